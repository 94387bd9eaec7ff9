"""``record``: run a model once and keep what the operators linearise around (a snapshot).

The one entry point for every model: a recurrent ``RecurrentModel`` gives a ``Trajectory``
(``kpflow.kernels.trajectory``), a ``SiteModel`` a ``SiteTrajectory`` (``kpflow.kernels.joint``). It sits
above both and above ``state_space`` (the adjoint ``P* e`` is recorded with the propagator), so the
kernels' modules import one another in one direction only: trajectory → linearization → joint →
kronecker → state_space → recording.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kpflow.models.base import RecurrentModel
from kpflow.models.cells import AffineRecurrentModel
from kpflow.models.sites import SiteModel

from .joint import record_sites
from .state_space import propagator
from .trajectory import (
    LossFn,
    NonFiniteStateError,
    Trajectory,
    _first_nonfinite,
    attach_error,
    resolve_param_names,
    snapshot,
)


def record(
    model: RecurrentModel,
    inputs: torch.Tensor,
    z0: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    loss: str | LossFn = "mse",
    mask: torch.Tensor | None = None,
    param_names: Sequence[str] | str | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
) -> Trajectory:
    """Run ``model`` on ``inputs`` and keep what the operators need, as a snapshot.

    With ``targets`` the direct error ``e = ∂L/∂z`` of the loss (``"mse"``: mean squared error of
    the readout over unmasked entries; ``"ce"``: mean cross-entropy; or a callable) and the adjoint
    ``P* e`` (backprop through time) are recorded too. The cell and readout parameters are copied,
    so later in-place updates of the model do not change the trajectory.

    Args:
        model: a kpflow ``RecurrentModel`` (wrap other cells with ``kpflow.models.CellAdapter``).
        inputs: ``[B, T, I]`` with B, T >= 1, finite, of the parameters' dtype and device.
        z0: initial state ``[B, H]`` (default: the model's initial state).
        targets: what the readout is compared with; enables ``error``, ``adjoint`` and ``loss``.
        loss: ``"mse"``, ``"ce"`` or a callable ``loss(outputs, targets) -> scalar``.
        mask: ``[B, T]`` or the outputs' shape; masked-out entries do not enter the loss.
        param_names: the cell parameters the operators differentiate by default (None = all).
        params: overrides of the model's cell parameters (a full or partial dict, shapes checked).

    Returns:
        The ``Trajectory``.

    Raises:
        TypeError: ``model`` is not a ``RecurrentModel``.
        ValueError: empty batch or no time steps, NaN/Inf inputs, shapes, dtypes or devices that do not
            fit the model (also a readout of another dtype than the cell), an unknown loss or parameter.
        NonFiniteStateError: the states (or the loss) become NaN/Inf.
    """
    if isinstance(model, SiteModel):  # the general joint-state path (MLP, transformer, ModuleAdapter)
        if z0 is not None:
            raise ValueError(f"{type(model).__name__} is a site model: it has no z0 (give the initial state to "
                             "RecurrentSites instead)")
        return record_sites(model, inputs, targets=targets, loss=loss, mask=mask, param_names=param_names,
                            params=params)
    if not isinstance(model, RecurrentModel):
        raise TypeError(f"record needs a kpflow RecurrentModel or SiteModel, got {type(model).__name__}; wrap an "
                        "nn.Module cell with kpflow.models.CellAdapter, any other nn.Module with "
                        "kpflow.models.ModuleAdapter")
    model.check_inputs(inputs, z0)
    for name, t in (("inputs", inputs), ("z0", z0)):
        if t is not None and not bool(torch.isfinite(t).all()):
            idx = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
            raise ValueError(f"{name} contain NaN/Inf (first at index {idx}); the model cannot be run on them")
    if inputs.shape[0] == 0:
        raise ValueError(f"inputs have an empty batch (shape {tuple(inputs.shape)}); record needs at least one "
                         "trial, inputs of shape [B, T, I] with B >= 1")
    # a snapshot: copies, so that an in-place optimizer step on the model cannot reach the trajectory
    live = snapshot(model.cell_params())
    if params is not None:
        model.check_params(params)
        live |= snapshot(params)
    model.check_params(live, complete=True)
    p0 = next(iter(live.values()))
    if inputs.dtype != p0.dtype or inputs.device != p0.device:
        raise ValueError(f"inputs are {inputs.dtype} on {inputs.device} but the model's parameters are "
                         f"{p0.dtype} on {p0.device}; convert one of them (e.g. inputs.to(model_dtype))")
    readout = snapshot(model.readout_params())
    odd = {k: (v.dtype, v.device) for k, v in readout.items() if (v.dtype, v.device) != (p0.dtype, p0.device)}
    if odd:
        raise ValueError(f"the readout parameters {sorted(odd)} are {next(iter(odd.values()))[0]} on "
                         f"{next(iter(odd.values()))[1]} but the cell's are {p0.dtype} on {p0.device}; convert the "
                         "whole model to one dtype and device (e.g. model.to(torch.float64))")
    names = resolve_param_names(model, param_names)
    B = inputs.shape[0]
    if z0 is None:
        z0 = model.initial_state(B, inputs.dtype, inputs.device)
    z0 = z0.detach()
    inputs = inputs.detach()
    with torch.no_grad():  # an affine-slot cell also gives the slots its steps computed (kept for the operators)
        states, slots = (model.unroll_slots(live, inputs, z0) if isinstance(model, AffineRecurrentModel)
                         else (model.unroll(live, inputs, z0), None))
    bad = _first_nonfinite(states)
    if bad is not None:
        b, t = bad
        raise NonFiniteStateError(
            f"the states became non-finite first at (b={b}, t={t}) (trial {b}, time step {t}); "
            "the dynamics diverge here: lower the weights' scale, the step dt, or the input size"
        )
    traj = Trajectory(model=model, params=live, inputs=inputs, z0=z0, states=states, outputs=None,
                      targets=targets, mask=mask, param_names=names, readout=readout)
    if slots is not None:
        traj.cache["slots"] = {s: v.reshape(B * inputs.shape[1], -1) for s, v in slots.items()}
    rp = traj.readout_params()
    with torch.no_grad():
        traj.outputs = model.output(states, rp)
    if targets is not None:
        if mask is not None and tuple(mask.shape) not in (tuple(states.shape[:2]), tuple(traj.outputs.shape)):
            raise ValueError(f"mask must be [B, T] = {list(states.shape[:2])} or the outputs' shape "
                             f"{list(traj.outputs.shape)}, got {tuple(mask.shape)}")
        attach_error(traj, lambda z: model.output(z, rp), targets, loss, mask, propagator, "states")
    return traj
