"""A recorded run of a model: everything the state-space operators linearise around.

``RecordedRun`` is the vocabulary every recording shares — the recurrent ``Trajectory`` here and the
joint-state ``kpflow.kernels.joint.SiteTrajectory`` — so operators and estimators rely on ``traj.shape``,
``traj.dtype``, ``traj.device``, ``traj.readout_params()`` and on a recording being a snapshot, whatever
model made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from kpflow.models.base import RecurrentModel


class NonFiniteStateError(ValueError):
    """The recorded states contain NaN or inf."""


class RecordedRun:
    """What every recorded run offers, whichever model made it: a snapshot with one vocabulary.

    *Snapshot*: the recording keeps copies of the parameters (``params``) and of the readout (``readout``)
    that it ran with, so training the model in place afterwards (``optimizer.step()``) changes neither the
    recording nor any operator built on it; record again to linearise around the new parameters. ``shape``,
    ``dtype`` and ``device`` are those of the recorded (visible) states, which every operator on the
    recording acts on.

    Subclasses (dataclasses) hold at least these attributes:

    Attributes:
        model: the model that produced the run (its pure functions are used, never its live parameters).
        params: copies of the parameters the run used (the linearisation point).
        readout: copies of the readout parameters ``{"weight", "bias"}`` of ``y = C z + d``.
        inputs: what the model ran on.
        states: the visible states ``[B, T, H]``; outputs: the readout of them.
        targets, mask, error, adjoint, loss: the loss's targets and mask, ``e = ∂L/∂states``, ``P* e``
            and the loss value (None without targets).
        param_names: the parameters the operators differentiate by default.
        cache: derived quantities memoised on the recording (pure functions of the snapshot).
    """

    model: object
    params: dict[str, torch.Tensor]
    readout: dict[str, torch.Tensor] | None
    inputs: torch.Tensor
    states: torch.Tensor
    outputs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, T, H)`` of the visible states."""
        return tuple(self.states.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the recorded states (and of every operator built on them)."""
        return self.states.dtype

    @property
    def device(self) -> torch.device:
        """The device of the recorded states (and of every operator built on them)."""
        return self.states.device

    def readout_params(self) -> dict[str, torch.Tensor]:
        """The readout parameters of the snapshot.

        Returns:
            A new dict of the snapshot's readout tensors (not the model's live ones).
        """
        return dict(self.readout)


@dataclass
class Trajectory(RecordedRun):
    """States ``[B, T, H]`` of a model run, with its inputs, outputs, error and adjoint.

    A trajectory is a *snapshot* (see ``RecordedRun``): ``record`` stores copies of the cell and readout
    parameters, so training the model in place afterwards (``optimizer.step()``) changes neither the
    trajectory nor any operator built on it. Record again to linearise around the new parameters.

    Attributes:
        model: the ``RecurrentModel`` that produced the run (its pure functions are used, never its
            live parameters).
        params: copies of the cell parameters the run used (the linearisation point).
        inputs: ``[B, T, I]``; z0: ``[B, H]``; states: ``[B, T, H]``; outputs: ``[B, T, O]``.
        targets, mask: what the loss compared the outputs with (or None).
        error: the direct error ``e = ∂L/∂z`` ``[B, T, H]`` (None without targets).
        adjoint: ``P* e`` (backprop through time; None without targets).
        loss: the loss value (None without targets).
        param_names: the parameters the operators differentiate by default (all cell parameters
            unless ``record`` was given a subset).
        readout: copies of the readout parameters (``weight``, ``bias``) the outputs were computed
            with; taken from the model (copied) when not given.
    """

    model: RecurrentModel
    params: dict[str, torch.Tensor]
    inputs: torch.Tensor
    z0: torch.Tensor
    states: torch.Tensor
    outputs: torch.Tensor
    targets: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    error: torch.Tensor | None = None
    adjoint: torch.Tensor | None = None
    loss: float | None = None
    param_names: tuple[str, ...] = ()
    readout: dict[str, torch.Tensor] | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.readout is None:
            self.readout = snapshot(self.model.readout_params())

    @property
    def prev_states(self) -> torch.Tensor:
        """``z_{t-1}`` at every site: ``[B, T, H]`` (``z0`` at t = 0); built once per ``(z0, states)`` pair."""
        held = self.cache.get("prev_states")
        if held is None or held[0] is not self.z0 or held[1] is not self.states:
            held = self.cache["prev_states"] = (self.z0, self.states,
                                                torch.cat([self.z0.unsqueeze(1), self.states[:, :-1]], 1))
        return held[2]

    def sites(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sites of the recording, flattened.

        Returns:
            Previous states ``[N, H]`` and inputs ``[N, I]`` of all N = B·T sites (b-major).
        """
        B, T, H = self.shape
        return self.prev_states.reshape(B * T, H), self.inputs.reshape(B * T, -1)


def snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies that no later in-place update of ``params`` can reach (what a recording keeps).

    Args:
        params: tensors by name (e.g. ``model.cell_params()``, live parameters).

    Returns:
        ``{name: tensor.detach().clone()}``: new memory, no autograd history.
    """
    return {k: v.detach().clone() for k, v in params.items()}


def resolve_param_names(model: RecurrentModel, names: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate a subset of cell-parameter names.

    Args:
        model: the model (a ``RecurrentModel`` or a ``SiteModel``) whose ``cell_params()`` name the valid
            choices.
        names: one name, a sequence of names, or None for all.

    Returns:
        The chosen names in the model's order.

    Raises:
        ValueError: a name that is not a cell parameter of ``model``, or an empty selection.
    """
    own = list(model.cell_params())
    if names is None:
        return tuple(own)
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    unknown = [n for n in names if n not in own]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown} for {type(model).__name__}; choose from {own}")
    if not names:
        raise ValueError(f"param_names is empty; choose at least one of {own}")
    return tuple(n for n in own if n in names)


def _first_nonfinite(states: torch.Tensor) -> tuple[int, int] | None:
    # a finite sum over the state has no NaN/inf term (they propagate), so only a non-finite row sum (NaN/inf,
    # or an overflow of finite terms) needs the entrywise test; the sum avoids a [B, T, H] mask per recording
    if bool(torch.isfinite(states.sum(-1)).all()):
        return None
    bad = ~torch.isfinite(states).all(-1)  # [B, T]
    if not bool(bad.any()):
        return None
    t = int(bad.any(0).nonzero()[0])
    b = int(bad[:, t].nonzero()[0])
    return b, t


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_value(outputs: torch.Tensor, targets, loss: str | LossFn, mask: torch.Tensor | None) -> torch.Tensor:
    """The scalar loss ``record`` differentiates: the one definition shared by every caller.

    Args:
        outputs: readout ``[B, T, O]``.
        targets: ``[B, T, O]`` for ``"mse"``; integer classes ``[B, T]`` for ``"ce"``.
        loss: ``"mse"`` (mean over unmasked entries), ``"ce"``/``"cross_entropy"`` (mean cross-entropy)
            or a callable ``loss(outputs, targets) -> scalar``.
        mask: ``[B, T]`` or the outputs' shape (1 = counts), or None.

    Returns:
        The loss (a tensor, differentiable in ``outputs``).

    Raises:
        ValueError: targets of the wrong shape or dtype for the loss, or an unknown loss.
    """
    if callable(loss):
        return loss(outputs, targets)
    if loss == "mse":
        if targets.shape != outputs.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)} but the outputs are "
                             f"{tuple(outputs.shape)}; for loss='mse' they must match")
        sq = (outputs - targets) ** 2
        if mask is None:
            return sq.mean()
        m = mask.to(sq.dtype)
        m = m.unsqueeze(-1).expand_as(sq) if m.dim() == 2 else m.expand_as(sq)
        return (sq * m).sum() / m.sum().clamp_min(1)
    if loss in ("ce", "cross_entropy"):
        if targets.shape != outputs.shape[:2] or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"for loss='ce' targets must be integer classes [B, T] = "
                             f"{list(outputs.shape[:2])}, got {tuple(targets.shape)} {targets.dtype}")
        ce = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long(),
                             reduction="none").reshape(targets.shape)
        if mask is None:
            return ce.mean()
        m = mask.to(ce.dtype)
        return (ce * m).sum() / m.sum().clamp_min(1)
    raise ValueError(f"unknown loss {loss!r}; use 'mse', 'ce' or a callable loss(outputs, targets) -> scalar")


def attach_error(traj, output, targets, loss, mask, adjoint, what: str = "states") -> None:
    """Set ``traj.error = ∂L/∂z``, ``traj.loss`` and ``traj.adjoint = P* e`` of a recorded run.

    One implementation for both recording paths (recurrences and site models).

    Args:
        traj: the recording, with ``states`` set (and not yet an error).
        output: ``z ↦ outputs`` (the readout of the snapshot), differentiable in ``z``.
        targets: what the outputs are compared with (see ``loss_value``).
        loss: the loss name or callable (see ``loss_value``).
        mask: optional mask of the compared entries (see ``loss_value``).
        adjoint: ``traj ↦`` the operator whose ``.T`` is applied to the error (the propagator).
        what: how the message for a non-finite loss names what is finite ("states", "activations").

    Raises:
        ValueError: the loss is not a scalar (see also ``loss_value``).
        NonFiniteStateError: the loss is NaN/inf.
    """
    with torch.enable_grad():
        z = traj.states.clone().requires_grad_(True)
        value = loss_value(output(z), targets, loss, mask)
        if value.dim() != 0:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
        (e,) = torch.autograd.grad(value, z)
    traj.error, traj.loss = e.detach(), float(value.detach())
    if not math.isfinite(traj.loss):
        raise NonFiniteStateError(f"the loss is {traj.loss} although the {what} are finite; check targets")
    traj.adjoint = adjoint(traj).T.apply(traj.error)


# ----------------------------------------------------------------------------- parameter layout
class ParamLayout:
    """Order, shapes and offsets of a parameter dict flattened into one vector."""

    def __init__(self, params: Mapping[str, torch.Tensor], names: Sequence[str]):
        self.names = tuple(names)
        self.shapes = {n: tuple(params[n].shape) for n in self.names}
        self.sizes = {n: math.prod(self.shapes[n]) for n in self.names}
        self.offsets, off = {}, 0
        for n in self.names:
            self.offsets[n] = off
            off += self.sizes[n]
        self.numel = off

    def flatten(self, params: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Flatten a parameter dict into one vector in the layout's order.

        Args:
            params: ``{name: [*batch, *shape]}`` holding at least the layout's names.
            batch_dims: number of leading batch axes to keep.

        Returns:
            ``[*batch, numel]``.
        """
        parts = []
        for n in self.names:
            p = params[n]
            parts.append(p.reshape(*p.shape[:batch_dims], -1))
        return torch.cat(parts, -1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into the layout's parameters (inverse of ``flatten``).

        Args:
            vector: ``[*batch, numel]``.

        Returns:
            ``{name: [*batch, *shape]}`` views of ``vector``.

        Raises:
            ValueError: the last axis of ``vector`` does not have ``numel`` entries.
        """
        if vector.shape[-1] != self.numel:
            raise ValueError(f"parameter vector has {vector.shape[-1]} entries, expected {self.numel} "
                             f"(parameters {list(self.names)})")
        lead = vector.shape[:-1]
        return {n: vector[..., self.offsets[n]:self.offsets[n] + self.sizes[n]].reshape(tuple(lead) + self.shapes[n])
                for n in self.names}

    def __repr__(self):
        return f"ParamLayout({', '.join(f'{n}{list(s)}' for n, s in self.shapes.items())}; numel={self.numel})"
