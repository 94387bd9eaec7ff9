"""Randomized eigensolvers for PSD operators.

Nyström with warm-started subspace iteration, and Rayleigh–Ritz on a given subspace from products with a
factor ``J*`` only.

* :func:`nystrom_eigh` — top-``r`` eigenpairs of a PSD operator ``A`` from ``(q + 1)·k`` products with
  ``A`` (Halko, Martinsson & Tropp 2011, Alg. 4.3/5.5; the stable Nyström of Tropp, Yurtsever, Udell &
  Cevher 2017, Alg. 3), warm-started from a previous basis.
* :func:`ritz_sketch` / :func:`ritz_update` — Rayleigh–Ritz pairs of ``Θ = J J*`` on a state-space subspace
  ``Q`` from one batched product ``J* Q`` (Parlett 1998, §11.4): ``Q* Θ Q = (J* Q)(J* Q)*``.
* :func:`damped_lowrank_solve` — ``(c U Λ U* + c·floor (I − U U*) + λ I)⁻¹ x`` (Woodbury; with
  ``floor = λ_r`` the Nyström preconditioner of Frangella, Tropp & Udell 2023).

The low-rank natural-gradient optimizer (:mod:`kpflow.training.natural_gradient`) is built on these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kpflow.operators import LinearOperator, ShapeError

__all__ = ["LowRankEig", "orthonormal_rows", "nystrom_eigh", "damped_lowrank_solve", "RitzSketch", "ritz_sketch",
           "ritz_update"]


@dataclass
class LowRankEig:
    """``A ≈ U diag(Λ) U*``: ``eigenvalues`` [r] (descending, ≥ 0), orthonormal ``basis`` [r, *shape]."""

    eigenvalues: torch.Tensor
    basis: torch.Tensor

    @property
    def rank(self) -> int:
        """The number r of kept eigenpairs."""
        return int(self.eigenvalues.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one basis vector (the operator's ``shape_in``)."""
        return tuple(self.basis.shape[1:])

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates ``U* x`` of ``x`` in the orthonormal basis.

        Args:
            x: one tensor of the basis shape.

        Returns:
            ``U* x``, shape ``[r]``.
        """
        return self.basis.reshape(self.rank, -1) @ x.reshape(-1)

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        """The combination ``U c`` of the basis vectors.

        Args:
            c: coefficients, shape ``[r]``.

        Returns:
            ``U c``, one tensor of the basis shape.
        """
        return (c @ self.basis.reshape(self.rank, -1)).reshape(self.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank product ``U Λ U* x``.

        Args:
            x: one tensor of the basis shape.

        Returns:
            ``U diag(Λ) U* x``, of the basis shape.
        """
        return self.combine(self.eigenvalues * self.coefficients(x))


def orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """Orthonormalize the k probes of ``X`` (thin Householder QR of the n×k matrix of their columns).

    Args:
        X: ``[k, *shape]``, k ≤ n = prod(shape) linearly independent probes.

    Returns:
        ``Q`` of the same shape with orthonormal rows spanning the rows of ``X`` (Gram–Schmidt order).
    """
    k = X.shape[0]
    Q, _ = torch.linalg.qr(X.reshape(k, -1).T)
    return Q.T.reshape(X.shape)


def _check_psd_operator(A: LinearOperator) -> None:
    if not isinstance(A, LinearOperator):
        raise TypeError(f"expected a kpflow LinearOperator, got {type(A).__name__}")
    if not A.is_square:
        raise ShapeError(f"a PSD operator must be square, got {A.shape_in} -> {A.shape_out}")


def nystrom_eigh(
    A: LinearOperator,
    rank: int,
    *,
    oversample: int = 0,
    power_iters: int = 0,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LowRankEig:
    """Top-``rank`` eigenpairs of a PSD operator by randomized Nyström with subspace iteration.

    ``Â = (AΩ)(Ω* A Ω)⁺(AΩ)*`` for an orthonormal test matrix Ω of ``k = rank + oversample`` probes,
    after ``power_iters`` steps ``Ω ← orth(AΩ)``; computed stably with a small shift ν (Tropp et al.
    2017, Alg. 3; Halko et al. 2011, Alg. 4.3). ``init`` [m, *shape] (e.g. the previous basis) fills
    the first ``min(m, k)`` probes — a warm start, so repeated calls are subspace iteration on a
    slowly moving operator; Gaussian probes fill the rest. Costs ``(power_iters + 1) · k`` products
    with ``A``. For an exact spectral gap ``λ_r > λ_{r+1}`` the basis converges to the top-r
    eigenspace at the rate ``(λ_{r+1}/λ_r)^q`` in the number q of passes.

    Args:
        A: a square PSD ``LinearOperator`` (PSD is assumed, not checked).
        rank: the number r of eigenpairs wanted, ``0 ≤ r ≤ n``.
        oversample: extra probes beyond ``rank`` (k = min(rank + oversample, n)).
        power_iters: subspace-iteration passes q before the sketch.
        init: ``[m, *shape_in]`` starting probes (e.g. the previous basis) for a warm start.
        generator: the ``torch.Generator`` of the Gaussian probes.

    Returns:
        ``LowRankEig`` with the r largest Nyström eigenvalues (descending, ≥ 0) and an orthonormal basis, in
        the operator's dtype and device.

    Raises:
        TypeError: ``A`` is not a kpflow ``LinearOperator``.
        ShapeError: ``A`` is not square, or ``init``'s probe shape is not the operator's.
        ValueError: a negative ``rank``, ``oversample`` or ``power_iters``, or ``rank > n``.
        FloatingPointError: the operator returned non-finite values.
    """
    _check_psd_operator(A)
    rank, oversample, power_iters = int(rank), int(oversample), int(power_iters)
    n = A.size_in
    if rank < 0 or oversample < 0 or power_iters < 0:
        raise ValueError(
            f"rank, oversample and power_iters must be >= 0, got {rank}, {oversample}, {power_iters}"
        )
    if rank > n:
        raise ValueError(f"rank {rank} is larger than the dimension {n} of the operator's space {A.shape_in}")
    shape, dtype, device = A.shape_in, A.dtype, A.device
    if rank == 0:
        return LowRankEig(torch.zeros(0, dtype=dtype, device=device),
                          torch.zeros(0, *shape, dtype=dtype, device=device))
    k = min(rank + oversample, n)
    probes = []
    if init is not None:
        if tuple(init.shape[1:]) != tuple(shape):
            raise ShapeError(f"init has probe shape {tuple(init.shape[1:])}, the operator acts on {shape}")
        probes.append(init[:k].to(dtype=dtype, device=device))
    m = sum(p.shape[0] for p in probes)
    if m < k:
        probes.append(torch.randn(k - m, *shape, dtype=dtype, device=device, generator=generator))
    Omega = orthonormal_rows(torch.cat(probes, 0))
    for _ in range(power_iters):
        Omega = orthonormal_rows(A.matmat(Omega))
    Y = A.matmat(Omega).reshape(k, n).T  # [n, k]
    W = Omega.reshape(k, n).T  # [n, k]
    ynorm = torch.linalg.matrix_norm(Y)
    if not torch.isfinite(ynorm):
        raise FloatingPointError("the operator returned non-finite values in the Nyström sketch")
    eps = torch.finfo(dtype).eps
    nu = max(float(ynorm) * eps * math.sqrt(n), torch.finfo(dtype).tiny ** 0.5)
    Y_nu = Y + nu * W
    C = W.T @ Y_nu
    C = 0.5 * (C + C.T)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:  # loss of positivity in low precision: fall back to a symmetric eigensolve
        evals, evecs = torch.linalg.eigh(C)
        keep = evals > evals.max().clamp_min(0) * eps * k
        B = Y_nu @ (evecs[:, keep] / evals[keep].sqrt())
    else:
        B = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_ν L^{-T}
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    r = min(rank, U.shape[1])
    lam = (S[:r] ** 2 - nu).clamp_min(0)
    return LowRankEig(lam, U[:, :r].T.reshape(r, *shape).contiguous())


def damped_lowrank_solve(eig: LowRankEig, damping: float, x: torch.Tensor, scale: float = 1.0,
                         floor: float = 0.0) -> torch.Tensor:
    """``(c U Λ U* + c·floor (I − U U*) + λ I)⁻¹ x = U (cΛ + λ)⁻¹ U* x + (x − U U* x)/(c·floor + λ)``.

    With ``floor = 0`` this is the Woodbury inverse of the damped rank-r approximation
    ``(c U Λ U* + λ I)⁻¹``. With ``floor = λ_r`` (the smallest kept eigenvalue, an upper bound of the
    unseen spectrum) it is the randomized Nyström preconditioner of Frangella, Tropp & Udell (2023):
    directions outside the basis get the curvature of the weakest kept one instead of none, which
    keeps the step in the unexplored complement from growing like 1/λ. The complement is formed
    before dividing (and dropped for a complete basis), so a small λ does not amplify rounding error.

    Args:
        eig: the low-rank pairs ``U, Λ``.
        damping: λ > 0.
        x: the right-hand side, of the basis shape.
        scale: the factor c of the curvature.
        floor: the curvature assumed on the complement of the basis (0, or λ_r for the preconditioner).

    Returns:
        The solution, of the shape of ``x``.

    Raises:
        ValueError: ``damping`` is not positive.
    """
    damping = float(damping)
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for the damped solve, got {damping}")
    if eig.rank == 0:
        return x / damping
    c = eig.coefficients(x)
    solved = eig.combine(c / (scale * eig.eigenvalues + damping))
    if eig.rank == x.numel():  # a complete basis: the complement is zero, not rounding error / λ
        return solved
    return (x - eig.combine(c)) / (scale * float(floor) + damping) + solved


@dataclass
class RitzSketch:
    """Rayleigh–Ritz pairs of ``Θ = J J*`` on an orthonormal state-space subspace ``Q`` (``m`` rows).

    ``Q* Θ Q = (J* Q)(J* Q)* = Z diag(values) Z*``. ``state_basis = Z_r* Q`` (Ritz vectors, orthonormal),
    ``adjoint_basis = J* state_basis = Z_r* (J* Q)`` and ``gradient = J* e`` (``e`` spans Q's first row).
    """

    values: torch.Tensor
    state_basis: torch.Tensor
    adjoint_basis: torch.Tensor
    gradient: torch.Tensor

    def eig(self, form: str) -> LowRankEig:
        """The state form ``Θ_S = U Λ U*`` or the parameter form ``F_S = J* Q Q* J = V Λ V*``.

        ``V = J* U Λ^{-1/2}`` is orthonormal and ``F_S`` has the same nonzero spectrum as ``Θ_S``
        (push-through identity).

        Args:
            form: ``"state"`` for ``Θ_S``; any other value gives the parameter form ``F_S``.

        Returns:
            ``LowRankEig`` of the chosen form.
        """
        if form == "state":
            return LowRankEig(self.values, self.state_basis)
        tiny = torch.finfo(self.values.dtype).tiny ** 0.5
        V = self.adjoint_basis / self.values.clamp_min(tiny).sqrt().unsqueeze(1)
        return LowRankEig(self.values, V.contiguous())


def ritz_sketch(J: LinearOperator, error: torch.Tensor, sketch: Sequence[torch.Tensor], rank: int) -> RitzSketch:
    """Rayleigh–Ritz of ``Θ = J J*`` on ``span(e, sketch)`` from one batched product with ``J*`` only.

    ``Q R = [e, s_1, …]`` (thin QR), ``W = J* Q`` — the ``m = 1 + len(sketch)`` cotangents of one
    backward pass, the first of which gives the gradient ``J* e = R₁₁ W₁`` — then the eigenpairs of
    the ``m×m`` Gram ``W W* = Q* Θ Q`` (Rayleigh–Ritz, Parlett 1998 §11.4; a block-Krylov step when
    the sketch holds the previous Ritz vectors and ``Θ``-images such as the state secant
    ``z_k − z_{k−1} ≈ J Δθ``). Ritz values are lower bounds of the top eigenvalues of Θ (Cauchy
    interlacing), exact when ``span(Q)`` contains the top-``rank`` eigenspace, and ``J* Q Q* J ⪯ F``.

    Args:
        J: the factor ``J`` (parameters → states) as a ``LinearOperator``; only ``J.rmatmat`` is called.
        error: the state-space vector ``e`` (e.g. the loss gradient with respect to the states).
        sketch: further state-space directions of the shape of ``error``.
        rank: the number of Ritz pairs kept (at most ``m``).

    Returns:
        ``RitzSketch`` with the top ``min(rank, m)`` Ritz values (descending), their state and adjoint
        bases, and the gradient ``J* e``.
    """
    rows = [error.reshape(-1)] + [v.reshape(-1).to(error.dtype) for v in sketch]
    X = torch.stack(rows, 1)  # [n, m]
    Q, R = torch.linalg.qr(X)  # Q: [n, min(n, m)]; e = R₁₁ Q₁
    k = Q.shape[1]
    Qr = Q.T.reshape(k, *error.shape)
    W = J.rmatmat(Qr).reshape(k, -1)  # J* Q: one (batched) backward pass
    gradient = R[0, 0] * W[0]
    G = W @ W.T
    values, Z = torch.linalg.eigh(0.5 * (G + G.T))
    values, Z = values.flip(0).clamp_min(0), Z.flip(1)
    r = min(int(rank), k)
    Zr = Z[:, :r].T
    state_basis = (Zr @ Q.T).reshape(r, *error.shape)
    return RitzSketch(values[:r], state_basis.contiguous(), Zr @ W, gradient)



def ritz_update(J: LinearOperator, state_basis: torch.Tensor, rank: int, form: str):
    """Rayleigh–Ritz of ``Θ = J J*`` on span(state_basis) with ``k`` VJPs only (Parlett 1998, §11.4).

    ``W = J* U``, ``U* Θ U = W W* = Z S Z*``. Keeps the curvature along the tracked directions current
    between refreshes.

    Args:
        J: the factor ``J`` as a ``LinearOperator``; only ``J.rmatmat`` is called.
        state_basis: ``[k, *shape_out]`` orthonormal state-space rows ``U``.
        rank: the number of pairs kept.
        form: ``"state"`` for the pairs of ``Θ`` on the state side; any other value gives the parameter side
            ``V = J* U Z Λ^{-1/2}``.

    Returns:
        ``(LowRankEig of the top min(rank, k) pairs, the rotated state basis Z* U)``.
    """
    W = J.rmatmat(state_basis)  # [k, n_params]
    k = W.shape[0]
    G = W.reshape(k, -1) @ W.reshape(k, -1).T
    S, Z = torch.linalg.eigh(0.5 * (G + G.T))
    S, Z = S.flip(0).clamp_min(0), Z.flip(1)
    rotated = (Z.T @ state_basis.reshape(k, -1)).reshape(state_basis.shape)
    r = min(rank, k)
    if form == "state":
        return LowRankEig(S[:r], rotated[:r].contiguous()), rotated
    tiny = torch.finfo(S.dtype).tiny ** 0.5
    V = (Z.T @ W.reshape(k, -1))[:r] / S[:r].clamp_min(tiny).sqrt().unsqueeze(1)
    return LowRankEig(S[:r], V.contiguous()), rotated
