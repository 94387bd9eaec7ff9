"""Weight-based models as one global implicit constraint over a joint state (DESIGN.md §5).

A *site model* writes its forward pass against a small recorder, ``sites``. Every weight ``W`` is
applied through a **weight site** — ``sites.affine(slot, {W: u, b: None}, at)`` returns
``Σ_W W u (+ b)`` — and every state the user wants to look at is marked with
``sites.state(slot, h, at)``. Each call writes one *slot* (a block of ``R`` channels) of the
**joint state** ``h`` at a set of *positions*: the positions are an index space ``B × T`` (trials ×
time for an RNN, samples × depth for an MLP, sequences × tokens for a transformer), ``at=t`` writes
position t of every trial, ``at=None`` all T of them. The joint state is one tensor ``[B, T, Hj]``
(the slots side by side), so every variable of the computation that a weight produces or that the
user marked is one block of it.

Every joint variable is defined by ``h_i = f_i(h_{<i}, x; θ)``, i.e. ``Φ(h, θ, x) = h − f(h, x; θ) = 0``.
Then (kpflow.kernels):

* ``Jθ = ∂f/∂θ`` is non-zero only on the weight sites, where it is ``δW ↦ δW u``: so
  ``K = Jθ Jθ* = ⊕_slots (U Uᵀ ⊗ I_R)`` (``U`` the stacked site variables of the slot), exactly;
* ``P = (∂Φ/∂h)⁻¹`` is a forward substitution through the computation: it is the JVP of the forward
  pass with the perturbation ``q`` *injected* at every joint variable (each call returns
  ``value + q_slot``); ``P*`` is the matching VJP; ``P⁻¹ = I − ∂f/∂h`` is the JVP of the forward pass
  with every variable's parents pinned to their recorded values (``mode="local"``);
* the NTK of the visible states is ``Θ = C P K P* C*`` with ``C`` the selection of the ``state`` slots.

The built-in recurrences (``AffineRecurrentModel``) are instances: their unroll writes the
pre-activation slots with ``affine`` and the state with ``state``; eliminating the slots (a Schur
complement) gives back ``P = (I − A S)⁻¹`` and ``K = M (G ⊗ I) M*`` of ``kpflow.kernels``.

Site kinds: ``affine`` (dense weights ``[R, C]`` with site variable ``u [.., C]``, biases ``[R]``
with site variable 1, lookup tables ``[V, R]`` with a one-hot site variable via ``lookup``) and
``scale`` (an elementwise weight ``γ ⊙ u``, e.g. LayerNorm's affine part; ``K = Σ_r u_r u_rᵀ ⊗ e_r e_rᵀ``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .base import Params


@dataclass(frozen=True)
class Slot:
    """One block of the joint state: ``width`` channels at offset ``offset``.

    ``kind`` is ``"site"`` (written by weights) or ``"state"`` (a visible state marked by the model).
    """

    name: str
    width: int
    offset: int
    kind: str


@dataclass
class Use:
    """One application of a weight at a site.

    ``weight`` writes ``slot`` at ``at`` (int or None = all positions) with site variable ``u``
    ``[n, C]`` (n = B or B·T rows, b-major). ``form``: ``"rc"`` (weight ``[R, C]``, ``out = u Wᵀ``),
    ``"r"`` (bias ``[R]``, u = 1), ``"cr"`` (table ``[C, R]``, ``out = u W`` with one-hot u),
    ``"diag"`` (elementwise ``[R]``, ``out = u ⊙ w``, u ``[n, R]``).
    """

    weight: str
    slot: str
    at: int | None
    form: str
    u: torch.Tensor | None


class JointLayout:
    """The slots of the joint state ``[B, T, Hj]`` in order of first appearance."""

    def __init__(self, slots: list[Slot], length: int):
        self.slots = {s.name: s for s in slots}
        self.length = int(length)
        self.width = sum(s.width for s in slots)
        self.visible = [s for s in slots if s.kind == "state"]
        self.visible_width = sum(s.width for s in self.visible)

    def visible_index(self, device=None) -> torch.Tensor:
        """Channel indices of the visible states inside the joint state.

        Args:
            device: of the index tensor.

        Returns:
            ``[Hv]`` long indices.
        """
        idx = [torch.arange(s.offset, s.offset + s.width) for s in self.visible]
        return torch.cat(idx).to(device) if idx else torch.zeros(0, dtype=torch.long, device=device)

    def __repr__(self):
        body = ", ".join(f"{s.name}[{s.width}]{'*' if s.kind == 'state' else ''}" for s in self.slots.values())
        return f"JointLayout(T={self.length}, Hj={self.width}: {body}; * = visible)"


class Sites:
    """The recorder a site model's forward pass writes to (see module docstring).

    Modes: ``"plain"`` (just compute), ``"record"`` (also keep the layout, every slot value and every
    weight use), ``"inject"`` (add ``inject[..., slot]`` to every call's result; with the layout of a
    recording), ``"local"`` (every call returns its *recorded* value plus the injection, so that the
    values it computes depend on the injection only through their direct parents), ``"frozen"`` (every
    weight is applied to its *recorded* site variable: the immediate dependence on θ).

    Args:
        params: the parameters the forward pass reads (``sites.param(name)``).
        batch, length: the position space ``B × T``.
        mode: one of the modes above.
        layout, recorded: from a recording (needed by the modes other than plain/record).
        inject: the injected joint perturbation ``[B, T, Hj]`` (inject and local modes).
    """

    def __init__(self, params: Params, batch: int, length: int, mode: str = "plain", *,
                 layout: JointLayout | None = None, recorded: Mapping | None = None,
                 inject: torch.Tensor | None = None):
        if mode not in ("plain", "record", "inject", "local", "frozen"):
            raise ValueError(f"unknown Sites mode {mode!r}")
        if mode in ("inject", "local", "frozen") and (layout is None or recorded is None):
            raise ValueError(f"Sites mode {mode!r} needs the layout and values of a recording")
        self.params, self.B, self.T, self.mode = params, int(batch), int(length), mode
        self.layout, self.recorded, self.inject = layout, recorded, inject
        self.values: dict[str, dict] = {}
        self.order: list[Slot] = []
        self.uses: list[Use] = []
        self._use_count = 0
        self._offset = 0

    # ------------------------------------------------------------------ public primitives
    def param(self, name: str) -> torch.Tensor:
        """The parameter ``name``.

        Args:
            name: the parameter's name.

        Returns:
            The tensor.

        Raises:
            KeyError: an unknown name (naming the known ones).
        """
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"the forward pass reads parameter {name!r}, which is not among "
                           f"{sorted(self.params)}") from None

    def affine(self, slot: str, terms: Mapping[str, torch.Tensor | None], at: int | None = None,
               lookups: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``Σ_W u_W Wᵀ (+ Σ_E E[index_E])``: the pre-activation written by the weights of one slot.

        ``terms = {weight: site variable u [B, (T,) C] or None for a bias}`` and ``lookups = {table [V, R]:
        integer index [B, (T)]}`` (embeddings: a weight site whose site variable is one-hot).

        Args:
            slot: the joint-state block this pre-activation occupies.
            terms: weights and their site variables (None: the weight is a bias ``[R]``).
            at: the position (time/depth index) written, or None for all T positions (u then ``[B, T, C]``).
            lookups: tables read by index.

        Returns:
            The pre-activation ``[B, (T,) R]`` (plus the injection in inject/local mode).

        Raises:
            ValueError: shapes that do not fit, indices out of range, no term at all.
        """
        out = None
        for name, index in (lookups or {}).items():
            E = self.param(name)
            if index.dtype not in (torch.int64, torch.int32) or E.dim() != 2:
                raise ValueError(f"lookup table {name!r} needs integer indices and a [V, R] table")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= E.shape[0]):
                raise ValueError(f"lookup table {name!r} has {E.shape[0]} rows; indices must lie in "
                                 f"[0, {E.shape[0]}), got [{int(index.min())}, {int(index.max())}]")
            onehot = torch.nn.functional.one_hot(index.long(), E.shape[0]).to(E.dtype)
            self._record_use(name, slot, at, "cr", onehot.expand(*self._lead(at), E.shape[0]))
            term = E[index.long()]
            out = term if out is None else out + term
        for name, u in terms.items():
            W = self.param(name)
            if u is None:
                if W.dim() != 1:
                    raise ValueError(f"weight {name!r} of shape {tuple(W.shape)} has no site variable; only a "
                                     "bias [R] can be given with u=None")
                form = "r"
                term = W
            else:
                if W.dim() != 2 or u.shape[-1] != W.shape[1]:
                    raise ValueError(f"weight {name!r} of shape {tuple(W.shape)} cannot act on a site variable "
                                     f"of width {u.shape[-1]}")
                u = self._frozen_u(u)
                form = "rc"
                term = u @ W.T
            self._record_use(name, slot, at, form, u)
            out = term if out is None else out + term
        if out is None:
            raise ValueError(f"slot {slot!r}: affine needs at least one weight term")
        lead = self._lead(at)
        if out.shape[:-1] != lead:
            out = out.expand(*lead, out.shape[-1])
        return self._emit(slot, out, at, "site")

    def linear(self, slot: str, weight: str, u: torch.Tensor, bias: str | None = None,
               at: int | None = None, transposed: bool = False) -> torch.Tensor:
        """``u Wᵀ (+ b)``: shorthand for ``affine(slot, {weight: u, bias: None}, at)``.

        With ``transposed=True`` the weight is stored ``[C, R]`` and applied as ``u W (+ b)`` (Hugging Face
        GPT-2's ``Conv1D``); the site is the same ``W u`` site, recorded in the ``"cr"`` form.

        Args:
            slot: the joint-state block written.
            weight: the weight's name.
            u: the site variable ``[B, (T,) C]``.
            bias: the bias's name, or None.
            at: the position written, or None for all.
            transposed: the weight is stored ``[C, R]``.

        Returns:
            The pre-activation ``[B, (T,) R]`` (plus the injection in inject/local mode).

        Raises:
            ValueError: a weight that cannot act on ``u``.
        """
        if not transposed:
            return self.affine(slot, {weight: u} | ({bias: None} if bias is not None else {}), at)
        W = self.param(weight)
        if W.dim() != 2 or u.shape[-1] != W.shape[0]:
            raise ValueError(f"transposed weight {weight!r} of shape {tuple(W.shape)} cannot act on a site variable "
                             f"of width {u.shape[-1]} (it needs [C, R] with C = {u.shape[-1]})")
        u = self._frozen_u(u)
        self._record_use(weight, slot, at, "cr", u)
        out = u @ W
        if bias is not None:
            self._record_use(bias, slot, at, "r", None)
            out = out + self.param(bias)
        lead = self._lead(at)
        if out.shape[:-1] != lead:
            out = out.expand(*lead, out.shape[-1])
        return self._emit(slot, out, at, "site")

    def lookup(self, slot: str, weight: str, index: torch.Tensor, at: int | None = None) -> torch.Tensor:
        """Rows ``W[index]`` of a table ``W [V, R]``: ``affine(slot, {}, at, lookups={weight: index})``.

        Args:
            slot: the joint-state block written.
            weight: the table's name.
            index: integer indices ``[B, (T)]``.
            at: the position written, or None for all.

        Returns:
            ``[B, (T,) R]``.
        """
        return self.affine(slot, {}, at, lookups={weight: index})

    def scale(self, slot: str, weight: str, u: torch.Tensor, bias: str | None = None,
              at: int | None = None) -> torch.Tensor:
        """``u ⊙ w (+ b)`` with an elementwise weight ``w [R]`` (e.g. LayerNorm's affine part).

        Args:
            slot: the joint-state block written, as in ``affine``.
            weight: the name of ``w`` ``[R]``.
            u: ``[B, (T,) R]``.
            bias: the name of ``b`` ``[R]`` or None.
            at: the position written, or None for all, as in ``affine``.

        Returns:
            ``[B, (T,) R]``.

        Raises:
            ValueError: a weight that is not ``[R]`` with ``R`` the width of ``u``.
        """
        w = self.param(weight)
        if w.dim() != 1 or u.shape[-1] != w.shape[0]:
            raise ValueError(f"scale weight {weight!r} of shape {tuple(w.shape)} cannot act on width {u.shape[-1]}")
        u = self._frozen_u(u)
        self._record_use(weight, slot, at, "diag", u)
        out = u * w
        if bias is not None:
            self._record_use(bias, slot, at, "r", None)
            out = out + self.param(bias)
        return self._emit(slot, out, at, "site")

    def state(self, slot: str, h: torch.Tensor, at: int | None = None) -> torch.Tensor:
        """Mark ``h`` ``[B, (T,) R]`` as a visible state (a block of the joint state the NTK is taken on).

        Args:
            slot: the joint-state block.
            h: the state.
            at: the position written, or None for all.

        Returns:
            ``h`` (the recorded value in frozen mode; plus the injection in inject/local mode).
        """
        if self.mode == "frozen":
            return self._emit(slot, self._recorded_value(slot, at), at, "state")
        return self._emit(slot, h, at, "state")

    # ------------------------------------------------------------------ assembled results
    def joint(self, dtype=None, device=None) -> torch.Tensor:
        """All slot values as one joint tensor ``[B, T, Hj]``.

        Positions never written are 0 (in inject mode: the injection, ``h_i = 0 + q_i``).

        Args:
            dtype: unused (the values' own dtype is kept).
            device: unused (the values' own device is kept).

        Returns:
            ``[B, T, Hj]``.
        """
        layout = self.layout if self.layout is not None else self.recorded_layout()
        return self._assemble(layout.slots.values(), dtype, device)

    def visible(self) -> torch.Tensor:
        """The visible states (the ``state`` slots side by side).

        Returns:
            ``[B, T, Hv]``.
        """
        layout = self.layout if self.layout is not None else self.recorded_layout()
        return self._assemble(layout.visible, None, None)

    def recorded_layout(self) -> JointLayout:
        """The layout this run wrote (slots in order of first appearance).

        Returns:
            The ``JointLayout``.
        """
        return JointLayout(self.order, self.T)

    # ------------------------------------------------------------------ internals
    def _lead(self, at):
        return (self.B,) if at is not None else (self.B, self.T)

    def _frozen_u(self, u):
        if self.mode != "frozen":
            return u
        rec = self.recorded["uses"][self._use_count]
        return rec.u.reshape(u.shape) if rec.u is not None else u

    def _record_use(self, weight, slot, at, form, u):
        if self.mode == "record":
            n = self.B if at is not None else self.B * self.T
            uu = None if u is None else u.detach().reshape(n, u.shape[-1])
            self.uses.append(Use(weight, slot, at, form, uu))
        self._use_count += 1

    def _recorded_value(self, slot, at):
        v = self.recorded["joint"]
        s = self.layout.slots[slot]
        block = v[..., s.offset:s.offset + s.width]
        return block if at is None else block[:, at]

    def _emit(self, slot: str, value: torch.Tensor, at, kind: str) -> torch.Tensor:
        if at is not None and not 0 <= int(at) < self.T:
            raise ValueError(f"slot {slot!r} written at position {at}, outside 0..{self.T - 1}")
        if tuple(value.shape[:-1]) != self._lead(at):
            raise ValueError(f"slot {slot!r} at {at}: value of shape {tuple(value.shape)} does not fit the "
                             f"positions {self._lead(at)} (+ channels)")
        written = self.values.setdefault(slot, {})
        if at in written or (at is None and written) or (None in written):
            raise ValueError(f"slot {slot!r} is written twice at position {'all' if at is None else at}: every "
                             "joint variable is defined once (give a reused weight's second site its own slot)")
        if self.layout is None and not any(s.name == slot for s in self.order):
            self.order.append(Slot(slot, int(value.shape[-1]), self._offset, kind))
            self._offset += int(value.shape[-1])
        if self.layout is not None:
            s = self.layout.slots.get(slot)
            if s is None or s.width != value.shape[-1]:
                raise ValueError(f"slot {slot!r} does not match the recorded layout {self.layout}")
        if self.mode in ("inject", "local"):
            s = self.layout.slots[slot]
            inj = self.inject[..., s.offset:s.offset + s.width]
            inj = inj if at is None else inj[:, at]
            if self.mode == "local":  # keep f_i(parents); return the recorded value + injection
                written[at] = value
                return self._recorded_value(slot, at) + inj
            written[at] = value + inj  # the joint variable h_i = f_i(h_<i) + q_i
            return written[at]
        written[at] = value
        return value

    def _unwritten(self, s, t: int, zero: torch.Tensor) -> torch.Tensor:
        # an entry no site writes is the variable h_i = f_i + q_i with f_i = 0: in inject mode it holds the
        # injection, so that P (and P*) act on it as the identity, as P⁻¹ = I − ∂f/∂h does; else it is 0
        if self.mode == "inject":
            return self.inject[:, t, s.offset:s.offset + s.width]
        return zero

    def _assemble(self, slots, dtype, device):
        blocks = []
        ref = None
        for vals in self.values.values():
            ref = next(iter(vals.values()))
            break
        if ref is None:
            raise ValueError("the forward pass wrote no slot")
        for s in slots:
            vals = self.values.get(s.name, {})
            if None in vals:
                blocks.append(vals[None])
                continue
            zero = ref.new_zeros(self.B, s.width)
            cols = [vals[t] if t in vals else self._unwritten(s, t, zero) for t in range(self.T)]
            blocks.append(torch.stack(cols, 1))
        if not blocks:
            return ref.new_zeros(self.B, self.T, 0)
        return torch.cat(blocks, -1)


class SiteModel(nn.Module):
    """Base class of the weight-based models written against ``Sites`` (see module docstring).

    Subclasses implement ``positions(inputs) -> (B, T)``, ``run_sites(params, inputs, sites)`` (the
    forward pass, marking the visible states) and ``output(states, readout_params)`` (the readout of
    the visible states ``[B, T, Hv]``). Parameters whose names start with ``readout.`` belong to the
    readout; all others are the model's (``cell_params()``), the θ of the operators.
    """

    #: True when the trials (the B axis) do not interact, so that probes may be folded into the batch.
    batch_independent: bool = True

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)`` of a forward pass on ``inputs``.

        Args:
            inputs: what the model takes.

        Returns:
            ``(B, T)``.
        """
        raise NotImplementedError

    def run_sites(self, params: Params, inputs: torch.Tensor, sites: Sites) -> None:
        """The forward pass, written against ``sites``.

        Weights enter via ``affine``/``lookup``/``scale``, visible states via ``state``.

        Args:
            params: the model's parameters by name.
            inputs: what the model takes.
            sites: the recorder.
        """
        raise NotImplementedError

    def output(self, states: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """The readout of the visible states.

        Args:
            states: ``[B, T, Hv]``.
            readout_params: the readout's parameters (None: the model's own).

        Returns:
            The outputs.
        """
        raise NotImplementedError

    def check_inputs(self, inputs) -> None:
        """Raise a ValueError describing what is wrong with ``inputs`` (default: accept).

        Args:
            inputs: what the model takes.
        """

    def cell_params(self) -> dict[str, torch.Tensor]:
        """The model's parameters except the readout's, by name, as live tensors.

        Returns:
            ``{name: parameter}``.
        """
        return {k: v for k, v in self.named_parameters() if not k.startswith("readout.")}

    def readout_params(self) -> dict[str, torch.Tensor]:
        """The readout's parameters (prefix ``readout.`` stripped).

        Returns:
            ``{name: parameter}``.
        """
        return {k[len("readout."):]: v for k, v in self.named_parameters() if k.startswith("readout.")}

    def check_params(self, params: Params, complete: bool = False) -> None:
        """Refuse parameters unknown to the model or of the wrong shape.

        Args:
            params: parameters by name.
            complete: also refuse missing ones.

        Raises:
            ValueError: naming the offending parameters and the model's own.
        """
        own = {k: tuple(v.shape) for k, v in self.cell_params().items()}
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter(s) {unknown}; its parameters are {sorted(own)}")
        for k, v in params.items():
            if tuple(v.shape) != own[k]:
                raise ValueError(f"parameter {k!r} has shape {tuple(v.shape)} but {type(self).__name__} needs {own[k]}")
        missing = sorted(set(own) - set(params))
        if complete and missing:
            raise ValueError(f"missing parameter(s) {missing} for {type(self).__name__}")

    def visible_states(self, params: Params, inputs) -> torch.Tensor:
        """The visible states of a forward pass (pure in ``params``).

        Args:
            params: the model's parameters by name.
            inputs: what the model takes.

        Returns:
            ``[B, T, Hv]``.
        """
        B, T = self.positions(inputs)
        sites = Sites(params, B, T)
        self.run_sites(params, inputs, sites)
        return sites.visible()

    def forward(self, inputs):
        """Run the model: returns ``(visible states [B, T, Hv], outputs)``."""
        self.check_inputs(inputs)
        z = self.visible_states(self.cell_params(), inputs)
        return z, self.output(z)


class RecurrentSites(SiteModel):
    """An ``AffineRecurrentModel`` (vanilla/leaky RNN, GRU, LSTM) seen as a site model.

    Positions are trials × time, slots the pre-activations, the visible state ``z``. Shares the recurrent model's
    parameters (no copy); ``z0`` is the initial state ``[B, H]`` (None: the model's default).

    Args:
        model: the recurrent model.
        z0: optional initial state.

    Raises:
        TypeError: ``model`` has no affine-slot structure.
    """

    def __init__(self, model, z0: torch.Tensor | None = None):
        super().__init__()
        from .cells import AffineRecurrentModel

        if not isinstance(model, AffineRecurrentModel):
            raise TypeError(f"RecurrentSites needs an AffineRecurrentModel (VanillaRNN, LeakyRNN, GRU, LSTM), got "
                            f"{type(model).__name__}")
        self.rnn = model
        self.z0 = z0
        self.state_dim = model.state_dim
        self.batch_independent = z0 is None  # a given z0 is tied to the batch it was made for

    def cell_params(self) -> dict[str, torch.Tensor]:
        """The recurrent model's cell parameters (shared, not copied).

        Returns:
            ``{name: parameter}``.
        """
        return self.rnn.cell_params()

    def readout_params(self) -> dict[str, torch.Tensor]:
        """The recurrent model's readout parameters.

        Returns:
            ``{name: parameter}``.
        """
        return self.rnn.readout_params()

    def check_params(self, params: Params, complete: bool = False) -> None:
        """The recurrent model's check (``RecurrentModel.check_params``).

        Args:
            params: parameters by name.
            complete: also refuse missing ones.
        """
        self.rnn.check_params(params, complete)

    def check_inputs(self, inputs) -> None:
        """The recurrent model's check of ``[B, T, I]`` inputs (with this view's ``z0``).

        Args:
            inputs: ``[B, T, I]``.
        """
        self.rnn.check_inputs(inputs, self.z0)

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)``: trials × time.

        Args:
            inputs: ``[B, T, I]``.

        Returns:
            ``(B, T)``.
        """
        return int(inputs.shape[0]), int(inputs.shape[1])

    def run_sites(self, params: Params, inputs: torch.Tensor, sites: Sites) -> None:
        """The recurrent model's unroll, writing its pre-activation slots and the state ``z``.

        Args:
            params: the cell parameters by name.
            inputs: ``[B, T, I]``.
            sites: the recorder.
        """
        self.rnn.run_sites(params, inputs, sites, self.z0)

    def output(self, states: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """The recurrent model's readout.

        Args:
            states: ``[B, T, H]``.
            readout_params: the readout's parameters (None: the model's own).

        Returns:
            ``[B, T, O]``.
        """
        return self.rnn.output(states, readout_params)


def as_site_model(model, z0: torch.Tensor | None = None) -> SiteModel:
    """``model`` itself if it is a ``SiteModel``, else its site-model view (``RecurrentSites``).

    Args:
        model: a ``SiteModel`` or an ``AffineRecurrentModel``.
        z0: the initial state of the recurrent view (None: the model's default).

    Returns:
        The site model.

    Raises:
        TypeError: a model without weight sites the library can see.
    """
    return model if isinstance(model, SiteModel) else RecurrentSites(model, z0)
