"""Trace estimators for square operators applied matrix-free.

All functions take a kpflow ``LinearOperator`` (or a torch/numpy matrix, or a scipy
``LinearOperator``), a budget ``num_matvecs`` of operator applications, and a ``seed`` (int or
``torch.Generator``). Probes are applied ``chunk_size`` at a time. Each returns an ``Estimate`` with
a standard error and the running estimate by probe count. When the budget reaches the dimension,
the randomized methods switch to the exact trace (``info['exact'] = True``), which costs the same.

Methods:
    hutchinson_trace  tr(A) ≈ mean(vᵀAv)                               Hutchinson (1989)
    hutchpp_trace     exact on a sketch of range(A), Hutchinson on rest  Meyer, Musco, Musco, Woodruff (2021)
    xtrace            exchangeable leave-one-out Hutch++                Epperly, Tropp, Webber (2024)
    xnystrace         XTrace with a Nyström sketch, for PSD A          Epperly, Tropp, Webber (2024)
    exact_trace       Σ eᵢᵀ A eᵢ over the basis, chunked, guarded
    trace             method="auto": exact / XNysTrace / XTrace / Hutchinson, and says which
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .probes import (
    DEFAULT_CHUNK,
    MIN_PROBES_FOR_RTOL,
    BudgetError,
    ProbeSource,
    apply_chunked,
    basis_chunks,
    check_budget,
    check_chunk,
    check_finite,
    check_rtol,
    flat_dot,
    running_mean,
    square_operator,
)
from .result import Estimate, History, exact_estimate
from .sampling import Executor, PerProbe, sample

#: Largest number of matvecs ``exact_trace`` spends unless told otherwise.
EXACT_MATVEC_LIMIT = 50_000


# ------------------------------------------------------------------------------------------------ helpers
def _rows(A, V: torch.Tensor, chunk: int, what: str, first: int = 0) -> torch.Tensor:
    """Apply ``A`` to the rows of ``V`` ([k, n] flat probes) -> [k, n] float64 outputs."""
    k = V.shape[0]
    Y = apply_chunked(A.matmat, V.to(A.dtype).reshape(k, *A.shape_in), chunk, what, first)
    return Y.reshape(k, -1).to(torch.float64)


def _flat(V: torch.Tensor) -> torch.Tensor:
    return V.reshape(V.shape[0], -1).to(torch.float64)


def _covers(m: int, n: int) -> bool:
    return m >= n


def _exact_instead(A, method: str, chunk_size: int, m: int) -> Estimate:
    est = exact_trace(A, chunk_size=chunk_size, max_matvecs=max(m, A.size_in))
    est.details["requested"] = method
    est.reason = f"budget {m} >= dimension {A.size_in}: exact trace"
    return est


# ------------------------------------------------------------------------------------------------- exact
def exact_trace(A, *, chunk_size: int = DEFAULT_CHUNK, max_matvecs: int = EXACT_MATVEC_LIMIT,
                progress: bool = False) -> Estimate:
    """tr(A) = Σᵢ eᵢᵀ A eᵢ over the standard basis, ``chunk_size`` basis vectors per call.

    Args:
        A: square operator.
        chunk_size: basis vectors per batched application.
        max_matvecs: refuse when the dimension (one matvec per basis vector) exceeds it.
        progress: show a progress bar.

    Returns:
        The exact ``Estimate`` (``stderr = 0``).

    Raises:
        BudgetError: the dimension exceeds ``max_matvecs``.
        ShapeError: A is not square.
        NonFiniteError: the operator returned NaN/Inf.
    """
    A = square_operator(A, "exact_trace")
    chunk = check_chunk(chunk_size)
    n = A.size_in
    if n > max_matvecs:
        raise BudgetError(
            f"exact_trace of {A!r} needs {n:,} matvecs (one per basis vector), above max_matvecs="
            f"{max_matvecs:,}. Raise max_matvecs if you mean it, or use a randomized estimator "
            "(kpflow.estimators.trace(A, num_matvecs=...))."
        )
    total = torch.zeros((), dtype=torch.float64)
    chunks = tqdm(basis_chunks(A.shape_in, A.dtype, A.device, chunk), total=-(-n // chunk), disable=not progress,
                  desc=f"exact trace over {n:,} basis vectors", leave=False)
    for start, E in chunks:
        Y = check_finite(A.matmat(E), start, "exact_trace: the operator")
        k = E.shape[0]
        idx = torch.arange(start, start + k, device=Y.device)
        total = total + Y.reshape(k, -1)[torch.arange(k, device=Y.device), idx].to(torch.float64).sum().cpu()
    return exact_estimate(float(total), n, "exact")


# --------------------------------------------------------------------------------------------- hutchinson
def _quadratic_forms(A, what: str, project=None) -> PerProbe:
    """The integrand ``vᵀAv`` (``v`` optionally projected by ``project``)."""

    def forms(V):
        if project is not None:
            V = project(V)
        return flat_dot(V, A.matmat(V.to(A.dtype)))

    return PerProbe(forms, f"{what}: the operator")


def hutchinson_trace(A, num_matvecs: int = 100, *, distribution: str = "rademacher", seed=None,
                     chunk_size: int = DEFAULT_CHUNK, rtol: float | None = None,
                     executor: Executor | None = None) -> Estimate:
    """Hutchinson: tr(A) ≈ (1/m) Σ vᵢᵀ A vᵢ with E[v vᵀ] = I (Hutchinson 1989).

    Standard error: sample standard deviation / √m. With ``rtol``, stops once the relative standard
    error falls below it (after at least 10 probes); ``num_matvecs`` is then the cap.

    Args:
        A: square operator (kpflow, torch/numpy matrix or scipy LinearOperator).
        num_matvecs: budget of applications of A (one per probe), at least 2.
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error to stop at, or None to spend the budget.
        executor: runs probe blocks elsewhere (see ``kpflow.estimators.sampling``).

    Returns:
        The ``Estimate`` (exact when the budget covers the dimension and ``rtol`` is None).

    Raises:
        BudgetError: fewer than 2 matvecs.
        ShapeError: A is not square.
        NonFiniteError: the operator returned NaN/Inf.
    """
    A = square_operator(A, "hutchinson_trace")
    m = check_budget(num_matvecs, 2, "hutchinson_trace", "Two probes are the least that give a standard error.")
    chunk, rtol = check_chunk(chunk_size), check_rtol(rtol)
    if _covers(m, A.size_in) and rtol is None:
        return _exact_instead(A, "hutchinson", chunk, m)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)
    forms = _quadratic_forms(A, "hutchinson_trace")
    run = sample(forms, src, m, chunk_size=chunk, rtol=rtol, executor=executor)
    mean, se = running_mean(forms.samples[:, 0])
    n = np.arange(1, run.num_probes + 1)
    return Estimate(float(mean[-1]), float(se[-1]), run.num_probes, "hutchinson", src.seed,
                    num_probes=run.num_probes, history=History(n, mean, se), distribution=distribution,
                    stopped_early=run.stopped_early)


# ----------------------------------------------------------------------------------------------- hutch++
def hutchpp_trace(A, num_matvecs: int = 99, *, distribution: str = "rademacher", seed=None,
                  chunk_size: int = DEFAULT_CHUNK, rtol: float | None = None,
                  executor: Executor | None = None) -> Estimate:
    """Hutch++: tr(A) = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ)), Q = orth(A S), the second term by Hutchinson.

    Meyer, Musco, Musco & Woodruff 2021. Budget split: m/3 sketch, m/3 on QᵀAQ, m/3 Hutchinson.

    Standard error: that of the Hutchinson part (conditionally on Q the estimate is unbiased, so
    this is the whole variance). ``rtol`` stops the Hutchinson part early.

    Args:
        A: square operator.
        num_matvecs: budget of applications of A, at least 3.
        distribution: probe distribution of the sketch and the Hutchinson part.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error at which the Hutchinson part stops.
        executor: runs the Hutchinson part's probe blocks elsewhere.

    Returns:
        The ``Estimate`` (``details``: ``sketch_size``, ``sketch_trace``).

    Raises:
        BudgetError: fewer than 3 matvecs.
        ShapeError: A is not square.
        NonFiniteError: the operator returned NaN/Inf.
    """
    A = square_operator(A, "hutchpp_trace")
    m = check_budget(num_matvecs, 3, "hutchpp_trace",
                     "It spends a third each on the sketch, its exact trace and the Hutchinson residual.")
    chunk, rtol = check_chunk(chunk_size), check_rtol(rtol)
    n = A.size_in
    if _covers(m, n):
        return _exact_instead(A, "hutchpp", chunk, m)
    k = m // 3
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)
    S = src.block(0, k)
    Y = _rows(A, _flat(S), chunk, "hutchpp_trace: the operator (sketch)")
    Q = torch.linalg.qr(Y.T).Q  # [n, k]
    AQ = _rows(A, Q.T.contiguous(), chunk, "hutchpp_trace: the operator (QᵀAQ)", k)
    t_sketch = float((Q.T * AQ).sum())
    Qd = Q.to(A.dtype)

    def project(V):
        Vf = V.reshape(V.shape[0], -1)
        return (Vf - (Vf @ Qd) @ Qd.T).reshape(V.shape)

    forms = _quadratic_forms(A, "hutchpp_trace", project)
    run = sample(forms, src, m - 2 * k, chunk_size=chunk, rtol=rtol, start=k, executor=executor)
    mean, se = running_mean(forms.samples[:, 0])
    hist = History(2 * k + np.arange(1, run.num_probes + 1), t_sketch + mean, se)
    return Estimate(t_sketch + float(mean[-1]), float(se[-1]), 2 * k + run.num_probes, "hutchpp", src.seed,
                    num_probes=k + run.num_probes, history=hist, distribution=distribution,
                    stopped_early=run.stopped_early, details={"sketch_size": k, "sketch_trace": t_sketch})


# ------------------------------------------------------------------------------------------------ xtrace
def _prefix_sizes(s: int, smallest: int = 2, points: int = 24) -> list[int]:
    if points <= 1:
        return [s]
    sizes = np.unique(np.round(np.geomspace(smallest, s, num=min(points, s - smallest + 1))).astype(int))
    return [int(v) for v in sizes if v >= smallest]


def _exchangeable_stderr(t: torch.Tensor, delta: torch.Tensor) -> float:
    """Standard error of the mean of exchangeable leave-one-out estimates tᵢ.

    tᵢ − tr = eᵢ with E[eᵢ | Ω₋ᵢ] = 0, so E[eᵢeⱼ] = E[ΔᵢⱼΔⱼᵢ] for i ≠ j, where Δᵢⱼ = tᵢ − tᵢ⁽⁻ʲ⁾ is the
    change of tᵢ when probe j also leaves the sketch (the other cross terms have conditional mean 0).
    Hence Var(t̄) ≈ [s/(s−1)·Σ(tᵢ − t̄)² + Σ_{i≠j} ΔᵢⱼΔⱼᵢ] / s²; the naive std(t)/√s drops the second
    sum and underestimates on decaying spectra. Falls back to the naive form if the sum is negative.

    Returns:
        The standard error (NaN for fewer than two estimates).
    """
    s = t.numel()
    if s < 2:
        return math.nan
    own = float(((t - t.mean()) ** 2).sum()) * s / (s - 1)
    D = delta.clone()
    D.fill_diagonal_(0)
    cross = float((D * D.T).sum())
    var = (own + cross) / s**2
    return math.sqrt(var if var > 0 else own / s**2)


def _xtrace_estimates(R, H, W, T, d, p: int) -> tuple[float, float]:
    """XTrace on the first ``p`` probes from the small matrices (all [s, s] except ``d`` [s]).

    With Y = AΩ = QR, Z = AQ, H = QᵀZ, W = QᵀΩ, T = ZᵀΩ, dᵢ = ωᵢᵀAωᵢ: the sketch without probes I
    is Q(I − P_I)Qᵀ, P_I the projector onto span{R⁻ᵀeₖ : k ∈ I}; the residual probe is
    u = ωᵢ − Q v, v = (I − P_I)wᵢ, and uᵀAu = dᵢ − Tₑᵢ·v − Reᵢ·v + vᵀHv (Qᵀ A ωᵢ = R eᵢ).
    Leave-one-out (I = {i}) gives the estimate; leave-two-out (I = {i, j}) its standard error.

    Returns:
        ``(estimate, stderr)``.
    """
    Rp, Hp, Wp, Tp, dp = R[:p, :p], H[:p, :p], W[:p, :p], T[:p, :p], d[:p]
    Hs = (Hp + Hp.T) / 2
    N = torch.linalg.solve_triangular(Rp, torch.eye(p, dtype=R.dtype), upper=True).T  # columns R^{-T} e_k
    N = N / N.norm(dim=0, keepdim=True)
    NN, NW, NHN, NHW = N.T @ N, N.T @ Wp, N.T @ Hs @ N, N.T @ Hs @ Wp
    TN, RN = Tp.T @ N, Rp.T @ N  # (i, k): T[:, i]·n_k and R[:, i]·n_k
    wHw = (Wp * (Hs @ Wp)).sum(0)
    lin_w = (Tp * Wp).sum(0) + (Rp * Wp).sum(0)
    trH = torch.trace(Hp)
    ii = torch.arange(p)
    # leave-one-out: v_i = w_i − n_i (n_i·w_i)
    a = NW[ii, ii]
    t = (trH - NHN[ii, ii] + dp - (lin_w - a * (TN[ii, ii] + RN[ii, ii]))
         + (wHw - 2 * a * NHW[ii, ii] + a**2 * NHN[ii, ii]))
    # leave-two-out, all pairs (row i = the estimate, column j = the extra probe left out)
    g_ii, g_jj, g_ij = NN[ii, ii][:, None], NN[ii, ii][None, :], NN
    det = (g_ii * g_jj - g_ij**2).clamp_min(1e-300)
    b1, b2 = NW[ii, ii][:, None], NW.T  # n_i·w_i, n_j·w_i
    al = (g_jj * b1 - g_ij * b2) / det
    be = (-g_ij * b1 + g_ii * b2) / det
    quad = (wHw[:, None] - 2 * al * NHW[ii, ii][:, None] - 2 * be * NHW.T
            + al**2 * NHN[ii, ii][:, None] + 2 * al * be * NHN + be**2 * NHN[ii, ii][None, :])
    lin = lin_w[:, None] - al * (TN[ii, ii] + RN[ii, ii])[:, None] - be * (TN + RN)
    tr_PH = (g_jj * NHN[ii, ii][:, None] - 2 * g_ij * NHN + g_ii * NHN[ii, ii][None, :]) / det
    t2 = trH - tr_PH + dp[:, None] - lin + quad
    return float(t.mean()), _exchangeable_stderr(t, t[:, None] - t2)


class _XTraceSketch:
    """The XTrace integrand: probes Ω, Y = AΩ = QR, Z = AQ, grown block by block (two matvecs per probe)."""

    def __init__(self, A, chunk: int, history_points: int):
        n = A.size_in
        self.A, self.chunk, self.history_points = A, chunk, history_points
        self.Om, self.Y, self.Q, self.Z = (torch.empty(n, 0, dtype=torch.float64, device=A.device) for _ in range(4))
        self.R = torch.empty(0, 0, dtype=torch.float64, device=A.device)
        self.history: list[tuple[int, float, float]] = []
        self.used = 0
        self.finished = False
        self.deficient_Y: torch.Tensor | None = None

    def evaluate(self, probes: torch.Tensor, start: int):
        """``(Ω_block, A Ω_block)`` as ``[n, k]`` float64 columns (one matvec per probe)."""
        Om_new = _flat(probes).T
        return Om_new, _rows(self.A, Om_new.T.contiguous(), self.chunk, "xtrace: the operator", start).T

    def absorb(self, result, start: int) -> None:
        """Extend the QR of Y and apply A to the new directions of Q (the second matvec per probe)."""
        Om_new, Y_new = result
        self.used += Om_new.shape[1]
        Q, R, Q_new = _extend_qr(self.Q, self.R, Y_new)
        rank_tol = 1e-13 * float(R.diagonal().abs().max()) * math.sqrt(self.A.size_in)
        if bool((R.diagonal().abs() <= rank_tol).any()):
            self.finished, self.deficient_Y = True, torch.cat([self.Y, Y_new], 1)
            return
        Z_new = _rows(self.A, Q_new.T.contiguous(), self.chunk, "xtrace: the operator", self.used).T
        self.used += Q_new.shape[1]
        self.Q, self.R = Q, R
        self.Om, self.Y, self.Z = torch.cat([self.Om, Om_new], 1), torch.cat([self.Y, Y_new], 1), \
            torch.cat([self.Z, Z_new], 1)

    def estimate(self) -> tuple[float, float]:
        """The XTrace estimate on all probes so far (and the history at new prefix sizes)."""
        if self.finished:
            return math.nan, math.nan
        Q, Z, Om = self.Q, self.Z, self.Om
        H, W, T = Q.T @ Z, Q.T @ Om, Z.T @ Om
        d = (Om * self.Y).sum(0)
        p_prev = self.history[-1][0] // 2 if self.history else 1
        for p in _prefix_sizes(Om.shape[1], points=self.history_points):
            if p > p_prev:
                self.history.append((2 * p, *_xtrace_estimates(self.R.cpu(), H.cpu(), W.cpu(), T.cpu(), d.cpu(), p)))
        return self.history[-1][1], self.history[-1][2]


def xtrace(A, num_matvecs: int = 100, *, distribution: str = "gaussian", seed=None,
           chunk_size: int = DEFAULT_CHUNK, rtol: float | None = None, history_points: int = 24,
           executor: Executor | None = None) -> Estimate:
    """XTrace: the mean over i of tr(Πᵢ A) + ωᵢᵀ(I−Πᵢ)A(I−Πᵢ)ωᵢ, Πᵢ the projector onto range(A Ω₋ᵢ).

    Epperly, Tropp & Webber 2024. m/2 probes Ω, m/2 matvecs on Q = orth(AΩ).

    Standard error: from the leave-one-out estimates plus their leave-two-out cross terms
    (``_exchangeable_stderr``; the paper's std/√(m/2) alone underestimates on decaying spectra).
    ``rtol`` doubles the number of probes (reusing all matvecs) until reached or the budget is spent.
    The running estimate is evaluated at ``history_points`` probe counts (cheap: small matrices only).

    Args:
        A: square operator.
        num_matvecs: budget of applications of A (two per probe), at least 4.
        distribution: probe distribution.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error to stop at, or None to spend the budget.
        history_points: number of probe counts at which the running estimate is kept.
        executor: runs the blocks of A Ω elsewhere (the A Q half runs here).

    Returns:
        The ``Estimate`` (exact, with ``details['rank_deficient']``, when the sketch captures range(A)).

    Raises:
        BudgetError: fewer than 4 matvecs.
        ShapeError: A is not square.
        NonFiniteError: the operator returned NaN/Inf.
    """
    A = square_operator(A, "xtrace")
    m = check_budget(num_matvecs, 4, "xtrace", "It needs two probes, each costing two matvecs.")
    chunk, rtol = check_chunk(chunk_size), check_rtol(rtol)
    n = A.size_in
    if _covers(m, n):
        return _exact_instead(A, "xtrace", chunk, m)
    s_max = m // 2
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)
    sketch = _XTraceSketch(A, chunk, history_points)
    run = sample(sketch, src, s_max, chunk_size=chunk, rtol=rtol, schedule="doubling",
                 first_round=max(4, MIN_PROBES_FOR_RTOL // 2), executor=executor)
    if sketch.finished:
        return _xtrace_rank_deficient(A, sketch.deficient_Y, chunk, sketch.used, src, distribution)
    ns, vals, ses = (np.array(x) for x in zip(*sketch.history, strict=True))
    return Estimate(run.value, run.stderr, sketch.used, "xtrace", src.seed, num_probes=run.num_probes,
                    history=History(ns, vals, ses), distribution=distribution, stopped_early=run.stopped_early)


def _extend_qr(Q, R, Y_new):
    """Extend a thin QR Y = QR by new columns (block Gram–Schmidt, reorthogonalised once)."""
    if Q.shape[1] == 0:
        Q_new, R_new = torch.linalg.qr(Y_new)
        return Q_new, R_new, Q_new
    C1 = Q.T @ Y_new
    X = Y_new - Q @ C1
    C2 = Q.T @ X
    X = X - Q @ C2
    Q2, R22 = torch.linalg.qr(X)
    k0, k1 = R.shape[1], Y_new.shape[1]
    R_full = torch.zeros(k0 + k1, k0 + k1, dtype=R.dtype, device=R.device)
    R_full[:k0, :k0], R_full[:k0, k0:], R_full[k0:, k0:] = R, C1 + C2, R22
    return torch.cat([Q, Q2], 1), R_full, Q2


def _xtrace_rank_deficient(A, Y, chunk, used, src, distribution) -> Estimate:
    """range(AΩ) has lower rank than Ω has columns: then it is range(A) and tr(A) = tr(QᵀAQ) exactly."""
    U, sv, _ = torch.linalg.svd(Y, full_matrices=False)
    r = int((sv > sv[0] * 1e-12 * math.sqrt(Y.shape[0])).sum())
    Qr = U[:, :r]
    AQ = _rows(A, Qr.T.contiguous(), chunk, "xtrace: the operator", used)
    value = float((Qr.T * AQ).sum())
    est = exact_estimate(value, used + r, "xtrace", rank_deficient=r,
                         reason=f"the sketch AΩ has rank {r} < {Y.shape[1]} probes: range(A) captured exactly")
    est.seed, est.distribution, est.num_probes = src.seed, distribution, Y.shape[1]
    return est


# --------------------------------------------------------------------------------------------- xnystrace
def _xnys_estimate(Gs, RY, p: int, nu: float, n: int) -> tuple[float, float] | None:
    """XNysTrace on the first ``p`` probes; ``Gs`` = Ωᵀ(A+νI)Ω, ``RY`` the R of (A+νI)Ω.

    With F = G⁻¹ and K = F M F (M = YᵀY = R_YᵀR_Y): leaving probe i out, tr(Âᵢ) = tr(FM) − Kᵢᵢ/Fᵢᵢ and
    the residual ωᵢᵀ(A − Âᵢ)ωᵢ = 1/Fᵢᵢ. Leaving j out as well replaces F by F − fⱼfⱼᵀ/Fⱼⱼ, which gives
    the leave-two-out estimates behind the standard error (``_exchangeable_stderr``).

    Returns:
        ``(estimate, stderr)``, or None when the Nyström core is not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(Gs[:p, :p])
    if int(info) != 0:
        return None
    X = torch.linalg.solve_triangular(L, torch.eye(p, dtype=L.dtype), upper=False)  # L^{-1}
    F = X.T @ X
    C = torch.linalg.solve_triangular(L, RY[:p, :p].T, upper=False).T  # R_Y L^{-T}
    tau = C.pow(2).sum()
    E = RY[:p, :p] @ F
    K = E.T @ E
    fd, kd = F.diagonal(), K.diagonal()
    t = tau - kd / fd + 1.0 / fd - n * nu
    r = F / fd[None, :]  # r_ij = F_ij / F_jj
    D = fd[:, None] - F * r  # F^{(j)}_ii = F_ii − F_ij² / F_jj
    q = kd[:, None] - 2 * r * K + r**2 * kd[None, :]
    t2 = tau - (kd / fd)[None, :] - q / D + 1.0 / D - n * nu
    return float(t.mean()), _exchangeable_stderr(t, t[:, None] - t2)


class _NystromSketch:
    """The XNysTrace integrand: probes Ω and Y = AΩ (one matvec per probe), grown block by block."""

    def __init__(self, A, chunk: int, history_points: int):
        n = A.size_in
        self.A, self.chunk, self.history_points = A, chunk, history_points
        self.Om = torch.empty(0, n, dtype=torch.float64, device=A.device)
        self.Y = torch.empty(0, n, dtype=torch.float64, device=A.device)
        self.history: list[tuple[int, float, float]] = []
        self.finished = False
        self.shift = math.nan

    def evaluate(self, probes: torch.Tensor, start: int):
        """``(Ω_block, A Ω_block)`` as float64 rows."""
        Om_new = _flat(probes)
        return Om_new, _rows(self.A, Om_new, self.chunk, "xnystrace: the operator", start)

    def absorb(self, result, start: int) -> None:
        """Append the block."""
        self.Om, self.Y = torch.cat([self.Om, result[0]]), torch.cat([self.Y, result[1]])

    def estimate(self) -> tuple[float, float]:
        """The XNysTrace estimate on all probes so far (and the history at new prefix sizes)."""
        A, Om, Y, n = self.A, self.Om, self.Y, self.A.size_in
        # shift at the operator's own precision (a float32 operator's outputs carry float32 rounding)
        nu = float(torch.finfo(A.dtype if A.dtype.is_floating_point else torch.float64).eps * Y.norm()
                   / math.sqrt(n) * 10)
        for _attempt in range(8):
            Ynu = Y + nu * Om
            G = Om @ Ynu.T
            Gs = ((G + G.T) / 2).cpu()
            RY = torch.linalg.qr(Ynu.T).R.cpu()
            sizes = _prefix_sizes(Om.shape[0], points=self.history_points)
            full = _xnys_estimate(Gs, RY, sizes[-1], nu, n)
            if full is not None:
                break
            nu = max(nu * 100, 1e-300)
        else:  # pragma: no cover - only for pathological operators
            raise ArithmeticError("xnystrace: the Nyström core stayed singular; is the operator PSD?")
        p_prev = self.history[-1][0] if self.history else 1
        for p in sizes[:-1]:
            if p > p_prev:
                est = _xnys_estimate(Gs, RY, p, nu, n)
                if est is not None:
                    self.history.append((p, *est))
        self.history.append((sizes[-1], *full))
        self.shift = nu
        return full


def xnystrace(A, num_matvecs: int = 100, *, distribution: str = "gaussian", seed=None,
              chunk_size: int = DEFAULT_CHUNK, rtol: float | None = None, assume_psd: bool = False,
              history_points: int = 24, executor: Executor | None = None) -> Estimate:
    """XNysTrace for PSD A: the mean over i of tr(Âᵢ) + ωᵢᵀ(A − Âᵢ)ωᵢ, Âᵢ the Nyström approximation from Ω₋ᵢ.

    Epperly, Tropp & Webber 2024. One matvec per probe; a tiny shift ν keeps the Cholesky factor
    stable (the estimate of tr(A + νI) − nν is still unbiased).

    Standard error: leave-one-out spread plus leave-two-out cross terms (``_exchangeable_stderr``).
    ``rtol`` doubles the probe count (reusing all matvecs) until reached.

    Args:
        A: square PSD operator (flagged ``is_psd``, or ``assume_psd=True``).
        num_matvecs: budget of applications of A (one per probe), at least 2.
        distribution: probe distribution.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error to stop at, or None to spend the budget.
        assume_psd: treat A as PSD although it is not flagged.
        history_points: number of probe counts at which the running estimate is kept.
        executor: runs probe blocks elsewhere.

    Returns:
        The ``Estimate`` (``details['shift']``: the shift ν).

    Raises:
        ValueError: A is not known to be PSD.
        BudgetError: fewer than 2 matvecs.
        ShapeError: A is not square.
        NonFiniteError: the operator returned NaN/Inf.
    """
    A = square_operator(A, "xnystrace")
    if not (A.is_psd or assume_psd):
        raise ValueError(
            f"xnystrace needs a positive semi-definite operator, and {A!r} is not flagged is_psd. Pass "
            "assume_psd=True if you know it is PSD, or use xtrace / hutchpp_trace for general operators."
        )
    m = check_budget(num_matvecs, 2, "xnystrace", "It needs two probes for the leave-one-out estimate.")
    chunk, rtol = check_chunk(chunk_size), check_rtol(rtol)
    n = A.size_in
    if _covers(m, n):
        return _exact_instead(A, "xnystrace", chunk, m)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)
    sketch = _NystromSketch(A, chunk, history_points)
    run = sample(sketch, src, m, chunk_size=chunk, rtol=rtol, schedule="doubling", executor=executor)
    ns, vals, ses = (np.array(x) for x in zip(*sketch.history, strict=True))
    return Estimate(run.value, run.stderr, run.num_probes, "xnystrace", src.seed, num_probes=run.num_probes,
                    history=History(ns, vals, ses), distribution=distribution, stopped_early=run.stopped_early,
                    details={"shift": sketch.shift})


# -------------------------------------------------------------------------------------------------- auto
METHODS = ("auto", "hutchinson", "hutchpp", "xtrace", "xnystrace", "exact")


def trace(A, num_matvecs: int = 100, *, method: str = "auto", seed=None, chunk_size: int = DEFAULT_CHUNK,
          rtol: float | None = None, distribution: str | None = None, assume_psd: bool = False,
          executor: Executor | None = None) -> Estimate:
    """tr(A) by the named method; ``method="auto"`` picks one.

    ``auto`` chooses:

    * ``exact`` when the budget covers the dimension (same cost, no error);
    * ``xnystrace`` for operators flagged PSD (one matvec per probe, O(1/m) on decaying spectra);
    * ``xtrace`` otherwise (needs ≥ 4 matvecs), else ``hutchinson``.

    Args:
        A: square operator.
        num_matvecs: budget of applications of A.
        method: one of ``METHODS``.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error to stop at (randomized methods).
        distribution: probe distribution (default: the method's own).
        assume_psd: treat A as PSD when its flag is not set (e.g. ``J @ J.T`` for a composed J).
        executor: runs probe blocks elsewhere.

    Returns:
        The ``Estimate``; its ``method`` is the method actually run and its ``reason`` says why.

    Raises:
        ValueError: an unknown method.
        BudgetError: a budget too small for the method.
        ShapeError: A is not square.
    """
    if method not in METHODS:
        raise ValueError(f"unknown trace method {method!r}; valid methods: {METHODS}")
    A = square_operator(A, "trace")
    kw = {} if distribution is None else {"distribution": distribution}
    reason = None
    if method == "auto":
        m = check_budget(num_matvecs, 2, "trace")
        if _covers(m, A.size_in):
            method, reason = "exact", f"budget {m} >= dimension {A.size_in}"
        elif A.is_psd or assume_psd:
            method, reason = "xnystrace", ("operator is " + ("flagged" if A.is_psd else "assumed")
                                           + " PSD and the budget is below the dimension")
        elif m >= 4:
            method, reason = "xtrace", "general square operator, budget below the dimension"
        else:
            method, reason = "hutchinson", f"budget {m} too small for xtrace (needs 4)"
    if method == "exact":
        est = exact_trace(A, chunk_size=chunk_size, max_matvecs=max(EXACT_MATVEC_LIMIT, num_matvecs))
    else:
        fn = {"hutchinson": hutchinson_trace, "hutchpp": hutchpp_trace, "xtrace": xtrace,
              "xnystrace": xnystrace}[method]
        if method == "xnystrace":
            kw["assume_psd"] = assume_psd
        est = fn(A, num_matvecs, seed=seed, chunk_size=chunk_size, rtol=rtol, executor=executor, **kw)
    if reason is not None:
        est.reason = reason
    return est
