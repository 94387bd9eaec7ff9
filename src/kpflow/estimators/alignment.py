"""Operator alignment cos(A, B) = tr(A* B) / (‖A‖_F ‖B‖_F), its centred version, and the adjoint-only
variant for two Jacobian factors.

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
    running_statistic,
)
from .result import Estimate, exact_estimate


def _cos_stat(mab, maa, mbb, n=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        return mab / np.sqrt(maa * mbb)


def _check_pair(A: LinearOperator, B: LinearOperator, what: str):
    if A.shape_in != B.shape_in or A.shape_out != B.shape_out:
        raise ShapeError(
            f"{what}: the operators must have the same shapes, got A: {A.shape_in} -> {A.shape_out} and "
            f"B: {B.shape_in} -> {B.shape_out}"
        )


def alignment(A, B, num_probes: int = 100, *, distribution: str = "gaussian", seed=None,
              chunk_size: int = DEFAULT_CHUNK) -> Estimate:
    """cos(A, B) = tr(A*B)/(‖A‖_F‖B‖_F) from shared probes (one matvec of A and one of B each).

    ``info`` carries the inner product and the two squared norms (same probes, so consistent).
    """
    A, B = operator(A, "alignment (A)"), operator(B, "alignment (B)")
    _check_pair(A, B, "alignment")
    m = check_budget(num_probes, 3, "alignment", "Three probes are the least that give a standard error.")
    chunk = check_chunk(chunk_size)
    n = A.size_in
    if m >= n:
        return _exact_alignment(A, B, chunk)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, distribution)
    ab, aa, bb = [], [], []
    done = 0
    while done < m:
        k = min(chunk, m - done)
        V = src.draw(k)
        a = check_finite(A.matmat(V), done, "alignment: A")
        b = check_finite(B.matmat(V.to(B.dtype)), done, "alignment: B")
        ab.append(flat_dot(a, b).cpu())
        aa.append(flat_sqnorm(a).cpu())
        bb.append(flat_sqnorm(b).cpu())
        done += k
    samples = [torch.cat(x).numpy() for x in (ab, aa, bb)]
    return _ratio_result(samples, "alignment", src.seed, 2 * m, m, distribution)


def _ratio_result(samples, method, seed, matvecs, m, distribution) -> Estimate:
    val, se = jackknife(samples, _cos_stat)
    run = running_statistic(samples, _cos_stat)
    ns = np.arange(1, m + 1)
    means = [float(s.mean()) for s in samples]
    info = {"inner": means[0], "frobenius_sq_A": means[1], "frobenius_sq_B": means[2],
            "num_probes": m, "distribution": distribution, "matvec_unit": "applications of A and B"}
    return Estimate(val, se, matvecs, method, seed, ns * (matvecs // m), run, np.full(m, np.nan), info)


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
    """C x = x − mean of x over ``axes`` (all axes when None): the orthogonal projector that removes
    the mean along those axes. Self-adjoint, idempotent, PSD."""

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
    """C A C with C the centring projector over ``axes`` of A's (square) structured shape."""
    A = operator(A, "centered")
    if not A.is_square:
        raise ShapeError(f"centring needs a square operator, got {A.shape_in} -> {A.shape_out}")
    C = CenteringOperator(A.shape_in, axes, A.dtype, A.device)
    return C @ A @ C


def centered_alignment(A, B, num_probes: int = 100, *, axes=None, **kwargs) -> Estimate:
    """Centred alignment cos(CAC, CBC), C = I − (mean over ``axes``) (kernel-alignment centring;
    Cortes, Mohri & Rostamizadeh 2012). ``axes=None`` centres over all entries."""
    A, B = operator(A, "centered_alignment (A)"), operator(B, "centered_alignment (B)")
    _check_pair(A, B, "centered_alignment")
    est = alignment(centered(A, axes), centered(B, axes), num_probes, **kwargs)
    est.method = "centered-" + est.method
    est.info["centered_axes"] = axes
    return est


def factor_alignment(J1, J2, num_probes: int = 100, *, distribution: str = "gaussian", seed=None,
                     chunk_size: int = DEFAULT_CHUNK, max_dense: int | None = None) -> Estimate:
    """cos(J₁J₁*, J₂J₂*) from VJPs only (adjoint-only; Hazelden 2025 ``op_alignment_adj_only``).

    J₁, J₂ must share their output space (e.g. the state space); their input spaces (parameters)
    may differ. Each probe pair costs 4 VJPs. Exact (from the basis) when ``num_probes`` reaches the
    output dimension and the two Jacobians fit in ``max_dense`` entries.
    """
    J1, J2 = operator(J1, "factor_alignment (J1)"), operator(J2, "factor_alignment (J2)")
    if J1.shape_out != J2.shape_out:
        raise ShapeError(f"factor_alignment: J1 and J2 must have the same output shape, got {J1.shape_out} "
                         f"and {J2.shape_out}")
    m = check_budget(num_probes, 3, "factor_alignment")
    chunk = check_chunk(chunk_size)
    n = J1.size_out
    limit = base.DENSE_LIMIT if max_dense is None else int(max_dense)
    if m >= n and n * max(J1.size_in, J2.size_in, n) <= limit:
        return _exact_factor_alignment(J1, J2, chunk)
    src = ProbeSource(seed, J1.shape_out, J1.dtype, J1.device, distribution)
    a_s, b_s = [], []
    done = 0
    while done < m:
        k = min(chunk, m - done)
        X, Y = src.draw(k), src.draw(k)
        XY = torch.cat([X, Y])
        P1 = check_finite(J1.rmatmat(XY), done, "factor_alignment: J1*")
        P2 = check_finite(J2.rmatmat(XY.to(J2.dtype)), done, "factor_alignment: J2*")
        a_s.append(flat_dot(P1[:k], P1[k:]).cpu())
        b_s.append(flat_dot(P2[:k], P2[k:]).cpu())
        done += k
    a, b = torch.cat(a_s).numpy(), torch.cat(b_s).numpy()
    return _ratio_result([a * b, a * a, b * b], "factor-alignment", src.seed, 4 * m, m, distribution)


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
