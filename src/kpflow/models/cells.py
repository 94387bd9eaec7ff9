"""Built-in weight-based recurrent cells: vanilla RNN, leaky (continuous-time) RNN, GRU and LSTM.

All four are *affine-slot* cells: every weight ``W`` enters the step only through a product ``W u``
with a *site variable* ``u`` (the previous state, ``φ`` of it, the input, or 1 for a bias), summed
into a pre-activation *slot* ``a_s``; the new state is then ``z_t = post(a, z_{t-1}, x_t)``, a map
that contains no parameters. This is the structure the Kronecker core of ``K`` uses
(``kpflow.kernels.kronecker_core``): ``K_W = M (G_W ⊗ I) M*`` with ``M = ∂post/∂a_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .base import Params, RecurrentModel

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "identity": lambda v: v,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity ``φ`` called ``name``.

    Args:
        name: one of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"softplus"``, ``"identity"``, or a callable
            ``φ(v)``, which is returned as it is.

    Returns:
        The function ``v ↦ φ(v)``, applied entrywise.

    Raises:
        ValueError: ``name`` is not one of the names above (the message lists them).
    """
    if callable(name):
        return name
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class ParameterCell(nn.Module):
    """A plain container of named parameters (the ``cell`` of a built-in model).

    Args:
        shapes: ``{name: shape}`` of the parameters to register (left uninitialised; the model fills them).
        dtype: their dtype (torch's default when None).
        device: their device (torch's default when None).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype=None, device=None):
        super().__init__()
        self.declared_shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, dtype=dtype, device=device)))


class AffineRecurrentModel(RecurrentModel):
    """A cell whose weights act only through pre-activation slots ``a_s = Σ_W W u_W (+ b_s)``.

    Subclasses set ``self.affine_terms`` = ``{param: (slot, site variable name or None for a bias)}``
    and implement ``site_variables(z_prev, x)`` and ``post(slots, z_prev, x)``. ``step`` is then
    ``post(slots(params, z_prev, x), z_prev, x)``.

    ``post_is_elementwise`` is True when there is one slot of size H and ``∂z_t/∂a`` is diagonal.
    """

    affine_terms: dict[str, tuple[str, str | None]]
    post_is_elementwise: bool = False
    #: the site variables that depend on the previous state (the others depend on the input only)
    state_sites: tuple[str, ...] = ()

    def site_variables(self, z_prev: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The site variables ``u`` that the weights multiply (``affine_terms`` names them).

        Args:
            z_prev: the previous state, ``[N, H]``.
            x: the input at this step, ``[N, I]``.

        Returns:
            ``{name: u}`` with ``u`` of shape ``[N, C]`` (``C`` = the columns of the weights that multiply it).
        """
        raise NotImplementedError

    def post(self, slots: Mapping[str, torch.Tensor], z_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The parameter-free map from the pre-activation slots ``a`` and ``(z_{t-1}, x_t)`` to the new state ``z_t``.

        Args:
            slots: ``{slot: a_s}`` with ``a_s`` of shape ``[N, R_s]`` (see ``slots``).
            z_prev: the previous state, ``[N, H]``.
            x: the input at this step, ``[N, I]``.

        Returns:
            The new state ``z_t``, ``[N, H]``.
        """
        raise NotImplementedError

    def post_unit_coefficients(self, slots: dict[str, torch.Tensor], z_prev: torch.Tensor, x: torch.Tensor):
        """Closed-form unit coefficients of ``post`` (optional; None: read them off by reverse mode).

        A cell with ``unit_size() = U > 0`` may return ``D_s = ∂post/∂a_s`` and ``E = ∂post/∂z_prev`` in the
        layout of ``kernels.linearization.unit_coefficients`` directly (elementwise formulas instead of one
        backward pass per output block). They are checked against autodiff of ``post`` with a random cotangent
        on every trajectory, so a subclass that changes ``post`` but not this method is refused, not wrong.

        Args:
            slots: the slot values ``{s: [N, R_s]}`` at every site.
            z_prev: previous states ``[N, H]``.
            x: inputs ``[N, I]``.

        Returns:
            ``({s: D_s [N, H/U, R_s/U, U]}, E [N, H/U, H/U, U])``, or None (the default).
        """
        return None

    def unit_size(self) -> int:
        """The unit width ``U`` of ``post``, or 0 when it has none.

        ``U > 0`` declares ``post`` *unit-structured*: output unit j of every U-wide block of the state reads only
        entry j of every U-wide gate block of the slots and of ``z_prev``. A cell that declares U > 0 gets
        per-site coefficient kernels for ``A`` and the Kronecker core's ``M``; the declaration is verified once
        per trajectory with a random cotangent and a wrong one is an error, never a silent fallback. With 0
        (the default) the operators use JVPs/VJPs of ``post``.

        Returns:
            ``U`` (an int), or 0 for a cell without that structure.
        """
        return 0

    def slot_sizes(self) -> dict[str, int]:
        """Size ``R_s`` of every pre-activation slot (the number of rows of the weights that feed it).

        Returns:
            ``{slot: R_s}`` for the slots named in ``affine_terms``.
        """
        sizes: dict[str, int] = {}
        for name, (slot, _site) in self.affine_terms.items():
            sizes[slot] = self.cell_params()[name].shape[0]
        return sizes

    def slots(self, params: Params, z_prev: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pre-activations ``a_s = Σ_W W u_W (+ b_s)`` of every slot.

        Args:
            params: the cell's parameters ``{name: tensor}`` (``affine_terms`` says where each enters).
            z_prev: the previous state, ``[N, H]``.
            x: the input at this step, ``[N, I]``.

        Returns:
            ``{slot: a_s}`` with ``a_s`` of shape ``[N, R_s]``.
        """
        u = self.site_variables(z_prev, x)
        out: dict[str, torch.Tensor] = {}
        for name, (slot, site) in self.affine_terms.items():
            p = params[name]
            term = p.expand(z_prev.shape[0], -1) if site is None else u[site] @ p.T
            out[slot] = term if slot not in out else out[slot] + term
        return out

    def step(self, params: Params, z_prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """One step ``z_t = post(slots(params, z_{t-1}, x_t), z_{t-1}, x_t)``; the same contract as the base."""
        return self.post(self.slots(params, z_prev, x_t), z_prev, x_t)

    def unroll_slots(self, params: Params, inputs: torch.Tensor, z0: torch.Tensor | None = None):
        """``unroll`` that also keeps the slot values ``a_s`` every step computed (what ``record`` stores).

        The states are those of ``unroll``, bit for bit (the same ``slots`` then ``post`` per step), and the
        slots are the very pre-activations they were computed from, so the operators linearise ``post`` at the
        recorded point without recomputing ``Σ_W W u_W`` over all sites (a second forward's worth of matmuls).

        Args:
            params: the cell's parameters by name.
            inputs: the input sequence, ``[B, T, I]``.
            z0: the initial state ``[B, H]`` (``initial_state`` when None).

        Returns:
            ``(states [B, T, H], slots)`` with ``slots = {s: [B, T, R_s]}``, or ``slots = None`` when the class
            overrides ``step`` or ``unroll`` (its states need not come from ``slots`` and ``post`` step by step,
            so they are computed by its own ``unroll``).

        Raises:
            ValueError: ``inputs`` or ``z0`` has the wrong shape or dtype (see ``check_inputs``).
        """
        cls = type(self)
        if cls.step is not AffineRecurrentModel.step or cls.unroll is not RecurrentModel.unroll:
            return self.unroll(params, inputs, z0), None
        self.check_inputs(inputs, z0)
        z = self.initial_state(inputs.shape[0], inputs.dtype, inputs.device) if z0 is None else z0
        B, T = inputs.shape[:2]
        states = slots = None
        for t in range(T):
            x = inputs[:, t]
            a = self.slots(params, z, x)
            z = self.post(a, z, x)
            if states is None:  # written in place step by step: no list of T tensors kept alive, no stack
                states = z.new_empty(B, T, z.shape[1])
                slots = {s: v.new_empty(B, T, v.shape[1]) for s, v in a.items()}
            states[:, t] = z
            for s, v in a.items():
                slots[s][:, t] = v
        return states, slots

    def run_sites(self, params: Params, inputs: torch.Tensor, sites, z0: torch.Tensor | None = None) -> None:
        """The unroll written against ``kpflow.models.sites.Sites``.

        At every step t each slot ``a_s`` is a weight site (``sites.affine(s, {W: u_W}, at=t)``) and the new
        state is the visible state ``"z"``. This makes the recurrence an instance of the general joint-state
        formulation (see ``as_site_model``).

        Args:
            params: the cell's parameters (unused here: ``sites.affine`` supplies the weights).
            inputs: the input sequence, ``[N, T, I]``.
            sites: the ``Sites`` recorder that owns the weights and records every site and state.
            z0: the initial state ``[N, H]`` (the model's ``initial_state`` when None).
        """
        z = self.initial_state(inputs.shape[0], inputs.dtype, inputs.device) if z0 is None else z0
        groups: dict[str, dict[str, str | None]] = {}
        for name, (slot, site) in self.affine_terms.items():
            groups.setdefault(slot, {})[name] = site
        for t in range(inputs.shape[1]):
            x = inputs[:, t]
            u = self.site_variables(z, x)
            slots = {slot: sites.affine(slot, {n: (None if site is None else u[site]) for n, site in terms.items()},
                                        at=t) for slot, terms in groups.items()}
            z = sites.state("z", self.post(slots, z, x), at=t)


def _normal_(p: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        p.normal_(0.0, std)


class VanillaRNN(AffineRecurrentModel):
    """``h_t = φ(W h_{t-1} + U x_t + b)``. Parameters ``W`` [H, H], ``U`` [H, I], ``b`` [H].

    ``W`` starts as ``N(0, gain²/H)`` (gain 1 = edge of chaos for tanh), ``U`` as ``N(0, 1/I)``,
    ``b`` at 0.
    """

    post_is_elementwise = True

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, gain: float = 1.0, dtype=None, device=None):
        super().__init__(input_dim, hidden_dim, output_dim)
        self.hidden_dim = self.state_dim
        H, Ii = self.state_dim, self.input_dim
        shapes = {"W": (H, H), "U": (H, Ii)} | ({"b": (H,)} if bias else {})
        self.cell = ParameterCell(shapes, dtype, device)
        self.readout.to(dtype=dtype, device=device)
        self.nonlinearity = nonlinearity
        self.phi = activation(nonlinearity)
        _normal_(self.cell.W, gain / math.sqrt(H))
        _normal_(self.cell.U, 1.0 / math.sqrt(max(Ii, 1)))
        if bias:
            nn.init.zeros_(self.cell.b)
        self.affine_terms = {"W": ("a", "z"), "U": ("a", "x")} | ({"b": ("a", None)} if bias else {})

    state_sites = ("z",)

    def unit_size(self) -> int:
        """``U = H``: unit j of the new state reads only entry j of every gate block (see the base)."""
        return self.hidden_dim

    def site_variables(self, z_prev, x):
        """``{"z": h_{t-1}, "x": x_t}``."""
        return {"z": z_prev, "x": x}

    def post(self, slots, z_prev, x):
        """``h_t = φ(a)``."""
        return self.phi(slots["a"])


class LeakyRNN(AffineRecurrentModel):
    """Euler step of a continuous-time RNN, in either common form (``dt`` = Δt/τ).

    * ``form="current"``: ``z_t = z + dt (−z + W φ(z) + U x_t + b)``  (state = currents/voltages)
    * ``form="rate"``:    ``z_t = z + dt (−z + φ(W z + U x_t + b))``  (state = firing rates)
    """

    is_flow = True
    post_is_elementwise = True

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int = 1, dt: float = 0.1,
                 form: str = "current", nonlinearity: str = "tanh", bias: bool = True, gain: float = 1.0,
                 dtype=None, device=None):
        super().__init__(input_dim, hidden_dim, output_dim)
        if form not in ("current", "rate"):
            raise ValueError(f"form must be 'current' (z + dt(-z + W φ(z) + U x + b)) or 'rate' "
                             f"(z + dt(-z + φ(W z + U x + b))), got {form!r}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.dt, self.form, self.nonlinearity = float(dt), form, nonlinearity
        self.hidden_dim = self.state_dim
        self.phi = activation(nonlinearity)
        H, Ii = self.state_dim, self.input_dim
        shapes = {"W": (H, H), "U": (H, Ii)} | ({"b": (H,)} if bias else {})
        self.cell = ParameterCell(shapes, dtype, device)
        self.readout.to(dtype=dtype, device=device)
        _normal_(self.cell.W, gain / math.sqrt(H))
        _normal_(self.cell.U, 1.0 / math.sqrt(max(Ii, 1)))
        if bias:
            nn.init.zeros_(self.cell.b)
        site = "phi_z" if form == "current" else "z"
        self.affine_terms = {"W": ("a", site), "U": ("a", "x")} | ({"b": ("a", None)} if bias else {})
        self.state_sites = (site,)

    def unit_size(self) -> int:
        """``U = H``: unit j of the new state reads only entry j of every gate block (see the base)."""
        return self.hidden_dim

    def site_variables(self, z_prev, x):
        """``{"phi_z": φ(z), "x": x_t}`` (current form) or ``{"z": z, "x": x_t}`` (rate form)."""
        if self.form == "current":
            return {"phi_z": self.phi(z_prev), "x": x}
        return {"z": z_prev, "x": x}

    def post(self, slots, z_prev, x):
        """``z_t = z + dt (−z + a)`` (current form) or ``z + dt (−z + φ(a))`` (rate form)."""
        a = slots["a"]
        drive = a if self.form == "current" else self.phi(a)
        return z_prev + self.dt * (drive - z_prev)

    def vector_field(self, params: Params, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The vector field ``f(z, x)`` of the flow, ``z_t = z + dt f(z, x_t)``.

        Args:
            params: the cell's parameters.
            z: the state, ``[N, H]``.
            x: the input, ``[N, I]``.

        Returns:
            ``f(z, x) = (step(params, z, x) − z) / dt``, shape ``[N, H]``.
        """
        return (self.step(params, z, x) - z) / self.dt


def _check_torch_rnn(module: nn.Module, kind: str, cell_cls, layer_cls):
    if isinstance(module, layer_cls):
        if module.num_layers != 1 or module.bidirectional:
            raise ValueError(f"only a single-layer, unidirectional nn.{kind} can be loaded "
                             f"(got num_layers={module.num_layers}, bidirectional={module.bidirectional})")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"nn.{kind} with proj_size={module.proj_size} is not supported (use proj_size=0)")
        suffix = "_l0"
    elif isinstance(module, cell_cls):
        suffix = ""
    else:
        raise TypeError(f"from_torch expects nn.{kind} or nn.{kind}Cell, got {type(module).__name__}")
    tensors = {}
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        t = getattr(module, name + suffix, None)
        if t is not None:
            tensors[name] = t
    return tensors


class _TorchGated(AffineRecurrentModel):
    """Shared code of GRU and LSTM (torch's gate layout, parameters named as in ``nn.GRUCell``)."""

    n_gates: int = 1
    kind: str = ""
    state_sites = ("h",)

    def unit_size(self) -> int:
        """``U = H``: unit j of the new state reads only entry j of every gate block (see the base)."""
        return self.hidden_dim

    def _build(self, hidden_dim: int, bias: bool, dtype, device):
        G, H, Ii = self.n_gates, hidden_dim, self.input_dim
        shapes = {"weight_ih": (G * H, Ii), "weight_hh": (G * H, H)}
        if bias:
            shapes |= {"bias_ih": (G * H,), "bias_hh": (G * H,)}
        self.cell = ParameterCell(shapes, dtype, device)
        self.readout.to(dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            for p in self.cell.parameters():
                p.uniform_(-bound, bound)
        self.affine_terms = {"weight_ih": ("ih", "x"), "weight_hh": ("hh", "h")}
        if bias:
            self.affine_terms |= {"bias_ih": ("ih", None), "bias_hh": ("hh", None)}

    @classmethod
    def from_torch(cls, module: nn.Module, output_dim: int = 1):
        """A kpflow model with the parameters (copied) of ``nn.{GRU,LSTM}`` or its ``Cell``.

        Args:
            module: an ``nn.GRU``/``nn.GRUCell`` (for ``GRU``) or ``nn.LSTM``/``nn.LSTMCell`` (for ``LSTM``);
                a layer must be single-layer, unidirectional and (LSTM) without ``proj_size``.
            output_dim: the output size of the new (randomly initialised) linear readout.

        Returns:
            The model, on the dtype and device of ``module``'s weights; its ``step`` equals the module's.

        Raises:
            TypeError: ``module`` is not one of the two torch classes of this cell.
            ValueError: the layer has more than one layer, is bidirectional or has ``proj_size > 0``.
        """
        layer_cls, cell_cls = (nn.GRU, nn.GRUCell) if cls is GRU else (nn.LSTM, nn.LSTMCell)
        tensors = _check_torch_rnn(module, cls.kind, cell_cls, layer_cls)
        w = tensors["weight_ih"]
        model = cls(module.input_size, module.hidden_size, output_dim, bias="bias_ih" in tensors,
                    dtype=w.dtype, device=w.device)
        model.load_cell_params({k: v.detach() for k, v in tensors.items()})
        return model

    def to_torch(self) -> nn.Module:
        """An ``nn.GRUCell`` / ``nn.LSTMCell`` holding a copy of this cell's parameters.

        Returns:
            The torch cell (same dtype and device); ``cell(x, h)`` equals this model's ``step`` (for the LSTM,
            ``cell(x, (h, c))`` gives ``(h', c')`` of the state ``[h; c]``).
        """
        cell_cls = nn.GRUCell if isinstance(self, GRU) else nn.LSTMCell
        p = self.cell_params()
        w = p["weight_ih"]
        cell = cell_cls(self.input_dim, self.hidden_dim, bias="bias_ih" in p, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for k, v in p.items():
                getattr(cell, k).copy_(v)
        return cell


class GRU(_TorchGated):
    """Gated recurrent unit, exactly ``torch.nn.GRUCell`` (gates r, z, n; ``b_hn`` inside ``r ⊙ (·)``).

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    """

    n_gates, kind = 3, "GRU"

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int = 1, bias: bool = True,
                 dtype=None, device=None):
        super().__init__(input_dim, hidden_dim, output_dim)
        self.hidden_dim = self.state_dim
        self._build(self.hidden_dim, bias, dtype, device)

    def site_variables(self, z_prev, x):
        """``{"x": x_t, "h": h_{t-1}}``."""
        return {"x": x, "h": z_prev}

    def post(self, slots, z_prev, x):
        """``h' = (1 − z) ⊙ n + z ⊙ h`` from the slots ``ih = W_i x + b_i`` and ``hh = W_h h + b_h``."""
        H = self.hidden_dim
        ai, ah = slots["ih"], slots["hh"]
        r = torch.sigmoid(ai[:, :H] + ah[:, :H])
        z = torch.sigmoid(ai[:, H:2 * H] + ah[:, H:2 * H])
        n = torch.tanh(ai[:, 2 * H:] + r * ah[:, 2 * H:])
        return n + z * (z_prev - n)  # as torch.nn.GRUCell: (1 − z) n + z h

    def post_unit_coefficients(self, slots, z_prev, x):
        """Closed-form ``∂h'/∂(ih, hh)`` per gate and ``∂h'/∂h = z`` (U = H, one output block).

        With ``c = (1 − z)(1 − n²)``: ``∂h'/∂a_r = c · hh_n · r(1 − r)`` (both slots), ``∂h'/∂a_z =
        (h − n) z(1 − z)`` (both slots), ``∂h'/∂ih_n = c``, ``∂h'/∂hh_n = c · r``.

        Args:
            slots: ``{"ih": [N, 3H], "hh": [N, 3H]}``.
            z_prev: ``h_{t-1}`` ``[N, H]``.
            x: inputs ``[N, I]`` (unused: ``post`` reads x only through the slots).

        Returns:
            ``({"ih": [N, 1, 3, H], "hh": [N, 1, 3, H]}, E [N, 1, 1, H])``.
        """
        if set(slots) != {"ih", "hh"}:
            return None
        H = self.hidden_dim
        ai, ah = slots["ih"], slots["hh"]
        # in place in the three outputs (on a CPU a fresh [N, H] buffer costs more than the flops here):
        # r and z live in hh's r, z blocks and n in ih's n block until the coefficients overwrite them
        N = ai.shape[0]
        ih = torch.empty(N, 1, 3, H, dtype=ai.dtype, device=ai.device)
        hh = torch.empty_like(ih)
        r, z, n = hh[:, 0, 0], hh[:, 0, 1], ih[:, 0, 2]
        torch.add(ai[:, :2 * H], ah[:, :2 * H], out=hh[:, 0, :2].view(N, 2 * H)).sigmoid_()
        E = z.clone()                                                         # ∂h'/∂h = z
        torch.addcmul(ai[:, 2 * H:], r, ah[:, 2 * H:], out=n).tanh_()
        a_z = torch.sub(z_prev, n, out=ih[:, 0, 1]).mul_(z)
        a_z.addcmul_(a_z, z, value=-1)                                        # ∂h'/∂a_z = (h − n) z (1 − z)
        c = n.square_().neg_().add_(1)                                        # 1 − n², over n
        c.addcmul_(z, c, value=-1)                                            # ∂h'/∂ih_n = (1 − z)(1 − n²)
        torch.mul(c, r, out=hh[:, 0, 2])                                      # ∂h'/∂hh_n = c r
        a_r = torch.mul(hh[:, 0, 2], ah[:, 2 * H:], out=ih[:, 0, 0])
        a_r.addcmul_(a_r, r, value=-1)                                        # ∂h'/∂a_r = c hh_n r (1 − r)
        hh[:, 0, :2] = ih[:, 0, :2]                                           # r, z: the same as ih's
        return {"ih": ih, "hh": hh}, E.view(N, 1, 1, H)


class LSTM(_TorchGated):
    """Long short-term memory, exactly ``torch.nn.LSTMCell`` (gates i, f, g, o).

    The state is ``z = [h; c]`` (size 2H): ``c' = f ⊙ c + i ⊙ g``, ``h' = o ⊙ tanh(c')``. The readout acts on
    the whole state ``[h; c]`` (zero its ``c`` columns for an ``h``-only readout).
    """

    n_gates, kind = 4, "LSTM"

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int = 1, bias: bool = True,
                 dtype=None, device=None):
        super().__init__(input_dim, 2 * hidden_dim, output_dim)
        self.hidden_dim = int(hidden_dim)
        self._build(self.hidden_dim, bias, dtype, device)
        # all four gates are read from one pre-activation a = W_ih x + b_ih + W_hh h + b_hh
        self.affine_terms = {k: ("a", site) for k, (_slot, site) in self.affine_terms.items()}

    def site_variables(self, z_prev, x):
        """``{"x": x_t, "h": h_{t-1}}`` (``h`` is the first half of the state ``[h; c]``)."""
        return {"x": x, "h": z_prev[:, :self.hidden_dim]}

    def post(self, slots, z_prev, x):
        """``[o ⊙ tanh(c'); c']`` with ``c' = f ⊙ c + i ⊙ g``, gates read from the one slot ``a``."""
        H = self.hidden_dim
        a = slots["a"]
        i, f = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H])
        g, o = torch.tanh(a[:, 2 * H:3 * H]), torch.sigmoid(a[:, 3 * H:])
        c = f * z_prev[:, H:] + i * g
        return torch.cat([o * torch.tanh(c), c], -1)
