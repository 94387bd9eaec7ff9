"""Top spectrum, spectral density and "modes for 95 % of the variance" of operators applied matrix-free.

* ``top_eigenpairs``: thick-restart Lanczos (Wu & Simon 2000, with full reorthogonalisation) or a
  randomized block subspace iteration with Rayleigh–Ritz (Halko, Martinsson & Tropp 2011; Saad 2011,
  §5.1), both in torch on the operator's device, both stopping on a residual test.
* ``top_singular_triplets``: Lanczos on the Jordan–Wielandt operator [[0, A], [A*, 0]] or randomized
  subspace iteration on A*A with Rayleigh–Ritz (Halko et al. 2011), same stopping rule.
* ``spectral_density``: stochastic Lanczos quadrature (Golub & Meurant 2010; Ubaru, Chen & Saad 2017),
  with an error bar that includes the quadrature error.
* ``modes_for_variance``: the smallest k with λ₁ + … + λ_k ≥ fraction · tr(A) (the papers' measure).

**Stopping rule.** A Ritz pair (θ, v), ‖v‖ = 1, is *converged* when its residual r = Av − θv satisfies
‖r‖ ≤ tol·|θ| (ARPACK's test), or ‖r‖ ≤ ε·√n·‖A‖ (the rounding level of a matvec in the operator's
dtype, for eigenvalues at zero). For a self-adjoint A some eigenvalue λ satisfies |λ − θ| ≤ ‖r‖, so a
converged θ is within relative error tol of an eigenvalue; it is usually far closer (|λ − θ| ≤ ‖r‖²/gap,
Kato–Temple). Both methods stop when all k wanted pairs are converged or after ``max_iters``
iterations; in the latter case the result says which pairs are not converged and a
``ConvergenceWarning`` is issued.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .probes import DEFAULT_CHUNK, ProbeSource, apply_chunked, check_chunk, operator, square_operator
from .result import Estimate, exact_estimate
from .trace import trace

#: Largest dimension for which ``modes_for_variance`` uses a dense eigendecomposition.
DENSE_EIG_LIMIT = 2048

#: The spectrum ends ``top_eigenpairs`` can target.
WHICH = ("largest", "smallest", "largest_magnitude")

#: Default iteration cap: restart cycles (Lanczos) or subspace iterations (randomized).
DEFAULT_MAX_ITERS = 100


class ConvergenceWarning(UserWarning):
    """An iterative eigensolver hit its iteration cap before every wanted pair met the tolerance."""


@dataclass
class EigenResult:
    """Eigenpairs (or singular triplets) with their residual norms and convergence record.

    Attributes:
        values: [k] float64; ordered by ``which`` (largest first, smallest first, or largest |λ|
            first); singular values descending.
        vectors: [k, *shape_in] unit eigenvectors (right singular vectors for SVD).
        residuals: [k] ‖A v − λ v‖ (SVD: ‖A v − σ u‖), recomputed with explicit matvecs at the end.
        converged: [k] bool, the stopping rule of the module docstring per pair (SVD: on both
            residuals ‖A v − σ u‖ and ‖A* u − σ v‖).
        method: ``lanczos`` or ``randomized``.
        iterations: restart cycles (Lanczos) or subspace iterations (randomized) that ran.
        num_matvecs: operator applications spent, the final residual check included (SVD: A and A*
            applications together).
        tol: the relative residual tolerance used.
        left_vectors: [k, *shape_out] left singular vectors for singular triplets.
        details: ``which``, the seed, the norm estimate max|θ|, the shift of the randomized method,
            the Lanczos basis and block sizes, the confirmation cycles, ...

    ``n_matvecs`` and ``info`` (the previous release's names) still work for one release with a
    ``DeprecationWarning``.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    method: str
    iterations: int
    num_matvecs: int
    tol: float
    left_vectors: torch.Tensor | None = None
    details: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """True when every returned pair met the tolerance."""
        return bool(self.converged.all())

    @property
    def n_matvecs(self) -> int:
        """Deprecated: use ``num_matvecs``."""
        warnings.warn("EigenResult.n_matvecs is deprecated; use num_matvecs", DeprecationWarning, stacklevel=2)
        return self.num_matvecs

    @property
    def info(self) -> dict:
        """Deprecated: use ``details``."""
        warnings.warn("EigenResult.info is deprecated; use details", DeprecationWarning, stacklevel=2)
        return self.details


# ------------------------------------------------------------------------------------ shared pieces
def _flat_rows(A, V, chunk, what):
    k = V.shape[0]
    return apply_chunked(A.matmat, V.to(A.dtype).reshape(k, *A.shape_in), chunk, what).reshape(k, -1).double()


def _flat_rows_adjoint(A, V, chunk, what):
    k = V.shape[0]
    return apply_chunked(A.rmatmat, V.to(A.dtype).reshape(k, *A.shape_out), chunk, what).reshape(k, -1).double()


def _real(A, what):
    if A.dtype.is_complex:
        raise TypeError(f"{what}: {A!r} is complex; the spectrum estimators work in real arithmetic. Pass a real "
                        "operator (for a Hermitian H = R + iS, the real symmetric [[R, -S], [S, R]] has H's spectrum "
                        "with each eigenvalue twice).")
    return A


def _default_tol(dtype: torch.dtype) -> float:
    """1e-6, or √ε of the operator's dtype when that is larger (float32: 3.5e-4)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return max(1e-6, math.sqrt(eps))


def _check_solver_args(k, dim, tol, max_iters, dtype, what):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < dim:
        raise ValueError(f"{what}: k must be an integer between 1 and {dim - 1} (the dimension - 1), got {k!r}")
    tol = _default_tol(dtype) if tol is None else float(tol)
    if not 0 < tol < 1:
        raise ValueError(f"{what}: tol is a relative residual tolerance in (0, 1) (e.g. 1e-6), got {tol}")
    max_iters = DEFAULT_MAX_ITERS if max_iters is None else max_iters
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{what}: max_iters must be a positive integer, got {max_iters!r}")
    return tol, max_iters


def _power_iters_shim(power_iters, max_iters, what):
    if power_iters is None:
        return max_iters
    warnings.warn(f"{what}: power_iters is deprecated; the iteration now stops on the residual test "
                  "(tol=...) with max_iters as its cap. power_iters=q is read as max_iters=q + 1.",
                  DeprecationWarning, stacklevel=3)
    return int(power_iters) + 1


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    key = {"largest": -theta, "smallest": theta, "largest_magnitude": -theta.abs()}[which]
    return torch.argsort(key, stable=True)


def _floor(dtype: torch.dtype, n: int, anorm: float) -> float:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return 10 * eps * math.sqrt(n) * anorm


def _orth_against(V: torch.Tensor, X: torch.Tensor, fresh: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Rows of X made orthonormal to the rows of V and to each other.

    Classical Gram–Schmidt applied twice ("twice is enough", Giraud et al. 2005). A row that vanishes (V spans
    an invariant subspace containing it) is replaced by a fresh random direction, so the basis keeps growing.

    Returns:
        The new orthonormal rows, ``[len(X), N]``.

    Raises:
        RuntimeError: four fresh directions in a row fell inside ``span(V)`` (the dimension is exhausted).
    """
    basis, out = V, []
    for x in X:
        for _attempt in range(4):
            x0 = x.norm()
            for _ in range(2):
                if basis.shape[0]:
                    x = x - (basis @ x) @ basis
            if x.norm() > 1e-12 * x0 and x.norm() > 0:
                break
            x = fresh()
        else:  # pragma: no cover - needs four random vectors inside span(V)
            raise RuntimeError("could not extend the Krylov basis (is the dimension exhausted?)")
        x = x / x.norm()
        basis = torch.cat([basis, x[None]])
        out.append(x)
    return torch.stack(out)


# -------------------------------------------------------------------------------------------- drivers
@dataclass
class _Ritz:
    values: torch.Tensor   # [k]
    vectors: torch.Tensor  # [k, N] float64
    iterations: int
    matvecs: int
    anorm: float
    info: dict


def _lanczos(mv, N, k, which, tol, max_iters, src, device, dtype, block=1) -> _Ritz:
    """Block thick-restart Lanczos with full reorthogonalisation.

    References: Wu & Simon 2000; Stewart's Krylov–Schur; the block form as in Zhou & Saad 2008.

    The basis V (rows, orthonormal) and W = A V are kept together, so Rayleigh–Ritz T = V Wᵀ and the
    residuals W s − θ V s need no extra matvecs. The next block is always the part of A·(last block)
    orthogonal to V; at a restart the best ``keep`` Ritz vectors stay, which preserves the block Krylov
    relation A Y = Y Θ + R E with R in the span of that next block.

    A Krylov space of block size b holds at most b copies of a repeated eigenvalue, so a converged set
    can silently miss copies. Every time all k pairs pass the test, one fresh random direction is added
    to the block and the basis is refilled from the k converged vectors alone (a deflated Krylov space
    of the new direction, of degree about m − k); the result is accepted only when the k wanted values
    survive that confirmation cycle unchanged (within the tolerance). A missing copy separated from
    the claimed k-th value by a relative gap g is found when the confirmation's Chebyshev factor
    T_{m−k}(1 + 2g) beats the fresh vector's small component along it; an exact multiplicity r costs
    about r confirmation cycles. For that degree to hold with a block of b directions the basis holds
    up to k + (m − k)·b vectors (with a fixed m the degree fell to (m − k)/b and copies were missed).

    Returns:
        The ``k`` wanted Ritz pairs (float64) with the cycles and matvecs spent and the norm estimate.
    """
    m = min(N, max(2 * k + 1, k + 20, k + 2 * block))
    keep = max(k, (m + k) // 2)
    fresh = lambda: src.gaussian(1).reshape(N).double().to(device)  # noqa: E731
    V = torch.zeros(0, N, dtype=torch.float64, device=device)
    W = torch.zeros_like(V)
    x = _orth_against(V, src.gaussian(block).reshape(block, N).double().to(device), fresh)
    matvecs, cycles, anorm, claimed, confirmations = 0, 0, 0.0, None, 0
    while True:
        # the basis grows with the block, so every direction of the block (a confirmation's fresh one
        # included) gets a Krylov degree of about m − k, not (m − k) / block
        cap = min(N, max(m, k + (m - k) * x.shape[0]))
        while V.shape[0] + x.shape[0] <= cap:
            ax = mv(x)
            matvecs += x.shape[0]
            V, W = torch.cat([V, x]), torch.cat([W, ax])
            room = N - V.shape[0]
            if room == 0:
                break
            x = _orth_against(V, ax[:room], fresh)
        T = V @ W.T
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        order = _order(theta, which)
        S = S[:, order]
        theta = theta[order]
        anorm = max(anorm, float(theta.abs().max()))
        Sk = S[:, :k]
        res = (Sk.T @ W - theta[:k, None] * (Sk.T @ V)).norm(dim=1)
        limit = torch.clamp(tol * theta[:k].abs(), min=_floor(dtype, N, anorm))
        confirm = bool((res <= limit).all())
        if confirm and claimed is not None and bool(((theta[:k] - claimed).abs() <= limit).all()):
            break
        if cycles >= max_iters or V.shape[0] >= N:
            break
        cycles += 1
        if confirm:
            claimed, confirmations = theta[:k].clone(), confirmations + 1
        grow = 1 if confirm and V.shape[0] + x.shape[0] < N else 0
        # a confirmation refills the whole basis from the k converged vectors
        kept = k if confirm else min(max(keep, cap - (m - keep)), cap - x.shape[0] - grow)
        V, W = S[:, :kept].T @ V, S[:, :kept].T @ W  # x stays orthogonal to the new, smaller span
        if grow:
            x = torch.cat([x, _orth_against(torch.cat([V, x]), fresh()[None], fresh)])
    return _Ritz(theta[:k], Sk.T @ V, cycles, matvecs, anorm,
                 {"block_size": x.shape[0], "basis_size": m, "confirmation_cycles": confirmations})


def _subspace(mv, N, k, which, tol, max_iters, p, src, device, dtype) -> _Ritz:
    """Block subspace iteration on B = ±A + σI with Rayleigh–Ritz on A at every step.

    ``largest_magnitude``: σ = 0. ``largest`` (``smallest``): σ = max(0, −θ_min) (σ = θ_max) over the
    Ritz values seen so far, which makes B positive semi-definite on everything seen and turns the wanted
    end into B's largest-magnitude end; σ only grows, and the test is trusted only once σ has settled.

    Returns:
        The ``k`` wanted Ritz pairs (float64) with the iterations and matvecs spent and the norm estimate.
    """
    sign = -1.0 if which == "smallest" else 1.0
    Q = torch.linalg.qr(src.gaussian(p).reshape(p, N).double().to(device).T).Q.T
    sigma, settled, matvecs, anorm = 0.0, True, 0, 0.0
    for it in range(1, max_iters + 1):
        Y = mv(Q)
        matvecs += p
        T = Q @ Y.T
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        order = _order(theta, which)
        S, theta = S[:, order], theta[order]
        anorm = max(anorm, float(theta.abs().max()))
        Sk = S[:, :k]
        res = (Sk.T @ Y - theta[:k, None] * (Sk.T @ Q)).norm(dim=1)
        done = bool((res <= torch.clamp(tol * theta[:k].abs(), min=_floor(dtype, N, anorm))).all())
        if (done and settled) or it == max_iters or p >= N:
            break
        if which != "largest_magnitude":
            new = max(sigma, float((-sign * theta).max()))
            settled = new - sigma <= 1e-3 * anorm
            sigma = new
        Q = torch.linalg.qr((sign * Y + sigma * Q).T).Q.T
    return _Ritz(theta[:k], Sk.T @ Q, it, matvecs, anorm, {"block_size": p, "shift": sign * sigma})


def _warn_unconverged(what, conv, res, values, tol, method, iterations, matvecs):
    if bool(conv.all()):
        return
    bad = (~conv).nonzero().flatten().tolist()
    rel = (res / values.abs().clamp(min=1e-300)).max().item()
    warnings.warn(
        f"{what}: {len(bad)} of {conv.numel()} pairs (indices {bad[:8]}{'...' if len(bad) > 8 else ''}) "
        f"did not reach the relative residual tol={tol:g} after {iterations} iterations of method={method!r} "
        f"({matvecs} matvecs; worst relative residual {rel:.2g}). Raise max_iters, use method='lanczos', or "
        "read result.converged before trusting those values.", ConvergenceWarning, stacklevel=3)


def top_eigenpairs(A, k: int = 6, *, method: str = "lanczos", which: str = "largest", tol: float | None = None,
                   max_iters: int | None = None, oversample: int = 10, seed=None,
                   chunk_size: int = DEFAULT_CHUNK, power_iters: int | None = None) -> EigenResult:
    """``k`` eigenpairs at one end of the spectrum of a self-adjoint operator, to a residual tolerance.

    ``which``: ``largest`` (algebraic), ``smallest`` (algebraic) or ``largest_magnitude``; every
    method delivers every ``which``. The iteration stops when all ``k`` pairs pass the residual test
    of the module docstring (‖Av − θv‖ ≤ tol·|θ|, Ritz values then within relative ``tol`` of
    eigenvalues) or after ``max_iters`` iterations, with a ``ConvergenceWarning`` naming the pairs
    that did not pass.

    Methods:
        ``lanczos`` (default): thick-restart Lanczos with full reorthogonalisation, one matvec per
        step, basis of max(2k+1, k+20) vectors; an iteration is a restart cycle (≤ the basis size
        minus the kept vectors in matvecs). Converges in far fewer matvecs than subspace iteration on
        clustered or slowly decaying spectra. A single Krylov vector spans one copy of a repeated
        eigenvalue, so each claimed convergence is confirmed by one more cycle with a fresh random
        direction added (see ``_lanczos``), which finds the missing copies (tested to multiplicity 5).
        ``randomized``: block subspace iteration with ``k + oversample`` vectors and Rayleigh–Ritz at
        every step, shifted for the algebraic ends (see ``_subspace``); ``k + oversample`` matvecs per
        iteration, batched. Convergence rate |λ_{p+1} + σ|/|λ_i + σ| per iteration: good for fast
        decay, poor for flat spectra (it then stops at ``max_iters`` and warns).

    Args:
        A: self-adjoint operator (kpflow ``LinearOperator`` flagged self-adjoint, matrix, ...).
        k: number of eigenpairs, 1 ≤ k < dimension.
        method: ``lanczos`` or ``randomized``.
        which: ``largest``, ``smallest`` or ``largest_magnitude``.
        tol: relative residual tolerance; default 1e-6 (√ε for dtypes coarser than float64).
        max_iters: iteration cap (restart cycles or subspace iterations); default 100.
        oversample: extra block vectors of the randomized method.
        seed: int or ``torch.Generator`` for the start vectors (reproducible on any device).
        chunk_size: probes per batched operator call.
        power_iters: deprecated; read as ``max_iters = power_iters + 1``.

    Returns:
        ``EigenResult``: values ordered by ``which``, vectors, residuals, converged flags, method,
        iterations, matvecs and the tolerance.

    Raises:
        ValueError: A not flagged self-adjoint, unknown ``method``/``which``, k out of range, or
            tol/max_iters invalid.
        TypeError: a complex operator.
    """
    A = _real(square_operator(A, "top_eigenpairs"), "top_eigenpairs")
    if not A.is_self_adjoint:
        raise ValueError(f"top_eigenpairs needs a self-adjoint operator; {A!r} is not flagged self-adjoint. "
                         "Use top_singular_triplets, or symmetric_part(A).")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH} (algebraic ends or largest magnitude), got {which!r}")
    if method not in ("lanczos", "randomized"):
        raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")
    max_iters = _power_iters_shim(power_iters, max_iters, "top_eigenpairs")
    n = A.size_in
    tol, max_iters = _check_solver_args(k, n, tol, max_iters, A.dtype, "top_eigenpairs")
    chunk = check_chunk(chunk_size)
    src = ProbeSource(seed, (n,), torch.float64, A.device, "gaussian")

    def mv(X):
        return _flat_rows(A, X, chunk, "top_eigenpairs")

    if method == "lanczos":
        r = _lanczos(mv, n, k, which, tol, max_iters, src, A.device, A.dtype)
    else:
        r = _subspace(mv, n, k, which, tol, max_iters, min(n, k + max(0, int(oversample))), src, A.device,
                      A.dtype)
    V = r.vectors / r.vectors.norm(dim=1, keepdim=True)
    vals = r.values
    res = (mv(V) - vals[:, None] * V).norm(dim=1)
    conv = res <= torch.clamp(tol * vals.abs(), min=_floor(A.dtype, n, r.anorm))
    used = r.matvecs + k
    vals, res, conv = vals.cpu(), res.cpu(), conv.cpu()
    _warn_unconverged("top_eigenpairs", conv, res, vals, tol, method, r.iterations, used)
    return EigenResult(vals, V.reshape(k, *A.shape_in).to(A.dtype), res, conv, method, r.iterations, used, tol,
                       details={"which": which, "seed": src.seed, "norm_estimate": r.anorm, **r.info})


def top_singular_triplets(A, k: int = 6, *, method: str = "lanczos", tol: float | None = None,
                          max_iters: int | None = None, oversample: int = 10, seed=None,
                          chunk_size: int = DEFAULT_CHUNK, power_iters: int | None = None) -> EigenResult:
    """Top-``k`` singular triplets A vᵢ = σᵢ uᵢ, A* uᵢ = σᵢ vᵢ of any operator, to a residual tolerance.

    ``lanczos``: the largest algebraic eigenpairs of the Jordan–Wielandt operator H = [[0, A], [A*, 0]]
    (eigenvalues ±σᵢ, eigenvectors [uᵢ; vᵢ]/√2) by ``top_eigenpairs``' Lanczos; each step costs one A
    and one A* application. ``randomized``: subspace iteration on A*A with Rayleigh–Ritz (Halko et al.
    2011, Alg. 4.4 + 5.1), ``2(k + oversample)`` applications per iteration. A triplet is converged when
    √(‖Av − σu‖² + ‖A*u − σv‖²) ≤ tol·σ·√2 (the residual of H's eigenpair) or below the rounding level.

    Args:
        A: any operator (kpflow ``LinearOperator``, matrix, scipy ``LinearOperator``).
        k: number of triplets, 1 ≤ k < min(dimensions).
        method: ``lanczos`` or ``randomized``.
        tol: relative residual tolerance; default as in ``top_eigenpairs``.
        max_iters: iteration cap; default 100.
        oversample: extra block vectors of the randomized method.
        seed: int or ``torch.Generator``.
        chunk_size: probes per batched operator call.
        power_iters: deprecated; read as ``max_iters = power_iters + 1``.

    Returns:
        ``EigenResult`` with singular values (descending), right ``vectors``, ``left_vectors``,
        residuals ‖A v − σ u‖ and converged flags.

    Raises:
        ValueError: unknown method, k out of range, or tol/max_iters invalid.
        TypeError: a complex operator.
    """
    A = _real(operator(A, "top_singular_triplets"), "top_singular_triplets")
    if method not in ("lanczos", "randomized"):
        raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")
    max_iters = _power_iters_shim(power_iters, max_iters, "top_singular_triplets")
    n_in, n_out = A.size_in, A.size_out
    tol, max_iters = _check_solver_args(k, min(n_in, n_out), tol, max_iters, A.dtype, "top_singular_triplets")
    chunk = check_chunk(chunk_size)

    def fwd(X):
        return _flat_rows(A, X, chunk, "top_singular_triplets")

    def adj(Y):
        return _flat_rows_adjoint(A, Y, chunk, "top_singular_triplets (adjoint)")

    if method == "lanczos":
        N = n_out + n_in
        src = ProbeSource(seed, (N,), torch.float64, A.device, "gaussian")

        def mv(X):
            return torch.cat([fwd(X[:, n_out:]), adj(X[:, :n_out])], 1)

        r = _lanczos(mv, N, k, "largest", tol, max_iters, src, A.device, A.dtype)
        U, Vm = r.vectors[:, :n_out], r.vectors[:, n_out:]
        used, info = 2 * r.matvecs, dict(r.info)
    else:
        src = ProbeSource(seed, (n_in,), torch.float64, A.device, "gaussian")
        p = min(n_in, n_out, k + max(0, int(oversample)))
        Vm = torch.linalg.qr(src.gaussian(p).reshape(p, n_in).double().to(A.device).T).Q.T
        Y, used, iterations = fwd(Vm), p, 0
        while iterations < max_iters:
            iterations += 1
            Q = torch.linalg.qr(Y.T).Q.T                                   # orth(A V)
            Ub, s, Vm = torch.linalg.svd(adj(Q), full_matrices=False)     # Qᵀ A = Ub S Vm
            U = Ub.T @ Q                       # Ritz triplets: A* u = s v holds exactly on span(Q)
            Y = fwd(Vm)                        # A V: this step's residuals and the next step's sketch
            used += 2 * p
            res = (Y[:k] - s[:k, None] * U[:k]).norm(dim=1)
            floor = _floor(A.dtype, n_in + n_out, float(s[0]))
            if bool((res <= torch.clamp(tol * s[:k], min=floor)).all()) or p >= min(n_in, n_out):
                break
        r = _Ritz(s[:k], Vm[:k], iterations, used, float(s[0]), {"block_size": p})
        U, Vm, info = U[:k], Vm[:k], dict(r.info)
    U = U / U.norm(dim=1, keepdim=True).clamp(min=1e-300)
    Vm = Vm / Vm.norm(dim=1, keepdim=True).clamp(min=1e-300)
    s = r.values
    AV, AtU = fwd(Vm), adj(U)
    used += 2 * k
    res = (AV - s[:, None] * U).norm(dim=1)
    res_h = torch.sqrt(res**2 + (AtU - s[:, None] * Vm).norm(dim=1) ** 2)
    conv = res_h <= torch.clamp(math.sqrt(2) * tol * s.abs(), min=_floor(A.dtype, n_in + n_out, r.anorm))
    s, res, conv = s.cpu(), res.cpu(), conv.cpu()
    _warn_unconverged("top_singular_triplets", conv, res, s, tol, method, r.iterations, used)
    return EigenResult(s, Vm.reshape(k, *A.shape_in).to(A.dtype), res, conv, method, r.iterations, used, tol,
                       left_vectors=U.reshape(k, *A.shape_out).to(A.dtype),
                       details={"seed": src.seed, "norm_estimate": r.anorm, **info})


# ---------------------------------------------------------------------------- stochastic Lanczos quadrature
@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: per probe, the Lanczos tridiagonal T and its Gauss rule.

    With v̂ = v/‖v‖ a Rademacher probe, the probe's spectral measure μ = Σⱼ (v̂ᵀuⱼ)² δ_{λⱼ} has
    ∫ f dμ = v̂ᵀ f(A) v̂ and E[n ∫ f dμ] = tr f(A). Its ``steps``-point Gauss rule (nodes θ = eig(T),
    weights τ² = squared first components of T's eigenvectors) is exact for polynomials of degree
    < 2·steps (Golub & Meurant 2010).

    Attributes:
        nodes: [num_probes, steps] Gauss nodes (rows padded with weight 0 when a probe's Krylov space
            became invariant early, in which case its rule is exact).
        weights: [num_probes, steps], each row sums to 1.
        alphas, betas: [num_probes, steps] Lanczos coefficients (betas[:, j] couples steps j and j+1;
            the last one feeds the Gauss–Radau rules of ``cdf``).
        lengths: [num_probes] Lanczos steps per probe.
        dim: n. num_matvecs: operator applications spent. seed: the probes' seed.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    num_matvecs: int
    seed: int | None
    alphas: torch.Tensor | None = None
    betas: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def _groups(self, depth: int | None = None):
        """(probe indices, rule length d, T [g, d, d], β after step d [g]) per distinct length."""
        lengths = self.lengths if depth is None else torch.clamp(self.lengths, max=depth)
        for d in lengths.unique().tolist():
            idx = (lengths == d).nonzero().flatten()
            a, b = self.alphas[idx, :d], self.betas[idx, : d - 1]
            T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
            yield idx, d, T, self.betas[idx, d - 1]

    def _per_probe(self, f, depth: int | None = None) -> torch.Tensor:
        out = torch.zeros(self.nodes.shape[0], dtype=torch.float64)
        for idx, _, T, _ in self._groups(depth):
            th, S = torch.linalg.eigh(T)
            out[idx] = (S[:, 0] ** 2 * f(th)).sum(1)
        return out

    def integrate(self, f) -> Estimate:
        """Estimate tr f(A) ≈ n · mean over probes of Σ τ² f(θ), with an error bar that includes quadrature error.

        ``stderr = s + q``: s is the standard error over probes (Hutchinson), q = n · mean over probes
        of max_{⌈m/2⌉ ≤ d < m} |Q_m(f) − Q_d(f)|, how far each probe's Gauss rule still moved over the
        second half of its depth (an estimate of the quadrature bias, added linearly so that
        value ± z·stderr ⊇ value ± (q + z·s)). Gauss error decays geometrically in m for f analytic
        near the spectrum, so q then over-covers (q = 0 for polynomials of degree < m, e.g. tr A,
        tr A²); for non-smooth f it decays like the node spacing, O(1/m). For step functions (spectral
        CDFs, eigenvalue counts) use ``cdf``, whose bracket is rigorous.

        Reliable: tr A, tr A², ‖A‖_F², tr exp(tA), log det(A + δI) with δ not ≪ the spectral spread,
        smoothed densities. Unreliable (q says so): f singular or steep inside the spectrum, e.g.
        log det or tr A⁻¹ with a (near-)null space, CDF at points inside a dense cluster.

        Args:
            f: elementwise function of a float64 tensor.

        Returns:
            ``Estimate`` (method ``slq``) with ``details``: ``probe_stderr``, ``quadrature_error``.
        """
        per = self.dim * self._per_probe(f)
        steps = self.nodes.shape[1]
        dev = torch.zeros_like(per)
        for d in range(max(1, math.ceil(steps / 2)), steps):
            dev = torch.maximum(dev, (per - self.dim * self._per_probe(f, d)).abs())
        m = per.numel()
        s = float(per.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.nan
        q = float(dev.mean())
        return Estimate(float(per.mean()), s + q, self.num_matvecs, "slq", self.seed, num_probes=m,
                        distribution="rademacher", details={"probe_stderr": s, "quadrature_error": q})

    def cdf(self, t: float) -> Estimate:
        """Fraction of eigenvalues ≤ t, (1/n)·#{λ ≤ t}, with a rigorous quadrature bracket.

        Per probe, the Gauss–Radau rule with a node prescribed at t (T extended by one row whose
        diagonal makes t an eigenvalue; Golub 1973) brackets the probe's CDF by the
        Chebyshev–Markov–Stieltjes inequalities: Σ_{ξᵢ<t} wᵢ ≤ μ((−∞, t)) ≤ μ((−∞, t]) ≤ Σ_{ξᵢ≤t} wᵢ.
        The bracket is tight when t lies in a gap of the spectrum and has the width of the local
        quadrature weight inside a dense part. The value is the mean bracket midpoint; its
        ``stderr = s + h`` with s the standard error over probes and h the mean bracket half-width
        (a bound on the quadrature bias), so value ± z·stderr contains the bracket of the probe mean
        widened by z·s on each side.

        Near-zero clusters (NTK null spaces): the measure's mass at 0 is not resolved by any finite
        rule at t → 0⁺, because moments cannot tell 0 from 10⁻¹²; evaluate at a threshold inside the
        gap above the cluster (e.g. t = 10⁻⁸·λ_max for a numerically exact null space) and the
        bracket then certifies the null fraction.

        Args:
            t: the point (float).

        Returns:
            ``Estimate`` (method ``slq-radau``) with ``details``: ``lower``, ``upper`` (bracket of the
            probe mean), ``probe_stderr``, ``quadrature_halfwidth``, ``t``.
        """
        t = float(t)
        lo = torch.zeros(self.nodes.shape[0], dtype=torch.float64)
        hi = torch.zeros_like(lo)
        for idx, L, T, beta in self._groups():
            th, S = torch.linalg.eigh(T)
            gap = th - t
            gap = torch.where(gap.abs() < 1e-300, torch.full_like(gap, 1e-300), gap)
            d = beta**2 * (S[:, -1] ** 2 / gap).sum(1)  # β²·[(T − tI)⁻¹]_{LL} from T's eigenpairs
            Tr = torch.zeros(idx.numel(), L + 1, L + 1, dtype=torch.float64)
            Tr[:, :L, :L] = T
            Tr[:, L, L - 1] = Tr[:, L - 1, L] = beta
            Tr[:, L, L] = t + d
            xi, Z = torch.linalg.eigh(Tr)  # ascending; one node is t up to rounding
            w = Z[:, 0] ** 2
            j = torch.argmin((xi - t).abs(), dim=1, keepdim=True)
            below = torch.arange(L + 1)[None] < j
            radau_lo, radau_hi = (w * below).sum(1), (w * (torch.arange(L + 1)[None] <= j)).sum(1)
            # β = 0 (invariant Krylov space): the Gauss rule is the probe's measure itself
            g = S[:, 0] ** 2
            exact = beta == 0
            lo[idx] = torch.where(exact, (g * (th < t)).sum(1), radau_lo)
            hi[idx] = torch.where(exact, (g * (th <= t)).sum(1), radau_hi)
        mid = (lo + hi) / 2
        m = mid.numel()
        s = float(mid.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.nan
        h = float(((hi - lo) / 2).mean())
        return Estimate(float(mid.mean()), s + h, self.num_matvecs, "slq-radau", self.seed, num_probes=m,
                        distribution="rademacher",
                        details={"lower": float(lo.mean()), "upper": float(hi.mean()), "probe_stderr": s,
                                 "quadrature_halfwidth": h, "t": t})

    def density(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """Gaussian-smoothed spectral density ``ρ(x) ≈ (1/n) Σⱼ N(x; λⱼ, σ²)`` on ``grid`` (integrates to ≈ 1).

        Every probe's Gauss rule stands in for its spectral measure: ``ρ(x) = mean over probes of
        Σᵢ τᵢ² N(x; θᵢ, σ²)`` (Lin, Saad & Yang 2016, *Approximating spectral densities of large matrices*).

        Args:
            grid: the points x (any 1-D tensor or sequence; read as float64).
            sigma: the smoothing width; default 1/100 of the span of the Gauss nodes.

        Returns:
            ``ρ(grid)``, a float64 tensor of the grid's length.
        """
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = max(span, 1e-12) / 100
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        g = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (g * self.weights[None]).sum(-1).mean(-1)


def spectral_density(A, num_probes: int = 10, lanczos_steps: int = 50, *, seed=None,
                     chunk_size: int = DEFAULT_CHUNK) -> SpectralDensity:
    """Stochastic Lanczos quadrature of a self-adjoint operator (Ubaru, Chen & Saad 2017).

    ``num_probes`` Rademacher starts run ``lanczos_steps`` Lanczos steps each, batched over probes,
    with full reorthogonalisation (torch, on A's device). A probe whose Krylov space becomes invariant
    (β below 10⁻¹² of the running ‖T‖) stops there; its Gauss rule is then exact.

    Args:
        A: self-adjoint operator.
        num_probes: number of Rademacher probes (≥ 2 for a standard error).
        lanczos_steps: Lanczos depth per probe (capped at the dimension).
        seed: int or ``torch.Generator``.
        chunk_size: probes per batched operator call.

    Returns:
        ``SpectralDensity`` (``integrate``, ``cdf``, ``density``).

    Raises:
        ValueError: A not flagged self-adjoint, or a non-positive probe count or depth.
    """
    A = _real(square_operator(A, "spectral_density"), "spectral_density")
    if not A.is_self_adjoint:
        raise ValueError(f"spectral_density needs a self-adjoint operator; {A!r} is not flagged self-adjoint")
    for name, val in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"spectral_density: {name} must be a positive integer, got {val!r}")
    chunk = check_chunk(chunk_size)
    n = A.size_in
    steps = min(lanczos_steps, n)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, "rademacher")
    V0 = src.draw(num_probes).reshape(num_probes, -1).double()
    q = V0 / V0.norm(dim=1, keepdim=True)
    b = num_probes
    Qs = torch.zeros(b, steps, q.shape[1], dtype=torch.float64, device=q.device)
    Qs[:, 0] = q
    alphas = torch.zeros(b, steps, dtype=torch.float64)
    betas = torch.zeros(b, steps, dtype=torch.float64)
    lengths = torch.full((b,), steps, dtype=torch.int64)
    active = torch.ones(b, dtype=torch.bool, device=q.device)
    q_prev, beta = torch.zeros_like(q), torch.zeros(b, dtype=torch.float64, device=q.device)
    scale = torch.zeros(b, dtype=torch.float64, device=q.device)
    used = 0
    for j in range(steps):
        idx = active.nonzero().flatten()
        w = torch.zeros_like(q)
        w[idx] = _flat_rows(A, q[idx], chunk, "spectral_density")
        used += idx.numel()
        alpha = (w * q).sum(1)
        w = w - alpha[:, None] * q - beta[:, None] * q_prev
        Qst = Qs[:, : j + 1]  # [b, j+1, n]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - (Qst.transpose(1, 2) @ (Qst @ w[:, :, None]))[:, :, 0]
        beta = w.norm(dim=1) * active
        scale = torch.maximum(scale, torch.maximum(alpha.abs(), beta))
        alphas[:, j] = alpha.cpu()
        betas[:, j] = beta.cpu()
        stop = active & (beta <= 1e-12 * scale)
        lengths[stop.cpu()] = j + 1
        betas[stop.cpu(), j] = 0.0
        active = active & ~stop
        beta = beta * active
        if j == steps - 1 or not bool(active.any()):
            lengths[active.cpu()] = j + 1
            break
        q_prev, q = q, torch.where(active[:, None], w / beta.clamp(min=1e-300)[:, None], torch.zeros_like(w))
        Qs[:, j + 1] = q
    if n <= steps:
        betas[:, -1] = 0.0  # the whole space was spanned: exact
    nodes = torch.zeros(b, steps, dtype=torch.float64)
    weights = torch.zeros(b, steps, dtype=torch.float64)
    for i in range(b):
        L = int(lengths[i])
        a, be = alphas[i, :L], betas[i, : L - 1]
        th, S = torch.linalg.eigh(torch.diag(a) + torch.diag(be, 1) + torch.diag(be, -1))
        nodes[i, :L], weights[i, :L] = th, S[0] ** 2
        nodes[i, L:] = th[-1]
    return SpectralDensity(nodes, weights, n, used, src.seed, alphas, betas, lengths)


# ------------------------------------------------------------------------------------ modes for variance
def _psd_tolerance(dtype: torch.dtype, n: int, anorm: float) -> float:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return 100 * eps * math.sqrt(n) * anorm


def modes_for_variance(A, fraction: float = 0.95, *, num_matvecs: int = 200, max_modes: int | None = None,
                       method: str = "lanczos", seed=None) -> Estimate:
    """The number of leading eigenmodes that carry ``fraction`` of tr(A) for PSD A.

    This is the papers' "modes for 95 % of the variance": the smallest k with λ₁ + … + λ_k ≥ fraction · tr(A),
    λ descending.

    Only defined for positive semi-definite A (for indefinite A the partial sums are not monotone and
    the count is meaningless). Dense eigendecomposition up to dimension ``DENSE_EIG_LIMIT``; above it,
    top eigenvalues (doubling k) against a trace estimate, and the standard error propagates the
    trace's uncertainty. Negative eigenvalues beyond rounding (100·ε·√n·‖A‖) are refused; the
    matrix-free path proves indefiniteness with a negative Ritz value (Ritz values lie in
    [λ_min, λ_max]) unless A is flagged ``is_psd``.

    Args:
        A: PSD operator (or matrix).
        fraction: in (0, 1].
        num_matvecs: budget of the trace estimate (matrix-free path).
        max_modes: cap on k (matrix-free path).
        method: eigensolver of the matrix-free path (see ``top_eigenpairs``).
        seed: int or ``torch.Generator``.

    Returns:
        ``Estimate`` of k: ``exact`` on the dense path (``details['eigenvalues']``), else with
        ``parts['trace']`` and ``details['eigenvalues']``, ``details['eigen_converged']``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or A has a negative eigenvalue beyond rounding.
    """
    A = _real(square_operator(A, "modes_for_variance"), "modes_for_variance")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = A.size_in

    def refuse(lam_min, anorm, how):
        raise ValueError(
            f"modes_for_variance needs a positive semi-definite operator; {A!r} has an eigenvalue {lam_min:.3g} "
            f"({how}; ‖A‖ ≈ {anorm:.3g}), beyond rounding. Pass a PSD operator such as a Gram or NTK "
            "operator (gram(J)), or A*A for the modes of A's singular values.")

    if n <= DENSE_EIG_LIMIT:
        M = A.to_matrix().double()
        lam = torch.linalg.eigvalsh((M + M.T) / 2).flip(0).cpu()
        anorm = float(lam.abs().max())
        if float(lam[-1]) < -_psd_tolerance(A.dtype, n, anorm):
            refuse(float(lam[-1]), anorm, "dense eigendecomposition")
        k = int(torch.searchsorted(torch.cumsum(lam, 0), fraction * lam.sum()).item()) + 1
        return exact_estimate(float(min(k, n)), n, "dense-eigh", reason=f"dimension {n} ≤ DENSE_EIG_LIMIT",
                              eigenvalues=lam, trace=float(lam.sum()))
    used = 0
    if not A.is_psd:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            low = top_eigenpairs(A, 1, method="lanczos", which="smallest", tol=1e-2, max_iters=5, seed=seed)
        used += low.num_matvecs
        anorm, lam_min = low.details["norm_estimate"], float(low.values[0])
        if lam_min < -_psd_tolerance(A.dtype, n, anorm):
            refuse(lam_min, anorm, "a Lanczos Ritz value, an upper bound on the smallest eigenvalue")
    tr = trace(A, num_matvecs, seed=seed)
    cap = n - 1 if max_modes is None else min(max_modes, n - 1)
    k = min(16, cap)
    used += tr.num_matvecs
    while True:
        res = top_eigenpairs(A, k, method=method, seed=seed)
        used += res.num_matvecs
        lam = res.values.double()
        cum = torch.cumsum(lam, 0)
        if cum[-1] >= fraction * (tr.value + 2 * tr.stderr) or k >= cap:
            break
        k = min(2 * k, cap)

    def count(total):
        hit = torch.nonzero(cum >= fraction * total)
        return float(hit[0].item() + 1) if hit.numel() else math.nan

    value = count(tr.value)
    lo, hi = count(tr.value - tr.stderr), count(tr.value + tr.stderr)
    se = (hi - lo) / 2 if math.isfinite(hi) and math.isfinite(lo) else math.nan
    note = "" if math.isfinite(value) else (
        f"the top {k} modes carry less than {fraction:.0%} of the trace; raise max_modes")
    return Estimate(value, se, used, f"{method}+{tr.method}", tr.seed, num_probes=tr.num_probes,
                    distribution=tr.distribution, note=note, parts={"trace": tr},
                    details={"eigenvalues": lam, "fraction": fraction, "eigen_converged": res.converged})


__all__ = ["ConvergenceWarning", "EigenResult", "SpectralDensity", "WHICH", "top_eigenpairs",
           "top_singular_triplets", "spectral_density", "modes_for_variance"]
