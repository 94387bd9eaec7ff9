"""Adapter: a user's own ``nn.Module`` cell ``cell(x_t, h_prev) -> h_t`` as a kpflow model."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import Params, RecurrentModel


class CellAdapter(RecurrentModel):
    """Wrap ``cell(x_t [B, I], h_prev [B, H]) -> h_t [B, H]`` (e.g. ``nn.RNNCell``) with a linear readout.

    The cell's parameters become the model's ``cell.*`` parameters; ``step`` calls the cell through
    ``torch.func.functional_call`` so that operators can differentiate it. ``input_dim``/``state_dim``
    default to the cell's ``input_size``/``hidden_size`` when it has them. The cell must be a pure
    function of its parameters (no in-place state, no randomness such as dropout in train mode).
    """

    def __init__(self, cell: nn.Module, input_dim: int | None = None, state_dim: int | None = None,
                 output_dim: int = 1, is_flow: bool = False, dt: float = 1.0):
        if not isinstance(cell, nn.Module):
            raise TypeError(f"CellAdapter wraps an nn.Module cell(x_t, h_prev) -> h_t, got {type(cell).__name__}")
        input_dim = getattr(cell, "input_size", None) if input_dim is None else input_dim
        state_dim = getattr(cell, "hidden_size", None) if state_dim is None else state_dim
        if input_dim is None or state_dim is None:
            raise ValueError("give input_dim and state_dim: the cell has no input_size/hidden_size attributes")
        super().__init__(input_dim, state_dim, output_dim)
        self.cell = cell
        self.is_flow, self.dt = bool(is_flow), float(dt)
        p = next(cell.parameters(), None)
        if p is None:
            raise ValueError("the cell has no parameters; there is nothing for the operators to differentiate")
        self.readout.to(dtype=p.dtype, device=p.device)

    def step(self, params: Params, z_prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.cell, dict(params), (x_t, z_prev))
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the wrapped cell returned {type(out).__name__}; it must return the new state as one "
                f"[B, {self.state_dim}] tensor (for a cell with several state tensors, write a step that "
                "concatenates them, as kpflow.models.LSTM does)"
            )
        if out.shape != z_prev.shape:
            raise ValueError(f"the wrapped cell returned shape {tuple(out.shape)}, expected the state shape "
                             f"{tuple(z_prev.shape)}")
        return out
