"""The one sampling-and-stopping driver, the typed result and the deprecated spellings of the old ones."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kpflow.estimators import (
    Estimate,
    History,
    alignment,
    effective_rank,
    factor_alignment,
    hutchinson_trace,
    hutchpp_trace,
    onesided_statistics,
    xnystrace,
    xtrace,
)
from kpflow.estimators.probes import ProbeSource
from kpflow.estimators.sampling import PerProbe, sample
from kpflow.operators import DenseOperator

DT = torch.float64


def _psd(n, seed=0, decay=1.0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return U * torch.arange(1, n + 1, dtype=DT) ** -decay @ U.T


def _general(n, m, seed=1):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=DT)


class _Recording:
    """An executor that runs the blocks here but records them (the hook a distributed executor uses)."""

    def __init__(self):
        self.blocks = []

    def map(self, fn, blocks):
        blocks = list(blocks)
        self.blocks += blocks
        return [fn(b) for b in blocks]


A = DenseOperator(_psd(120), is_psd=True)
J = DenseOperator(_general(90, 40))


@pytest.mark.parametrize("run", [
    lambda c, ex: hutchinson_trace(A, 50, seed=3, chunk_size=c, executor=ex),
    lambda c, ex: hutchpp_trace(A, 48, seed=3, chunk_size=c, executor=ex),
    lambda c, ex: xnystrace(A, 40, seed=3, chunk_size=c, executor=ex),
    lambda c, ex: xtrace(A, 40, seed=3, chunk_size=c, executor=ex),
    lambda c, ex: onesided_statistics(J, 30, seed=3, chunk_size=c, executor=ex).frobenius_sq,
    lambda c, ex: alignment(A, DenseOperator(_psd(120, seed=1)), 60, seed=3, chunk_size=c, executor=ex),
    lambda c, ex: factor_alignment(J, DenseOperator(_general(90, 30, seed=2)), 80, seed=3, chunk_size=c, executor=ex),
])
def test_estimates_do_not_depend_on_blocking_or_where_blocks_run(run):
    """Probe i has its own generator, so chunking and a (here threaded) executor change nothing but the
    order of floating-point additions in the sketches."""
    ref = run(64, None)
    for chunk in (1, 7):
        assert run(chunk, None).value == pytest.approx(ref.value, rel=1e-9, abs=1e-12)
    with ThreadPoolExecutor(2) as pool:
        assert run(5, pool).value == pytest.approx(ref.value, rel=1e-9, abs=1e-12)
    rec = _Recording()
    assert run(8, rec).value == pytest.approx(ref.value, rel=1e-9, abs=1e-12)
    starts = [b[0] for b in rec.blocks]
    assert starts == sorted(starts) and len(rec.blocks) >= 2 and max(b[1] for b in rec.blocks) <= 8


def test_driver_stops_at_rtol_and_reports_its_rounds():
    """A mean estimator against its exact value: the driver stops at the first round whose standard error
    meets rtol, and the probes it used are exactly the first ones of the stream."""
    src = ProbeSource(0, A.shape_in, DT, "cpu", "rademacher")
    forms = PerProbe(lambda V: (V * A.matmat(V)).flatten(1).sum(1), "A")
    run = sample(forms, src, 10_000, chunk_size=16, rtol=0.02)
    s = forms.samples[:, 0]
    assert run.stopped_early and run.num_probes == s.size < 10_000 and run.num_probes % 16 == 0
    se = s.std(ddof=1) / math.sqrt(s.size)
    assert run.stderr == pytest.approx(se) and se <= 0.02 * abs(run.value)
    prev = s[:-16]
    assert prev.std(ddof=1) / math.sqrt(prev.size) > 0.02 * abs(prev.mean()) or prev.size < 10
    V = ProbeSource(0, A.shape_in, DT, "cpu", "rademacher").draw(s.size)
    assert np.allclose(s, (V * A.matmat(V)).flatten(1).sum(1).numpy(), rtol=1e-13)
    truth = float(torch.trace(A.matrix))
    assert abs(run.value - truth) <= 4 * run.stderr
    with pytest.raises(ValueError, match="schedule"):
        sample(forms, src, 4, chunk_size=2, schedule="halving")


def test_typed_result_fields():
    est = hutchinson_trace(A, 30, seed=0, chunk_size=8)
    assert est.num_matvecs == est.num_probes == 30 and est.distribution == "rademacher" and not est.exact
    assert isinstance(est.history, History) and len(est.history) == 30
    x = xtrace(A, 40, seed=0)
    assert x.num_matvecs == 40 and x.num_probes == 20 and x.history.num_matvecs[-1] == 40
    h = hutchpp_trace(A, 30, seed=0)
    assert h.num_matvecs == 30 and h.num_probes == 20 and h.details["sketch_size"] == 10
    er = effective_rank(A, 60, seed=0)
    assert set(er.parts) == {"trace", "frobenius_sq"} and all(isinstance(p, Estimate) for p in er.parts.values())
    assert er.num_matvecs == er.parts["trace"].num_matvecs + er.parts["frobenius_sq"].num_matvecs
    al = alignment(A, A, 40, seed=0)
    assert al.num_matvecs == 40 and al.num_probes == 20 and al.history.num_matvecs[-1] == 40
    assert not any(isinstance(v, Estimate) for e in (est, x, h, er, al) for v in e.details.values())
    exact = hutchinson_trace(A, 200)
    assert exact.exact and exact.num_probes == 0 and exact.stderr == 0 and "budget" in exact.reason


def test_old_spellings_warn_and_mean_what_they_meant():
    B = DenseOperator(_psd(120, seed=1))
    with pytest.warns(DeprecationWarning, match=r"alignment\(num_probes=...\) is deprecated.*num_matvecs=60"):
        old = alignment(A, B, num_probes=30, seed=2)
    assert old.value == alignment(A, B, 60, seed=2).value and old.num_probes == 30
    with pytest.warns(DeprecationWarning, match="num_matvecs=120"):
        assert factor_alignment(J, J, num_probes=30, seed=1).num_probes == 30
    with pytest.warns(DeprecationWarning, match="onesided_statistics"):
        assert onesided_statistics(J, num_probes=12, seed=0).trace.num_matvecs == 12
    est = hutchinson_trace(A, 20, seed=0)
    with pytest.warns(DeprecationWarning, match="n_probes"):
        assert est.n_probes == 20
    with pytest.warns(DeprecationWarning, match="history.value"):
        assert np.array_equal(est.running_value, est.history.value)
    with pytest.warns(DeprecationWarning, match=r"Estimate\.info"):
        assert est.info["distribution"] == "rademacher"
    with pytest.warns(DeprecationWarning, match=r"Estimate\(info=...\)"):
        legacy = Estimate(1.0, 0.5, 3, "x", info={"exact": True, "trace": est, "k": 2, "auto_reason": "r"})
    assert legacy.exact and legacy.parts == {"trace": est} and legacy.details == {"k": 2} and legacy.reason == "r"
