"""Estimators: exactness when the budget covers the dimension, accepted inputs, bad input, reproducibility.

Every reference is an explicit float64 matrix computed independently of the estimators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from kpflow.estimators import (
    BudgetError,
    Estimate,
    NonFiniteError,
    alignment,
    axis_effective_rank,
    centered_alignment,
    effective_rank,
    exact_onesided_trace,
    exact_trace,
    factor_alignment,
    frobenius_norm,
    frobenius_norm_sq,
    hutchinson_trace,
    hutchpp_trace,
    modes_for_variance,
    onesided_statistics,
    spectral_density,
    top_eigenpairs,
    top_singular_triplets,
    trace,
    xnystrace,
    xtrace,
)
from kpflow.estimators.norms import ratio_erank, sqrt_estimate
from kpflow.estimators.probes import ProbeSource
from kpflow.operators import DenseOperator, FunctionOperator, ShapeError

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny dense products: one thread avoids oversubscription on shared 2-core runners."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _psd(n, seed=0, decay=1.0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam = torch.arange(1, n + 1, dtype=DT) ** -decay
    return U * lam @ U.T


def _general(n, seed=1, m=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n if m is None else m, n, generator=g, dtype=DT)


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("fn", [hutchinson_trace, hutchpp_trace, xtrace, xnystrace])
def test_trace_exact_when_budget_covers_dimension(fn):
    M = _psd(30)
    est = fn(DenseOperator(M, is_psd=True), 30, seed=0)
    assert est.exact and est.stderr == 0
    assert est.value == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert float(est) == est.value


def test_exact_trace_general_structured_operator():
    M = _general(24)
    A = DenseOperator(M, shape_in=(2, 3, 4), shape_out=(2, 3, 4))
    est = exact_trace(A, chunk_size=5)
    assert est.value == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert est.num_matvecs == 24


def test_auto_picks_and_says_why():
    M = _psd(40)
    est = trace(DenseOperator(M, is_psd=True), 40)
    assert est.method == "exact" and "budget" in est.reason
    assert est.value == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert trace(DenseOperator(M, is_psd=True), 20, seed=0).method == "xnystrace"
    assert trace(DenseOperator(_general(40)), 20, seed=0).method == "xtrace"
    assert trace(DenseOperator(_general(40)), 3, seed=0).method == "hutchinson"
    unflagged = trace(DenseOperator(M), 20, seed=0, assume_psd=True)
    assert unflagged.method == "xnystrace" and "assumed" in unflagged.reason


@pytest.mark.parametrize("side", ["forward", "reverse"])
def test_onesided_exact(side):
    J = _general(12, m=20)  # J: R^12 -> R^20, A = J Jᵀ on R^20
    A = J @ J.T
    d = 12 if side == "forward" else 20
    st = onesided_statistics(DenseOperator(J), d, side=side)
    tr, f2 = float(torch.trace(A)), float((A * A).sum())
    assert st.trace.exact and st.trace.value == pytest.approx(tr, rel=1e-12)
    assert st.frobenius_sq.value == pytest.approx(f2, rel=1e-12)
    assert st.effective_rank.value == pytest.approx(tr**2 / f2, rel=1e-12)
    assert exact_onesided_trace(DenseOperator(J), side=side).value == pytest.approx(tr, rel=1e-12)


def test_onesided_auto_side_is_smaller_space():
    J = DenseOperator(_general(12, m=20))
    assert onesided_statistics(J, 5, seed=0).trace.details["side"] == "forward"
    assert onesided_statistics(DenseOperator(_general(20, m=12)), 5, seed=0).trace.details["side"] == "reverse"


@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutchpp", "xtrace", "xnystrace", "auto"])
def test_frobenius_exact_when_budget_covers(method):
    M = _general(15, m=25)
    A = DenseOperator(M)
    budget = 2 * 25 if method != "hutchinson" else 15  # a Gram probe costs two matvecs
    est = frobenius_norm_sq(A, budget, method=method, seed=0)
    assert est.value == pytest.approx(float((M * M).sum()), rel=1e-10)
    assert frobenius_norm(A, budget, method=method, seed=0).value == pytest.approx(float(M.norm()), rel=1e-10)


def test_effective_rank_exact():
    M = _psd(20, decay=0.7)
    est = effective_rank(DenseOperator(M, is_psd=True), 40)
    assert est.exact and est.value == pytest.approx(float(torch.trace(M) ** 2 / (M * M).sum()), rel=1e-10)


def test_alignment_exact_and_centered():
    A, B = _psd(18, seed=0), _psd(18, seed=1, decay=0.5)
    cos = float((A * B).sum() / (A.norm() * B.norm()))
    est = alignment(DenseOperator(A), DenseOperator(B), 36)  # 18 probes, 2 matvecs each
    assert est.exact and est.value == pytest.approx(cos, rel=1e-12)
    C = torch.eye(18, dtype=DT) - 1.0 / 18
    Ac, Bc = C @ A @ C, C @ B @ C
    cen = centered_alignment(DenseOperator(A), DenseOperator(B), 36)
    assert cen.value == pytest.approx(float((Ac * Bc).sum() / (Ac.norm() * Bc.norm())), rel=1e-12)


def test_centered_alignment_along_one_axis():
    A, B = _psd(12, seed=2), _psd(12, seed=3)
    shape = (3, 4)
    Ao, Bo = DenseOperator(A, shape, shape), DenseOperator(B, shape, shape)
    # centring over axis 0 of a (3, 4) tensor: C = (I₃ − 11ᵀ/3) ⊗ I₄
    C = torch.kron(torch.eye(3, dtype=DT) - 1.0 / 3, torch.eye(4, dtype=DT))
    Ac, Bc = C @ A @ C, C @ B @ C
    est = centered_alignment(Ao, Bo, 24, axes=0)
    assert est.value == pytest.approx(float((Ac * Bc).sum() / (Ac.norm() * Bc.norm())), rel=1e-12)


def test_factor_alignment_exact():
    J1, J2 = _general(7, seed=4, m=10), _general(9, seed=5, m=10)  # different parameter counts
    A, B = J1 @ J1.T, J2 @ J2.T
    est = factor_alignment(DenseOperator(J1), DenseOperator(J2), 40)  # 10 probe pairs, 4 VJPs each
    assert est.value == pytest.approx(float((A * B).sum() / (A.norm() * B.norm())), rel=1e-12)


def test_axis_effective_rank_matches_dense_compression():
    Bn, T, H = 2, 5, 4
    n = Bn * T * H
    g = torch.Generator().manual_seed(7)
    Jm = torch.randn(n, 6, generator=g, dtype=DT)
    M = Jm @ Jm.T
    A = DenseOperator(M, (Bn, T, H), (Bn, T, H), is_psd=True)
    M6 = M.reshape(Bn, T, H, Bn, T, H)
    refs = {
        "temporal": M6.sum(dim=(2, 5)).reshape(Bn * T, Bn * T),
        "spatial": M6.sum(dim=(0, 1, 3, 4)),
        "trial": M6.sum(dim=(1, 2, 4, 5)),
    }
    for name, C in refs.items():
        want = float(torch.trace(C) ** 2 / (C * C).sum())
        est = axis_effective_rank(A, name, 2 * C.shape[0])
        assert est.value == pytest.approx(want, rel=1e-10), name
    # keep-axes form on the same operator
    est = axis_effective_rank(A, (0, 1), 2 * Bn * T)
    C = refs["temporal"]
    assert est.value == pytest.approx(float(torch.trace(C) ** 2 / (C * C).sum()), rel=1e-10)


# ------------------------------------------------------------------------------------------- inputs
def test_accepts_tensor_numpy_scipy_and_operator_alike():
    M = _psd(50)
    inputs = [DenseOperator(M), M, M.numpy(), spla.aslinearoperator(M.numpy())]
    vals = [hutchinson_trace(x, 20, seed=3).value for x in inputs]
    assert np.allclose(vals, vals[0], rtol=1e-12)
    vals = [xtrace(x, 20, seed=3).value for x in inputs]
    assert np.allclose(vals, vals[0], rtol=1e-10)


def test_seed_and_generator_reproducible_and_chunk_invariant():
    A = DenseOperator(_psd(80), is_psd=True)
    a = hutchinson_trace(A, 50, seed=11, chunk_size=7)
    b = hutchinson_trace(A, 50, seed=11, chunk_size=50)
    assert a.value == b.value and a.seed == 11
    for dist in ("gaussian", "sphere"):
        vals = [hutchinson_trace(A, 40, seed=1, chunk_size=c, distribution=dist).value for c in (1, 7, 64)]
        assert vals[0] == pytest.approx(vals[1], rel=1e-12) and vals[0] == pytest.approx(vals[2], rel=1e-12)
    J = DenseOperator(_psd(80)[:, :30])
    f = [onesided_statistics(J, 24, side="reverse", seed=3, chunk_size=c).frobenius_sq.value for c in (1, 5, 64)]
    assert f[0] == pytest.approx(f[1], rel=1e-12) and f[0] == pytest.approx(f[2], rel=1e-12)
    # an rtol that is never reached must not change the estimate (probes drawn in rounds)
    assert xnystrace(A, 40, seed=1).value == pytest.approx(xnystrace(A, 40, seed=1, rtol=1e-12).value, rel=1e-12)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert xnystrace(A, 30, seed=g1).value == xnystrace(A, 30, seed=g2).value
    assert xnystrace(A, 30, seed=g1).value != xnystrace(A, 30, seed=g2.manual_seed(6)).value


def test_result_object_history_and_float():
    A = DenseOperator(_psd(200), is_psd=True)
    est = hutchinson_trace(A, 40, seed=0)
    assert isinstance(est, Estimate)
    h = est.history
    assert len(h) == 40 and h.num_matvecs[-1] == 40 and h.value[-1] == est.value
    assert math.isnan(h.stderr[0]) and h.stderr[-1] == est.stderr
    # running value equals the mean of the first k samples: recompute for k = 10 by hand
    v = ProbeSource(0, (200,), DT, "cpu", "rademacher").draw(40)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    q = (v * (v @ A.matrix.T)).sum(1)
    assert est.history.value[9] == pytest.approx(float(q[:10].mean()), rel=1e-12)
    for fn in (hutchpp_trace, xtrace, xnystrace):
        e = fn(A, 60, seed=0)
        assert e.history.num_matvecs[-1] == e.num_matvecs == 60 and e.history.value[-1] == pytest.approx(e.value)
        assert len(e.history) > 3 and np.all(np.diff(e.history.num_matvecs) > 0)


def test_rtol_stops_early():
    A = DenseOperator(torch.eye(300, dtype=DT) + 0.01 * _psd(300), is_psd=True)
    est = hutchinson_trace(A, 2000, seed=0, rtol=0.05)
    assert est.num_matvecs < 2000 and est.stopped_early and est.relative_stderr <= 0.05
    est2 = xnystrace(DenseOperator(_psd(300, decay=2.0), is_psd=True), 200, seed=0, rtol=1e-3)
    assert est2.num_matvecs < 200 and est2.relative_stderr <= 1e-3
    est3 = xtrace(DenseOperator(_psd(300, decay=2.0)), 200, seed=0, rtol=1e-3)
    assert est3.num_matvecs < 200 and est3.relative_stderr <= 1e-3
    st = onesided_statistics(DenseOperator(_general(300, m=40)), 1000, seed=0, rtol=0.05)
    assert st.trace.num_matvecs < 1000 and st.trace.relative_stderr <= 0.05


def test_xtrace_low_rank_operator_is_exact():
    g = torch.Generator().manual_seed(0)
    Jm = torch.randn(100, 5, generator=g, dtype=DT)
    est = xtrace(DenseOperator(Jm @ Jm.T), 20, seed=0)
    assert est.exact and est.details["rank_deficient"] == 5
    assert est.value == pytest.approx(float((Jm * Jm).sum()), rel=1e-10)


def test_float32_operator():
    M = _psd(100).float()
    est = xnystrace(DenseOperator(M, is_psd=True), 40, seed=0)
    assert abs(est.value - float(torch.trace(M.double()))) < 5 * est.stderr + 1e-4


# ---------------------------------------------------------------------------------------- bad input
def test_budget_too_small_errors():
    A = DenseOperator(_psd(50), is_psd=True)
    with pytest.raises(BudgetError, match="hutchpp_trace needs at least 3 matvecs"):
        hutchpp_trace(A, 2)
    with pytest.raises(BudgetError, match="xtrace needs at least 4"):
        xtrace(A, 3)
    with pytest.raises(BudgetError, match="at least 2"):
        hutchinson_trace(A, 1)
    with pytest.raises(TypeError, match="integer"):
        hutchinson_trace(A, 10.5)
    with pytest.raises(BudgetError, match="max_matvecs"):
        exact_trace(A, max_matvecs=10)


def test_non_square_trace_errors():
    A = DenseOperator(_general(5, m=7))
    for fn in (trace, hutchinson_trace, hutchpp_trace, xtrace, exact_trace):
        with pytest.raises(ShapeError, match="square operator"):
            fn(A)


def test_alignment_shape_mismatch_errors():
    with pytest.raises(ShapeError, match="same shapes"):
        alignment(DenseOperator(_psd(5)), DenseOperator(_psd(6)))
    with pytest.raises(ShapeError, match="same output shape"):
        factor_alignment(DenseOperator(_general(3, m=5)), DenseOperator(_general(3, m=6)))


def test_xnystrace_requires_psd_flag():
    with pytest.raises(ValueError, match="positive semi-definite"):
        xnystrace(DenseOperator(_general(20)), 10)
    assert math.isfinite(xnystrace(DenseOperator(_psd(20)), 10, seed=0, assume_psd=True).value)


def test_non_finite_output_names_the_probe():
    n = 30

    def mv(X):
        Y = X.clone()
        Y[13] = float("nan")  # probe #13 of a chunk-less run
        return Y

    A = FunctionOperator(mv, mv, (n,), (n,), DT, batched=True, is_self_adjoint=True)
    with pytest.raises(NonFiniteError, match="probe #13"):
        hutchinson_trace(A, 20, seed=0, chunk_size=20)
    with pytest.raises(NonFiniteError, match="probe #13"):
        exact_trace(A, chunk_size=30)


def test_unknown_method_and_distribution():
    A = DenseOperator(_psd(10))
    with pytest.raises(ValueError, match="valid methods"):
        trace(A, 5, method="magic")
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(A, 5, distribution="cauchy")


def test_negative_frobenius_estimate_is_reported_not_clamped():
    # The one-sided forms are non-negative by construction; unbiased combinations from other sources
    # (e.g. a difference of estimates) can be negative. The reporting path must keep the value.
    neg = Estimate(-0.5, 0.3, 20, "hutchinson", 0)
    tr = Estimate(10.0, 0.1, 20, "hutchinson", 0)
    with pytest.warns(RuntimeWarning, match="not clamped"):
        er = ratio_erank(tr, neg)
    assert math.isnan(er.value) and er.parts["frobenius_sq"].value == -0.5
    root = sqrt_estimate(neg)
    assert math.isnan(root.value) and root.parts["square"].value == -0.5 and "negative" in root.note


def test_onesided_fro_forms_nonnegative_and_rademacher_not_identifiable():
    J = DenseOperator(_general(40, m=30))
    for seed in range(30):
        for dist in ("gaussian", "sphere"):
            assert onesided_statistics(J, 3, distribution=dist, seed=seed).frobenius_sq.value >= 0
    st = onesided_statistics(J, 10, distribution="rademacher", seed=0)
    assert math.isnan(st.frobenius_sq.value) and "Rademacher" in st.frobenius_sq.note


# ----------------------------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_top_eigenpairs_match_eigh(method):
    M = _psd(120, decay=1.5)
    w, V = torch.linalg.eigh(M)
    res = top_eigenpairs(DenseOperator(M, is_psd=True), 5, method=method, seed=0)
    assert torch.allclose(res.values, w.flip(0)[:5], rtol=1e-6)
    overlap = (res.vectors @ V[:, -5:].flip(1)).abs().diagonal()
    assert torch.all(overlap > 1 - 1e-5) and torch.all(res.residuals < 1e-4)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_top_singular_triplets_match_svd(method):
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=DT))
    Vq, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))
    s = 2.0 ** -torch.arange(30, dtype=DT)
    M = U[:, :30] * s @ Vq.T  # 60 x 30
    res = top_singular_triplets(DenseOperator(M), 4, method=method, seed=0)
    assert torch.allclose(res.values, s[:4], rtol=1e-8)
    assert torch.all(res.residuals < 1e-8)
    assert torch.allclose((res.left_vectors * (res.vectors @ M.T)).sum(1), s[:4], rtol=1e-8)


def test_top_eigenpairs_requires_self_adjoint():
    with pytest.raises(ValueError, match="self-adjoint"):
        top_eigenpairs(DenseOperator(_general(20)), 3)


def test_spectral_density_quadrature():
    lam = torch.linspace(0.1, 2.0, 150, dtype=DT)
    U = torch.linalg.qr(torch.randn(150, 150, generator=torch.Generator().manual_seed(0), dtype=DT)).Q
    A = DenseOperator(U * lam @ U.T, is_psd=True)
    sd = spectral_density(A, num_probes=8, lanczos_steps=30, seed=0)
    # per probe, Gauss quadrature with 30 nodes is exact for x and x² (degree ≤ 59): trace of A is the
    # Rademacher Hutchinson estimate with the same probes, which is within its error of the truth
    t = sd.integrate(lambda x: x)
    assert abs(t.value - float(lam.sum())) <= 3 * t.stderr
    sq = sd.integrate(lambda x: x**2)
    assert abs(sq.value - float((lam**2).sum())) <= 3 * sq.stderr
    assert torch.allclose(sd.weights.sum(1), torch.ones(8, dtype=DT))
    grid = torch.linspace(-0.5, 2.6, 2000, dtype=DT)
    mass = float(torch.trapezoid(sd.density(grid, sigma=0.05), grid))
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_modes_for_variance_dense_and_iterative(monkeypatch):
    import kpflow.estimators.spectrum as spectrum

    n = 300
    lam = torch.arange(1, n + 1, dtype=DT) ** -2.0
    U = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=DT)).Q
    A = DenseOperator(U * lam @ U.T, is_psd=True)
    want = int(torch.searchsorted(torch.cumsum(lam, 0), 0.95 * lam.sum())) + 1
    assert modes_for_variance(A, 0.95).value == want
    monkeypatch.setattr(spectrum, "DENSE_EIG_LIMIT", 10)  # force the matrix-free path
    est = modes_for_variance(A, 0.95, num_matvecs=300, seed=0)
    assert est.value == want and est.num_matvecs > 0



def test_onesided_effective_rank_stays_in_its_feasible_range():
    # rank-one J J*: erank is exactly 1; with few probes the plain ratio tr²/‖A‖_F² often falls below 1
    u = torch.randn(40, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    J = DenseOperator(u @ torch.randn(1, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    clipped = 0
    for seed in range(40):
        er = onesided_statistics(J, 4, side="reverse", seed=seed).effective_rank
        assert 1.0 <= er.value <= 30, (seed, er.value)
        clipped += "erank_clipped_from" in er.details
    assert clipped > 0  # the guard was exercised, not only the already-feasible path


def test_integer_matrices_are_cast_with_a_warning_and_integer_operators_refused():
    """An integer matrix used to give biased traces silently (its real probes were truncated)."""
    from kpflow.estimators import hutchpp_trace, onesided_trace, trace, xtrace
    from kpflow.operators import FunctionOperator

    M = torch.diag(torch.arange(1, 21))  # int64, trace 210
    Mf = M.to(torch.float64)
    for fn in (trace, xtrace, hutchpp_trace):
        with pytest.warns(UserWarning, match="dtype torch.int64; it is cast to float64"):
            got = fn(M, 12, seed=4)
        assert got.value == fn(Mf, 12, seed=4).value
    with pytest.warns(UserWarning, match="cast to float64"):
        assert onesided_trace(M.numpy(), 8, seed=1).value == onesided_trace(Mf, 8, seed=1).value
    op = FunctionOperator(lambda v: 2 * v, None, (5,), (5,), torch.int64, is_self_adjoint=True)
    with pytest.raises(TypeError, match="integer dtype torch.int64.*floating dtype"):
        trace(op, 3, seed=0)
