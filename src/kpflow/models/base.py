"""Recurrent models as pure functions of (parameters, previous state, input).

A kpflow model is an ``nn.Module`` (so users train it like any other) whose recurrence is also
available as a *pure* function ``step(params, z_prev, x_t) -> z_t`` of a parameter dict, so that
``torch.func`` can differentiate it. The state ``z_t`` is a flat vector of size ``state_dim``
(an LSTM's state is ``[h; c]``). A linear readout ``y_t = C z_t + d`` maps states to outputs.

Parameter naming: the recurrence's parameters are the module's parameters whose names start with
``cell.``; the readout's start with ``readout.``. ``cell_params()`` returns the former with that
prefix stripped, which is the dict ``step`` takes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Params = Mapping[str, torch.Tensor]


class RecurrentModel(nn.Module):
    """Base class: a recurrent cell (``self.cell``) plus a linear readout (``self.readout``).

    Subclasses implement ``step``. Everything else (unrolling, recording, operators) is generic.

    Attributes:
        state_dim: size H of the state vector z_t.
        input_dim: size of the input x_t.
        output_dim: size of the readout y_t.
        is_flow: True when the model is the Euler/RK step of a continuous-time flow
            (then ``dt`` is its step and stability is judged by Re λ of the vector field).
    """

    is_flow: bool = False
    dt: float = 1.0

    def __init__(self, input_dim: int, state_dim: int, output_dim: int):
        """A model with the given sizes and a fresh ``nn.Linear(state_dim, output_dim)`` readout.

        Args:
            input_dim: size ``I`` of the input ``x_t``.
            state_dim: size ``H`` of the state ``z_t``.
            output_dim: size ``O`` of the output ``y_t``.
        """
        super().__init__()
        self.input_dim, self.state_dim, self.output_dim = int(input_dim), int(state_dim), int(output_dim)
        self.readout = nn.Linear(self.state_dim, self.output_dim)

    # --------------------------------------------------------------- pure API
    def step(self, params: Params, z_prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence, ``z_t = F(z_{t-1}, x_t; θ)``, pure in ``params``.

        Args:
            params: the cell's parameters ``θ`` by name (as ``cell_params()`` gives them).
            z_prev: the previous state ``z_{t-1}``, ``[B, H]``.
            x_t: the input at step t, ``[B, I]``.

        Returns:
            The new state ``z_t``, ``[B, H]``.

        Raises:
            NotImplementedError: in the base class; every model implements ``step``.
        """
        raise NotImplementedError

    def cell_params(self) -> dict[str, torch.Tensor]:
        """The recurrence's parameters by name (prefix ``cell.`` stripped), as live tensors.

        Returns:
            ``{name: parameter}``: the module's own parameters (they share memory; not a copy).
        """
        return {k[len("cell."):]: v for k, v in self.named_parameters() if k.startswith("cell.")}

    def readout_params(self) -> dict[str, torch.Tensor]:
        """The readout's parameters ``C`` and ``d`` of ``y = C z + d``, as live tensors.

        Returns:
            ``{"weight": C [O, H], "bias": d [O]}`` (the module's own parameters; not a copy).
        """
        return {"weight": self.readout.weight, "bias": self.readout.bias}

    def output(self, z: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """Linear readout ``y = C z + d`` on any leading shape.

        Args:
            z: states ``[..., H]``.
            readout_params: ``{"weight": C, "bias": d}`` to use instead of the model's own (e.g. a recorded
                snapshot, or tensors to differentiate with respect to).

        Returns:
            The outputs ``y``, ``[..., O]``.
        """
        p = self.readout_params() if readout_params is None else readout_params
        return z @ p["weight"].T + p["bias"]

    def initial_state(self, batch: int, dtype=None, device=None) -> torch.Tensor:
        """The initial state ``z_0 = 0``.

        Args:
            batch: the batch size ``B``.
            dtype: its dtype (the model's parameters' when None).
            device: its device (the model's parameters' when None).

        Returns:
            Zeros of shape ``[B, H]``.
        """
        p = next(self.parameters())
        return torch.zeros(batch, self.state_dim, dtype=dtype or p.dtype, device=device or p.device)

    def unroll(self, params: Params, inputs: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """All states of the recurrence ``z_t = step(params, z_{t-1}, x_t)``, ``t = 1..T`` (pure in ``params``).

        Args:
            params: the cell's parameters by name.
            inputs: the input sequence, ``[B, T, I]``.
            z0: the initial state ``[B, H]`` (``initial_state``, zeros, when None).

        Returns:
            The states ``[B, T, H]`` (``z_0`` not included).

        Raises:
            ValueError: ``inputs`` or ``z0`` has the wrong shape or dtype (see ``check_inputs``).
        """
        self.check_inputs(inputs, z0)
        z = self.initial_state(inputs.shape[0], inputs.dtype, inputs.device) if z0 is None else z0
        states = []
        for t in range(inputs.shape[1]):
            z = self.step(params, z, inputs[:, t])
            states.append(z)
        return torch.stack(states, 1)

    def forward(self, inputs: torch.Tensor, z0: torch.Tensor | None = None):
        """Run the model with its own parameters.

        Args:
            inputs: the input sequence, ``[B, T, I]``.
            z0: the initial state ``[B, H]`` (zeros when None).

        Returns:
            ``(states [B, T, H], outputs [B, T, O])`` with ``outputs = C states + d``.

        Raises:
            ValueError: ``inputs`` or ``z0`` has the wrong shape or dtype (see ``check_inputs``).
        """
        z = self.unroll(self.cell_params(), inputs, z0)
        return z, self.output(z)

    def load_cell_params(self, params: Params) -> None:
        """Copy ``params`` (names as in ``cell_params()``) into the cell, checking every shape.

        Args:
            params: a value for every cell parameter, by name.

        Raises:
            ValueError: a name is unknown or missing, or a shape differs (see ``check_params``).
        """
        self.check_params(params, complete=True)
        live = self.cell_params()
        with torch.no_grad():
            for k, v in params.items():
                live[k].copy_(v)

    # ------------------------------------------------------------ validation
    def expected_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape every cell parameter must have.

        These are the shapes the cell declared when it was built (``cell.declared_shapes``, set by the built-in
        cells), else the current ones.

        Returns:
            ``{name: shape}`` for every cell parameter.
        """
        declared = getattr(getattr(self, "cell", None), "declared_shapes", None)
        if declared:
            return {k: tuple(v) for k, v in declared.items()}
        return {k: tuple(v.shape) for k, v in self.cell_params().items()}

    def check_params(self, params: Params, complete: bool = False) -> None:
        """Check that ``params`` names cell parameters with the cell's shapes.

        Args:
            params: parameter values by name (as ``cell_params()``).
            complete: also require every cell parameter to be present.

        Raises:
            ValueError: naming any parameter in ``params`` that the cell does not have or whose shape differs
                from the cell's (with ``complete=True`` also any that is missing).
        """
        own = self.expected_param_shapes()
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no cell parameter(s) {unknown}; its parameters are "
                             f"{sorted(own)}")
        for k, v in params.items():
            if tuple(v.shape) != own[k]:
                raise ValueError(f"parameter {k!r} has shape {tuple(v.shape)} but {type(self).__name__} "
                                 f"needs {own[k]}")
        missing = sorted(set(own) - set(params))
        if complete and missing:
            raise ValueError(f"missing cell parameter(s) {missing} for {type(self).__name__}")

    def check_inputs(self, inputs: torch.Tensor, z0: torch.Tensor | None = None) -> None:
        """Check an input sequence and initial state before an unroll.

        Args:
            inputs: must be a ``[B, T, I]`` tensor with ``I = input_dim`` and ``T ≥ 1``.
            z0: None, or a ``[B, H]`` tensor in the dtype of ``inputs``.

        Raises:
            ValueError: naming the shape or dtype that is wrong and the one that is valid.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"inputs must be a [B, T, I] tensor, got {shape}")
        if inputs.shape[-1] != self.input_dim:
            raise ValueError(
                f"inputs have width {inputs.shape[-1]} but {type(self).__name__} expects input_dim="
                f"{self.input_dim} (inputs shape {tuple(inputs.shape)} should be [B, T, {self.input_dim}])"
            )
        if inputs.shape[1] < 1:
            raise ValueError(f"inputs have no time steps (shape {tuple(inputs.shape)}); T must be at least 1")
        if z0 is not None and tuple(z0.shape) != (inputs.shape[0], self.state_dim):
            raise ValueError(
                f"z0 has shape {tuple(z0.shape)} but must be [B, H] = [{inputs.shape[0]}, {self.state_dim}]"
            )
        if z0 is not None and z0.dtype != inputs.dtype:
            raise ValueError(f"z0 has dtype {z0.dtype} but the inputs have {inputs.dtype}; pass both in one dtype "
                             "(the model's, e.g. model.double() with float64 tensors)")
