"""Low-rank natural gradient in state space: a drop-in ``torch.optim.Optimizer`` for recurrent models.

The Gauss–Newton / natural-gradient step of a loss ``L(z(θ))`` on the recorded states ``z`` is

    Δθ = −η (J* J + λ I)⁻¹ J* e = −η J* (J J* + λ I)⁻¹ e = −η Jθ* P* (Θ + λ I)⁻¹ e,

with ``J = dz/dθ = P Jθ`` the state Jacobian, ``e = ∂L/∂z`` the direct error and ``Θ = P K P*`` the
state-space NTK (push-through / Woodbury identity). Near a bifurcation ``Θ`` is dominated by one
amplified direction, so a rank-``r`` approximation ``Θ_r = U Λ U*`` captures the part of the geometry
that makes plain gradient descent overshoot; the rest is treated as ``λ I`` (or, by default, as
curvature ``λ_r`` — the Nyström preconditioner of Frangella, Tropp & Udell 2023):

    (Θ_r + λ I)⁻¹ e = U (Λ + λ)⁻¹ U* e + (e − U U* e) / λ.

By default ``Θ_r`` is tracked by Rayleigh–Ritz on the Krylov-like subspace ``span(e, U, z_k − z_{k−1})``
(:func:`ritz_sketch`): the products ``J* [e, U, secant]`` are one batched backward pass, the first of
which is the gradient, so no JVP is ever needed; it runs only when the curvature measured by the
state secant (or the loss's reduction ratio) says the basis went stale, and a step otherwise costs
SGD's one backward pass. The alternative is randomized Nyström with subspace iteration (Halko,
Martinsson & Tropp 2011, Alg. 4.3/5.5; the stable Nyström of Tropp, Yurtsever, Udell & Cevher 2017,
Alg. 3), warm-started from the previous step's basis (cold starts use it too).
The same step in parameter space uses the state-space Fisher ``F = J* J`` (same nonzero spectrum):
``Δθ = −η (F_r + λ I)⁻¹ g`` with ``g = J* e``; the optimizer picks the form whose space is smaller.

Building blocks (free functions, operators only): :func:`nystrom_eigh`, :func:`damped_lowrank_solve`,
:class:`LevenbergMarquardtDamping`, :func:`clip_to_trust_region`. The optimizer
:class:`LowRankNaturalGradient` applies them to ``J`` evaluated on the recording's autograd graph
(:class:`UnrolledJacobian`; ``J*`` costs one backward pass, like SGD's gradient) or to the
state-space operators ``P Jθ`` of :mod:`kpflow.kernels`. See docs/natural_gradient.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kpflow.operators import LinearOperator, ShapeError

__all__ = [
    "LowRankEig",
    "nystrom_eigh",
    "RitzSketch",
    "ritz_sketch",
    "damped_lowrank_solve",
    "LevenbergMarquardtDamping",
    "clip_to_trust_region",
    "CountingOperator",
    "UnrolledJacobian",
    "AutotunedJacobian",
    "record_for_step",
    "LowRankNaturalGradient",
    "lowrank_ng",
]


# ---------------------------------------------------------------------------------------------
# Randomized Nyström with warm-started subspace iteration
# ---------------------------------------------------------------------------------------------


@dataclass
class LowRankEig:
    """``A ≈ U diag(Λ) U*``: ``eigenvalues`` [r] (descending, ≥ 0), orthonormal ``basis`` [r, *shape]."""

    eigenvalues: torch.Tensor
    basis: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.basis.shape[1:])

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``U* x`` for one tensor ``x`` of the basis shape -> [r]."""
        return self.basis.reshape(self.rank, -1) @ x.reshape(-1)

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        """``U c`` for coefficients ``c`` [r] -> one tensor of the basis shape."""
        return (c @ self.basis.reshape(self.rank, -1)).reshape(self.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``U Λ U* x``."""
        return self.combine(self.eigenvalues * self.coefficients(x))


def _orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """Orthonormalize the k probes of ``X`` [k, *shape] (thin QR of the n×k matrix)."""
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
    Omega = _orthonormal_rows(torch.cat(probes, 0))
    for _ in range(power_iters):
        Omega = _orthonormal_rows(A.matmat(Omega))
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


# ---------------------------------------------------------------------------------------------
# Damping and trust region
# ---------------------------------------------------------------------------------------------


@dataclass
class LevenbergMarquardtDamping:
    """Adaptive damping by the reduction ratio ρ = actual / predicted loss change (Martens 2010, §4.1):
    ``λ ← λ·boost`` when ρ < 1/4, ``λ ← λ·drop`` when ρ > 3/4, kept inside ``[minimum, maximum]``."""

    value: float
    boost: float = 1.5
    drop: float = 2.0 / 3.0
    minimum: float = 1e-10
    maximum: float = 1e10
    history: list = field(default_factory=list)

    def __post_init__(self):
        if not self.value > 0:
            raise ValueError(f"adaptive damping needs a positive initial value, got {self.value}")
        if not (self.boost > 1 and 0 < self.drop < 1):
            raise ValueError(f"need boost > 1 and 0 < drop < 1, got boost={self.boost}, drop={self.drop}")

    def update(self, actual: float, predicted: float) -> float:
        """Feed one step's actual and predicted loss change (both usually negative); returns ρ."""
        if predicted >= 0 or not math.isfinite(actual):
            rho = -math.inf
        else:
            rho = actual / predicted
        if rho < 0.25:
            self.value *= self.boost
        elif rho > 0.75:
            self.value *= self.drop
        self.value = min(max(self.value, self.minimum), self.maximum)
        self.history.append(rho)
        return rho


def clip_to_trust_region(step: torch.Tensor, radius: float | None) -> tuple[torch.Tensor, float]:
    """Scale ``step`` so that ``‖step‖₂ ≤ radius``; returns the clipped step and the factor applied."""
    if radius is None:
        return step, 1.0
    norm = float(torch.linalg.vector_norm(step))
    if norm <= radius or norm == 0:
        return step, 1.0
    factor = radius / norm
    return step * factor, factor


# ---------------------------------------------------------------------------------------------
# Cost accounting
# ---------------------------------------------------------------------------------------------


class CountingOperator(LinearOperator):
    """Wraps ``J`` and counts its products: ``jvps`` probes through ``J``, ``vjps`` through ``J*``."""

    def __init__(self, base: LinearOperator):
        super().__init__(base.shape_in, base.shape_out, base.dtype, base.device,
                         is_self_adjoint=base.is_self_adjoint, is_psd=base.is_psd)
        self.base = base
        self.jvps = 0
        self.vjps = 0

    def _matmat(self, X):
        self.jvps += X.shape[0]
        return self.base._matmat(X)

    def _rmatmat(self, Y):
        self.vjps += Y.shape[0]
        return self.base._rmatmat(Y)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------

FORMS = ("auto", "state", "parameter")
JACOBIANS = ("auto", "unrolled", "kernels")
COMPLEMENTS = ("nystrom", "damping")
UPDATES = ("krylov", "nystrom")
SPACES = ("state", "output")


def _kernel_jacobian(traj, param_names: Sequence[str]):
    """``J = P Jθ`` from :mod:`kpflow.kernels`, and ``Jθ`` alone (to reuse the recorded ``P* e``)."""
    from kpflow.kernels import param_jacobian, propagator

    Jtheta = param_jacobian(traj, list(param_names))
    return propagator(traj) @ Jtheta, Jtheta


class UnrolledJacobian(LinearOperator):
    """``J = dz/dθ`` by reverse-mode autodiff through the unrolled recurrence, on one retained graph.

    The same operator as ``P Jθ`` of :mod:`kpflow.kernels`, evaluated the way a training step
    evaluates its gradient: one forward pass builds the autograd graph; every ``J* y`` is then one
    backward pass over it, and every ``J v`` one double-backward pass (``J v = ∂/∂u ⟨J* u, v⟩``, the
    graph of ``u ↦ J* u`` being built once on first use). Several probes go through one vmapped
    backward pass of the graph (``is_grads_batched``: the Python-level cost of a pass is paid once,
    so k probes cost far less than k passes); models whose ops lack a batching rule fall back to a
    loop over the probes. Flat parameter vectors follow ``names`` (the model's parameter order).
    """

    def __init__(self, model, params: dict, names: Sequence[str], inputs: torch.Tensor, z0: torch.Tensor):
        fixed = {k: v.detach() for k, v in params.items()}
        self.names = tuple(names)
        self._leaves = [fixed[n].clone().requires_grad_(True) for n in self.names]
        self._shapes = [tuple(t.shape) for t in self._leaves]
        self._sizes = [t.numel() for t in self._leaves]
        with torch.enable_grad():
            self._out = model.unroll({**fixed, **dict(zip(self.names, self._leaves, strict=True))}, inputs, z0)
        self.states = self._out.detach()
        self.gradient = None  # J* e, when the recording computed it with e
        self._dual = None  # (u, J* u) with the graph of the backward pass, for JVPs
        self._batched = None  # whether vmapped (is_grads_batched) backward passes work for this model
        super().__init__((sum(self._sizes),), tuple(self.states.shape), self.states.dtype, self.states.device)

    def _vjp(self, y, create_graph=False):
        grads = torch.autograd.grad(self._out, self._leaves, y, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)
        return torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                          for g, leaf in zip(grads, self._leaves, strict=True)])

    def _vjp_batched(self, Y):
        """``J* Y`` for all probes in one vmapped backward pass (``is_grads_batched``); None if unsupported."""
        if self._batched is False or Y.shape[0] == 1:
            return None
        try:
            grads = torch.autograd.grad(self._out, self._leaves, Y, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: loop over the probes instead
            self._batched = False
            return None
        self._batched = True
        return torch.cat([(Y.new_zeros(Y.shape[0], leaf.numel()) if g is None else g.reshape(Y.shape[0], -1))
                          for g, leaf in zip(grads, self._leaves, strict=True)], 1)

    def _rmatmat(self, Y):
        with torch.enable_grad():
            out = self._vjp_batched(Y)
            return (out if out is not None else torch.stack([self._vjp(y) for y in Y])).detach()

    def _matmat(self, V):
        with torch.enable_grad():
            if self._dual is None:
                u = torch.zeros_like(self.states, requires_grad=True)
                self._dual = (u, self._vjp(u, create_graph=True))
            u, g = self._dual
            if not g.requires_grad:  # J* does not depend on u through a graph: J is zero
                return torch.zeros(V.shape[0], *self.shape_out, dtype=self.dtype, device=self.device)
            if self._batched is not False and V.shape[0] > 1:
                try:
                    return torch.autograd.grad(g, u, V, retain_graph=True, is_grads_batched=True)[0].detach()
                except RuntimeError:
                    self._batched = False
            return torch.stack([torch.autograd.grad(g, u, v, retain_graph=True)[0] for v in V]).detach()


class AutotunedJacobian(LinearOperator):
    """``J`` with ``J*`` on the recording's autograd graph and ``J v`` from whichever is faster here:
    the double-backward pass of :class:`UnrolledJacobian` or the forward-mode ``P Jθ`` of
    :mod:`kpflow.kernels`. ``choice`` is a dict shared across steps: on the first two products both
    are timed on the same probes (their results agree to rounding; the tests check both against
    ``jacrev``; the first call of each is a warm-up) and the faster one is kept."""

    def __init__(self, unrolled: UnrolledJacobian, traj, names: Sequence[str], choice: dict):
        super().__init__(unrolled.shape_in, unrolled.shape_out, unrolled.dtype, unrolled.device)
        self.unrolled, self.traj, self.names, self.choice = unrolled, traj, tuple(names), choice
        self.gradient = unrolled.gradient

    def _kernels(self):
        from kpflow.kernels import param_jacobian, propagator

        return propagator(self.traj) @ param_jacobian(self.traj, list(self.names))

    def _matmat(self, V):
        backend = self.choice.get("jvp")
        if backend == "unrolled":
            return self.unrolled._matmat(V)
        if backend == "kernels":
            return self._kernels()._matmat(V)
        t0 = time.perf_counter()
        out = self.unrolled._matmat(V)
        t1 = time.perf_counter()
        try:
            self._kernels()._matmat(V)
        except Exception:  # noqa: BLE001 - a model the kernels cannot linearise: keep autodiff
            self.choice["jvp"] = "unrolled"
            return out
        t2 = time.perf_counter()
        trials = self.choice.get("trials", 0) + 1  # the first call of each is a warm-up (lazy setup)
        self.choice.update(trials=trials, seconds={"unrolled": t1 - t0, "kernels": t2 - t1})
        if trials >= 2:
            self.choice["jvp"] = "kernels" if (t2 - t1) < (t1 - t0) else "unrolled"
        return out

    def _rmatmat(self, Y):
        return self.unrolled._rmatmat(Y)


def record_for_step(model, names: Sequence[str], inputs, targets, *, mask=None, loss="mse", z0=None):
    """Record a batch for one optimizer step: a :class:`kpflow.kernels.Trajectory` (without the adjoint,
    which the step does not need) and the :class:`UnrolledJacobian` whose forward pass produced it.
    The gradient ``J* e`` comes from the same backward pass as ``e`` (as in SGD), so a step that
    reuses its basis costs no product beyond it."""
    from kpflow.kernels import Trajectory
    from kpflow.kernels.trajectory import _loss_value

    model.check_inputs(inputs, z0)
    inputs = inputs.detach()
    if z0 is None:
        z0 = model.initial_state(inputs.shape[0], inputs.dtype, inputs.device)
    params = {k: v.detach() for k, v in model.cell_params().items()}
    J = UnrolledJacobian(model, params, names, inputs, z0.detach())
    states = J.states.detach()
    if not bool(torch.isfinite(states).all()):
        raise FloatingPointError("the model's states became non-finite on this batch; lower the learning rate "
                                 "or the damping's lower bound, or raise the trust_region clip")
    rp = {k: v.detach() for k, v in model.readout_params().items()}
    with torch.enable_grad():  # one backward pass gives e = ∂L/∂z, ∂L/∂y and the gradient J* e
        y = model.output(J._out, rp)
        value = _loss_value(y, targets, loss, mask)
        e, e_y, *grads = torch.autograd.grad(value, [J._out, y, *J._leaves], retain_graph=True,
                                             allow_unused=True)
    J.gradient = torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                            for g, leaf in zip(grads, J._leaves, strict=True)])
    with torch.no_grad():
        outputs = model.output(states, rp)
    traj = Trajectory(model=model, params=params, inputs=inputs, z0=z0.detach(), states=states, outputs=outputs,
                      targets=targets, mask=mask, error=e.detach(), adjoint=None, loss=float(value.detach()),
                      param_names=tuple(names))
    traj.cache["unrolled_jacobian"] = J
    traj.cache["loss"] = loss
    traj.cache["output_error"] = e_y.detach()
    return traj, J


class LowRankNaturalGradient(torch.optim.Optimizer):
    """Low-rank natural gradient (damped Gauss–Newton) for a :class:`~kpflow.models.RecurrentModel`.

    Each step: ``Δθ = −η J* (c Θ_r + λ I)⁻¹ e`` (state form) or ``Δθ = −η (c F_r + λ I)⁻¹ J* e``
    (parameter form), with ``Θ_r`` / ``F_r`` a rank-``r`` randomized Nyström approximation of the
    state-space NTK ``Θ = J J* = P K P*`` / the state-space Fisher ``F = J* J``, warm-started from the
    previous basis; ``c`` is the curvature of the loss in state space (``L ≈ ½c‖z − z*‖²``). ``r = 0``
    is gradient descent with learning rate ``η/λ``; ``r`` = full rank and ``λ → 0`` is the exact
    Gauss–Newton step ``−η J⁺ e / c``.

    Usage in a plain PyTorch loop (the closure records the batch)::

        from kpflow.kernels import record
        opt = LowRankNaturalGradient(model, lr=0.5, rank=2, damping=1e-3, param_names=["W"])
        for inputs, targets in loader:
            loss = opt.step(lambda: record(model, inputs, targets=targets))
        opt.last_stats["extra_products"]   # products with J beyond SGD's one backward pass

    With the kpflow trainer (``optimizer: lowrank-ng``) the trainer hands each batch to
    :meth:`set_batch` and the optimizer records it itself.

    Args:
        model: the recurrent model; the trained parameters are its cell parameters (``param_names``
            selects a subset, e.g. only the recurrent weight ``["W"]``).
        lr: η, the fraction of the damped Gauss–Newton step taken.
        rank: r ≥ 0, rank of the curvature approximation (1–2 capture a bifurcation channel).
        damping: λ > 0, the Levenberg–Marquardt damping (initial value when ``adaptive_damping``).
        adaptive_damping: adapt λ by the reduction ratio ρ of the previous step (Martens 2010); the
            actual change is measured with the next call's loss, so it is exact for full-batch
            training and a noisy estimate with minibatches. No extra model evaluations.
        damping_bounds: the range adaptive λ is kept in.
        curvature: c, or ``"auto"`` = ``‖e‖² / (2 L)`` (exact for a mean-squared loss directly on
            the states, since then ``L = ½c‖z − z*‖²`` and ``e = c (z − z*)``).
        update: how the basis follows the moving sNTK. ``"krylov"`` (default): Rayleigh–Ritz of
            ``Θ`` on ``span(e, U_prev, z_k − z_{k−1})`` (:func:`ritz_sketch`; the state secant is
            ``J Δθ_{k−1}`` to first order, free on the same batch) from one batched ``J*`` pass whose
            first cotangent ``e`` yields the gradient — no JVP — run only when a free staleness test
            fires (``stale_curvature``, ``stale_rho``) or every ``refresh_every`` steps; otherwise
            ``(U, Λ)`` is reused and the step costs SGD's one backward pass. Without a secant (cold
            start, a new batch) it falls back to a Nyström sketch. ``"nystrom"``: a randomized Nyström
            sketch (:func:`nystrom_eigh`) every ``refresh_every`` steps.
        refresh_every: krylov: also update every this many steps (None = only when stale); nystrom:
            sketch every this many steps (None = 1), reusing ``(U, Λ)`` in between unless the
            previous step's reduction ratio ρ fell below 1/4 (then the basis is refreshed at once).
        stale_curvature: krylov: update when the secant's curvature ratio
            ``‖z_k − z_{k−1}‖² / Δθ*(VΛV* + λ_r(I − VV*))Δθ`` (measured over modelled ``‖J Δθ‖²``)
            exceeds this (≥ 1; inf = never).
        stale_rho: krylov: update when the previous step's reduction ratio fell below this
            (-inf = never).
        ritz_updates: between refreshes, when the batch is the previous step's, update the
            eigenvalues and rotate the basis by Rayleigh–Ritz on the tracked state-space directions
            (``rank + oversample`` products with ``J*`` only, no ``J``), so the curvature along
            the channel stays current; otherwise the previous ``(U, Λ)`` are reused as they are.
        power_iters: subspace-iteration passes before each warm Nyström sketch.
        warmup_iters: passes for the first (cold, random) sketch.
        oversample: extra probes in the sketch beyond ``rank``.
        trust_region: clip ``‖Δθ‖₂ ≤ trust_region · max(‖θ‖₂, 1)`` (None = no clip).
        complement: curvature assumed outside the rank-r basis: ``"nystrom"`` (default) the smallest
            kept eigenvalue λ_r, i.e. the Nyström preconditioner ``U(cΛ+λ)⁻¹U* + (I−UU*)/(cλ_r+λ)``
            (Frangella, Tropp & Udell 2023); ``"damping"`` none, i.e. exactly ``(cΘ_r + λI)⁻¹``, whose
            complement step grows like 1/λ. Both are the exact Gauss–Newton step at full rank and
            gradient descent with step η/λ at rank 0.
        space: where the Gauss–Newton metric lives: ``"state"`` (default; the sNTK ``Θ = J J*`` and
            ``e = ∂L/∂z`` as above) or ``"output"`` (``G = C J``, the output NTK ``C Θ C*`` and
            ``∂L/∂y``: the exact Gauss–Newton step of a loss on the readout).
        form: ``"state"``, ``"parameter"`` or ``"auto"`` (the smaller of B·T·H (B·T·O) and n_params).
        param_names: which cell parameters to train (default all of ``model.cell_params()``).
        readout_lr: learning rate of plain gradient steps on the readout (None = the readout is
            not touched by this optimizer; pair it with another one if it should train).
        jacobian: how products with ``J = dz/dθ`` are computed: ``"auto"`` (default; ``J*`` on the
            recording's autograd graph, ``J v`` by whichever of the two below was faster on the
            first refresh), ``"unrolled"`` (autodiff through the unrolled recurrence, so ``J*``
            costs one backward pass like SGD's and ``J v`` one double-backward pass),
            ``"kernels"`` (``P Jθ`` of :mod:`kpflow.kernels`, reusing the recorded adjoint ``P* e`` for
            the gradient), or a callable ``jacobian(traj, param_names) -> LinearOperator`` taking the
            flat parameter vector (model's parameter order) to the error's shape.
        seed: seed of the random sketch.
    """

    #: the kpflow trainer calls ``step(closure)``; see ``set_batch``.
    requires_closure = True

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 0.5,
        rank: int = 2,
        damping: float = 1e-3,
        *,
        adaptive_damping: bool = True,
        damping_bounds: tuple[float, float] = (1e-8, 1e8),
        curvature: float | str = "auto",
        refresh_every: int | None = None,
        update: str = "krylov",
        stale_rho: float = 0.5,
        stale_curvature: float = 1.5,
        ritz_updates: bool = False,
        power_iters: int = 0,
        warmup_iters: int = 2,
        oversample: int = 0,
        trust_region: float | None = 0.25,
        complement: str = "nystrom",
        space: str = "state",
        form: str = "auto",
        param_names: Sequence[str] | None = None,
        readout_lr: float | None = None,
        jacobian: str | Callable[..., LinearOperator] = "auto",
        seed: int = 0,
    ):
        if not hasattr(model, "cell_params"):
            raise TypeError(
                f"LowRankNaturalGradient needs a kpflow RecurrentModel (built-in cell or CellAdapter), got "
                f"{type(model).__name__}; wrap a custom nn.Module cell with kpflow.models.CellAdapter"
            )
        cell = model.cell_params()
        chosen = list(cell) if param_names is None else [str(n) for n in param_names]
        unknown = [n for n in chosen if n not in cell]
        if unknown or not chosen:
            raise ValueError(f"param_names {unknown or chosen} are not cell parameters of {type(model).__name__}; "
                             f"valid names: {list(cell)}")
        names = [n for n in cell if n in chosen]  # the model's order = the flat layout of kpflow.kernels
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is invalid; use one of {UPDATES}")
        if refresh_every is None:  # nystrom: sketch every step; krylov: update only when a test says stale
            refresh_every = 1 if update == "nystrom" else 0
        elif not (isinstance(refresh_every, int) and not isinstance(refresh_every, bool) and refresh_every >= 1):
            raise ValueError(f"refresh_every={refresh_every!r} is invalid; refresh_every must be None (default) "
                             "or an integer >= 1")
        _check_hyper(lr=lr, rank=rank, damping=damping, refresh_every=max(refresh_every, 1),
                     power_iters=power_iters, warmup_iters=warmup_iters, oversample=oversample,
                     trust_region=trust_region, curvature=curvature, form=form,
                     damping_bounds=damping_bounds, readout_lr=readout_lr)
        n_params = sum(cell[n].numel() for n in names)
        if int(rank) > n_params:
            raise ValueError(
                f"rank {rank} is larger than the number of trained parameters ({n_params}); Θ = J J* and "
                f"F = J* J have rank at most {n_params}, so use rank <= {n_params}"
            )
        defaults = dict(lr=float(lr), rank=int(rank), damping=float(damping), trust_region=trust_region,
                        refresh_every=int(refresh_every), power_iters=int(power_iters),
                        warmup_iters=int(warmup_iters), oversample=int(oversample))
        super().__init__([cell[n] for n in names], defaults)
        self.model = model
        self.param_names = names
        self.n_params = n_params
        self.form = form
        if complement not in COMPLEMENTS:
            raise ValueError(f"complement={complement!r} is invalid; use one of {COMPLEMENTS}")
        self.complement = complement
        if space not in SPACES:
            raise ValueError(f"space={space!r} is invalid; use one of {SPACES}")
        self.space = space
        self.curvature = curvature
        self.adaptive_damping = bool(adaptive_damping)
        self.damping_bounds = (float(damping_bounds[0]), float(damping_bounds[1]))
        self.readout_lr = None if readout_lr is None else float(readout_lr)
        if not (callable(jacobian) or jacobian in JACOBIANS):
            raise ValueError(f"jacobian={jacobian!r} is invalid; use one of {JACOBIANS} or a callable "
                             "jacobian(traj, param_names) -> LinearOperator")
        self.jacobian = jacobian
        p0 = cell[names[0]]
        self._generator = torch.Generator(device=p0.device).manual_seed(int(seed))
        self._batch = None
        self._jvp_choice: dict = {}
        self._state_basis: torch.Tensor | None = None  # state-space side of the basis (not checkpointed)
        self._last_inputs: torch.Tensor | None = None
        self.ritz_updates = bool(ritz_updates)
        self.update = update
        if not (isinstance(stale_rho, (int, float)) and stale_rho <= 1):
            raise ValueError(f"stale_rho={stale_rho!r} is invalid; stale_rho must be a number <= 1 (a reduction "
                             "ratio below which the basis is updated at once; -inf: never)")
        self.stale_rho = float(stale_rho)
        if not (isinstance(stale_curvature, (int, float)) and stale_curvature >= 1):
            raise ValueError(f"stale_curvature={stale_curvature!r} is invalid; it must be a number >= 1 (the ratio "
                             "of the measured to the modelled ‖J Δθ‖² above which the basis is updated; inf: never)")
        self.stale_curvature = float(stale_curvature)
        self._prev_residual: torch.Tensor | None = None  # last recording's states (outputs), for the secant
        # all state lives under the first parameter, as tensors and JSON scalars (checkpoint friendly)
        self.state[p0].update(steps=0, damping=float(damping), eig_values=None, eig_basis=None, eig_form=None,
                              pending_loss=None, pending_predicted=None, pending_quad=None, jvps=0, vjps=0, seconds=0.0)
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ helpers
    @property
    def _st(self) -> dict:
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def damping(self) -> float:
        """The current damping λ."""
        return float(self._st["damping"])

    @property
    def products_per_step(self) -> float:
        """Mean products with J or J* per step so far (SGD needs 1: the gradient's backward pass)."""
        st = self._st
        return (st["jvps"] + st["vjps"]) / max(st["steps"], 1)

    def set_batch(self, batch) -> None:
        """Record the next step from this batch (anything with ``inputs``, ``targets`` and optionally
        ``mask`` and ``loss``, e.g. a ``kpflow.tasks.TaskBatch``) instead of calling the closure."""
        if not _is_batch(batch):
            raise ValueError(f"set_batch needs a batch with 'inputs' and 'targets' (e.g. a TaskBatch or a dict), "
                             f"got {type(batch).__name__}")
        self._batch = batch

    def _record_batch(self, batch):
        get = batch.get if isinstance(batch, dict) else (lambda k, d=None: getattr(batch, k, d))
        traj, _ = record_for_step(self.model, self.param_names, get("inputs"), get("targets"),
                                  mask=get("mask"), loss=get("loss") or "mse", z0=get("z0"))
        return traj

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.param_groups[0]["params"]])

    def _apply_update(self, delta: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.param_groups[0]["params"]:
                n = p.numel()
                p.add_(delta[offset:offset + n].reshape(p.shape).to(p.dtype))
                offset += n

    def _same_batch(self, traj, J) -> bool:
        """Whether this step's trials are the previous step's (then a state-space basis still applies)."""
        inputs = getattr(traj, "inputs", None)
        prev, self._last_inputs = self._last_inputs, inputs
        if inputs is None or prev is None or prev.shape != inputs.shape:
            return False
        if self._state_basis is None or tuple(self._state_basis.shape[1:]) != tuple(J.shape_out):
            return False
        return prev is inputs or bool(torch.equal(prev, inputs))

    def _choose_form(self, n_state: int) -> str:
        if self.form != "auto":
            return self.form
        return "parameter" if self.n_params <= n_state else "state"

    def _operators(self, traj):
        """``J`` (counted) and the gradient ``J* e`` (None: the step computes it as one product)."""
        if callable(self.jacobian):
            return CountingOperator(self.jacobian(traj, self.param_names)), None
        if self.jacobian == "kernels":
            J, Jtheta = _kernel_jacobian(traj, self.param_names)
            J = CountingOperator(J)
            if getattr(traj, "adjoint", None) is None:
                return J, None
            J.vjps += 1  # P* e was recorded (one backward pass); Jθ* of it is the gradient
            return J, Jtheta.adjoint_apply(traj.adjoint.detach().to(Jtheta.dtype))
        J = traj.cache.get("unrolled_jacobian") if hasattr(traj, "cache") else None
        if J is None or tuple(J.names) != tuple(self.param_names):
            J = UnrolledJacobian(traj.model, traj.params, self.param_names, traj.inputs, traj.z0)
        if self.jacobian == "auto":
            J = AutotunedJacobian(J, traj, self.param_names, self._jvp_choice)
        grad = getattr(J, "gradient", None)
        J = CountingOperator(J)
        if grad is not None:
            J.vjps += 1  # the gradient came with e from the recording's one backward pass
        return J, grad

    def _readout_step(self, traj) -> None:
        if self.readout_lr is None or getattr(traj, "targets", None) is None:
            return
        from kpflow.kernels.trajectory import _loss_value

        rp = dict(self.model.readout_params())
        with torch.enable_grad():
            value = _loss_value(self.model.output(traj.states.detach(), rp), traj.targets,
                                traj.cache.get("loss", "mse"), traj.mask)
            grads = torch.autograd.grad(value, list(rp.values()))
        with torch.no_grad():
            for p, g in zip(rp.values(), grads, strict=True):
                p.add_(g, alpha=-self.readout_lr)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], object] | None = None):  # type: ignore[override]
        """One low-rank natural-gradient step; returns the loss before the step.

        ``closure()`` must return a recorded trajectory with an error
        (``kpflow.kernels.record(model, inputs, targets=...)``), unless a batch was handed over with
        :meth:`set_batch`, in which case the optimizer records that batch and does not call it."""
        if self._batch is not None:
            batch, self._batch = self._batch, None
            traj = self._record_batch(batch)
        elif closure is None:
            raise ValueError(
                "LowRankNaturalGradient.step needs a closure that records the batch, e.g. "
                "opt.step(lambda: record(model, inputs, targets=targets)); it has no trajectory otherwise"
            )
        else:
            with torch.enable_grad():
                traj = closure()
        if _is_batch(traj):
            traj = self._record_batch(traj)
        if traj is None or not hasattr(traj, "states") or not hasattr(traj, "error"):
            raise TypeError(
                f"the closure returned {type(traj).__name__}, not a recorded trajectory; it must return "
                "kpflow.kernels.record(model, inputs, targets=...)"
            )
        if traj.error is None:
            raise ValueError("the recorded trajectory has no error e = dL/dz (it was recorded without targets); "
                             "record it with targets=... so the optimizer has a loss to descend")
        if getattr(traj, "loss", None) is None:
            raise ValueError("the recorded trajectory carries no loss value; record it with targets=...")
        group, st = self.param_groups[0], self._st
        t0 = time.perf_counter()
        loss = float(traj.loss)
        rho = None
        if self.adaptive_damping and st["pending_loss"] is not None:
            lm = LevenbergMarquardtDamping(st["damping"], minimum=self.damping_bounds[0],
                                           maximum=self.damping_bounds[1])
            rho = lm.update(loss - st["pending_loss"], st["pending_predicted"])
            st["damping"] = lm.value
        lam = st["damping"]
        counter, grad = self._operators(traj)
        if counter.shape_in != (self.n_params,):
            raise ShapeError(f"the Jacobian takes {counter.shape_in}, expected the flat ({self.n_params},) vector "
                             f"of the trained parameters {self.param_names}")
        if self.space == "output":  # residuals are the outputs: G = C J, error ∂L/∂y
            from kpflow.kernels import readout_jacobian

            J = readout_jacobian(traj) @ counter
            e = _output_error(traj).to(J.dtype)
        else:
            J, e = counter, traj.error.detach().to(counter.dtype)
        n_state = J.size_out
        form = self._choose_form(n_state)
        rank = group["rank"]
        space_dim = n_state if form == "state" else self.n_params
        if rank > space_dim:
            raise ValueError(
                f"rank {rank} is larger than the {self.space} dimension B·T·{'H' if self.space == 'state' else 'O'}"
                f" = {n_state} of this batch; "
                f"use rank <= {space_dim} (or a larger batch, or form='parameter')"
            )
        c = _curvature(self.curvature, e, loss)
        shape = J.shape_out if form == "state" else J.shape_in
        eig = None
        if st["eig_values"] is not None:
            eig = LowRankEig(st["eig_values"].to(J.dtype), st["eig_basis"].to(J.dtype))
        stale = eig is None or st["eig_form"] != form or eig.shape != tuple(shape) or eig.rank != rank
        poor = rho is not None and rho < 0.25  # the last step's model was poor: the basis may be stale
        every = group["refresh_every"]  # 0: no periodic update (krylov: only the staleness tests)
        periodic = every > 0 and st["steps"] % every == 0
        refresh = rank > 0 and (stale or poor or periodic)
        residual = (traj.outputs if self.space == "output" else traj.states).detach().to(J.dtype)
        same_batch = self._same_batch(traj, J)
        secant = None
        if same_batch and self._prev_residual is not None and self._prev_residual.shape == residual.shape:
            secant = residual - self._prev_residual
        self._prev_residual = residual
        # the Krylov/Ritz update needs the previous basis and the secant (same batch as the last step);
        # otherwise (cold start, a new batch) the step falls back to a Nyström sketch
        krylov = (self.update == "krylov" and rank > 0 and not stale and secant is not None
                  and self._state_basis is not None and tuple(self._state_basis.shape[1:]) == tuple(J.shape_out))
        updated = False
        ritz = None
        if krylov:  # Nyström only for a cold start; Ritz steps track the basis every refresh_every steps
            refresh = False
        elif self.update == "krylov" and rank > 0:  # no secant (new batch): Nyström sketches, period ≥ 1
            refresh = refresh or st["steps"] % max(every, 1) == 0
        # free staleness tests: the loss's reduction ratio ρ, and the secant's curvature ratio
        # q = ‖z_k − z_{k−1}‖² / (Δθ* F_model Δθ) (the measured ‖J Δθ‖² against the low-rank model's)
        q = None
        if secant is not None and st.get("pending_quad"):
            q = float(secant.pow(2).sum()) / st["pending_quad"]
        stale_now = (rho is not None and rho < self.stale_rho) or (q is not None and q > self.stale_curvature)
        if krylov and (periodic or stale_now):
            sketch = [*self._state_basis, secant]
            ritz = ritz_sketch(J, e, sketch, rank)
            eig, grad = ritz.eig(form), ritz.gradient
            self._state_basis = ritz.state_basis
            updated = True
        elif refresh:
            op = (J @ J.T) if form == "state" else _FisherKeepingImage(J)
            warm = None if stale else eig.basis
            iters = group["warmup_iters"] if warm is None else group["power_iters"]
            eig = nystrom_eigh(op, rank, oversample=group["oversample"], power_iters=iters, init=warm,
                               generator=self._generator)
            # a state-space basis for cheap Ritz updates until the next refresh
            self._state_basis = eig.basis if form == "state" else _orthonormal_rows(op.last_image)
        elif rank > 0 and self.ritz_updates and same_batch and self._state_basis is not None:
            eig, self._state_basis = _ritz_update(J, self._state_basis, rank, form)
            updated = True
        elif rank == 0:
            eig = LowRankEig(torch.zeros(0, dtype=J.dtype, device=J.device),
                             torch.zeros(0, *shape, dtype=J.dtype, device=J.device))
        x = None
        floor = float(eig.eigenvalues[-1]) if self.complement == "nystrom" and eig.rank > 0 else 0.0
        if ritz is not None and form == "state":
            x, direction = _state_direction(ritz, e, lam, c, floor)
        elif form == "state":
            x = damped_lowrank_solve(eig, lam, e, scale=c, floor=floor)
            if grad is None:  # J* of the preconditioned error and of the error, in one batched product
                both = J.rmatmat(torch.stack([x, e]))
                direction, grad = both[0], both[1]
            else:
                direction = J.adjoint_apply(x)
        else:
            if grad is None:
                grad = J.adjoint_apply(e)
            direction = damped_lowrank_solve(eig, lam, grad, scale=c, floor=floor)
        theta = self._flat_params().to(J.dtype)
        radius = None if group["trust_region"] is None else group["trust_region"] * max(
            float(theta.norm()), 1.0)
        delta, clip = clip_to_trust_region(-group["lr"] * direction, radius)
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError("the natural-gradient step is not finite (non-finite error or Jacobian); "
                                     "check the loss and the model's states")
        predicted = float(grad @ delta) + 0.5 * c * _lowrank_quadratic(eig, form, delta, x, group["lr"] * clip)
        quad = _model_image_norm2(eig, form, delta, x, group["lr"] * clip, floor) if rank > 0 else None
        self._apply_update(delta)
        self._readout_step(traj)
        keep = rank > 0
        st.update(eig_values=eig.eigenvalues.detach() if keep else None,
                  eig_basis=eig.basis.detach() if keep else None, eig_form=form if keep else None,
                  steps=st["steps"] + 1, pending_loss=loss, pending_predicted=predicted, pending_quad=quad)
        st["jvps"] += counter.jvps
        st["vjps"] += counter.vjps
        seconds = time.perf_counter() - t0
        st["seconds"] += seconds
        self.last_stats = dict(
            loss=loss, form=form, rank=rank, damping=lam, rho=rho, curvature=c, refreshed=refresh,
            ritz_updated=updated, krylov=ritz is not None, secant=secant is not None,
            jvps=counter.jvps, vjps=counter.vjps, products=counter.jvps + counter.vjps,
            jvp_backend=self._jvp_choice.get("jvp", self.jacobian if isinstance(self.jacobian, str) else "custom"),
            extra_products=counter.jvps + counter.vjps - 1, space=self.space,
            step_norm=float(delta.norm()), clip_factor=clip, predicted_change=predicted,
            grad_norm=float(grad.norm()), eigenvalues=[float(v) for v in eig.eigenvalues] if keep else [],
            complement_floor=floor, curvature_ratio=q,
            seconds=seconds,
        )
        return torch.tensor(loss, dtype=torch.float64)


@dataclass
class RitzSketch:
    """Rayleigh–Ritz pairs of ``Θ = J J*`` on an orthonormal state-space subspace ``Q`` (``m`` rows):
    ``Q* Θ Q = (J* Q)(J* Q)* = Z diag(values) Z*``. ``state_basis = Z_r* Q`` (Ritz vectors, orthonormal),
    ``adjoint_basis = J* state_basis = Z_r* (J* Q)`` and ``gradient = J* e`` (``e`` spans Q's first row)."""

    values: torch.Tensor
    state_basis: torch.Tensor
    adjoint_basis: torch.Tensor
    gradient: torch.Tensor

    def eig(self, form: str) -> LowRankEig:
        """The state form's ``Θ_S = U Λ U*`` or the parameter form's ``F_S = J* Q Q* J = V Λ V*`` with
        ``V = J* U Λ^{-1/2}`` (orthonormal; the same nonzero spectrum, push-through identity)."""
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


def _state_direction(ritz: RitzSketch, e: torch.Tensor, damping: float, scale: float, floor: float):
    """``x = (cΘ_S + c·floor (I − UU*) + λI)⁻¹ e`` and ``J* x``, the latter from the sketch's ``J* U`` and
    ``J* e`` with no further product: ``J* x = (a − β U*e)·J*U + β J* e``, ``a = U*e / (cΛ + λ)``."""
    eig = ritz.eig("state")
    coeff = eig.coefficients(e)
    a = coeff / (scale * eig.eigenvalues + damping)
    beta = 0.0 if eig.rank == e.numel() else 1.0 / (scale * float(floor) + damping)
    x = damped_lowrank_solve(eig, damping, e, scale=scale, floor=floor)
    direction = (a - beta * coeff) @ ritz.adjoint_basis + beta * ritz.gradient
    return x, direction


class _FisherKeepingImage(LinearOperator):
    """``F = J* J`` (PSD) that keeps the last image ``J X`` (the state-space side of the sketch)."""

    def __init__(self, J: LinearOperator):
        super().__init__(J.shape_in, J.shape_in, J.dtype, J.device, is_psd=True)
        self.J, self.last_image = J, None

    def _matmat(self, X):
        self.last_image = self.J._matmat(X)
        return self.J._rmatmat(self.last_image)


def _ritz_update(J: LinearOperator, state_basis: torch.Tensor, rank: int, form: str):
    """Rayleigh–Ritz of ``Θ = J J*`` on span(state_basis) with ``k`` VJPs only: ``W = J* U``,
    ``U* Θ U = W W*`` = Z S Z*; returns the top-``rank`` pairs (state or parameter side) and the
    rotated state basis. Keeps the curvature along the tracked directions current between refreshes."""
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


def _output_error(traj) -> torch.Tensor:
    """``∂L/∂y`` of the recorded loss (kept by ``record_for_step``, else recomputed from the outputs)."""
    cached = traj.cache.get("output_error") if hasattr(traj, "cache") else None
    if cached is not None:
        return cached
    from kpflow.kernels.trajectory import _loss_value

    with torch.enable_grad():
        y = traj.outputs.detach().clone().requires_grad_(True)
        value = _loss_value(y, traj.targets, traj.cache.get("loss", "mse"), traj.mask)
        (e_y,) = torch.autograd.grad(value, y)
    return e_y


def _is_batch(obj) -> bool:
    if isinstance(obj, dict):
        return obj.get("inputs") is not None and obj.get("targets") is not None
    return getattr(obj, "inputs", None) is not None and getattr(obj, "targets", None) is not None and \
        not hasattr(obj, "states")


def _lowrank_quadratic(eig: LowRankEig, form: str, delta, x, scale) -> float:
    """``Δ* F_r Δ`` of the low-rank model (state form: ``‖Θ_r x‖²·scale²`` since ``JΔ ≈ −scale·Θ_r x``)."""
    if eig.rank == 0:
        return 0.0
    if form == "state":
        return float((eig.apply(x) * scale).pow(2).sum())
    coeff = eig.coefficients(delta)
    return float((eig.eigenvalues * coeff.pow(2)).sum())


def _model_image_norm2(eig: LowRankEig, form: str, delta, x, scale, floor: float) -> float:
    """The low-rank model's ``‖J Δθ‖²``: ``Δθ*(VΛV* + λ_r(I − VV*))Δθ`` (parameter form) or
    ``‖scale·(UΛU* + λ_r(I − UU*)) x‖²`` (state form, ``J Δθ = −scale·Θ x``), the floor being the
    curvature the preconditioner assumed outside the basis."""
    if form == "state":
        coeff = eig.coefficients(x)
        image = eig.combine((eig.eigenvalues - floor) * coeff) + floor * x
        return float(image.pow(2).sum()) * scale**2
    coeff = eig.coefficients(delta)
    return float((eig.eigenvalues * coeff.pow(2)).sum() + floor * (delta.pow(2).sum() - coeff.pow(2).sum()))


def _curvature(curvature, e: torch.Tensor, loss: float) -> float:
    if curvature != "auto":
        return float(curvature)
    e2 = float(e.pow(2).sum())
    if loss <= 0 or e2 == 0:
        return 1.0
    return e2 / (2.0 * loss)


def _check_hyper(*, lr, rank, damping, refresh_every, power_iters, warmup_iters, oversample, trust_region,
                 curvature, form, damping_bounds, readout_lr) -> None:
    def bad(name, value, valid):
        raise ValueError(f"{name}={value!r} is invalid; {name} must be {valid}")

    if not (isinstance(lr, (int, float)) and lr > 0):
        bad("lr", lr, "a positive number")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
        bad("rank", rank, "an integer >= 0 (0 = gradient descent with step lr/damping)")
    if not (isinstance(damping, (int, float)) and damping > 0 and math.isfinite(damping)):
        bad("damping", damping, "a positive finite number (the λ of (Θ_r + λI)⁻¹; it cannot be negative or zero)")
    for name, v, lo in (("refresh_every", refresh_every, 1), ("power_iters", power_iters, 0),
                        ("warmup_iters", warmup_iters, 0), ("oversample", oversample, 0)):
        if not (isinstance(v, int) and v >= lo):
            bad(name, v, f"an integer >= {lo}")
    if trust_region is not None and not (isinstance(trust_region, (int, float)) and trust_region > 0):
        bad("trust_region", trust_region, "a positive number or None (no clip)")
    if curvature != "auto" and not (isinstance(curvature, (int, float)) and curvature > 0):
        bad("curvature", curvature, "'auto' or a positive number")
    if form not in FORMS:
        bad("form", form, f"one of {FORMS}")
    if readout_lr is not None and not (isinstance(readout_lr, (int, float)) and readout_lr >= 0):
        bad("readout_lr", readout_lr, "None (readout untouched) or a number >= 0")
    lo, hi = damping_bounds
    if not (0 < lo <= hi):
        bad("damping_bounds", damping_bounds, "(low, high) with 0 < low <= high")



def lowrank_ng(model: torch.nn.Module, **options) -> LowRankNaturalGradient:
    """Factory of the optimizer registry: ``optimizer: {name: lowrank-ng, lr: 0.5, params: {rank: 2}}``."""
    return LowRankNaturalGradient(model, **options)


lowrank_ng.optimizer_class = LowRankNaturalGradient


def _register() -> None:
    try:
        from kpflow.training.optimizers import register_optimizer
    except ImportError:  # the registry is optional for using the optimizer directly
        return
    register_optimizer("lowrank-ng", lowrank_ng)


_register()
