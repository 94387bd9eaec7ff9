"""The transformer study's measurements and verdict rule (kpflow.experiments.transformer)."""

from __future__ import annotations

import torch

from kpflow.experiments.transformer import HIGH, LOW, erank, token_ntk, verdict
from kpflow.kernels import kronecker_core, ntk, record
from kpflow.models import Transformer
from kpflow.operators import view


def test_token_views_are_the_exact_temporal_compressions():
    torch.manual_seed(0)
    m = Transformer(3, 8, 2, 1, 8, 1, max_len=5, bias=False, dtype=torch.float64)
    traj = record(m, torch.randn(2, 5, 3, dtype=torch.float64))
    N = 10
    dense = view(ntk(traj), "temporal").to_dense().reshape(N, N)
    got = token_ntk(traj)
    assert float((got - dense).norm() / dense.norm()) < 1e-10
    core = kronecker_core(traj)
    kt = view(core.operator(), "temporal").to_dense().reshape(N, N)
    assert float((core.temporal_gram() - kt).norm() / kt.norm()) < 1e-10
    ev = torch.linalg.eigvalsh(dense)
    assert abs(erank(dense) - float(ev.sum() ** 2 / (ev ** 2).sum())) < 1e-9 * erank(dense)


def test_verdict_follows_the_fixed_criterion():
    def cells(fraction, se):
        return {(d, 50): {"ntk_token_fraction": (f, se)} for d, f in zip((1, 64, 512), fraction, strict=True)}

    assert verdict(cells((0.02, 0.1, LOW - 0.05), 0.01))[0] == "agree"
    assert verdict(cells((0.02, 0.1, HIGH + 0.1), 0.01))[0] == "disagree"
    assert verdict(cells((0.02, 0.1, 0.4), 0.01))[0] == "inconclusive"
    assert verdict(cells((0.02, 0.1, LOW - 0.01), 0.02))[0] == "inconclusive"  # within 2 SE of the line
