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

The optimizer is the algorithm only; its building blocks live with their kin: the randomized
eigensolvers (:func:`~kpflow.estimators.nystrom.nystrom_eigh`, :func:`~kpflow.estimators.nystrom.ritz_sketch`,
:func:`~kpflow.estimators.nystrom.damped_lowrank_solve`) in :mod:`kpflow.estimators.nystrom`, and the Jacobian
operators of the unrolled model (:class:`~kpflow.kernels.unrolled.UnrolledJacobian`, evaluated on the
recording's autograd graph, where ``J*`` costs one backward pass like SGD's gradient) in
:mod:`kpflow.kernels.unrolled`; the state-space operators ``P Jθ`` of :mod:`kpflow.kernels` are the
alternative. Damping (:class:`LevenbergMarquardtDamping`) and the trust region
(:func:`clip_to_trust_region`) are here. See docs/natural_gradient.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kpflow.estimators.nystrom import (
    LowRankEig,
    RitzSketch,
    damped_lowrank_solve,
    nystrom_eigh,
    orthonormal_rows,
    ritz_sketch,
    ritz_update,
)
from kpflow.kernels.unrolled import (
    AutotunedJacobian,
    CountingOperator,
    UnrolledJacobian,
    kernel_jacobian,
    output_error,
    record_for_step,
)
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


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------

FORMS = ("auto", "state", "parameter")
JACOBIANS = ("auto", "unrolled", "kernels")
COMPLEMENTS = ("nystrom", "damping")
UPDATES = ("krylov", "nystrom")
SPACES = ("state", "output")



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
                        warmup_iters=int(warmup_iters), oversample=int(oversample), seed=int(seed))
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
        self._batch = None  # the batch handed over by set_batch for the next step only
        self._jvp_choice: dict = {}  # the timing trial of jacobian="auto"; its outcome is kept in the state
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
        # all state lives under the first parameter, as tensors and JSON scalars, so that state_dict holds
        # everything a resumed run needs (checkpoint friendly); the sketch's random stream is derived from
        # (seed, step) (param_groups hold the seed), so there is no generator state to save
        self.state[p0].update(_initial_state(float(damping)))
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
        st = self._st
        inputs = getattr(traj, "inputs", None)
        prev = st["last_inputs"]
        st["last_inputs"] = None if inputs is None else inputs.detach()
        if inputs is None or prev is None or prev.shape != inputs.shape:
            return False
        basis = st["state_basis"]
        if basis is None or tuple(basis.shape[1:]) != tuple(J.shape_out):
            return False
        return prev is inputs or bool(torch.equal(prev, inputs.to(prev.dtype)))

    def _sketch_generator(self, device) -> torch.Generator:
        """The random stream of this step's sketch: a function of (seed, step), so resuming needs no state."""
        seed = np.random.SeedSequence([self.param_groups[0]["seed"], self._st["steps"]]).generate_state(1)[0]
        return torch.Generator(device=device).manual_seed(int(seed))

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping the non-tensor values of the saved state as they
        are: torch's loader casts every iterable value element by element, which turns a saved string (the
        basis's form) into a generator object."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if not isinstance(value, torch.Tensor):
                    self.state[params[int(index)]][key] = copy.deepcopy(value)
        st = self._st
        for key, value in _initial_state(st.get("damping", self.param_groups[0]["damping"])).items():
            st.setdefault(key, value)  # a checkpoint from before a key existed starts that key afresh
        self._jvp_choice = {} if st["jvp_backend"] is None else {"jvp": st["jvp_backend"]}

    def _choose_form(self, n_state: int) -> str:
        if self.form != "auto":
            return self.form
        return "parameter" if self.n_params <= n_state else "state"

    def _operators(self, traj):
        """``J`` (counted) and the gradient ``J* e`` (None: the step computes it as one product)."""
        if callable(self.jacobian):
            return CountingOperator(self.jacobian(traj, self.param_names)), None
        if self.jacobian == "kernels":
            J, Jtheta = kernel_jacobian(traj, self.param_names)
            J = CountingOperator(J)
            if getattr(traj, "adjoint", None) is None:
                return J, None
            J.vjps += 1  # P* e was recorded (one backward pass); Jθ* of it is the gradient
            return J, Jtheta.T.apply(traj.adjoint.detach().to(Jtheta.dtype))
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
        from kpflow.kernels.trajectory import loss_value

        rp = dict(self.model.readout_params())
        with torch.enable_grad():
            value = loss_value(self.model.output(traj.states.detach(), rp), traj.targets,
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
            e = output_error(traj).to(J.dtype)
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
        prev_residual = st["prev_residual"]
        if same_batch and prev_residual is not None and prev_residual.shape == residual.shape:
            secant = residual - prev_residual.to(residual.dtype)
        st["prev_residual"] = residual
        basis = None if st["state_basis"] is None else st["state_basis"].to(J.dtype)
        # the Krylov/Ritz update needs the previous basis and the secant (same batch as the last step);
        # otherwise (cold start, a new batch) the step falls back to a Nyström sketch
        krylov = (self.update == "krylov" and rank > 0 and not stale and secant is not None
                  and basis is not None and tuple(basis.shape[1:]) == tuple(J.shape_out))
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
            sketch = [*basis, secant]
            ritz = ritz_sketch(J, e, sketch, rank)
            eig, grad = ritz.eig(form), ritz.gradient
            basis = ritz.state_basis
            updated = True
        elif refresh:
            op = (J @ J.T) if form == "state" else _FisherKeepingImage(J)
            warm = None if stale else eig.basis
            iters = group["warmup_iters"] if warm is None else group["power_iters"]
            eig = nystrom_eigh(op, rank, oversample=group["oversample"], power_iters=iters, init=warm,
                               generator=self._sketch_generator(J.device))
            # a state-space basis for cheap Ritz updates until the next refresh
            basis = eig.basis if form == "state" else orthonormal_rows(op.last_image)
        elif rank > 0 and self.ritz_updates and same_batch and basis is not None:
            eig, basis = ritz_update(J, basis, rank, form)
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
                direction = J.T.apply(x)
        else:
            if grad is None:
                grad = J.T.apply(e)
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
                  steps=st["steps"] + 1, pending_loss=loss, pending_predicted=predicted, pending_quad=quad,
                  state_basis=None if basis is None else basis.detach(), jvp_backend=self._jvp_choice.get("jvp"))
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


def _initial_state(damping: float) -> dict:
    """The optimizer's whole state before the first step (tensors, numbers, strings and None only):
    the damping λ, the low-rank model ``(Λ, U)`` and its form, the state-space side of the basis, the
    previous step's residual and inputs (the secant and the same-batch test), the previous step's loss and
    predicted change (the reduction ratio ρ), the chosen JVP backend of ``jacobian="auto"`` and counters."""
    return dict(steps=0, damping=float(damping), eig_values=None, eig_basis=None, eig_form=None, state_basis=None,
                prev_residual=None, last_inputs=None, pending_loss=None, pending_predicted=None, pending_quad=None,
                jvp_backend=None, jvps=0, vjps=0, seconds=0.0)


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
