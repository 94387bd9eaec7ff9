"""A deep MLP as a site model: depth plays the role of time."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Params
from .sites import SiteModel, Sites

_ACT = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "identity": lambda v: v}


class DeepMLP(SiteModel):
    """``a_0 = W_0 x + b_0``, ``a_l = W_l z_{l-1} + b_l``, ``z_l = φ(a_l)`` for l < depth, readout ``y = C z_L + d``.

    Depth is the position axis ``T``: layer l writes the pre-activation slot ``"a"`` and the visible
    state ``"z"`` at position l, so the states are ``[B, depth, width]`` and the readout's output is
    ``[B, O]``. Parameters ``layers.l.weight`` (``[width, I]`` for l = 0, else ``[width, width]``),
    ``layers.l.bias`` ``[width]``; weights start ``N(0, gain²/fan_in)``, biases at 0.

    With ``seq_len = S`` the network maps whole sequences (what the sequence tasks of ``kpflow.tasks``
    give): the input ``x [B, S, I]`` is read flattened, ``x̄ = vec(x) ∈ R^{S·I}`` (so ``W_0`` is
    ``[width, S·I]``), and the readout ``[S·O, width]`` is read back as per-step outputs ``[B, S, O]``
    (``y[b, s] = (C z_L + d)[s·O:(s+1)·O]``). Every output step sees the whole sequence (no causality);
    positions of the operators are still depth, not the task's time.

    Args:
        input_dim, width, depth, output_dim: sizes (depth >= 1); with ``seq_len`` the per-step widths.
        nonlinearity: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"identity"``.
        bias: include the biases.
        gain: scale of the initial weights.
        seq_len: if given, inputs are sequences ``[B, seq_len, input_dim]`` and outputs ``[B, seq_len,
            output_dim]`` (see above); None: inputs ``[B, input_dim]``, outputs ``[B, output_dim]``.
        dtype, device: of the parameters.

    Raises:
        ValueError: a size below 1 or an unknown nonlinearity.
    """

    def __init__(self, input_dim: int, width: int, depth: int, output_dim: int = 1, nonlinearity: str = "relu",
                 bias: bool = True, gain: float = 1.0, seq_len: int | None = None, dtype=None, device=None):
        super().__init__()
        if min(int(input_dim), int(width), int(depth), int(output_dim)) < 1:
            raise ValueError(f"input_dim, width, depth and output_dim must be >= 1, got {input_dim}, {width}, "
                             f"{depth}, {output_dim}")
        if seq_len is not None and int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1 or None, got {seq_len!r}")
        if nonlinearity not in _ACT:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; choose one of {sorted(_ACT)}")
        self.input_dim, self.width = int(input_dim), int(width)
        self.depth, self.output_dim = int(depth), int(output_dim)
        self.nonlinearity, self.phi, self.bias = nonlinearity, _ACT[nonlinearity], bool(bias)
        self.seq_len = None if seq_len is None else int(seq_len)
        steps = 1 if self.seq_len is None else self.seq_len
        self.layers = nn.ModuleList(
            nn.Linear(steps * self.input_dim if i == 0 else self.width, self.width, bias=bias, dtype=dtype,
                      device=device)
            for i in range(self.depth))
        self.readout = nn.Linear(self.width, steps * self.output_dim, dtype=dtype, device=device)
        with torch.no_grad():
            for lin in self.layers:
                lin.weight.normal_(0.0, gain / math.sqrt(lin.in_features))
                if bias:
                    lin.bias.zero_()

    @property
    def state_dim(self) -> int:
        """The width of the visible state ``z_l`` (the layer width)."""
        return self.width

    def check_inputs(self, inputs) -> None:
        """Raise if ``inputs`` is not ``[B, input_dim]`` (``[B, seq_len, input_dim]`` with ``seq_len``).

        Raises:
            ValueError: another shape (a sequence of another length names the length the MLP was built
                for), or an empty batch.
        """
        want = (self.input_dim,) if self.seq_len is None else (self.seq_len, self.input_dim)
        if not isinstance(inputs, torch.Tensor) or tuple(inputs.shape[1:]) != want:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            hint = "" if self.seq_len is None else (f" (built for sequences of seq_len={self.seq_len} steps: an MLP "
                                                    "reads the whole sequence at once, so every batch needs that "
                                                    "length)")
            raise ValueError(f"DeepMLP inputs must be [B, {', '.join(map(str, want))}], got {shape}{hint}")
        if inputs.shape[0] < 1:
            raise ValueError("the batch is empty (B = 0)")

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)``: samples × depth.

        Args:
            inputs: as for ``forward``.

        Returns:
            ``(B, T)``.
        """
        return int(inputs.shape[0]), self.depth

    def run_sites(self, params: Params, inputs: torch.Tensor, sites: Sites) -> None:
        """``a_l = W_l z_{l-1} + b_l`` (slot ``a``) and ``z_l = φ(a_l)`` (visible) at position l.

        Args:
            params: the model's parameters by name (the θ of the operators).
            inputs: as for ``forward``.
            sites: the recorder every weight site and visible state is written to.
        """
        z = inputs.reshape(inputs.shape[0], -1)
        for i in range(self.depth):
            a = sites.linear("a", f"layers.{i}.weight", z, f"layers.{i}.bias" if self.bias else None, at=i)
            z = sites.state("z", self.phi(a), at=i)

    def output(self, states: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """The readout ``y = C z_L + d`` of the last layer.

        Args:
            states: the visible states ``[B, T, Hv]``.
            readout_params: the readout's parameters (None: the model's own).

        Returns:
            ``[B, O]`` (``[B, seq_len, O]`` with ``seq_len``).
        """
        p = self.readout_params() if readout_params is None else readout_params
        y = states[:, -1] @ p["weight"].T + p["bias"]
        return y if self.seq_len is None else y.reshape(y.shape[0], self.seq_len, self.output_dim)

    def to_torch(self) -> nn.Sequential:
        """The same network as an ``nn.Sequential`` of torch layers, with copies of the parameters.

        Returns:
            ``nn.Sequential(Linear, act, ..., Linear)`` (the last Linear is the readout); with ``seq_len``
            wrapped in ``nn.Flatten(1)`` … ``nn.Unflatten(1, (seq_len, O))``.
        """
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}[self.nonlinearity]
        mods: list[nn.Module] = []
        for lin in self.layers:
            new = nn.Linear(lin.in_features, lin.out_features, bias=self.bias, dtype=lin.weight.dtype,
                            device=lin.weight.device)
            new.load_state_dict(lin.state_dict())
            mods += [new, act()]
        ro = nn.Linear(self.width, self.readout.out_features, dtype=self.readout.weight.dtype,
                       device=self.readout.weight.device)
        ro.load_state_dict(self.readout.state_dict())
        if self.seq_len is not None:
            return nn.Sequential(nn.Flatten(1), *mods, ro, nn.Unflatten(1, (self.seq_len, self.output_dim)))
        return nn.Sequential(*mods, ro)

    @classmethod
    def from_torch(cls, seq: nn.Sequential) -> DeepMLP:
        """A ``DeepMLP`` with copies of the parameters of ``nn.Sequential(Linear, act, ..., Linear)``.

        The last Linear is the readout; all hidden layers have one width and one activation among
        ReLU/Tanh/GELU (exact)/Identity.

        Args:
            seq: the torch network.

        Returns:
            The ``DeepMLP`` (inputs ``[B, I]``).

        Raises:
            ValueError: a layer sequence of another form.
        """
        names = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.GELU: "gelu", nn.Identity: "identity"}
        mods = list(seq)
        if len(mods) < 3 or len(mods) % 2 == 0 or not all(isinstance(m, nn.Linear) for m in mods[::2]):
            raise ValueError("from_torch expects nn.Sequential(Linear, act, Linear, act, ..., Linear)")
        acts = {type(m) for m in mods[1::2]}
        if len(acts) != 1 or next(iter(acts)) not in names:
            raise ValueError(f"all activations must be one of {[c.__name__ for c in names]}, got {acts}")
        if isinstance(mods[1], nn.GELU) and mods[1].approximate != "none":
            raise ValueError("only the exact GELU (approximate='none') is supported")
        lins = mods[::2]
        width = lins[0].out_features
        if any(m.out_features != width for m in lins[:-1]) or any(m.in_features != width for m in lins[1:]):
            raise ValueError("all hidden layers must have one width")
        has_bias = lins[0].bias is not None
        w = lins[0].weight
        model = cls(lins[0].in_features, width, len(lins) - 1, lins[-1].out_features, names[next(iter(acts))],
                    bias=has_bias, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for mine, theirs in zip(model.layers, lins[:-1], strict=False):
                mine.load_state_dict(theirs.state_dict())
            model.readout.weight.copy_(lins[-1].weight)
            if lins[-1].bias is not None:
                model.readout.bias.copy_(lins[-1].bias)
            else:
                model.readout.bias.zero_()
        return model
