"""Adapters: a user's model as a kpflow model.

A recurrent cell becomes a ``RecurrentModel`` (``CellAdapter``); any ``nn.Module`` built from
``nn.Linear`` layers and parameter-free operations becomes a ``SiteModel`` (``ModuleAdapter``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import Params, RecurrentModel
from .sites import SiteModel


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
        """``z_t = cell(x_t, z_{t-1}; params)`` through ``torch.func.functional_call``.

        Args:
            params: the cell's parameters by name.
            z_prev: the previous state ``[B, H]``.
            x_t: the input ``[B, I]``.

        Returns:
            The cell's output ``[B, H]``: the new state (or the flow's vector field with ``is_flow``).

        Raises:
            TypeError: the cell returns something other than one tensor.
            ValueError: the cell returns another shape than the state's.
        """
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


class ModuleAdapter(SiteModel):
    """A user's ``nn.Module`` built from ``nn.Linear`` layers and parameter-free operations, as a site model.

    Every ``nn.Linear`` call is intercepted (a forward hook, with the parameters swapped in through
    ``torch.func.functional_call``) and becomes a weight site named after the module (``fc1``,
    ``blocks.0.proj``): its input is the site variable, its output a slot of the joint state. A
    Linear applied to ``[B, C]`` writes position 0, one applied to ``[B, T, C]`` all T positions. The
    visible states are the outputs of the submodules named in ``visible`` and, last, the module's
    output (``[B, O]`` or ``[B, T, O]``); the readout is the identity on that output, so the NTK of the
    visible block ``output`` is the output NTK.

    Refused, with an error that says why (the joint-state operators would silently be wrong):
    parameters outside ``nn.Linear`` (a LayerNorm's weight, an embedding: they are not ``W u`` sites
    the adapter can see — freeze them with ``requires_grad_(False)`` or use a built-in model); a
    parameter shared by two modules, or one Linear called twice in a forward pass (weight sharing);
    buffers or parameters mutated in place by the forward pass (BatchNorm in train mode); dropout in
    train mode, or any other randomness (two forward passes that differ); a module with no
    ``nn.Linear`` that its forward pass calls.

    Args:
        module: the network; its ``forward(inputs)`` returns one tensor.
        visible: names of submodules whose outputs are visible states too (``[B, C]`` or ``[B, T, C]``).
        batch_independent: declare that the trials (first axis) do not interact, so that probes may be
            folded into the batch (faster); False by default.

    Raises:
        TypeError, ValueError: see above.
    """

    def __init__(self, module: nn.Module, visible: tuple[str, ...] | list[str] = (), batch_independent: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModuleAdapter wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self.visible = tuple(visible)
        self.batch_independent = bool(batch_independent)
        mods = dict(module.named_modules())
        unknown = [v for v in self.visible if v not in mods]
        if unknown:
            raise ValueError(f"visible submodule(s) {unknown} not found; the module has {sorted(k for k in mods if k)}")
        self._linears = {n: m for n, m in mods.items() if isinstance(m, nn.Linear)}
        if not self._linears:
            raise ValueError(f"{type(module).__name__} has no nn.Linear layer: the adapter sees weights only as the "
                             "nn.Linear sites of the forward pass, so there is no visible weight site")
        seen: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                raise ValueError(f"parameter {name!r} is the same tensor as {seen[id(p)]!r} (weight sharing across "
                                 "modules); the adapter gives every nn.Linear its own site and cannot split a shared "
                                 "weight's K between them")
            seen[id(p)] = name
        in_linear = {f"{n}.{k}" for n, m in self._linears.items() for k, _ in m.named_parameters(recurse=False)}
        outside = [n for n, p in module.named_parameters() if p.requires_grad and n not in in_linear]
        if outside:
            raise ValueError(f"parameter(s) {outside} live outside nn.Linear layers; the adapter sees weights only as "
                             "nn.Linear sites (W u). Freeze them (requires_grad_(False)) or use a built-in model "
                             "(kpflow.models.Transformer, DeepMLP)")
        self._frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
        self._shapes: dict[tuple, tuple[int, int]] = {}

    # ------------------------------------------------------------------ checks
    def _check_training_mode(self):
        bad = [n or type(self.module).__name__ for n, m in self.module.named_modules()
               if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if bad:
            raise ValueError(f"dropout in train mode ({bad}): the operators linearise one deterministic network; call "
                             "module.eval() (or set p=0)")

    def cell_params(self) -> dict[str, torch.Tensor]:
        """The module's parameters except the frozen ones, by name (``module.`` prefix), as live tensors.

        Returns:
            ``{name: parameter}``.
        """
        return {k: v for k, v in self.named_parameters() if k[len("module."):] not in self._frozen}

    def readout_params(self) -> dict[str, torch.Tensor]:
        """No readout: the module's output is the output.

        Returns:
            ``{}``.
        """
        return {}

    def _call(self, params, inputs, sites_hook):
        names = {k[len("module."):]: v for k, v in params.items()}
        handles = [m.register_forward_hook(sites_hook(n)) for n, m in self.module.named_modules()
                   if n in self._linears or n in self.visible]
        try:
            out = functional_call(self.module, names, (inputs,))
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the module returned {type(out).__name__}; it must return one tensor")
        return out

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)``: batch × the sequence length every site sees (1 without one).

        The first call per input shape runs the module twice and refuses what the operators cannot
        linearise.

        Args:
            inputs: the module's input, batch first.

        Returns:
            ``(B, T)``.

        Raises:
            ValueError: dropout in train mode, in-place updates (BatchNorm statistics), a random forward
                pass, a site with another batch axis or rank, sites of different sequence lengths.
        """
        key = (tuple(inputs.shape), inputs.dtype)
        if key not in self._shapes:
            self._check_training_mode()
            lengths = set()

            def hook_for(name):
                def hook(mod, args, out):
                    u = args[0] if name in self._linears else out
                    if u.dim() == 3:
                        lengths.add(int(u.shape[1]))
                    elif u.dim() != 2:
                        raise ValueError(f"{name!r} sees a tensor of shape {tuple(u.shape)}; the adapter needs "
                                         "[B, C] or [B, T, C] at every nn.Linear and visible submodule")
                    if int(u.shape[0]) != int(inputs.shape[0]):
                        raise ValueError(f"{name!r} sees a leading axis of {u.shape[0]} but the batch has "
                                         f"{inputs.shape[0]} trials; the adapter needs the batch first everywhere")
                return hook

            before = {n: b._version for n, b in self.module.named_buffers()}
            pbefore = {n: p._version for n, p in self.module.named_parameters()}
            with torch.no_grad():
                out1 = self._call(dict(self.named_parameters()), inputs, hook_for)
                out2 = self._call(dict(self.named_parameters()), inputs, lambda n: (lambda *a: None))
            changed = [n for n, b in self.module.named_buffers() if b._version != before[n]]
            changed += [n for n, p in self.module.named_parameters() if p._version != pbefore[n]]
            if changed:
                raise ValueError(f"the forward pass changes {changed} in place (e.g. BatchNorm running statistics in "
                                 "train mode); the operators need a pure function of the parameters: call "
                                 "module.eval() or remove the in-place update")
            if out1.shape != out2.shape or not torch.equal(out1, out2):
                raise ValueError("two forward passes on the same inputs differ: the module is random (dropout in "
                                 "train mode, noise); the operators linearise one deterministic network")
            if out1.dim() == 3:
                lengths.add(int(out1.shape[1]))
            if len(lengths) > 1:
                raise ValueError(f"the module's sites see sequences of different lengths {sorted(lengths)}; the "
                                 "position space must be one [B, T]")
            self._shapes[key] = (int(inputs.shape[0]), lengths.pop() if lengths else 1)
        return self._shapes[key]

    def run_sites(self, params, inputs, sites) -> None:
        """The module's forward pass, every ``nn.Linear`` writing a weight site.

        Every visible submodule's output is marked as a visible state.

        Args:
            params: the module's parameters by name.
            inputs: the module's input.
            sites: the recorder.

        Raises:
            ValueError: an ``nn.Linear`` called twice in one pass (weight sharing).
        """
        called: set[str] = set()

        def hook_for(name):
            def hook(mod, args, out):
                if name in self._linears:
                    if name in called:
                        raise ValueError(f"nn.Linear {name!r} is called twice in one forward pass (weight sharing "
                                         "across uses); the adapter gives every nn.Linear one site")
                    called.add(name)
                    u = args[0]
                    at = 0 if u.dim() == 2 else None
                    w, b = f"module.{name}.weight", f"module.{name}.bias"
                    if w not in sites.params:  # a frozen Linear: a constant map, not a weight site
                        return out
                    return sites.linear(name, w, u, b if mod.bias is not None and b in sites.params else None, at)
                return sites.state(name, out, 0 if out.dim() == 2 else None)
            return hook

        fixed = {k: v for k, v in self.named_parameters()}
        out = self._call({**fixed, **params}, inputs, hook_for)
        if not called:
            raise ValueError("the forward pass calls none of the module's nn.Linear layers: no visible weight site")
        self._output_width, self._output_rank = int(out.shape[-1]), out.dim()
        sites.state("output", out, 0 if out.dim() == 2 else None)

    def output(self, states: torch.Tensor, readout_params=None) -> torch.Tensor:
        """The module's output: the last visible block (``[B, O]`` for a per-trial output)."""
        width = self._output_width
        out = states[..., -width:]
        return out[:, 0] if self._output_rank == 2 else out
