"""Operator alignment cos(A, B) = tr(A* B) / (‖A‖_F ‖B‖_F), centred, and adjoint-only for two factors.

The centred version removes means along chosen axes; the adjoint-only variant needs only VJPs of two
Jacobian factors.

Shared probes (Hazelden 2025, ``op_alignment``): with aᵢ = A vᵢ and bᵢ = B vᵢ, E[aᵢ·bᵢ] = tr(A*B),
E‖aᵢ‖² = ‖A‖_F², E‖bᵢ‖² = ‖B‖_F², so cos ≈ Σ aᵢ·bᵢ / √(Σ‖aᵢ‖² Σ‖bᵢ‖²): a ratio estimator whose
errors in numerator and denominator are correlated and largely cancel. Standard error: delete-one
jackknife. Exact when the probe count reaches the dimension (the standard basis is used).

Adjoint-only (A = J₁J₁*, B = J₂J₂*, J's sharing their output space): with independent x, y,
aᵢ = ⟨J₁*x, J₁*y⟩ = xᵀAy and bᵢ = ⟨J₂*y, J₂*x⟩ = yᵀBx satisfy E[ab] = tr(AB), E[a²] = ‖A‖_F²,
E[b²] = ‖B‖_F²: four VJPs per probe pair and no JVP (works for two models with different parameters).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kpflow.operators import LinearOperator, ShapeError, base

from .probes import (
    DEFAULT_CHUNK,
    ProbeSource,
    basis_chunks,
    check_budget,
    check_chunk,
    check_finite,
    flat_dot,
    flat_sqnorm,
    jackknife,
    operator,
    renamed_budget,
    running_statistic,
)
from .result import Estimate, History, exact_estimate
from .sampling import Executor, PerProbe, sample


def _cos_stat(mab, maa, mbb, n=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        return mab / np.sqrt(maa * mbb)


def _check_pair(A: LinearOperator, B: LinearOperator, what: str):
    if A.shape_in != B.shape_in or A.shape_out != B.shape_out:
        raise ShapeError(
            f"{what}: the operators must have the same shapes, got A: {A.shape_in} -> {A.shape_out} and "
            f"B: {B.shape_in} -> {B.shape_out}"
        )


def _cos_columns(cols) -> tuple[float, float]:
    return jackknife(cols, _cos_stat)


def alignment(A, B, num_matvecs: int = 200, *, distribution: str = "gaussian", seed=None,
              chunk_size: int = DEFAULT_CHUNK, executor: Executor | None = None,
              num_probes: int | None = None) -> Estimate:
    """cos(A, B) = tr(A*B)/(‖A‖_F‖B‖_F) from shared probes (one matvec of A and one of B each).

    Args:
        A: the first operator.
        B: the second operator, of A's shapes.
        num_matvecs: budget of applications of A and B together (two per probe), at least 6.
        distribution: probe distribution.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        executor: runs probe blocks elsewhere.
        num_probes: deprecated: the budget in probes (``num_matvecs = 2 · num_probes``).

    Returns:
        The ``Estimate`` (jackknife standard error); ``details`` carry the inner product and the two
        squared norms from the same probes.

    Raises:
        ShapeError: A and B differ in shape.
        BudgetError: fewer than three probes.
        NonFiniteError: an operator returned NaN/Inf.
    """
    A, B = operator(A, "alignment (A)"), operator(B, "alignment (B)")
    _check_pair(A, B, "alignment")
    num_matvecs = renamed_budget(num_matvecs, num_probes, 2, "alignment")
    m = check_budget(num_matvecs, 6, "alignment", "Three probes (two matvecs each) are the least that give a "
                     "standard error.") // 2
    chunk = check_chunk(chunk_size)
    n = A.size_in
    if m >= n:
        return _exact_alignment(A, B, chunk)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)

    def products(V):
        a, b = A.matmat(V), B.matmat(V.to(B.dtype))
        return torch.stack([flat_dot(a, b), flat_sqnorm(a), flat_sqnorm(b)], 1)

    pairs = PerProbe(products, "alignment: A or B", _cos_columns)
    sample(pairs, src, m, chunk_size=chunk, executor=executor)
    return _ratio_result(pairs.columns(), "alignment", src.seed, 2, distribution)


def _ratio_result(samples, method, seed, per_probe: int, distribution) -> Estimate:
    m = samples[0].size
    val, se = jackknife(samples, _cos_stat)
    run = running_statistic(samples, _cos_stat)
    ns = np.arange(1, m + 1)
    means = [float(s.mean()) for s in samples]
    details = {"inner": means[0], "frobenius_sq_A": means[1], "frobenius_sq_B": means[2],
               "matvec_unit": "applications of A and B" if per_probe == 2 else "applications of J1* and J2*"}
    return Estimate(val, se, per_probe * m, method, seed, num_probes=m,
                    history=History(ns * per_probe, run, np.full(m, np.nan)), distribution=distribution,
                    details=details)


def _exact_alignment(A, B, chunk) -> Estimate:
    inner = aa = bb = 0.0
    for start, E in basis_chunks(A.shape_in, A.dtype, A.device, chunk):
        a = check_finite(A.matmat(E), start, "alignment (exact): A")
        b = check_finite(B.matmat(E.to(B.dtype)), start, "alignment (exact): B")
        inner += float(flat_dot(a, b).sum())
        aa += float(flat_sqnorm(a).sum())
        bb += float(flat_sqnorm(b).sum())
    n = A.size_in
    return exact_estimate(inner / math.sqrt(aa * bb), 2 * n, "alignment", inner=inner, frobenius_sq_A=aa,
                          frobenius_sq_B=bb, reason=f"budget covers the dimension {n}: exact")


class CenteringOperator(LinearOperator):
    """C x = x − mean of x over ``axes`` (all axes when None).

    The orthogonal projector that removes the mean along those axes. Self-adjoint, idempotent, PSD.
    """

    def __init__(self, shape, axes=None, dtype=torch.float64, device="cpu"):
        super().__init__(shape, shape, dtype, device, is_psd=True)
        nd = len(self.shape_in)
        self.axes = tuple(range(nd)) if axes is None else tuple(
            a % nd for a in ((axes,) if isinstance(axes, int) else axes))

    def _matmat(self, X):
        return X - X.mean(dim=tuple(a + 1 for a in self.axes), keepdim=True)

    def _rmatmat(self, Y):
        return self._matmat(Y)


def centered(A, axes=None) -> LinearOperator:
    """C A C with C the centring projector over ``axes`` of A's (square) structured shape.

    Args:
        A: square operator.
        axes: the axes to centre over (None: all).

    Returns:
        The lazy operator ``C A C``.

    Raises:
        ShapeError: A is not square.
    """
    A = operator(A, "centered")
    if not A.is_square:
        raise ShapeError(f"centring needs a square operator, got {A.shape_in} -> {A.shape_out}")
    C = CenteringOperator(A.shape_in, axes, A.dtype, A.device)
    return C @ A @ C


def centered_alignment(A, B, num_matvecs: int = 200, *, axes=None, **kwargs) -> Estimate:
    """Centred alignment cos(CAC, CBC) with C = I − (mean over ``axes``).

    Kernel-alignment centring (Cortes, Mohri & Rostamizadeh 2012); ``axes=None`` centres over all entries.

    Args:
        A: the first square operator.
        B: the second, of A's shape.
        num_matvecs: budget of applications of A and B together.
        axes: the axes to centre over (None: all).
        **kwargs: as for ``alignment``.

    Returns:
        The ``Estimate`` (``details['centered_axes']``).

    Raises:
        ShapeError: the shapes differ or are not square.
    """
    A, B = operator(A, "centered_alignment (A)"), operator(B, "centered_alignment (B)")
    _check_pair(A, B, "centered_alignment")
    est = alignment(centered(A, axes), centered(B, axes), num_matvecs, **kwargs)
    est.method = "centered-" + est.method
    est.details["centered_axes"] = axes
    return est


def factor_alignment(J1, J2, num_matvecs: int = 400, *, distribution: str = "gaussian", seed=None,
                     chunk_size: int = DEFAULT_CHUNK, max_dense: int | None = None,
                     executor: Executor | None = None, num_probes: int | None = None) -> Estimate:
    """cos(J₁J₁*, J₂J₂*) from VJPs only (adjoint-only; Hazelden 2025 ``op_alignment_adj_only``).

    J₁, J₂ must share their output space (e.g. the state space); their input spaces (parameters)
    may differ. Each probe pair (x, y) costs 4 VJPs. Exact (from the basis) when the budget covers
    the output dimension and the two Jacobians fit in ``max_dense`` entries.

    Args:
        J1: the first factor.
        J2: the second factor, with J1's output shape.
        num_matvecs: budget of applications of J1* and J2* (four per probe pair), at least 12.
        distribution: probe distribution.
        seed: int, None or ``torch.Generator``.
        chunk_size: probe pairs per batched application.
        max_dense: entry limit of the exact path (default ``DENSE_LIMIT``).
        executor: runs probe blocks elsewhere.
        num_probes: deprecated: the budget in probe pairs (``num_matvecs = 4 · num_probes``).

    Returns:
        The ``Estimate`` (jackknife standard error).

    Raises:
        ShapeError: the output shapes differ.
        BudgetError: fewer than three probe pairs.
        NonFiniteError: a factor returned NaN/Inf.
    """
    J1, J2 = operator(J1, "factor_alignment (J1)"), operator(J2, "factor_alignment (J2)")
    if J1.shape_out != J2.shape_out:
        raise ShapeError(f"factor_alignment: J1 and J2 must have the same output shape, got {J1.shape_out} "
                         f"and {J2.shape_out}")
    num_matvecs = renamed_budget(num_matvecs, num_probes, 4, "factor_alignment")
    m = check_budget(num_matvecs, 12, "factor_alignment", "Three probe pairs (four VJPs each) are the least.") // 4
    chunk = check_chunk(chunk_size)
    n = J1.size_out
    limit = base.DENSE_LIMIT if max_dense is None else int(max_dense)
    if m >= n and n * max(J1.size_in, J2.size_in, n) <= limit:
        return _exact_factor_alignment(J1, J2, chunk)
    # probe pair j is (v_2j, v_2j+1) of the source, so pairs are drawn by index like single probes
    src = _PairSource(ProbeSource(seed, J1.shape_out, J1.dtype, J1.device, distribution))

    def products(XY):
        k = XY.shape[0]
        XY = torch.cat([XY[:, 0], XY[:, 1]])
        P1, P2 = J1.rmatmat(XY), J2.rmatmat(XY.to(J2.dtype))
        a, b = flat_dot(P1[:k], P1[k:]), flat_dot(P2[:k], P2[k:])
        return torch.stack([a * b, a * a, b * b], 1)

    pairs = PerProbe(products, "factor_alignment: J1* or J2*", _cos_columns)
    sample(pairs, src, m, chunk_size=chunk, executor=executor)
    return _ratio_result(pairs.columns(), "factor-alignment", src.seed, 4, distribution)


class _PairSource:
    """Pairs of probes ``(v_2j, v_2j+1)`` of a ``ProbeSource``, drawn by pair index."""

    def __init__(self, source: ProbeSource):
        self.source, self.seed = source, source.seed

    def block(self, start: int, k: int) -> torch.Tensor:
        V = self.source.block(2 * start, 2 * k)
        return V.reshape(k, 2, *V.shape[1:])


def _exact_factor_alignment(J1, J2, chunk) -> Estimate:
    rows1, rows2 = [], []
    for start, E in basis_chunks(J1.shape_out, J1.dtype, J1.device, chunk):
        rows1.append(check_finite(J1.rmatmat(E), start, "factor_alignment (exact): J1*").reshape(E.shape[0], -1))
        rows2.append(check_finite(J2.rmatmat(E.to(J2.dtype)), start, "factor_alignment (exact): J2*")
                     .reshape(E.shape[0], -1))
    R1, R2 = torch.cat(rows1).double(), torch.cat(rows2).double()
    A, B = R1 @ R1.T, R2 @ R2.T
    inner, aa, bb = float((A * B).sum()), float((A * A).sum()), float((B * B).sum())
    n = J1.size_out
    return exact_estimate(inner / math.sqrt(aa * bb), 2 * n, "factor-alignment", inner=inner,
                          frobenius_sq_A=aa, frobenius_sq_B=bb, reason=f"budget covers the dimension {n}: exact")
