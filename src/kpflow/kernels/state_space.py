"""The state-space operators of a recorded run, matrix-free (DESIGN.md §2).

On tensors of shape ``[B, T, H]`` (a perturbation of every state):

* ``Jθ``  (``param_jacobian``): ``∂F/∂θ`` with the previous state held fixed, parameters -> states;
* ``K = Jθ Jθ*`` (``parameter_operator``);
* ``A``  (``step_jacobians``): block diagonal of ``A_t = ∂F/∂z_{t-1}`` at every site;
* ``S``  (``time_shift``): ``(S z)_t = z_{t-1}`` (0 at t = 0);
* ``P = (I − A S)^{-1}`` (``propagator``): ``δz_t = A_t δz_{t-1} + q_t`` forward in time; ``P*`` runs
  ``λ_t = y_t + A_{t+1}ᵀ λ_{t+1}`` backward (backprop through time);
* ``P^{-1} = I − A S`` (``inverse_propagator``); ``J = P Jθ`` (``state_jacobian``);
* ``Θ = P K P*`` (``ntk``), ``C Θ C*`` (``output_ntk``), ``Jθ* P* P Jθ`` (``state_fisher``).

Everything is applied with per-site JVPs/VJPs of the model's step, batched over probes with
``torch.func.vmap``. ``Jθ``, ``A`` and ``P^{-1}`` treat all B·T sites at once (the step is independent
across sites once ``z_{t-1}`` is known); ``P`` and ``P*`` are sequential in time and batched over
trials and probes; for the weight-based cells each step uses stored per-site coefficients of ``A_t``
instead (``kpflow.kernels.linearization``: one matmul per weight and a few elementwise products).
``P``/``P*``/``A`` switch to a cache of dense step Jacobians ``[B, T, H, H]`` when it fits a memory
budget and is expected to pay for itself (see ``StepJacobianCache``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import jvp, vjp, vmap

from kpflow.deprecation import keyword_only
from kpflow.operators import LinearOperator

from .joint import (
    InverseJointPropagator,
    SiteParamJacobian,
    SiteReadoutJacobian,
    is_site_trajectory,
    site_ntk,
    site_parameter_operator,
    site_propagator,
)
from .kronecker import kronecker_core, supports_kronecker
from .linearization import StepLinearization, repeat_probes
from .trajectory import ParamLayout, Trajectory, resolve_param_names

#: Default memory budget for the dense step-Jacobian cache, in bytes.
CACHE_BUDGET_BYTES = 512 * 2**20


def step_jvp(model, params, z_prev: torch.Tensor, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``A V``: the step Jacobian ``∂F/∂z_prev`` at every site applied to probes, by one JVP.

    The probes are folded into the batch axis (the step is evaluated at k copies of the sites)
    instead of vmapped: forward-mode AD under ``vmap`` was measured 2-3x slower than this.

    Args:
        model: the recurrent model.
        params: its cell parameters.
        z_prev: previous states ``[N, H]`` of the sites.
        x: inputs ``[N, I]`` of the sites.
        V: probes ``[k, N, H]``.

    Returns:
        ``[k, N, H]``.
    """
    k, N, H = V.shape
    zr, xr = repeat_probes(z_prev, k), repeat_probes(x, k)
    return jvp(lambda z: model.step(params, z, xr), (zr,), (V.reshape(k * N, H),))[1].reshape(k, N, -1)


class _TrajectoryOperator(LinearOperator):
    """Base of the operators built on a recorded trajectory (shared dtype/device/shape logic)."""

    def __init__(self, traj: Trajectory, shape_in, shape_out, chunk_size: int | None = None, **flags):
        super().__init__(shape_in, shape_out, traj.dtype, traj.device, **flags)
        self.traj = traj
        self.chunk_size = chunk_size

    def structure(self):
        """Operators of one kind on one trajectory are one map, whatever their numerical path or chunking."""
        return (id(self.traj),)

    def _vmap(self, fn):
        return vmap(fn, chunk_size=self.chunk_size)

    def _chunks(self, X):
        return (X,) if self.chunk_size is None else X.split(self.chunk_size)


# ----------------------------------------------------------------------------- Jθ
class ParamJacobian(_TrajectoryOperator):
    """``Jθ``: ``(Jθ v)_{b,t} = ∂F/∂θ (z_{t-1}, x_t; θ) · v`` (previous state held fixed).

    ``shape_in = (n_params,)`` (flat, in ``self.layout`` order); ``apply_dict``/``adjoint_dict`` work
    with parameter dicts. Both directions evaluate all B·T sites at once. ``backend="autodiff"`` uses
    JVP/VJP of the step; ``"auto"`` (default) uses, for the weight-based cells, the Kronecker structure
    ``Jθ v = M (Σ_W V_W u_W)``, ``(Jθ* y)_W = Σ_n (M* y)_n u_nᵀ`` (one matmul per weight, no autodiff).
    """

    def __init__(self, traj: Trajectory, param_names=None, chunk_size=None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "kronecker":
            if not supports_kronecker(traj.model):
                raise ValueError(f"backend='kronecker' needs a weight-based cell (VanillaRNN, LeakyRNN, GRU, LSTM); "
                                 f"{type(traj.model).__name__} is not one. Use backend='autodiff' or 'auto'")
        names = resolve_param_names(traj.model, traj.param_names if param_names is None else param_names)
        self.layout = ParamLayout(traj.params, names)
        super().__init__(traj, (self.layout.numel,), traj.shape, chunk_size)
        self.param_names = names
        self.backend = backend

    def structure(self):
        """``Jθ`` of one trajectory and one parameter subset is one map (autodiff or Kronecker path alike)."""
        return (id(self.traj), self.param_names)

    def _core(self):
        if self.backend == "autodiff":
            return None

        if not supports_kronecker(self.traj.model):
            return None
        core = kronecker_core(self.traj, self.param_names)
        return core if core.structured else None

    def _site_fn(self):
        traj = self.traj
        zp, x = traj.sites()
        fixed = traj.params

        def f(sub):
            return traj.model.step({**fixed, **sub}, zp, x)

        primal = {n: fixed[n] for n in self.param_names}
        return f, primal

    def _matmat(self, V):
        core = self._core()
        if core is not None:
            return core.param_jvp(self.layout.unflatten(V)).reshape(V.shape[0], *self.shape_out)
        f, primal = self._site_fn()
        tangents = self.layout.unflatten(V)
        out = self._vmap(lambda t: jvp(f, (primal,), (t,))[1])(tangents)
        return out.reshape(V.shape[0], *self.shape_out)

    def _rmatmat(self, Y):
        k, (B, T, H) = Y.shape[0], self.shape_out
        core = self._core()
        if core is not None:
            return self.layout.flatten(core.param_vjp(Y.reshape(k, B * T, H)), batch_dims=1)
        f, primal = self._site_fn()
        _, pullback = vjp(f, primal)
        grads = self._vmap(lambda y: pullback(y)[0])(Y.reshape(k, B * T, H))
        return self.layout.flatten(grads, batch_dims=1)

    def apply_dict(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Jθ v`` for a parameter perturbation given as a dict.

        Args:
            params: ``{name: tensor of the parameter's shape}``; missing names count as 0.

        Returns:
            ``Jθ v`` ``[B, T, H]``.
        """
        full = {n: params[n] if n in params else torch.zeros(self.layout.shapes[n], dtype=self.dtype,
                                                               device=self.device) for n in self.layout.names}
        return self.apply(self.layout.flatten(full))

    def adjoint_dict(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Jθ* y`` as a parameter dict.

        Args:
            y: a state cotangent ``[B, T, H]``.

        Returns:
            ``{name: tensor of the parameter's shape}``.
        """
        return self.layout.unflatten(self.T.apply(y))


# ----------------------------------------------------------------------------- A and its cache
class StepJacobianCache:
    """Dense per-site step Jacobians ``A[b, t] = ∂F/∂z_{t-1}`` ``[B, T, H, H]``, built on demand.

    Policy ``"auto"``: building the cache is ``A*`` applied to the H basis vectors at all B·T sites — the
    work of about H probes through ``P`` by JVP/VJP of the step (about 4H against the faster per-site
    coefficients of the weight-based cells) — after which every sequential step is one batched matmul. So
    ``auto`` uses the dense cache for a request of at least that many probes (building it on the first such
    request, if its ``B·T·H²`` entries fit ``memory_budget`` bytes) and the JVP/coefficient path otherwise.
    The choice depends on the request alone, never on what was applied before, so the same call gives the
    same bits whatever the call history (a cumulative "ski rental" count made results depend on call order
    at rounding level). ``True`` builds it on first use (error if it does not fit), ``False`` never.
    """

    def __init__(self, traj: Trajectory, policy="auto", memory_budget: int | None = None):
        if policy not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {policy!r}")
        self.traj, self.policy = traj, policy
        self.memory_budget = CACHE_BUDGET_BYTES if memory_budget is None else int(memory_budget)
        self.dense: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the dense cache, ``B·T·H²`` entries of the states' dtype."""
        B, T, H = self.traj.shape
        return B * T * H * H * self.traj.states.element_size()

    @property
    def fits(self) -> bool:
        """Whether the dense cache fits ``memory_budget``."""
        return self.nbytes <= self.memory_budget

    def get(self, probes: int) -> torch.Tensor | None:
        """The dense Jacobians if the policy wants them now.

        Args:
            probes: probes about to be pushed through ``A``/``P``/``P*`` in this request.

        Returns:
            ``[B, T, H, H]`` (built now if the policy says so), or None while the JVP/coefficient path is cheaper.

        Raises:
            MemoryError: policy True and the cache does not fit ``memory_budget``.
        """
        if self.policy is False:
            return None
        H = self.traj.shape[-1]
        # break-even: about H probes against the JVP/VJP path, about 4H against the per-site coefficients
        threshold = 4 * H if _linearization_of(self.traj) is not None else H
        if self.policy == "auto" and probes < threshold:
            return None  # decided by this request alone (no hidden state)
        if self.dense is None:
            if self.fits:
                self.dense = dense_step_jacobians(self.traj)
            elif self.policy is True:
                raise MemoryError(
                    f"the dense step-Jacobian cache needs {self.nbytes / 2**20:,.1f} MiB, over the budget of "
                    f"{self.memory_budget / 2**20:,.1f} MiB; raise memory_budget or use cache='auto'/False"
                )
        return self.dense


def _cache_for(traj: Trajectory, cache, memory_budget) -> StepJacobianCache:
    """The trajectory's shared step-Jacobian cache (one per trajectory; a new policy replaces it)."""
    c = traj.cache.get("step_jacobians")
    if c is None or c.policy != cache or (memory_budget is not None and c.memory_budget != memory_budget):
        dense = None if c is None else c.dense
        c = StepJacobianCache(traj, cache, memory_budget)
        if cache is not False and dense is not None and c.fits:
            c.dense = dense
        traj.cache["step_jacobians"] = c
    return c


def _linearization_of(traj: Trajectory):
    """The trajectory's ``StepLinearization`` (built once; None for cells without the structure)."""
    if "linearization" not in traj.cache:
        traj.cache["linearization"] = StepLinearization.build(traj)
    return traj.cache["linearization"]


def dense_step_jacobians(traj: Trajectory, chunk: int | None = None) -> torch.Tensor:
    """All step Jacobians of a recurrence, densely, by VJPs with the basis vectors at all sites.

    Args:
        traj: the recorded trajectory.
        chunk: basis vectors per vmapped VJP (None: as many as keep ``[chunk, N, H]`` under 2**24 entries).

    Returns:
        ``A[b, t, i, j] = ∂F_i/∂z_{t-1, j}`` as one ``[B, T, H, H]`` tensor.
    """
    B, T, H = traj.shape
    zp, x = traj.sites()
    model, params = traj.model, traj.params

    def f(z):
        return model.step(params, z, x)

    N = B * T
    eye = torch.eye(H, dtype=traj.dtype, device=traj.device)
    chunk = chunk or max(1, min(H, (2**24) // max(1, N * H)))
    out = torch.empty(N, H, H, dtype=traj.dtype, device=traj.device)
    _, pullback = vjp(f, zp)
    for i0 in range(0, H, chunk):  # rows i of every A[n], by VJPs with the basis e_i at all sites
        basis = eye[i0:i0 + chunk].unsqueeze(1).expand(-1, N, H)
        rows = vmap(lambda v: pullback(v)[0])(basis)  # [c, N, H_in]
        out[:, i0:i0 + chunk, :] = rows.permute(1, 0, 2)
    return out.reshape(B, T, H, H)


#: numerical paths of P, P* and A: per-site JVPs/VJPs of the step, stored per-unit coefficients of the
#: affine cells, the dense step-Jacobian cache, or "auto" (coefficients where the cell declares them, else
#: JVPs; the dense cache once it pays, see StepJacobianCache)
PATHS = ("auto", "jvp", "coefficients", "dense")


def _path_policy(path: str, cache, what: str):
    """The cache policy a path implies (``path="auto"`` keeps ``cache``)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} for {what}, got {path!r}")
    if path == "dense":
        return True
    if path in ("jvp", "coefficients"):
        return False
    return cache


class StepJacobians(_TrajectoryOperator):
    """``A``: block-diagonal ``(A q)_{b,t} = A_{b,t} q_{b,t}`` with ``A_{b,t} = ∂F/∂z_{t-1}``.

    ``path``: ``"jvp"`` (one batched JVP/VJP of the step over all sites), ``"dense"`` (the dense cache) or
    ``"auto"`` (``cache`` decides); ``last_path`` reports the path the last application took.
    """

    def __init__(self, traj: Trajectory, cache="auto", memory_budget=None, chunk_size=None, path: str = "auto"):
        if path == "coefficients":
            raise ValueError("path='coefficients' applies to P and P* (per time step); A takes 'auto', 'jvp' or "
                             "'dense'")
        cache = _path_policy(path, cache, "A")
        super().__init__(traj, traj.shape, traj.shape, chunk_size)
        self.cache = _cache_for(traj, cache, memory_budget)
        self.path, self.last_path = path, None

    def _matmat(self, Q):
        dense = self.cache.get(Q.shape[0])
        self.last_path = "dense" if dense is not None else "jvp"
        if dense is not None:
            return torch.einsum("btij,kbtj->kbti", dense, Q)
        traj, k, (B, T, H) = self.traj, Q.shape[0], self.shape_in
        zp, x = traj.sites()
        out = [step_jvp(traj.model, traj.params, zp, x, q) for q in self._chunks(Q.reshape(k, B * T, H))]
        return torch.cat(out, 0).reshape(Q.shape)

    def _rmatmat(self, Y):
        dense = self.cache.get(Y.shape[0])
        self.last_path = "dense" if dense is not None else "jvp"
        if dense is not None:
            return torch.einsum("btij,kbti->kbtj", dense, Y)
        traj, k, (B, T, H) = self.traj, Y.shape[0], self.shape_in
        zp, x = traj.sites()
        _, pullback = vjp(lambda z: traj.model.step(traj.params, z, x), zp)
        return self._vmap(lambda y: pullback(y)[0])(Y.reshape(k, B * T, H)).reshape(Y.shape)


class TimeShift(LinearOperator):
    """``S``: ``(S z)_t = z_{t-1}``, 0 at t = 0; ``(S* y)_t = y_{t+1}``, 0 at t = T−1."""

    def __init__(self, shape, dtype=torch.float64, device="cpu"):
        super().__init__(shape, shape, dtype, device)

    def structure(self):
        """Time shifts of one shape, dtype and device are one map."""
        return (self.shape_in, self.dtype, self.device)

    def _matmat(self, X):
        out = torch.zeros_like(X)
        out[:, :, 1:] = X[:, :, :-1]
        return out

    def _rmatmat(self, Y):
        out = torch.zeros_like(Y)
        out[:, :, :-1] = Y[:, :, 1:]
        return out


class Propagator(_TrajectoryOperator):
    """``P = (I − A S)^{-1}``: forward recursion ``δz_t = A_t δz_{t-1} + q_t``.

    The adjoint is the backward recursion ``λ_t = y_t + A_{t+1}ᵀ λ_{t+1}`` (BPTT). Batched over trials
    and probes.

    ``path`` chooses how each ``A_t`` is applied: ``"jvp"`` (JVP/VJP of the step), ``"coefficients"``
    (stored per-unit coefficients; cells that declare ``unit_size() > 0``), ``"dense"`` (the dense
    step-Jacobian cache, built on first use) or ``"auto"`` (coefficients where declared, else JVPs, and
    the dense cache by ``cache``'s policy). ``last_path`` reports the path the last application took.

    Raises:
        ValueError: an unknown path, or ``"coefficients"`` for a cell without declared unit structure.
    """

    def __init__(self, traj: Trajectory, cache="auto", memory_budget=None, chunk_size=None, path: str = "auto"):
        cache = _path_policy(path, cache, "P")
        super().__init__(traj, traj.shape, traj.shape, chunk_size)
        self.cache = _cache_for(traj, cache, memory_budget)
        self.path, self.last_path = path, None
        if path == "coefficients" and _linearization_of(traj) is None:
            raise ValueError(f"{type(traj.model).__name__} declares no unit structure (unit_size() = 0), so "
                             "path='coefficients' is not available; use 'jvp', 'dense' or 'auto'")

    def _linearization(self):
        """Stored per-site coefficients of A for affine unit-structured cells (None otherwise or on path='jvp')."""
        return None if self.path == "jvp" else _linearization_of(self.traj)

    def _took(self, dense, lin):
        self.last_path = "dense" if dense is not None else ("coefficients" if lin is not None else "jvp")

    def _step_fns(self, t):
        traj = self.traj
        x_t = traj.inputs[:, t]

        def f(z):
            return traj.model.step(traj.params, z, x_t)

        return f

    def _matmat(self, Q):
        dense = self.cache.get(Q.shape[0])
        traj = self.traj
        prev = traj.prev_states
        lin = None if dense is not None else self._linearization()
        self._took(dense, lin)
        out = torch.empty_like(Q)
        d = Q[:, :, 0]
        out[:, :, 0] = d
        for t in range(1, Q.shape[2]):
            if dense is not None:
                Ad = torch.einsum("bij,kbj->kbi", dense[:, t], d)
            elif lin is not None:
                Ad = lin.step(t, d)
            else:
                Ad = torch.cat([step_jvp(traj.model, traj.params, prev[:, t], traj.inputs[:, t], c)
                                for c in self._chunks(d)], 0)
            d = Ad + Q[:, :, t]
            out[:, :, t] = d
        return out

    def _rmatmat(self, Y):
        dense = self.cache.get(Y.shape[0])
        prev = self.traj.prev_states
        T = Y.shape[2]
        lin = None if dense is not None else self._linearization()
        self._took(dense, lin)
        out = torch.empty_like(Y)
        lam = Y[:, :, T - 1]
        out[:, :, T - 1] = lam
        for t in range(T - 2, -1, -1):
            if dense is not None:
                Atl = torch.einsum("bij,kbi->kbj", dense[:, t + 1], lam)
            elif lin is not None:
                Atl = lin.step_adjoint(t + 1, lam)
            else:
                _, pullback = vjp(self._step_fns(t + 1), prev[:, t + 1])
                Atl = self._vmap(lambda y, pb=pullback: pb(y)[0])(lam)
            lam = Y[:, :, t] + Atl
            out[:, :, t] = lam
        return out


class InversePropagator(_TrajectoryOperator):
    """``P^{-1} = I − A S``: ``(P^{-1} q)_t = q_t − A_t q_{t-1}``; adjoint ``y_t − A_{t+1}ᵀ y_{t+1}``.

    No recursion: one batched JVP (VJP) over all sites.
    """

    def __init__(self, traj: Trajectory, cache="auto", memory_budget=None, chunk_size=None, path: str = "auto"):
        super().__init__(traj, traj.shape, traj.shape, chunk_size)
        self.A = StepJacobians(traj, cache, memory_budget, chunk_size, path)
        self.S = TimeShift(traj.shape, traj.dtype, traj.device)
        self.path = path

    @property
    def last_path(self):
        """The path the last application of ``A`` took."""
        return self.A.last_path

    def _matmat(self, Q):
        return Q - self.A._matmat(self.S._matmat(Q))

    def _rmatmat(self, Y):
        return Y - self.S._rmatmat(self.A._rmatmat(Y))


class ReadoutJacobian(_TrajectoryOperator):
    """``C = ∂y/∂z`` of the readout at every site: ``[B, T, H] -> [B, T, O]``."""

    def __init__(self, traj: Trajectory, chunk_size=None):
        super().__init__(traj, traj.shape, tuple(traj.outputs.shape), chunk_size)
        self._rp = traj.readout_params()

    def _f(self, z):
        return self.traj.model.output(z, self._rp)

    def _matmat(self, X):
        z = self.traj.states
        return self._vmap(lambda v: jvp(self._f, (z,), (v,))[1])(X)

    def _rmatmat(self, Y):
        _, pullback = vjp(self._f, self.traj.states)
        return self._vmap(lambda y: pullback(y)[0])(Y)


# ----------------------------------------------------------------------------- public constructors
def _is_site(traj) -> bool:
    """True for a recorded site model (``kpflow.kernels.joint``).

    The constructors below then build the joint-state operators of the general formulation.

    Returns:
        Whether ``traj`` records a site model.
    """
    return is_site_trajectory(traj)


def _refuse_site(traj, what: str) -> None:
    if _is_site(traj):
        raise TypeError(f"{what} belongs to recurrences z_t = F(z_(t-1), x_t); a site model's state has no time "
                        "shift. Use inverse_propagator(traj) (∂Φ/∂h on the joint state) or propagator(traj)")


#: autodiff-versus-Kronecker choices of ``param_jacobian``/``parameter_operator``/``ntk``/``output_ntk``
BACKENDS = ("auto", "autodiff", "kronecker")
_RENAMED = {"method": "backend"}


@keyword_only(["chunk_size", "backend"], renamed=_RENAMED)
def param_jacobian(traj: Trajectory, param_names=None, *, backend: str = "auto",
                   chunk_size: int | None = None) -> ParamJacobian:
    """``Jθ`` (parameters, flat vector -> ``[B, T, H]``).

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        backend: ``"autodiff"`` (JVP/VJP of the step), ``"kronecker"`` (one matmul per weight through
            the site variables; weight-based cells only) or ``"auto"`` (Kronecker when the cell has it).
        chunk_size: probes per vmapped call (None: all at once).

    Returns:
        The ``ParamJacobian`` (a site model's ``SiteParamJacobian`` for site trajectories).

    Raises:
        ValueError: an unknown backend or parameter name, or ``"kronecker"`` for a cell without the structure.
    """
    if _is_site(traj):
        return SiteParamJacobian(traj, param_names, "autodiff" if backend == "autodiff" else "auto")
    return ParamJacobian(traj, param_names, chunk_size, backend)


@keyword_only(["backend", "chunk_size"], renamed=_RENAMED)
def parameter_operator(traj: Trajectory, param_names=None, *, backend: str = "auto",
                       chunk_size: int | None = None) -> LinearOperator:
    """``K = Jθ Jθ*`` on ``[B, T, H]`` (PSD).

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        backend: ``"kronecker"`` (the exact Kronecker core; weight-based cells only), ``"autodiff"``
            (``J @ J.T`` by JVP/VJP) or ``"auto"`` (Kronecker when the cell supports it).
        chunk_size: probes per vmapped call of the autodiff path.

    Returns:
        The PSD operator.

    Raises:
        ValueError: an unknown backend.
        TypeError: ``"kronecker"`` for a cell without the structure.
    """
    if _is_site(traj):  # K on the joint state, through its Kronecker core unless backend="autodiff"

        return site_parameter_operator(traj, param_names, backend="autodiff" if backend == "autodiff" else "kronecker")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "autodiff":
        if backend == "kronecker" or supports_kronecker(traj.model):
            return kronecker_core(traj, param_names).operator()
    J = param_jacobian(traj, param_names, chunk_size=chunk_size, backend="autodiff")
    return J @ J.T


@keyword_only(["cache", "memory_budget", "chunk_size"])
def step_jacobians(traj: Trajectory, *, cache="auto", memory_budget: int | None = None,
                   chunk_size: int | None = None, path: str = "auto") -> StepJacobians:
    """``A`` on ``[B, T, H]``: block diagonal, ``(A q)_{b,t} = A_{b,t} q_{b,t}`` with ``A_{b,t} = ∂F/∂z_{t-1}``.

    Args:
        traj: the recorded trajectory of a recurrence.
        cache: policy of the dense step-Jacobian cache: ``"auto"`` (dense for requests of many probes), True or False
            (see ``StepJacobianCache``).
        memory_budget: bytes the dense cache may take (None: ``CACHE_BUDGET_BYTES``).
        chunk_size: probes per vmapped call (None: all at once).
        path: how ``A_t`` is applied: ``"auto"``, ``"jvp"``, ``"coefficients"`` or ``"dense"`` (see ``Propagator``).

    Returns:
        The ``StepJacobians`` operator.

    Raises:
        TypeError: a site-model trajectory (its state has no time shift).
        ValueError: an unknown path or cache policy, or ``"coefficients"`` for a cell without declared unit
            structure.
    """
    _refuse_site(traj, "step_jacobians (A)")
    return StepJacobians(traj, cache, memory_budget, chunk_size, path)


def time_shift(traj: Trajectory) -> TimeShift:
    """The time shift ``S`` on ``[B, T, H]``: ``(S z)_t = z_{t-1}``, ``(S z)_0 = 0``.

    Args:
        traj: the recorded trajectory of a recurrence (gives shape, dtype and device).

    Returns:
        The ``TimeShift`` operator.

    Raises:
        TypeError: a site-model trajectory (its state has no time shift).
    """
    _refuse_site(traj, "time_shift (S)")
    return TimeShift(traj.shape, traj.dtype, traj.device)


@keyword_only(["cache", "memory_budget", "chunk_size"])
def propagator(traj: Trajectory, *, cache="auto", memory_budget: int | None = None,
               chunk_size: int | None = None, path: str = "auto") -> Propagator:
    """The propagator ``P = (I − A S)^{-1}``; ``propagator(traj).T`` is ``P*`` (backprop through time).

    Args:
        traj: the recorded trajectory of a recurrence.
        cache: policy of the dense step-Jacobian cache: ``"auto"`` (dense for requests of many probes), True or False
            (see ``StepJacobianCache``).
        memory_budget: bytes the dense cache may take (None: ``CACHE_BUDGET_BYTES``).
        chunk_size: probes per vmapped call (None: all at once).
        path: how ``A_t`` is applied: ``"auto"``, ``"jvp"``, ``"coefficients"`` or ``"dense"`` (see ``Propagator``).
            The operator's ``last_path`` says which one ran.

    Returns:
        The ``Propagator``; for a site trajectory ``C P`` (joint perturbations -> visible states), so that
        ``P @ K @ P.T`` is the visible NTK.

    Raises:
        ValueError: an unknown path or cache policy, or ``"coefficients"`` for a cell without declared unit
            structure.
    """
    if _is_site(traj):  # C P: joint perturbations -> visible states, so that P @ K @ P.T is the visible NTK

        return site_propagator(traj)
    return Propagator(traj, cache, memory_budget, chunk_size, path)


@keyword_only(["cache", "memory_budget", "chunk_size"])
def inverse_propagator(traj: Trajectory, *, cache="auto", memory_budget: int | None = None,
                       chunk_size: int | None = None, path: str = "auto") -> InversePropagator:
    """The inverse propagator ``P^{-1} = I − A S`` (no recursion).

    Args:
        traj: the recorded trajectory of a recurrence.
        cache: policy of the dense step-Jacobian cache: ``"auto"`` (dense for requests of many probes), True or False
            (see ``StepJacobianCache``).
        memory_budget: bytes the dense cache may take (None: ``CACHE_BUDGET_BYTES``).
        chunk_size: probes per vmapped call (None: all at once).
        path: how ``A_t`` is applied: ``"auto"``, ``"jvp"``, ``"coefficients"`` or ``"dense"`` (see ``Propagator``).

    Returns:
        The ``InversePropagator``; for a site trajectory ``∂Φ/∂h`` on the joint state.

    Raises:
        ValueError: an unknown path or cache policy, or ``"coefficients"`` for a cell without declared unit
            structure.
    """
    if _is_site(traj):  # ∂Φ/∂h on the joint state

        return InverseJointPropagator(traj)
    return InversePropagator(traj, cache, memory_budget, chunk_size, path)


@keyword_only(["chunk_size"])
def readout_jacobian(traj: Trajectory, *, chunk_size: int | None = None) -> ReadoutJacobian:
    """The readout Jacobian ``C = ∂y/∂z``: state perturbations ``[B, T, H]`` -> output perturbations ``[B, T, O]``.

    Args:
        traj: the recorded trajectory (the readout of its snapshot).
        chunk_size: probes per vmapped call (None: all at once).

    Returns:
        The ``ReadoutJacobian`` (a site model's ``SiteReadoutJacobian`` for site trajectories).
    """
    if _is_site(traj):
        return SiteReadoutJacobian(traj)
    return ReadoutJacobian(traj, chunk_size)


@keyword_only(["cache", "chunk_size"])
def state_jacobian(traj: Trajectory, param_names=None, *, cache="auto", chunk_size=None) -> LinearOperator:
    """The state Jacobian ``J = dz/dθ = P Jθ``.

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        cache: dense step-Jacobian cache policy of ``P`` (see ``propagator``).
        chunk_size: probes per vmapped call.

    Returns:
        ``P @ Jθ``, from flat parameter vectors to ``[B, T, H]``.
    """
    return propagator(traj, cache=cache, chunk_size=chunk_size) @ param_jacobian(traj, param_names,
                                                                                  chunk_size=chunk_size)


@keyword_only(["backend", "cache", "chunk_size"], renamed=_RENAMED)
def ntk(traj: Trajectory, param_names=None, *, backend: str = "auto", cache="auto",
        chunk_size: int | None = None) -> LinearOperator:
    """State-space NTK ``Θ = P K P*`` on ``[B, T, H]`` (PSD).

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        backend: how ``K`` is applied, as in ``parameter_operator``.
        cache: dense step-Jacobian cache policy of ``P`` (see ``propagator``).
        chunk_size: probes per vmapped call.

    Returns:
        ``P @ K @ P.T``; for a site trajectory the NTK of the visible states,
        ``kpflow.kernels.joint.site_ntk(traj, path="auto")``.
    """
    if _is_site(traj):
        if backend in ("kronecker", "autodiff"):
            return site_ntk(traj, param_names, path="joint", backend=backend)
        return site_ntk(traj, param_names, path="auto")
    P = propagator(traj, cache=cache, chunk_size=chunk_size)
    return P @ parameter_operator(traj, param_names, backend=backend, chunk_size=chunk_size) @ P.T


@keyword_only(["backend", "cache", "chunk_size"], renamed=_RENAMED)
def output_ntk(traj: Trajectory, param_names=None, *, backend: str = "auto", cache="auto",
               chunk_size: int | None = None) -> LinearOperator:
    """Output-space NTK ``C Θ C*`` on ``[B, T, O]`` (PSD).

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        backend: how ``K`` is applied, as in ``parameter_operator``.
        cache: dense step-Jacobian cache policy of ``P`` (see ``propagator``).
        chunk_size: probes per vmapped call.

    Returns:
        ``C @ Θ @ C.T``.
    """
    C = readout_jacobian(traj, chunk_size=chunk_size)
    return C @ ntk(traj, param_names, backend=backend, cache=cache, chunk_size=chunk_size) @ C.T


@keyword_only(["cache", "chunk_size"])
def state_fisher(traj: Trajectory, param_names=None, *, cache="auto", chunk_size=None) -> LinearOperator:
    """The state-space Fisher ``Jθ* P* P Jθ`` on parameters (PSD): Gauss–Newton matrix of a unit state loss.

    Args:
        traj: the recorded trajectory.
        param_names: the parameters (default: the trajectory's).
        cache: dense step-Jacobian cache policy of ``P`` (see ``propagator``).
        chunk_size: probes per vmapped call.

    Returns:
        ``Jθ.T @ P.T @ P @ Jθ`` on flat parameter vectors.
    """
    J = param_jacobian(traj, param_names, chunk_size=chunk_size)
    P = propagator(traj, cache=cache, chunk_size=chunk_size)
    return J.T @ P.T @ P @ J
