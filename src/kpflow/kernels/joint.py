"""Operators of the global implicit constraint ``Φ(h, θ, x) = h − f(h, x; θ) = 0`` over the joint state.

For a site model (``kpflow.models.sites``: MLP, transformer, a user's ``nn.Module`` through
``ModuleAdapter``, or a recurrence through ``RecurrentSites``) the joint state ``h`` ``[B, T, Hj]``
holds every weight's output and every visible state. On it (papers.md §2.2):

* ``Jθ = ∂f/∂θ`` (``SiteParamJacobian``): ``δW ↦ δW u`` on the weight's own slot, nothing elsewhere;
* ``K = Jθ Jθ* = ⊕_slots (G_s ⊗ I_R) (+ Σ_r d_r d_rᵀ ⊗ e_r e_rᵀ for elementwise weights)`` with
  ``G_s = U_s U_sᵀ`` the Gram matrix of the slot's site variables over positions (``SiteKroneckerCore``):
  exact matvecs (Gram or factored contraction, whichever costs less), exact ``tr K``, ``‖K‖_F``,
  effective rank and rank bound, no probes;
* ``P = (∂Φ/∂h)⁻¹`` (``JointPropagator``): the JVP of the forward pass with the perturbation injected
  at every joint variable — forward substitution through the computation, no inverse; ``P*`` the VJP;
* ``P⁻¹ = I − ∂f/∂h`` (``InverseJointPropagator``): the JVP of the forward pass with every variable's
  parents pinned to their recorded values;
* ``C``: the selection of the visible states; ``Θ = C P K P* C*`` the NTK of the visible states,
  ``dh_vis/dθ = C P Jθ``, and the gradient ``∇θL = Jθ* P* C* e`` with ``e = ∂L/∂h_vis``.

``kpflow.kernels.propagator(traj)`` for a site trajectory is ``C P`` (joint -> visible), so that
``P @ K @ P.T`` is the NTK on the visible states and every existing estimator, tracking metric and
report takes it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import jvp, vjp, vmap

from kpflow.models.sites import JointLayout, SiteModel, Sites, Use
from kpflow.operators import LinearOperator

from .trajectory import NonFiniteStateError, ParamLayout, RecordedRun, attach_error, snapshot
from .trajectory import resolve_param_names as _resolve

#: ceiling on the entries of an N×N position Gram matrix (slot_grams, temporal_gram)
GRAM_LIMIT = 2**26

PATHS = ("auto", "fold", "vmap")


@dataclass
class SiteTrajectory(RecordedRun):
    """A recorded forward pass of a site model: the joint state and everything the operators need.

    A snapshot with the vocabulary of ``kpflow.kernels.trajectory.RecordedRun`` (``shape``, ``dtype``,
    ``device``, ``readout_params()``); ``joint_shape`` and ``recorded()`` add the joint state.

    Attributes:
        model: the ``SiteModel``.
        params: snapshot (copies) of the model's parameters; readout: snapshot of the readout's.
        inputs: what the model ran on.
        layout: the ``JointLayout`` (slots, their widths and offsets; which are visible).
        joint: ``[B, T, Hj]``; states: the visible states ``[B, T, Hv]``; outputs: the readout.
        uses: every weight application (``kpflow.models.sites.Use``) with its site variable.
        targets, mask, error (``∂L/∂states``), adjoint (``P* C* e`` on the joint state), loss.
        param_names: the parameters the operators differentiate by default.
    """

    model: SiteModel
    params: dict[str, torch.Tensor]
    readout: dict[str, torch.Tensor]
    inputs: torch.Tensor
    layout: JointLayout
    joint: torch.Tensor
    states: torch.Tensor
    outputs: torch.Tensor
    uses: list[Use]
    targets: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    error: torch.Tensor | None = None
    adjoint: torch.Tensor | None = None
    loss: float | None = None
    param_names: tuple[str, ...] = ()
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def joint_shape(self) -> tuple[int, int, int]:
        """``(B, T, Hj)`` of the joint state."""
        return tuple(self.joint.shape)

    def recorded(self) -> dict:
        """What the recording holds beyond the visible states.

        Returns:
            ``{"joint": [B, T, Hj] joint state, "uses": the weight uses (site variables) of the run}``.
        """
        return {"joint": self.joint, "uses": self.uses}


def is_site_trajectory(traj) -> bool:
    """True for a recorded site model (the general joint-state path)."""
    return isinstance(traj, SiteTrajectory)


def _first_nonfinite(joint: torch.Tensor, layout: JointLayout) -> str | None:
    for s in layout.slots.values():
        block = joint[..., s.offset:s.offset + s.width]
        bad = ~torch.isfinite(block).all(-1)  # [B, T]
        if bool(bad.any()):
            t = int(bad.any(0).nonzero()[0])
            b = int(bad[:, t].nonzero()[0])
            return (f"the activations became non-finite first in {s.name!r} (a {s.kind} slot) at position t={t} "
                    f"(the token, time step or layer index) of sequence/trial b={b}")
    return None


def record_sites(model: SiteModel, inputs, *, targets: torch.Tensor | None = None, loss="mse",
                 mask: torch.Tensor | None = None, param_names: Sequence[str] | str | None = None,
                 params: Mapping[str, torch.Tensor] | None = None) -> SiteTrajectory:
    """Run a site model once and keep its joint state, site variables, error and adjoint (a snapshot).

    Args:
        model: a ``kpflow.models.sites.SiteModel`` (``DeepMLP``, ``Transformer``, ``ModuleAdapter``,
            ``RecurrentSites``).
        inputs: what ``model`` takes (checked by ``model.check_inputs``).
        targets: the loss targets, as in ``kpflow.kernels.record``.
        loss: a loss name or callable, as in ``kpflow.kernels.record``.
        mask: optional loss mask with the outputs' shape or, for per-token outputs ``[B, T, O]``, ``[B, T]``.
        param_names: the parameters the operators differentiate by default (None = all but the readout).
        params: overrides of the model's parameters (shapes checked).

    Returns:
        The ``SiteTrajectory``.

    Raises:
        ValueError: inputs or masks of the wrong shape, dtype or device, unknown parameters, a parameter
            that never enters through a weight site.
        NonFiniteStateError: NaN/Inf activations (named by slot, position and trial) or loss.
    """
    model.check_inputs(inputs)
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        idx = tuple(int(i) for i in torch.nonzero(~torch.isfinite(inputs))[0])
        raise ValueError(f"inputs contain NaN/Inf (first at index {idx}); the model cannot be run on them")
    live = snapshot(model.cell_params())
    if params is not None:
        model.check_params(params)
        live |= snapshot(params)
    if not live:
        raise ValueError(f"{type(model).__name__} has no parameters outside its readout: nothing to differentiate")
    p0 = next(iter(live.values()))
    if inputs.is_floating_point() and (inputs.dtype != p0.dtype or inputs.device != p0.device):
        raise ValueError(f"inputs are {inputs.dtype} on {inputs.device} but the model's parameters are "
                         f"{p0.dtype} on {p0.device}; convert one of them (e.g. inputs.to(model_dtype))")
    names = _resolve(model, param_names)
    inputs = inputs.detach()
    B, T = model.positions(inputs)
    sites = Sites(live, B, T, "record")
    with torch.no_grad():
        model.run_sites(live, inputs, sites)
    layout = sites.recorded_layout()
    if not layout.visible:
        raise ValueError(f"{type(model).__name__}'s forward pass marks no visible state (sites.state)")
    joint = sites.joint()
    msg = _first_nonfinite(joint, layout)
    if msg is not None:
        raise NonFiniteStateError(msg + "; lower the weights' scale or the input size")
    used = {u.weight for u in sites.uses}
    unseen = [n for n in names if n not in used]
    if unseen:
        raise ValueError(f"parameter(s) {unseen} never enter the forward pass through a weight site; the joint-state "
                         "operators see parameters only as W u (affine/lookup/scale). Exclude them with param_names")
    readout = snapshot(model.readout_params())
    states = sites.visible()
    with torch.no_grad():
        outputs = model.output(states, readout)
    traj = SiteTrajectory(model=model, params=live, readout=readout, inputs=inputs, layout=layout, joint=joint,
                          states=states, outputs=outputs, uses=sites.uses, targets=targets, mask=mask,
                          param_names=names)
    if targets is not None:
        if mask is not None:
            ok = {tuple(outputs.shape)} | ({tuple(outputs.shape[:-1])} if outputs.dim() == 3 else set())
            if tuple(mask.shape) not in ok:
                raise ValueError(f"mask must have the outputs' shape {list(outputs.shape)}"
                                 + (f" or [B, T] = {list(outputs.shape[:-1])}" if outputs.dim() == 3 else "")
                                 + f", got {tuple(mask.shape)}")
        attach_error(traj, lambda z: model.output(z, readout), targets, loss, mask, site_propagator, "activations")
    return traj


# ----------------------------------------------------------------------------- helpers on the joint tensor
def _block(Y: torch.Tensor, layout: JointLayout, use: Use) -> torch.Tensor:
    """Rows of ``Y`` ``[k, B, T, Hj]`` that ``use`` writes: ``[k, n, R]``."""
    s = layout.slots[use.slot]
    blk = Y[..., s.offset:s.offset + s.width]
    k = Y.shape[0]
    return blk.reshape(k, -1, s.width) if use.at is None else blk[:, :, use.at]


def _add_block(out: torch.Tensor, Z: torch.Tensor, layout: JointLayout, use: Use) -> None:
    s = layout.slots[use.slot]
    k, B, T = out.shape[:3]
    if use.at is None:
        out[..., s.offset:s.offset + s.width] += Z.reshape(k, B, T, s.width)
    else:
        out[:, :, use.at, s.offset:s.offset + s.width] += Z


def _use_jvp(use: Use, v: torch.Tensor, n: int) -> torch.Tensor:
    """``δW ↦`` the use's output ``[k, n, R]`` for tangents ``v`` ``[k, *shape]``."""
    if use.form == "rc":
        return torch.einsum("nc,krc->knr", use.u, v)
    if use.form == "cr":
        return torch.einsum("nc,kcr->knr", use.u, v)
    if use.form == "r":
        return v.unsqueeze(1).expand(-1, n, -1)
    return use.u.unsqueeze(0) * v.unsqueeze(1)  # diag


def _use_vjp(use: Use, Z: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``_use_jvp``: ``[k, n, R]`` -> ``[k, *shape]``."""
    if use.form == "rc":
        return torch.einsum("knr,nc->krc", Z, use.u)
    if use.form == "cr":
        return torch.einsum("nc,knr->kcr", use.u, Z)
    if use.form == "r":
        return Z.sum(1)
    return (Z * use.u.unsqueeze(0)).sum(1)


def _add_rows(out: torch.Tensor, use: Use, values, B: int, T: int) -> None:
    """``out[positions of use] += values`` (``out`` ``[B·T, C]``, b-major; values a tensor or a scalar)."""
    if use.at is None:
        out.add_(values)
    else:
        out.view(B, T, -1)[:, use.at] += values


class _SiteOperator(LinearOperator):
    def __init__(self, traj: SiteTrajectory, shape_in, shape_out, **flags):
        super().__init__(shape_in, shape_out, traj.dtype, traj.device, **flags)
        self.traj = traj


# ----------------------------------------------------------------------------- Jθ
class SiteParamJacobian(_SiteOperator):
    """``Jθ = ∂f/∂θ`` on the joint state: parameters (flat, in ``layout`` order) -> ``[B, T, Hj]``.

    ``backend="kronecker"`` applies ``δW ↦ δW u`` at every recorded use (one matmul per use);
    ``"autodiff"`` differentiates the forward pass with every weight applied to its recorded site
    variable (an independent reference). ``"auto"`` is ``"kronecker"``.

    Args:
        traj: the site trajectory; param_names: a subset (None: the trajectory's).
        backend: ``"auto"``, ``"kronecker"`` or ``"autodiff"``.

    Raises:
        ValueError: an unknown backend or parameter.
    """

    def __init__(self, traj: SiteTrajectory, param_names=None, backend: str = "auto"):
        if backend not in ("auto", "kronecker", "autodiff"):
            raise ValueError(f"backend must be 'auto', 'kronecker' or 'autodiff', got {backend!r}")
        names = _resolve(traj.model, traj.param_names if param_names is None else param_names)
        self.layout = ParamLayout(traj.params, names)
        super().__init__(traj, (self.layout.numel,), traj.joint_shape)
        self.param_names = names
        self.backend = "kronecker" if backend == "auto" else backend

    def _matmat(self, V):
        traj, k = self.traj, V.shape[0]
        tang = self.layout.unflatten(V)
        if self.backend == "autodiff":
            return vmap(lambda t: jvp(self._frozen_run, (self._primal(),), (t,))[1])(tang)
        B, T, _ = traj.joint_shape
        out = torch.zeros(k, *traj.joint_shape, dtype=V.dtype, device=V.device)
        for use in traj.uses:
            if use.weight in tang:
                n = B if use.at is not None else B * T
                _add_block(out, _use_jvp(use, tang[use.weight], n), traj.layout, use)
        return out

    def _rmatmat(self, Y):
        traj = self.traj
        if self.backend == "autodiff":
            _, pullback = vjp(self._frozen_run, self._primal())
            return self.layout.flatten(vmap(lambda y: pullback(y)[0])(Y), batch_dims=1)
        grads: dict[str, torch.Tensor] = {}
        for use in traj.uses:
            if use.weight in self.layout.shapes:
                g = _use_vjp(use, _block(Y, traj.layout, use))
                grads[use.weight] = g if use.weight not in grads else grads[use.weight] + g
        return self.layout.flatten({n: grads[n].reshape(Y.shape[0], *self.layout.shapes[n]) for n in self.param_names},
                                   batch_dims=1)

    def _primal(self):
        return {n: self.traj.params[n] for n in self.param_names}

    def _frozen_run(self, sub):
        traj = self.traj
        params = {**traj.params, **sub}
        B, T, _ = traj.joint_shape
        sites = Sites(params, B, T, "frozen", layout=traj.layout, recorded=traj.recorded())
        traj.model.run_sites(params, traj.inputs, sites)
        return sites.joint()

    def apply_dict(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Jθ v`` for a parameter perturbation given as a dict.

        Args:
            params: ``{name: tensor of the parameter's shape}``; missing names count as 0.

        Returns:
            ``Jθ v`` on the joint state ``[B, T, Hj]``.
        """
        full = {n: params[n] if n in params else torch.zeros(self.layout.shapes[n], dtype=self.dtype,
                                                               device=self.device) for n in self.layout.names}
        return self.apply(self.layout.flatten(full))

    def adjoint_dict(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Jθ* y`` as a parameter dict.

        Args:
            y: a joint-state cotangent ``[B, T, Hj]``.

        Returns:
            ``{name: tensor of the parameter's shape}``.
        """
        return self.layout.unflatten(self.T.apply(y))


# ----------------------------------------------------------------------------- P, P⁻¹, C
class JointPropagator(_SiteOperator):
    """``P = (∂Φ/∂h)⁻¹`` on the joint state, by autodiff of the forward pass with injections.

    ``P q`` is the JVP of the forward pass with ``q`` injected at every joint variable
    (``h_i = f_i(h_<i) + q_i``); ``P* y`` the VJP. With ``visible=True`` the output is restricted to the
    visible states, i.e. the operator is ``C P`` (joint -> visible).

    Args:
        traj: the site trajectory.
        visible: return ``C P`` instead of ``P``.
        path: ``"fold"`` (probes folded into the batch axis: the model is run on k copies of its
            inputs), ``"vmap"`` (probes vmapped) or ``"auto"`` (fold when the model's trials are
            independent, ``model.batch_independent``). The path used is ``self.path``.

    Raises:
        ValueError: an unknown path, or ``"fold"`` for a model whose trials interact.
    """

    def __init__(self, traj: SiteTrajectory, visible: bool = False, path: str = "auto"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        independent = bool(traj.model.batch_independent)  # declared on SiteModel (True unless trials interact)
        if path == "fold" and not independent:
            raise ValueError(f"{type(traj.model).__name__} does not declare batch_independent=True; its trials may "
                             "interact, so probes cannot be folded into the batch (use path='vmap')")
        self.path = ("fold" if independent else "vmap") if path == "auto" else path
        self.visible = bool(visible)
        shape_out = traj.shape if visible else traj.joint_shape
        super().__init__(traj, traj.joint_shape, shape_out)
        self._pullbacks: dict[int, object] = {}

    def _run(self, inject: torch.Tensor, copies: int = 1) -> torch.Tensor:
        traj = self.traj
        B, T, _ = traj.joint_shape
        inputs = traj.inputs if copies == 1 else traj.inputs.repeat(copies, *([1] * (traj.inputs.dim() - 1)))
        sites = Sites(traj.params, copies * B, T, "inject", layout=traj.layout, recorded=traj.recorded(),
                      inject=inject)
        traj.model.run_sites(traj.params, inputs, sites)
        return sites.visible() if self.visible else sites.joint()

    def _zeros(self, copies=1):
        B, T, Hj = self.traj.joint_shape
        return torch.zeros(copies * B, T, Hj, dtype=self.dtype, device=self.device)

    def _matmat(self, Q):
        k = Q.shape[0]
        if self.path == "fold":
            out = jvp(lambda q: self._run(q, k), (self._zeros(k),), (Q.reshape(k * Q.shape[1], *Q.shape[2:]),))[1]
            return out.reshape(k, *self.shape_out)
        zero = self._zeros()
        return vmap(lambda q: jvp(self._run, (zero,), (q,))[1])(Q)

    def _pullback(self, copies):
        pb = self._pullbacks.get(copies)
        if pb is None:
            _, pb = vjp(lambda q: self._run(q, copies), self._zeros(copies))
            self._pullbacks = {copies: pb}  # keep one graph alive at a time
        return pb

    def _rmatmat(self, Y):
        k = Y.shape[0]
        if self.path == "fold":
            out = self._pullback(k)(Y.reshape(k * Y.shape[1], *Y.shape[2:]))[0]
            return out.reshape(k, *self.shape_in)
        pb = self._pullback(1)
        return vmap(lambda y: pb(y)[0])(Y)


class InverseJointPropagator(_SiteOperator):
    """``P⁻¹ = ∂Φ/∂h = I − ∂f/∂h`` on the joint state.

    ``(∂f/∂h) v`` is the JVP of the forward pass in which every joint variable is pinned to its recorded
    value plus ``v`` (so each ``f_i`` sees ``v`` only through its direct parents). Its adjoint is the
    matching VJP.
    """

    def __init__(self, traj: SiteTrajectory):
        super().__init__(traj, traj.joint_shape, traj.joint_shape)

    def _local(self, v):
        traj = self.traj
        B, T, _ = traj.joint_shape
        sites = Sites(traj.params, B, T, "local", layout=traj.layout, recorded=traj.recorded(), inject=v)
        traj.model.run_sites(traj.params, traj.inputs, sites)
        return sites.joint()

    def _matmat(self, Q):
        zero = torch.zeros_like(self.traj.joint)
        return Q - vmap(lambda q: jvp(self._local, (zero,), (q,))[1])(Q)

    def _rmatmat(self, Y):
        _, pb = vjp(self._local, torch.zeros_like(self.traj.joint))
        return Y - vmap(lambda y: pb(y)[0])(Y)


class VisibleSelection(_SiteOperator):
    """``C``: the visible states out of the joint state (``[B, T, Hj] -> [B, T, Hv]``); ``C*`` scatters back."""

    def __init__(self, traj: SiteTrajectory):
        super().__init__(traj, traj.joint_shape, traj.shape)
        self.index = traj.layout.visible_index(traj.device)

    def _matmat(self, X):
        return X.index_select(-1, self.index)

    def _rmatmat(self, Y):
        out = torch.zeros(Y.shape[0], *self.shape_in, dtype=Y.dtype, device=Y.device)
        out[..., self.index] = Y
        return out


class SiteReadoutJacobian(_SiteOperator):
    """``C_out = ∂y/∂h_vis`` of the readout: visible states -> outputs."""

    def __init__(self, traj: SiteTrajectory):
        super().__init__(traj, traj.shape, tuple(traj.outputs.shape))

    def _f(self, z):
        return self.traj.model.output(z, self.traj.readout)

    def _matmat(self, X):
        return vmap(lambda v: jvp(self._f, (self.traj.states,), (v,))[1])(X)

    def _rmatmat(self, Y):
        _, pb = vjp(self._f, self.traj.states)
        return vmap(lambda y: pb(y)[0])(Y)


class SiteStateJacobian(_SiteOperator):
    """``J = dh_vis/dθ = C P Jθ`` by plain autodiff of the forward pass in θ (no injection).

    ``J w`` is a JVP (vmapped over probes), ``J* y`` a VJP whose graph is kept between calls. The reference
    for ``C P Jθ`` and, for wide models, the faster way to apply the NTK (``site_ntk(path="parameters")``).
    """

    def __init__(self, traj: SiteTrajectory, param_names=None):
        names = _resolve(traj.model, traj.param_names if param_names is None else param_names)
        self.layout = ParamLayout(traj.params, names)
        super().__init__(traj, (self.layout.numel,), traj.shape)
        self.param_names = names
        self._pb = None

    def _f(self, sub):
        traj = self.traj
        return traj.model.visible_states({**traj.params, **sub}, traj.inputs)

    def _primal(self):
        return {n: self.traj.params[n] for n in self.param_names}

    def _matmat(self, V):
        primal = self._primal()
        return vmap(lambda t: jvp(self._f, (primal,), (t,))[1])(self.layout.unflatten(V))

    def _rmatmat(self, Y):
        if self._pb is None:
            _, self._pb = vjp(self._f, self._primal())
        return self.layout.flatten(vmap(lambda y: self._pb(y)[0])(Y), batch_dims=1)


NTK_PATHS = ("auto", "joint", "parameters")


def site_ntk(traj: SiteTrajectory, param_names=None, *, path: str = "auto",
             backend: str = "kronecker") -> LinearOperator:
    """The NTK of the visible states, ``Θ = C P K P* C* = J J*`` (PSD).

    By one of two paths:

    * ``"joint"``: ``(C P) K (C P)*`` — the VJP of the forward pass with injections, the exact Kronecker
      core, the JVP with injections (the general formulation's factorisation);
    * ``"parameters"``: ``J J*`` with ``J = dh_vis/dθ`` by autodiff in θ (a VJP with its graph kept, then a JVP);
    * ``"auto"``: ``"parameters"`` (measured faster on the built-in transformer, ``benchmarks/transformer.py``).

    Args:
        traj: the site trajectory.
        param_names: the parameters (None: the trajectory's).
        path: ``"joint"``, ``"parameters"`` or ``"auto"`` (above).
        backend: how K is applied on the joint path, ``"kronecker"`` or ``"autodiff"``.

    Returns:
        The PSD operator on ``[B, T, Hv]``; the path taken is its ``path`` attribute.

    Raises:
        ValueError: an unknown path (or, on the joint path, an unknown backend).
    """
    if path not in NTK_PATHS:
        raise ValueError(f"path must be one of {NTK_PATHS}, got {path!r}")
    chosen = "parameters" if path == "auto" else path
    if chosen == "joint":
        P = site_propagator(traj)
        op = P @ site_parameter_operator(traj, param_names, backend=backend) @ P.T
    else:
        J = SiteStateJacobian(traj, param_names)
        op = J @ J.T
    op.path = chosen
    return op


# ----------------------------------------------------------------------------- the Kronecker core
class SiteKroneckerCore:
    """``K = Jθ Jθ*`` of a site trajectory from its site variables (see module docstring).

    Attributes:
        param_names: the weights included.
        slots: ``{slot: [weights writing it]}``; slot_widths: ``{slot: R_s}``.
        contraction: ``{weight: "gram" | "factored"}`` — how ``apply`` contracts each weight: the Gram form
            ``G_W Z`` costs ``n_W² R`` per probe, the factored form ``U (Uᵀ Z)`` ``2 n_W C R``; ``"auto"``
            takes the cheaper (Gram iff ``n_W < 2 C``).

    Args:
        traj: the site trajectory; param_names: a subset (None: the trajectory's).
        contraction: ``"auto"``, ``"gram"`` or ``"factored"`` (elementwise weights and biases are always factored).

    Raises:
        ValueError: an unknown contraction or parameter.
    """

    def __init__(self, traj: SiteTrajectory, param_names=None, contraction: str = "auto"):
        if contraction not in ("auto", "gram", "factored"):
            raise ValueError(f"contraction must be 'auto', 'gram' or 'factored', got {contraction!r}")
        self.traj = traj
        self.param_names = _resolve(traj.model, traj.param_names if param_names is None else param_names)
        self.uses: dict[str, list[Use]] = {}
        for u in traj.uses:
            if u.weight in self.param_names:
                self.uses.setdefault(u.weight, []).append(u)
        self.slots: dict[str, list[str]] = {}
        for w, us in self.uses.items():
            for u in us:
                if w not in self.slots.setdefault(u.slot, []):
                    self.slots[u.slot].append(w)
        self.slot_widths = {s: traj.layout.slots[s].width for s in self.slots}
        self.contraction: dict[str, str] = {}
        self._grams: dict[str, torch.Tensor] = {}
        for w, us in self.uses.items():
            dense = us[0].form in ("rc", "cr")
            n, C = sum(u.u.shape[0] for u in us) if dense else 0, us[0].u.shape[1] if dense else 0
            if not dense or contraction == "factored":
                self.contraction[w] = "factored"
            elif contraction == "gram":
                self.contraction[w] = "gram"
            else:
                self.contraction[w] = "gram" if n < 2 * C else "factored"
        self._slot_stats = None

    # ------------------------------------------------------------------ K
    def _gram(self, w: str) -> torch.Tensor:
        if w not in self._grams:
            U = torch.cat([u.u for u in self.uses[w]], 0)
            self._grams[w] = U @ U.T
        return self._grams[w]

    def apply(self, Y: torch.Tensor) -> torch.Tensor:
        """``K Y = Σ_W Σ_uses J_W (G_W or U(Uᵀ·)) J_W* Y``: ``K`` applied through the core.

        Args:
            Y: ``[k, B, T, Hj]`` joint-state probes.

        Returns:
            ``K Y``, same shape as ``Y``.
        """
        traj = self.traj
        B, T, _ = traj.joint_shape
        layout = traj.layout
        out = torch.zeros_like(Y)
        for w, us in self.uses.items():
            if self.contraction[w] == "gram":
                Z = torch.cat([_block(Y, layout, u) for u in us], 1)  # [k, n_W, R]
                GZ = torch.einsum("nm,kmr->knr", self._gram(w), Z)
                off = 0
                for u in us:
                    n = u.u.shape[0]
                    _add_block(out, GZ[:, off:off + n], layout, u)
                    off += n
                continue
            M = None
            for u in us:
                g = _use_vjp(u, _block(Y, layout, u))
                M = g if M is None else M + g
            for u in us:
                n = B if u.at is not None else B * T
                _add_block(out, _use_jvp(u, M, n), layout, u)
        return out

    def operator(self) -> LinearOperator:
        """``K`` as a ``LinearOperator``.

        Returns:
            A PSD ``SiteKroneckerKernel`` on the joint state ``[B, T, Hj]``.
        """
        return SiteKroneckerKernel(self)

    # ------------------------------------------------------------------ exact scalars
    def _stats(self):
        """The statistics of the exact scalars per slot group (cached).

        A *group* is a set of slots linked by weights that write more than one of them (one slot when
        no weight is shared). With the group's slots ``s_1..s_m`` stacked, its rows are the ``m·N``
        (slot, position) pairs and every weight's site variables fill the rows of the slots it writes:
        ``J_W δW`` puts ``δW u`` at every use, so ``K_W[(s,p,r), (s',p',r')] = u_{s,p}·u_{s',p'} δ_rr'`` —
        the Kronecker form ``Ũ Ũᵀ ⊗ I_R`` of a single slot, over the stacked rows (the cross-slot blocks
        are the cross terms of the sum over sites). Weights of different groups touch disjoint channels,
        so K is block-diagonal over groups.

        Returns:
            ``{group name ("s" or "s_1+s_2+…"): (Ũ [m·N, ΣC] (dense weights and biases), [D_W [m·N, R] of the
            elementwise weights], R, m)}``.
        """
        if self._slot_stats is not None:
            return self._slot_stats
        traj = self.traj
        B, T, _ = traj.joint_shape
        N = B * T
        parent = {sl: sl for sl in self.slots}

        def root(sl):
            while parent[sl] != sl:
                sl = parent[sl]
            return sl

        for us in self.uses.values():
            first = root(us[0].slot)
            for u in us[1:]:
                parent[root(u.slot)] = first
        groups: dict[str, list[str]] = {}
        for sl in self.slots:
            groups.setdefault(root(sl), []).append(sl)
        stats = {}
        for members in groups.values():
            R = self.slot_widths[members[0]]
            row = {sl: i * N for i, sl in enumerate(members)}
            rows = len(members) * N
            weights = [w for w in self.uses if self.uses[w][0].slot in row]
            cols, diag = [], []
            for w in weights:
                us = self.uses[w]
                if us[0].form == "diag":
                    D = torch.zeros(rows, R, dtype=traj.dtype, device=traj.device)
                    for u in us:
                        _add_rows(D[row[u.slot]:row[u.slot] + N], u, u.u, B, T)
                    diag.append(D)
                    continue
                C = 1 if us[0].form == "r" else us[0].u.shape[1]
                Uf = torch.zeros(rows, C, dtype=traj.dtype, device=traj.device)
                for u in us:
                    _add_rows(Uf[row[u.slot]:row[u.slot] + N], u, 1.0 if u.form == "r" else u.u, B, T)
                cols.append(Uf)
            Ut = torch.cat(cols, 1) if cols else torch.zeros(rows, 0, dtype=traj.dtype, device=traj.device)
            stats["+".join(members)] = (Ut, diag, R, len(members))
        self._slot_stats = stats
        return stats

    def _gram_of(self, Ut: torch.Tensor) -> torch.Tensor:
        N = Ut.shape[0]
        if N * N > GRAM_LIMIT:
            raise MemoryError(f"a {N}×{N} position Gram matrix exceeds {GRAM_LIMIT:,} entries; use the estimators "
                              "(trace, Frobenius norm and effective rank need no Gram matrix)")
        return Ut @ Ut.T

    def slot_grams(self) -> dict[str, torch.Tensor]:
        """The position Gram matrices of the slot groups (see ``_stats``: one slot unless weights are shared).

        Returns:
            ``{group: G = Ũ Ũᵀ}`` ``[m·B·T, m·B·T]`` (dense weights and biases; rows: the group's m slots in
            turn, each at its B·T positions).

        Raises:
            MemoryError: a Gram matrix over ``GRAM_LIMIT`` entries.
        """
        return {s: self._gram_of(v[0]) for s, v in self._stats().items()}

    def trace(self) -> float:
        """Exact trace (no probes).

        Returns:
            ``tr K = Σ_groups R ‖Ũ‖_F² + Σ_{elementwise W} ‖d_W‖²``.
        """
        total = 0.0
        for Ut, diag, R, _ in self._stats().values():
            total += R * float((Ut ** 2).sum()) + sum(float((D ** 2).sum()) for D in diag)
        return total

    def frobenius_norm(self) -> float:
        """Exact Frobenius norm (no probes).

        Per slot group ``R ‖ŨᵀŨ‖² + 2 Σ_W ‖Ũᵀ d_W‖² + Σ_r ‖Σ_W d_{W,r} d_{W,r}ᵀ‖²``, contracted on the smaller
        side (``‖Ũ Ũᵀ‖_F = ‖Ũᵀ Ũ‖_F``): O(N C²) per group and no N×N matrix.

        Returns:
            ``‖K‖_F``.
        """
        total = 0.0
        for Ut, diag, R, _ in self._stats().values():
            small = Ut.T @ Ut if Ut.shape[1] <= Ut.shape[0] else Ut @ Ut.T
            total += R * float((small ** 2).sum())
            for D in diag:
                total += 2 * float(((Ut.T @ D) ** 2).sum())
            for a, Da in enumerate(diag):  # Σ_r (d_{a,r} · d_{b,r})² over pairs of elementwise weights
                for Db in diag[a:]:
                    cross = (Da * Db).sum(0)
                    total += (1 if Db is Da else 2) * float((cross ** 2).sum())
        return math.sqrt(max(total, 0.0))

    def effective_rank(self) -> float:
        """Exact participation ratio.

        Returns:
            ``tr(K)² / ‖K‖_F²`` (0 for ``K = 0``).
        """
        fro = self.frobenius_norm()
        return self.trace() ** 2 / fro ** 2 if fro > 0 else 0.0

    def temporal_gram(self) -> torch.Tensor:
        """The exact position ("temporal"/token) view of ``K``.

        Returns:
            ``Σ_groups (R G_f + Σ_W d_f d_fᵀ)`` ``[B·T, B·T]`` with ``Ũ_f``, ``d_f`` the group's rows summed
            over its slots (the view sums the channels of all of them), equal to
            ``kpflow.operators.view(K, "temporal")`` as a matrix.

        Raises:
            MemoryError: a Gram matrix over ``GRAM_LIMIT`` entries.
        """
        B, T, _ = self.traj.joint_shape
        out = None
        for Ut, diag, R, m in self._stats().values():
            G = self._gram_of(Ut.reshape(m, B * T, Ut.shape[1]).sum(0))
            folded = (D.reshape(m, B * T, R).sum(0) for D in diag)
            term = R * G + sum((Df @ Df.T for Df in folded), torch.zeros_like(G))
            out = term if out is None else out + term
        return out

    def rank_bound(self, rtol: float | None = None) -> int:
        """Upper bound on the rank of ``K``.

        Args:
            rtol: relative tolerance passed to ``torch.linalg.matrix_rank`` (None: its default).

        Returns:
            ``min(Σ_groups rank(Ũ) R + Σ_{elementwise W} R, #parameters, dim of the joint state)``.
        """
        bound = 0
        for Ut, diag, R, _ in self._stats().values():
            bound += (int(torch.linalg.matrix_rank(Ut, rtol=rtol)) if Ut.shape[1] else 0) * R + len(diag) * R
        n_params = sum(self.traj.params[n].numel() for n in self.param_names)
        return min(bound, n_params, math.prod(self.traj.joint_shape))


class SiteKroneckerKernel(LinearOperator):
    """``K`` of a site trajectory applied through its Kronecker core (PSD)."""

    def __init__(self, core: SiteKroneckerCore):
        shape = core.traj.joint_shape
        super().__init__(shape, shape, core.traj.dtype, core.traj.device, is_psd=True)
        self.core = core

    def _matmat(self, X):
        return self.core.apply(X)

    def _rmatmat(self, Y):
        return self.core.apply(Y)


# ----------------------------------------------------------------------------- constructors
def site_kronecker_core(traj: SiteTrajectory, param_names=None, *, contraction: str = "auto") -> SiteKroneckerCore:
    """The exact Kronecker core of ``K`` (cached on the trajectory per parameter subset and contraction).

    Args:
        traj: the site trajectory.
        param_names: the weights included (None: the trajectory's).
        contraction: ``"auto"``, ``"gram"`` or ``"factored"`` (see ``SiteKroneckerCore``).

    Returns:
        The ``SiteKroneckerCore``.
    """
    key = ("site_core", _resolve(traj.model, traj.param_names if param_names is None else param_names), contraction)
    core = traj.cache.get(key)
    if core is None:
        core = traj.cache[key] = SiteKroneckerCore(traj, param_names, contraction)
    return core


def site_propagator(traj: SiteTrajectory, *, path: str = "auto") -> JointPropagator:
    """``C P``: joint perturbations -> visible states (``.T`` is ``P* C*``).

    Args:
        traj: the site trajectory.
        path: ``"fold"``, ``"vmap"`` or ``"auto"`` (see ``JointPropagator``).

    Returns:
        The ``JointPropagator`` with ``visible=True``.
    """
    return JointPropagator(traj, visible=True, path=path)


def joint_propagator(traj: SiteTrajectory, *, path: str = "auto") -> JointPropagator:
    """``P = (∂Φ/∂h)⁻¹`` on the joint state.

    Args:
        traj: the site trajectory.
        path: ``"fold"``, ``"vmap"`` or ``"auto"`` (see ``JointPropagator``).

    Returns:
        The ``JointPropagator`` (joint -> joint).
    """
    return JointPropagator(traj, visible=False, path=path)


def site_parameter_operator(traj: SiteTrajectory, param_names=None, *, backend: str = "auto") -> LinearOperator:
    """``K = Jθ Jθ*`` on the joint state.

    Args:
        traj: the site trajectory.
        param_names: the weights included (None: the trajectory's).
        backend: ``"auto"``/``"kronecker"`` (through the Kronecker core) or ``"autodiff"`` (``Jθ @ Jθ.T``).

    Returns:
        The PSD operator on ``[B, T, Hj]``.

    Raises:
        ValueError: an unknown backend.
    """
    if backend == "autodiff":
        J = SiteParamJacobian(traj, param_names, "autodiff")
        return J @ J.T
    if backend not in ("auto", "kronecker"):
        raise ValueError(f"backend must be 'auto', 'kronecker' or 'autodiff', got {backend!r}")
    return site_kronecker_core(traj, param_names).operator()
