"""Top spectrum, spectral density and "modes for 95 % of the variance" of operators applied matrix-free.

* ``top_eigenpairs``: Lanczos (scipy ``eigsh`` through the scipy bridge; Lehoucq et al., ARPACK) or a
  randomized block subspace iteration with Rayleigh–Ritz in torch (Halko, Martinsson & Tropp 2011),
  which stays on the operator's device.
* ``top_singular_triplets``: ``svds`` or randomized SVD (Halko et al. 2011) for any operator.
* ``spectral_density``: stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017).
* ``modes_for_variance``: the smallest k with λ₁ + … + λ_k ≥ fraction · tr(A) (the papers' measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kpflow.operators import to_scipy

from .probes import DEFAULT_CHUNK, ProbeSource, apply_chunked, check_chunk, operator, square_operator
from .result import Estimate
from .trace import trace

#: Largest dimension for which ``modes_for_variance`` uses a dense eigendecomposition.
DENSE_EIG_LIMIT = 2048


@dataclass
class EigenResult:
    """Eigenpairs (or singular triplets) with their residual norms ‖A v − λ v‖."""

    values: torch.Tensor                   # [k], descending
    vectors: torch.Tensor                  # [k, *shape_in] (right singular vectors for SVD)
    residuals: torch.Tensor                # [k]
    method: str
    n_matvecs: int
    left_vectors: torch.Tensor | None = None  # [k, *shape_out] for singular triplets
    info: dict = field(default_factory=dict)


def _flat_rows(A, V, chunk, what):
    k = V.shape[0]
    return apply_chunked(A.matmat, V.to(A.dtype).reshape(k, *A.shape_in), chunk, what).reshape(k, -1).double()


def top_eigenpairs(A, k: int = 6, *, method: str = "randomized", which: str = "largest",
                   oversample: int = 10, power_iters: int = 3, seed=None, chunk_size: int = DEFAULT_CHUNK,
                   tol: float = 0.0) -> EigenResult:
    """Top-``k`` eigenpairs of a self-adjoint operator (``which``: ``largest`` algebraic or
    ``largest_magnitude``). ``method``: ``lanczos`` (scipy eigsh) or ``randomized`` (torch)."""
    A = square_operator(A, "top_eigenpairs")
    if not A.is_self_adjoint:
        raise ValueError(f"top_eigenpairs needs a self-adjoint operator; {A!r} is not flagged self-adjoint. "
                         "Use top_singular_triplets, or symmetric_part(A).")
    if which not in ("largest", "largest_magnitude"):
        raise ValueError(f"which must be 'largest' or 'largest_magnitude', got {which!r}")
    n = A.size_in
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the dimension - 1 = {n - 1}, got {k}")
    chunk = check_chunk(chunk_size)
    if method == "lanczos":
        from scipy.sparse.linalg import eigsh

        L = to_scipy(A)
        counter = _count(L)
        vals, vecs = eigsh(counter, k=k, which="LA" if which == "largest" else "LM", tol=tol)
        order = np.argsort(-vals if which == "largest" else -np.abs(vals))
        vals = torch.as_tensor(vals[order].copy(), dtype=torch.float64)
        V = torch.as_tensor(vecs[:, order].T.copy(), dtype=torch.float64, device=A.device)
        used = counter.calls
    elif method == "randomized":
        src = ProbeSource(seed, A.shape_in, A.dtype, A.device, "gaussian")
        p = min(n, k + oversample)
        Q = torch.linalg.qr(_flat_rows(A, src.gaussian(p).reshape(p, -1), chunk, "top_eigenpairs").T).Q
        used = p
        for _ in range(power_iters):
            Q = torch.linalg.qr(_flat_rows(A, Q.T, chunk, "top_eigenpairs").T).Q
            used += p
        AQ = _flat_rows(A, Q.T, chunk, "top_eigenpairs").T
        used += p
        T = Q.T @ AQ
        w, S = torch.linalg.eigh((T + T.T) / 2)
        order = torch.argsort(-w if which == "largest" else -w.abs())[:k]
        vals, V = w[order].cpu(), (Q @ S[:, order]).T
    else:
        raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")
    AV = _flat_rows(A, V, chunk, "top_eigenpairs (residuals)")
    res = (AV - vals.to(AV.device)[:, None] * V.to(AV.device)).norm(dim=1).cpu()
    return EigenResult(vals, V.reshape(k, *A.shape_in).to(A.dtype), res, method, used + k)


class _count:
    """Wrap a scipy LinearOperator counting matvecs."""

    def __init__(self, L):
        self.L, self.calls = L, 0
        self.shape, self.dtype = L.shape, L.dtype

    def matvec(self, x):
        self.calls += 1 if x.ndim == 1 else x.shape[1]
        return self.L.matvec(x)

    def rmatvec(self, x):
        self.calls += 1 if x.ndim == 1 else x.shape[1]
        return self.L.rmatvec(x)

    def matmat(self, X):
        self.calls += X.shape[1]
        return self.L.matmat(X)

    def __getattr__(self, name):
        return getattr(self.L, name)


def top_singular_triplets(A, k: int = 6, *, method: str = "randomized", oversample: int = 10,
                          power_iters: int = 3, seed=None, chunk_size: int = DEFAULT_CHUNK) -> EigenResult:
    """Top-``k`` singular triplets A vᵢ = σᵢ uᵢ of any operator (``lanczos``: scipy svds; ``randomized``:
    Halko et al. randomized SVD with power iterations, in torch)."""
    A = operator(A, "top_singular_triplets")
    d = min(A.size_in, A.size_out)
    if not 1 <= k < d:
        raise ValueError(f"k must be between 1 and min(dims) - 1 = {d - 1}, got {k}")
    chunk = check_chunk(chunk_size)

    def adj(Y):
        kk = Y.shape[0]
        return apply_chunked(A.rmatmat, Y.to(A.dtype).reshape(kk, *A.shape_out), chunk,
                             "top_singular_triplets (adjoint)").reshape(kk, -1).double()

    if method == "lanczos":
        from scipy.sparse.linalg import svds

        L = _count(to_scipy(A))
        U, s, Vt = svds(L, k=k)
        order = np.argsort(-s)
        s = torch.as_tensor(s[order].copy())
        Um = torch.as_tensor(U[:, order].T.copy(), device=A.device)
        Vm = torch.as_tensor(Vt[order].copy(), device=A.device)
        used = L.calls
    elif method == "randomized":
        src = ProbeSource(seed, A.shape_in, A.dtype, A.device, "gaussian")
        p = min(d, k + oversample)
        Q = torch.linalg.qr(_flat_rows(A, src.gaussian(p).reshape(p, -1), chunk, "top_singular_triplets").T).Q
        used = p
        for _ in range(power_iters):
            W = torch.linalg.qr(adj(Q.T).T).Q
            Q = torch.linalg.qr(_flat_rows(A, W.T, chunk, "top_singular_triplets").T).Q
            used += 2 * p
        Bt = adj(Q.T).T  # Aᵀ Q = Bᵀ, B = Qᵀ A  [size_in, p]
        used += p
        Ub, s, Vt = torch.linalg.svd(Bt.T, full_matrices=False)
        s, Um, Vm = s[:k].cpu(), (Q @ Ub[:, :k]).T, Vt[:k]
    else:
        raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")
    AV = _flat_rows(A, Vm, chunk, "top_singular_triplets (residuals)")
    res = (AV - s.to(AV.device)[:, None] * Um.to(AV.device)).norm(dim=1).cpu()
    return EigenResult(s, Vm.reshape(k, *A.shape_in).to(A.dtype), res, method, used + k,
                       left_vectors=Um.reshape(k, *A.shape_out).to(A.dtype))


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: nodes θ and weights τ² per probe; Σ τ² f(θ) ≈ (1/n) tr f(A)."""

    nodes: torch.Tensor     # [num_probes, steps]
    weights: torch.Tensor   # [num_probes, steps], each row sums to 1
    dim: int
    n_matvecs: int
    seed: int | None

    def integrate(self, f) -> Estimate:
        """tr f(A) ≈ n · mean over probes of Σ τ² f(θ), with its standard error over probes."""
        per = self.dim * (self.weights * f(self.nodes)).sum(1)
        m = per.numel()
        se = float(per.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.nan
        return Estimate(float(per.mean()), se, self.n_matvecs, "slq", self.seed)

    def density(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """Gaussian-smoothed spectral density on ``grid`` (integrates to ≈ 1)."""
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = max(span, 1e-12) / 100
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        g = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (g * self.weights[None]).sum(-1).mean(-1)


def spectral_density(A, num_probes: int = 10, lanczos_steps: int = 50, *, seed=None) -> SpectralDensity:
    """Stochastic Lanczos quadrature of a self-adjoint operator: ``num_probes`` Rademacher starts, each
    ``lanczos_steps`` Lanczos steps with full reorthogonalisation (torch, on A's device)."""
    A = square_operator(A, "spectral_density")
    if not A.is_self_adjoint:
        raise ValueError(f"spectral_density needs a self-adjoint operator; {A!r} is not flagged self-adjoint")
    n = A.size_in
    steps = min(lanczos_steps, n)
    src = ProbeSource(seed, A.shape_in, A.dtype, A.device, "rademacher")
    V0 = src.draw(num_probes).reshape(num_probes, -1).double()
    V0 = V0 / V0.norm(dim=1, keepdim=True)
    b = num_probes
    Qs = [V0]
    alphas, betas = [], []
    q_prev, beta = torch.zeros_like(V0), torch.zeros(b, dtype=torch.float64, device=V0.device)
    q = V0
    active_steps = steps
    for j in range(steps):
        w = _flat_rows(A, q, DEFAULT_CHUNK, "spectral_density")
        alpha = (w * q).sum(1)
        w = w - alpha[:, None] * q - beta[:, None] * q_prev
        Qst = torch.stack(Qs, 1)  # [b, j+1, n]
        w = w - torch.einsum("bj,bjn->bn", torch.einsum("bjn,bn->bj", Qst, w), Qst)  # full reorth
        alphas.append(alpha)
        beta = w.norm(dim=1)
        if j == steps - 1 or bool((beta < 1e-10 * alpha.abs().clamp(min=1e-300)).any()):
            active_steps = j + 1
            break
        betas.append(beta)
        q_prev, q = q, w / beta[:, None]
        Qs.append(q)
    al = torch.stack(alphas, 1).cpu()
    be = torch.stack(betas, 1).cpu() if betas else torch.zeros(b, 0, dtype=torch.float64)
    nodes, weights = [], []
    for i in range(b):
        T = torch.diag(al[i]) + torch.diag(be[i, : active_steps - 1], 1) + torch.diag(be[i, : active_steps - 1], -1)
        th, S = torch.linalg.eigh(T)
        nodes.append(th)
        weights.append(S[0] ** 2)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), n, b * active_steps, src.seed)


def modes_for_variance(A, fraction: float = 0.95, *, num_matvecs: int = 200, max_modes: int | None = None,
                       method: str = "lanczos", seed=None) -> Estimate:
    """The number of leading eigenmodes that carry ``fraction`` of tr(A) for PSD A (papers' "modes for
    95 % of the variance"). Dense eigendecomposition up to dimension 2048; above it, top eigenvalues
    (doubling k) against a trace estimate; the standard error propagates the trace's uncertainty.
    """
    A = square_operator(A, "modes_for_variance")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = A.size_in
    if n <= DENSE_EIG_LIMIT:
        M = A.to_matrix().double()
        lam = torch.linalg.eigvalsh((M + M.T) / 2).flip(0).cpu()
        k = int(torch.searchsorted(torch.cumsum(lam, 0), fraction * lam.sum()).item()) + 1
        return Estimate(float(min(k, n)), 0.0, n, "dense-eigh", None,
                        info={"exact": True, "eigenvalues": lam, "trace": float(lam.sum())})
    tr = trace(A, num_matvecs, seed=seed)
    cap = n - 1 if max_modes is None else min(max_modes, n - 1)
    k, used = min(16, cap), tr.n_probes
    while True:
        res = top_eigenpairs(A, k, method=method, seed=seed)
        used += res.n_matvecs
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
    info = {"eigenvalues": lam, "trace": tr, "fraction": fraction}
    if not math.isfinite(value):
        info["note"] = f"the top {k} modes carry less than {fraction:.0%} of the trace; raise max_modes"
    return Estimate(value, se, used, f"{method}+{tr.method}", tr.seed, info=info)


__all__ = ["EigenResult", "SpectralDensity", "top_eigenpairs", "top_singular_triplets", "spectral_density",
           "modes_for_variance"]
