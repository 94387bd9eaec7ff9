"""The Hugging Face adapter (kpflow.models.hf) against independent float64 references.

References are the Hugging Face model's *own* forward pass (``functional_call`` of the HF module, not the
adapter), differentiated by ``torch.func.jacrev``: hidden-state NTK = J Jᵀ with J = ∂(hidden states)/∂θ,
logit NTK with the LM head held fixed, K = Jθ Jθᵀ from the autodiff parameter Jacobian of the joint state.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from torch.func import functional_call, jacrev  # noqa: E402

from kpflow.estimators import onesided_statistics  # noqa: E402
from kpflow.kernels import kronecker_core, ntk, output_ntk, param_jacobian, record  # noqa: E402
from kpflow.kernels.joint import SiteStateJacobian  # noqa: E402
from kpflow.models.hf import (  # noqa: E402
    ByteTokenizer,
    HFLanguageModel,
    build_lm,
    lm_config,
    load_lm,
    param_subset,
    tokenize,
)

FAMILIES = ["gpt2-tiny", "pythia-tiny", "llama-tiny"]
# LlamaRMSNorm normalises in float32 even for float64 inputs (Hugging Face's code); the adapter keeps float64,
# so the Llama references agree to float32 rounding only
TOL = {"gpt2-tiny": 1e-10, "pythia-tiny": 1e-10, "llama-tiny": 2e-5}


def _setup(preset, B=2, T=4, seed=0):
    hf = build_lm(preset, dtype=torch.float64, seed=seed)
    model = HFLanguageModel(hf)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.vocab_size, (B, T), generator=g)
    return hf, model, ids


def _hf_hidden(hf, model, ids, names):
    """Hidden states of the HF model itself as a function of the chosen parameters (head untied and fixed)."""
    fixed = dict(hf.named_parameters())

    def f(sub):
        out = functional_call(hf, {**fixed, **sub}, (ids,), {"output_hidden_states": True, "use_cache": False},
                              tie_weights=False)
        return torch.cat(out.hidden_states, -1), out.logits
    return f


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", FAMILIES)
def test_forward_matches_hugging_face(preset):
    hf, model, ids = _setup(preset)
    out = hf(ids, output_hidden_states=True, use_cache=False)
    z, logits = model(ids)
    assert z.shape == (2, 4, (model.n_layers + 1) * model.d_model)
    assert _rel(z, torch.cat(out.hidden_states, -1)) < TOL[preset]
    assert _rel(logits, out.logits) < TOL[preset]


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("path", ["parameters", "joint"])
def test_hidden_and_logit_ntk_against_jacrev(preset, path):
    hf, model, ids = _setup(preset)
    names = list(model.cell_params())
    primal = {n: p.detach() for n, p in model.cell_params().items()}
    f = _hf_hidden(hf, model, ids, names)
    jh = jacrev(lambda p: f(p)[0])(primal)
    jl = jacrev(lambda p: f(p)[1])(primal)
    Jh = torch.cat([jh[n].reshape(-1, primal[n].numel()) for n in names], 1)
    Jl = torch.cat([jl[n].reshape(-1, primal[n].numel()) for n in names], 1)
    traj = record(model, ids)
    theta = ntk(traj, backend="kronecker" if path == "joint" else "auto")
    assert theta.path == path
    assert _rel(theta.to_matrix(), Jh @ Jh.T) < TOL[preset]
    logit = output_ntk(traj, backend="kronecker" if path == "joint" else "auto")
    assert _rel(logit.to_matrix(), Jl @ Jl.T) < TOL[preset]


@pytest.mark.parametrize("preset", FAMILIES)
def test_kronecker_core_against_autodiff_k(preset):
    _, model, ids = _setup(preset)
    traj = record(model, ids)
    J = param_jacobian(traj, backend="autodiff").to_matrix()  # Jθ of the joint state by autodiff (frozen sites)
    K = J @ J.T
    core = kronecker_core(traj)
    assert abs(core.trace() - float(torch.trace(K))) < 1e-10 * float(torch.trace(K))
    assert abs(core.frobenius_norm() - float(K.norm())) < 1e-10 * float(K.norm())
    assert _rel(core.operator().to_matrix(), K) < 1e-10
    # the weight sites include every linear layer (GPT-2: Conv1D, stored transposed), embeddings and norms
    assert set(core.param_names) == set(model.cell_params())


def test_parameter_subset_by_pattern():
    hf, model, ids = _setup("gpt2-tiny")
    attn = param_subset(model, "*.attn.*")
    assert attn and all(".attn." in n for n in attn)
    primal = {n: model.cell_params()[n].detach() for n in attn}
    f = _hf_hidden(hf, model, ids, attn)
    j = jacrev(lambda p: f(p)[0])(primal)
    Jh = torch.cat([j[n].reshape(-1, primal[n].numel()) for n in attn], 1)
    traj = record(model, ids, param_names=attn)
    assert _rel(ntk(traj).to_matrix(), Jh @ Jh.T) < 1e-10
    core = kronecker_core(traj)
    Jt = param_jacobian(traj, backend="autodiff").to_matrix()
    assert abs(core.trace() - float((Jt ** 2).sum())) < 1e-10 * core.trace()
    with pytest.raises(ValueError, match="matches none"):
        param_subset(model, "*.nonexistent.*")


def test_onesided_trace_within_its_standard_error():
    _, model, ids = _setup("pythia-tiny")
    traj = record(model, ids)
    J = SiteStateJacobian(traj)
    exact = float((J.to_matrix() ** 2).sum())
    est = onesided_statistics(J, 60, side="reverse", seed=3).trace
    assert est.stderr > 0
    assert abs(est.value - exact) < 4 * est.stderr


def test_safetensors_round_trip(tmp_path):
    hf, model, ids = _setup("pythia-tiny")
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    again = HFLanguageModel(load_lm(tmp_path / "m", dtype=torch.float64))
    assert torch.equal(again(ids)[0], model(ids)[0])


# ----------------------------------------------------------------------------- bad input
def test_unsupported_architecture_is_named(tmp_path):
    supported = r"causal LM families \['gpt2', 'gpt_neox', 'llama'\].*masked LM families \['bert', 'roberta'\]"
    with pytest.raises(ValueError, match=r"unsupported architecture 'opt'.*" + supported):
        lm_config("opt")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "distilbert", "dim": 8}))
    with pytest.raises(ValueError, match=r"unsupported architecture 'distilbert'.*" + supported):
        build_lm(cfg)
    import transformers

    distil = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(dim=8, n_layers=1, n_heads=2,
                                                                              hidden_dim=8, vocab_size=10))
    with pytest.raises(ValueError, match="unsupported architecture 'distilbert'"):
        HFLanguageModel(distil)


def test_config_folder_without_weights(tmp_path):
    build_lm("gpt2-tiny").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights.*random initial weights"):
        load_lm(tmp_path)
    build_lm(tmp_path / "config.json")  # the config itself gives a randomly initialised model


def test_tokenizer_vocabulary_mismatch_and_long_sequences():
    _, model, ids = _setup("gpt2-tiny")
    with pytest.raises(ValueError, match=r"tokenizer has 256 tokens but the model's vocabulary has 13"):
        tokenize("hello world", ByteTokenizer(), model, 1, 4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 13\)"):
        record(model, torch.full((1, 3), 20))
    with pytest.raises(ValueError, match=r"9 tokens are longer than the model's 8 positions"):
        record(model, torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"integer token ids \[B, T\]"):
        record(model, torch.zeros(1, 3, 8, dtype=torch.float64))


def test_train_mode_with_dropout_is_refused():
    import transformers

    hf = transformers.GPT2LMHeadModel(lm_config("gpt2", n_embd=8, n_layer=1, n_head=2, vocab_size=13, n_positions=8,
                                                resid_pdrop=0.1)).double().train()
    with pytest.raises(ValueError, match=r"train mode with dropout.*eval"):
        record(HFLanguageModel(hf), torch.zeros(1, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------- the CLI
def test_cli_lm_stats(tmp_path):
    from typer.testing import CliRunner

    from kpflow.cli import app

    cfg = lm_config("gpt2", n_embd=8, n_layer=1, n_head=2, n_inner=16, vocab_size=256, n_positions=16)
    cfg.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("kpflow measures the operators of learning. " * 4)
    res = CliRunner().invoke(app, ["lm", "stats", str(tmp_path / "m" / "config.json"), "--text", str(text),
                                   "--batch", "2", "--tokens", "6", "--probes", "4", "--dtype", "float64"])
    assert res.exit_code == 0, res.output
    for key in ("hidden_trace", "hidden_fro", "hidden_erank", "logit_trace", "attn_mlp_alignment", "k_erank"):
        assert f"{key} = " in res.output
    assert "± " in res.output and "(exact)" in res.output
    bad = CliRunner().invoke(app, ["lm", "stats", str(tmp_path / "m"), "--text", str(text)])
    assert bad.exit_code == 2 and "no *.safetensors weights" in bad.output


# ----------------------------------------------------------------------------- masked LMs (BERT, RoBERTa)
MASKED = ["bert-tiny", "roberta-tiny"]


def _masked_setup(preset, seed=0):
    """Two sequences of 5 tokens, the second padded after 3 (pad id at padded positions), token types for BERT.

    Real ids avoid the pad id: Hugging Face's ``nn.Embedding(padding_idx=pad)`` gives the pad row no gradient (a
    training convention), the adapter differentiates every row.
    """
    from kpflow.models.hf import masked_inputs

    hf = build_lm(preset, dtype=torch.float64, seed=seed)
    model = HFLanguageModel(hf)
    pad = hf.config.pad_token_id
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, model.vocab_size - 1, (2, 5), generator=g)
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids[attn == 0] = pad
    ids[0, 1] = ids[1, 2] = model.mask_token_id
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]) if hf.config.type_vocab_size > 1 else None
    return hf, model, ids, attn, types, masked_inputs(ids, attn, types)


def _hf_masked(hf, ids, attn, types):
    """Hugging Face's own hidden states (zeroed at padding) and logits as a function of θ (head fixed)."""
    fixed = dict(hf.named_parameters())
    m = attn.to(torch.float64).unsqueeze(-1)

    def f(sub):
        out = functional_call(hf, {**fixed, **sub}, (), {"input_ids": ids, "attention_mask": attn,
                              "token_type_ids": types, "output_hidden_states": True}, tie_weights=False)
        return torch.cat(out.hidden_states, -1) * m, out.logits
    return f


@pytest.mark.parametrize("preset", MASKED)
@pytest.mark.parametrize("path", ["parameters", "joint"])
def test_masked_lm_ntks_against_jacrev(preset, path):
    from kpflow.experiments.language_model import logit_jacobian

    hf, model, ids, attn, types, x = _masked_setup(preset)
    z, logits = (t.detach() for t in model(x))
    f = _hf_masked(hf, ids, attn, types)
    names = list(model.cell_params())
    primal = {n: p.detach() for n, p in model.cell_params().items()}
    h_ref, l_ref = f(primal)
    assert _rel(z, h_ref) < 1e-12
    real = attn.bool()
    assert _rel(logits[real], l_ref[real]) < 1e-12
    jh = jacrev(lambda p: f(p)[0])(primal)
    jl = jacrev(lambda p: f(p)[1])(primal)
    Jh = torch.cat([jh[n].reshape(-1, primal[n].numel()) for n in names], 1)
    Jl = torch.cat([jl[n].reshape(*ids.shape, -1, primal[n].numel()) for n in names], -1)
    traj = record(model, x)
    theta = ntk(traj, backend="kronecker" if path == "joint" else "auto")
    assert theta.path == path
    assert _rel(theta.to_matrix(), Jh @ Jh.T) < 1e-10
    # logit NTK over all real positions and over the [MASK] positions only
    for positions, sel in (("all", real), ("masked", real & (ids == model.mask_token_id))):
        Js = (Jl * sel[..., None, None]).reshape(-1, Jl.shape[-1])
        CJ = logit_jacobian(traj, positions=positions).to_matrix()
        assert _rel(CJ @ CJ.T, Js @ Js.T) < 1e-10
    assert int(model.masked_positions(x).sum()) == 2
    logit = output_ntk(traj, backend="kronecker" if path == "joint" else "auto").to_matrix()
    Jr = (Jl * real[..., None, None]).reshape(-1, Jl.shape[-1])
    assert _rel(logit, Jr @ Jr.T) < 1e-10  # padded logits are constant: zero rows


@pytest.mark.parametrize("preset", MASKED)
def test_masked_lm_kronecker_core_against_autodiff_k(preset):
    _, model, ids, attn, types, x = _masked_setup(preset)
    traj = record(model, x)
    J = param_jacobian(traj, backend="autodiff").to_matrix()
    K = J @ J.T
    core = kronecker_core(traj)
    assert abs(core.trace() - float(torch.trace(K))) < 1e-10 * float(torch.trace(K))
    assert abs(core.frobenius_norm() - float(K.norm())) < 1e-10 * float(K.norm())
    assert _rel(core.operator().to_matrix(), K) < 1e-10
    # θ = the base model (word embeddings in their input use); the tied decoder is in the fixed readout
    assert set(core.param_names) == set(model.cell_params())
    assert not any(n.startswith(("cls.", "lm_head.")) for n in core.param_names)
    head = model.readout_params()
    emb = model.base.embeddings.word_embeddings.weight
    assert any(v is emb for v in head.values())  # the tie, read-only in C


@pytest.mark.parametrize("preset", MASKED)
def test_padding_is_respected(preset):
    """Changing the ids (and token types) at padded positions changes no state, NTK or K statistic."""
    from kpflow.models.hf import masked_inputs

    _, model, ids, attn, types, x = _masked_setup(preset)
    ids2 = ids.clone()
    ids2[1, 3:] = torch.tensor([5, 7])
    types2 = None if types is None else types.clone()
    if types2 is not None:
        types2[1, 3:] = 1
    x2 = masked_inputs(ids2, attn, types2)
    a, b = record(model, x), record(model, x2)
    assert torch.equal(model.hidden_states(x), model.hidden_states(x2))
    assert _rel(ntk(b).to_matrix(), ntk(a).to_matrix()) < 1e-12
    assert _rel(output_ntk(b).to_matrix(), output_ntk(a).to_matrix()) < 1e-12
    ka, kb = kronecker_core(a), kronecker_core(b)
    assert abs(ka.trace() - kb.trace()) < 1e-12 * ka.trace()
    assert abs(ka.frobenius_norm() - kb.frobenius_norm()) < 1e-12 * ka.frobenius_norm()
    # while a real token's id does change them
    ids3 = ids.clone()
    ids3[1, 0] = 4 if int(ids[1, 0]) != 4 else 5
    assert _rel(ntk(record(model, masked_inputs(ids3, attn, types))).to_matrix(), ntk(a).to_matrix()) > 1e-6


def test_masked_lm_bad_input():
    from kpflow.experiments.language_model import logit_jacobian
    from kpflow.models.hf import mask_tokens, masked_inputs

    _, model, ids, attn, types, x = _masked_setup("bert-tiny")
    with pytest.raises(ValueError, match=r"attention_mask must have the ids' shape \[B, T\] = \[2, 5\], got \(2, 4\)"):
        masked_inputs(ids, attn[:, :4])
    with pytest.raises(ValueError, match=r"token_type_ids must have the ids' shape"):
        masked_inputs(ids, attn, torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[B, T, 3\] \(ids, attention mask, token types"):
        record(model, torch.zeros(2, 5, 2, dtype=torch.int64))
    bad = x.clone()
    bad[0, 0, 1] = 2
    with pytest.raises(ValueError, match="attention mask must be 1 .* or 0"):
        record(model, bad)
    bad = x.clone()
    bad[1, :, 1] = 0
    with pytest.raises(ValueError, match="sequence 1 is all padding"):
        record(model, bad)
    bad = x.clone()
    bad[0, 0, 2] = 2
    with pytest.raises(ValueError, match=r"token-type ids must lie in \[0, 2\)"):
        record(model, bad)
    with pytest.raises(ValueError, match=r"9 tokens are longer than the model's 8 positions"):
        record(model, torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        logit_jacobian(record(model, masked_inputs(ids.clamp_max(model.vocab_size - 2), attn)), positions="masked")
    _, causal, cids = _setup("gpt2-tiny")
    with pytest.raises(ValueError, match="masked LMs only"):
        record(causal, masked_inputs(cids))
    with pytest.raises(ValueError, match="causal LM: it has no \\[MASK\\] positions"):
        logit_jacobian(record(causal, cids), positions="masked")
    with pytest.raises(ValueError, match="only masked LMs"):
        mask_tokens(cids, causal)
    with pytest.raises(ValueError, match="mask_token_id is for masked LMs"):
        HFLanguageModel(build_lm("gpt2-tiny"), mask_token_id=3)
    import transformers

    with pytest.raises(ValueError, match="no masked-LM head"):
        HFLanguageModel(transformers.BertModel(lm_config("bert", hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=8, vocab_size=10)))


def test_mask_tokens_is_seeded_and_skips_padding():
    from kpflow.models.hf import mask_tokens

    _, model, ids, attn, types, x = _masked_setup("bert-tiny")
    a, b = mask_tokens(x, model, 0.5, seed=3), mask_tokens(x, model, 0.5, seed=3)
    assert torch.equal(a, b)
    chosen = a[..., 0] == model.mask_token_id
    assert int(chosen[0].sum()) >= 3 and int(chosen[1].sum()) >= 2  # ceil(0.5 · 5), ceil(0.5 · 3), or already [MASK]
    assert not bool(chosen[attn == 0].any()) and torch.equal(a[..., 1:], x[..., 1:])


def test_masked_safetensors_round_trip(tmp_path):
    hf, model, ids, attn, types, x = _masked_setup("roberta-tiny")
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    again = HFLanguageModel(load_lm(tmp_path / "m", dtype=torch.float64))
    assert type(again.hf).__name__ == "RobertaForMaskedLM"
    assert torch.equal(again(x)[0], model(x)[0]) and torch.equal(again(x)[1], model(x)[1])


def test_cli_lm_stats_masked(tmp_path):
    from typer.testing import CliRunner

    from kpflow.cli import app

    cfg = lm_config("bert", hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    vocab_size=256, max_position_embeddings=16)
    cfg.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("kpflow measures the operators of learning. " * 4)
    args = ["lm", "stats", str(tmp_path / "m" / "config.json"), "--text", str(text), "--batch", "2", "--tokens", "6",
            "--probes", "4", "--dtype", "float64", "--mask-fraction", "0.3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 of them [MASK] (id 255)" in res.output  # ceil(0.3 · 6) = 2 per window
    for key in ("hidden_trace", "logit_trace", "attn_mlp_alignment", "k_erank"):
        assert f"{key} = " in res.output
    bad = CliRunner().invoke(app, args + ["--logit-positions", "first"])
    assert bad.exit_code == 2 and "positions must be one of" in bad.output


def test_lm_statistics_takes_the_one_budget_name_and_the_old_one_warns():
    # one name for the probe budget across the package (num_matvecs); num_probes= works for one release
    from kpflow.experiments.language_model import lm_statistics

    _, model, ids = _setup("gpt2-tiny")
    kw = dict(seed=3, alignment=False, logits=False, exact_k=False, progress=False)
    new = lm_statistics(model, ids, num_matvecs=6, **kw)
    with pytest.warns(DeprecationWarning, match="num_probes"):
        old = lm_statistics(model, ids, num_probes=6, **kw)
    assert new["hidden_trace"].value == old["hidden_trace"].value and new["hidden_trace"].num_matvecs == 6
    with pytest.raises(ValueError, match="num_matvecs must be >= 3"):
        lm_statistics(model, ids, num_matvecs=2, **kw)
