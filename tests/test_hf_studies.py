"""The language-model studies (claims lm_rich_lazy, lm_ntk_distillation): their pieces and verdicts."""

import pytest
import torch

pytest.importorskip("transformers")

from kpflow.experiments.claims.language_model import (  # noqa: E402
    CharTokenizer,
    _sketched_ntk,
    generated_corpus,
)
from kpflow.kernels import ntk, record  # noqa: E402
from kpflow.models.hf import HFLanguageModel, build_lm  # noqa: E402


def test_sketched_ntk_is_r_theta_rt():
    hf = build_lm("gpt2-tiny", dtype=torch.float64, seed=3)
    model = HFLanguageModel(hf)
    x = torch.randint(0, model.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    theta = ntk(record(model, x)).to_matrix()
    R = torch.randn(5, 2, 4, model.state_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Rf = R.reshape(5, -1)
    got = _sketched_ntk(hf, x, R, create_graph=False)
    assert torch.allclose(got, Rf @ theta @ Rf.T, rtol=1e-10, atol=0)


def test_generated_corpus_and_tokenizer():
    text = generated_corpus(20, seed=0)
    assert text == generated_corpus(20, seed=0) and text != generated_corpus(20, seed=1)
    tok = CharTokenizer(text)
    assert len(tok) < 40 and len(tok.encode(text)) == len(text)
