"""Step Jacobians of affine-slot cells from stored per-site coefficients (no autodiff of the step).

For the built-in weight-based cells the step is ``z_t = post(a, z_{t-1}, x_t)`` with slots
``a_s = Σ_W W u_W(z_{t-1}, x_t)``, and ``post`` is *unit-structured*: output unit j reads only the
entries j of each gate block of the slots and of ``z_{t-1}``. Hence

    ``A_t v = Σ_s D_s ⊙ (Σ_{W→s} W (∂u_W/∂z) v)  +  E ⊙ v``

with per-site, per-unit coefficients ``D_s = ∂post/∂a_s`` ``[N, O_b, G_s, U]`` and
``E = ∂post/∂z_prev`` ``[N, O_b, O_b, U]`` read off once with one reverse-mode pass per output block
(and checked with a random cotangent); the state site variables (``z``, ``φ(z)``, the h half of the LSTM
state) get coefficients ``F_u = ∂u/∂z`` the same way. Applying ``A`` or ``Aᵀ`` is then one matmul per weight
plus a few elementwise products, with no autodiff.
"""

from __future__ import annotations

import math

import torch
from torch.func import jvp, vjp

from kpflow.models.cells import AffineRecurrentModel

from .trajectory import Trajectory


def repeat_probes(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` ``[N, ...]`` repeated k times along the batch axis -> ``[k·N, ...]`` (probe-major).

    Folding k probes into the batch axis of the sites is how the kernels run forward-mode AD of a step
    for many probes at once (measured faster than ``vmap`` of a JVP on CPU).

    Args:
        t: per-site tensor ``[N, ...]``.
        k: number of probes.

    Returns:
        ``[k·N, ...]``.
    """
    return t.repeat(k, *([1] * (t.dim() - 1)))


#: sites (spread evenly over the run) at which ``unit_coefficients`` checks the extracted coefficients
CHECK_SITES = 64


def unit_coefficients(fn, primal: torch.Tensor | dict, sizes: dict | int, N: int, H: int, U: int):
    """Per-unit coefficients of a unit-structured linear map ``d fn`` at ``primal``.

    For a unit-structured map (output unit j of every U-wide block reads only entry j of every U-wide input
    block) the gradient of the sum of output block o is, at input entry ``g·U + j``, exactly ``C[n, o, g, j]``.
    So the coefficients are read off with one reverse-mode pass per *output* block (one for the GRU, vanilla
    and leaky RNN, two for the LSTM), with plain ``torch.autograd`` (no ``torch.func`` transform, whose first
    use costs an import of ``torch._dynamo``). They are checked with a random cotangent ``y`` at
    ``CHECK_SITES`` sites spread over the run (seed 0, relative error ≤ 1e-6): ``Jᵀ y = Cᵀ y`` for a random
    ``y`` holds with probability one only if ``J = C`` there, which a map that mixes units violates.

    Args:
        fn: ``fn(inputs, rows)`` maps a dict of ``[n, R_s]`` tensors (or one ``[n, R]`` tensor) of the sites
            ``rows`` (None: all N; else an index tensor) to ``[n, H]``, site by site.
        primal: the point of linearization at all N sites, of the form ``fn`` takes.
        sizes: ``{s: R_s}`` (or one ``R``) widths of the inputs.
        N: number of sites.
        H: output width.
        U: unit size.

    Returns:
        ``{s: C_s [N, H/U, R_s/U, U]}`` (or one tensor) with ``out[n, o·U + j] = Σ_{s,g} C_s[n, o, g, j] ·
        in_s[n, g·U + j]``, or None when ``U ≤ 0``, U does not divide the sizes, or the random check disagrees.
    """
    single = not isinstance(primal, dict)
    prim = {"_": primal} if single else primal
    sz = {"_": sizes} if single else sizes
    if U <= 0 or H % U or any(R % U for R in sz.values()):
        return None
    Ob = H // U
    names = list(prim)

    def graph(rows):
        leaves = {q: (v if rows is None else v[rows]).detach().requires_grad_(True) for q, v in prim.items()}
        return leaves, fn(leaves["_"] if single else leaves, rows)

    def pull(leaves, scalar):
        # a scalar output rather than grad_outputs=cot: autograd.grad's check of a grad_outputs tensor imports
        # sympy (~0.6 s on first use); the gradient is the same
        grads = torch.autograd.grad(scalar, [leaves[q] for q in names], retain_graph=True, allow_unused=True)
        return {q: torch.zeros_like(leaves[q]) if g is None else g for q, g in zip(names, grads, strict=True)}

    with torch.enable_grad():
        leaves, out = graph(None)
        C = {q: torch.empty(N, Ob, sz[q] // U, U, dtype=out.dtype, device=out.device) for q in names}
        for o in range(Ob):
            for q, g in pull(leaves, out[:, o * U:(o + 1) * U].sum()).items():
                C[q][:, o] = g.reshape(N, -1, U)
        del leaves, out
    if not coefficients_agree(fn if not single else (lambda d, rows: fn(d["_"], rows)), prim, C, N):
        return None
    return C["_"] if single else C


def coefficients_agree(fn, primal: dict, C: dict, N: int) -> bool:
    """Whether unit coefficients ``C`` are the Jacobian of ``fn`` at ``primal``, by a random cotangent.

    At ``CHECK_SITES`` sites spread over the run, ``Jᵀ y`` (one reverse-mode pass of ``fn``) is compared with
    ``Cᵀ y`` (``apply_units_adjoint``) for a Gaussian ``y`` (seed 0); for a random ``y`` they agree with
    probability one only if ``J = C`` there. Used on extracted coefficients and on a cell's closed form.

    Args:
        fn: ``fn(inputs, rows)`` as in ``unit_coefficients`` (a dict of ``[n, R_s]`` tensors).
        primal: the point of linearization at all N sites (a dict).
        C: ``{s: [N, H/U, R_s/U, U]}`` coefficients for every key of ``primal``.
        N: number of sites.

    Returns:
        True when the relative error of ``Cᵀ y`` is at most 1e-6 (and finite).
    """
    names = list(primal)
    rows = torch.linspace(0, N - 1, min(N, CHECK_SITES), device=C[names[0]].device).round().long().unique()
    with torch.enable_grad():
        leaves = {q: primal[q][rows].detach().requires_grad_(True) for q in names}
        out = fn(leaves, rows)
        gen = torch.Generator(device="cpu").manual_seed(0)
        y = torch.randn(tuple(out.shape), generator=gen, dtype=out.dtype).to(out.device)
        # a scalar output rather than grad_outputs=y (see unit_coefficients)
        grads = torch.autograd.grad((out * y).sum(), [leaves[q] for q in names], allow_unused=True)
    ref = {q: torch.zeros_like(leaves[q]) if g is None else g for q, g in zip(names, grads, strict=True)}
    got = apply_units_adjoint({q: C[q][rows] for q in names}, y.unsqueeze(0), len(rows))
    err = sum(float((got[q][0] - ref[q]).norm()) ** 2 for q in names) ** 0.5
    scale = sum(float(ref[q].norm()) ** 2 for q in names) ** 0.5
    return math.isfinite(err) and err <= 1e-6 * max(scale, 1e-30)


def slot_values(traj: Trajectory) -> dict[str, torch.Tensor]:
    """The pre-activation slots ``a_s = Σ_W W u_W (+ b_s)`` of an affine-slot cell at every site (cached).

    ``record`` keeps the slots its steps computed (``AffineRecurrentModel.unroll_slots``), so this is usually
    a lookup; a trajectory made otherwise (or of a cell that overrides ``step``) gets them from ``model.slots``
    over all sites at once.

    Args:
        traj: a recorded trajectory of an ``AffineRecurrentModel``.

    Returns:
        ``{s: [N, R_s]}`` (N = B·T sites, b-major), detached.
    """
    if "slots" not in traj.cache:
        zp, x = traj.sites()
        with torch.no_grad():
            traj.cache["slots"] = {k: v.detach() for k, v in traj.model.slots(traj.params, zp, x).items()}
    return traj.cache["slots"]


def post_coefficients(traj: Trajectory):
    """``D_s = ∂post/∂a_s`` and ``E = ∂post/∂z_prev`` of an affine unit-structured cell at every site (cached).

    One extraction per trajectory, shared by the step linearization (``A``) and the Kronecker core of ``K``.

    Args:
        traj: a recorded trajectory of an ``AffineRecurrentModel`` with ``unit_size() > 0``.

    Returns:
        ``(slots, D, E)``: the slot values ``{s: [N, R_s]}``, ``{s: [N, O_b, G_s, U]}`` and ``[N, O_b, O_b, U]``.

    Raises:
        ValueError: the declared unit size does not divide the state and slot sizes, or the random check of
            ``unit_coefficients`` contradicts the declared structure.
    """
    if "post_coefficients" not in traj.cache:
        model = traj.model
        U = int(model.unit_size())
        B, T, H = traj.shape
        N = B * T
        zp, x = traj.sites()
        slots = slot_values(traj)
        sizes = {s: v.shape[1] for s, v in slots.items()}
        if U <= 0 or H % U or any(R % U for R in sizes.values()):
            raise ValueError(f"{type(model).__name__} declares unit_size()={U}, which does not divide the state "
                             f"({H}) and the slots ({sizes}); declare unit_size() = 0")
        def fn(d, rows):
            return model.post({s: d[s] for s in slots}, d["__z_prev__"], x if rows is None else x[rows])

        primal = {**slots, "__z_prev__": zp}
        closed = model.post_unit_coefficients(slots, zp, x)
        if closed is not None:  # the cell's closed form, checked like an extraction (a subclass may change post)
            D, E = closed
            both = {**D, "__z_prev__": E} if coefficients_agree(fn, primal, {**D, "__z_prev__": E}, N) else None
        else:
            both = unit_coefficients(fn, primal, {**sizes, "__z_prev__": H}, N, H, U)
        if both is None:
            raise ValueError(f"{type(model).__name__} declares unit_size()={U}, but its post is not unit-structured "
                             f"with blocks of {U} (state {H}, slots {sizes}; a random check disagrees with the unit "
                             "coefficients: its output units read other units): declare unit_size() = 0")
        E = both.pop("__z_prev__")
        traj.cache["post_coefficients"] = (slots, both, E)
    return traj.cache["post_coefficients"]


def apply_units(C: dict, Z: dict, N: int, H: int) -> torch.Tensor:
    """``Σ_s C_s · Z_s`` for ``Z_s`` ``[k, N, R_s]`` -> ``[k, N, H]`` (see ``unit_coefficients``)."""
    out = None
    for s, Cs in C.items():
        _, Ob, G, U = Cs.shape
        k = Z[s].shape[0]
        Zs = Z[s].reshape(k, N, 1, G, U)
        for g in range(G):  # fused multiply-adds into one buffer
            if out is None:
                out = Cs[:, :, g] * Zs[:, :, :, g]
            else:
                out.addcmul_(Cs[:, :, g], Zs[:, :, :, g])
    return out.reshape(out.shape[0], N, H)


def apply_units_adjoint(C: dict, Y: torch.Tensor, N: int) -> dict:
    """Adjoint of ``apply_units``: ``Y`` ``[k, N, H]`` -> ``{s: [k, N, R_s]}``."""
    out = {}
    k = Y.shape[0]
    for s, Cs in C.items():
        _, Ob, G, U = Cs.shape
        Yr = Y.reshape(k, N, Ob, 1, U)
        Zs = Cs[:, 0:1] * Yr[:, :, 0:1]
        for o in range(1, Ob):
            Zs.addcmul_(Cs[:, o:o + 1], Yr[:, :, o:o + 1])
        out[s] = Zs.reshape(k, N, G * U)
    return out


class StepLinearization:
    """``A`` of an affine-slot, unit-structured cell from stored coefficients (see module docstring).

    ``A_t v = Σ_s D_s ⊙ (Σ_{W→s} W u̇_W) + E ⊙ v`` with ``u̇_W = (∂u_W/∂z) v``; the state site variables of the
    built-in cells (``z``, ``φ(z)``, the ``h`` half of the LSTM state) are unit-structured in ``z`` too, so
    ``∂u/∂z`` is stored as per-unit coefficients ``F_u`` as well and a step is one matmul per weight plus a few
    elementwise products, with no autodiff. Site variables that are not unit-structured are differentiated with
    a JVP/VJP per step. ``StepLinearization.build(traj)`` returns None for cells without unit structure; the
    operators then fall back to JVP/VJP of the whole step.
    """

    def __init__(self, traj: Trajectory, D: dict, E: torch.Tensor, zsites: tuple[str, ...], F: dict | None = None):
        B, T, H = traj.shape
        self.traj, self.B, self.T, self.H = traj, B, T, H
        self.D = {s: v.reshape(B, T, *v.shape[1:]) for s, v in D.items()}
        self.E = E.reshape(B, T, *E.shape[1:])
        # F[site]: per-unit coefficients of ∂u/∂z, None for the identity (u = z); F None: JVP/VJP of the sites
        self.F = None if F is None else {s: None if v is None else v.reshape(B, T, *v.shape[1:])
                                         for s, v in F.items()}
        self.zsites = zsites
        model = traj.model
        self.terms = [(name, slot, site) for name, (slot, site) in model.affine_terms.items() if site in zsites]
        self.prev = traj.prev_states
        # the weights that act on state sites, transposed once: ``u̇ @ Wᵀ`` is then a plain row-major matmul
        self._weights_T = {name: traj.params[name].T.contiguous() for name, _, _ in self.terms}

    @staticmethod
    def build(traj: Trajectory) -> StepLinearization | None:
        """The stored coefficients of ``A`` for a cell that declares ``unit_size() > 0``.

        Args:
            traj: a recorded trajectory.

        Returns:
            The ``StepLinearization``, or None for a cell that is not an ``AffineRecurrentModel`` or
            declares ``unit_size() = 0``.

        Raises:
            ValueError: a cell whose declared unit structure the random check contradicts, or whose
                ``state_sites`` are not among its site variables.
        """
        model = traj.model
        if not isinstance(model, AffineRecurrentModel) or model.unit_size() <= 0:
            return None
        U = int(model.unit_size())
        B, T, H = traj.shape
        N = B * T
        zp, x = traj.sites()
        _, D, E = post_coefficients(traj)
        with torch.no_grad():
            u = model.site_variables(zp, x)
        zsites = tuple(model.state_sites)
        if not zsites or not set(zsites) <= set(u):
            raise ValueError(f"{type(model).__name__}.state_sites = {zsites} must name the site variables that depend "
                             f"on the previous state, among {sorted(u)}")
        F = {}
        for site in zsites:
            if u[site] is zp:  # the site variable is the previous state itself: ∂u/∂z = I
                F[site] = None
                continue
            F[site] = unit_coefficients(lambda z, rows, site=site: model.site_variables(
                z, x if rows is None else x[rows])[site], zp, H, N, u[site].shape[1], U)
            if F[site] is None:  # not unit-structured in z: JVP/VJP of the site variables per step
                F = None
                break
        return StepLinearization(traj, D, E, zsites, F)

    # ------------------------------------------------------------------ one time step (all trials)
    def _sites_fn(self, t: int, k: int):
        x = repeat_probes(self.traj.inputs[:, t], k)
        model = self.traj.model
        zs = self.zsites

        def f(z):
            u = model.site_variables(z, x)
            return {s: u[s] for s in zs}

        return f

    def _coeffs(self, t):
        return {s: v[:, t] for s, v in self.D.items()}, {"_": self.E[:, t]}

    def step(self, t: int, V: torch.Tensor) -> torch.Tensor:
        """``A_t V`` for ``V`` ``[k, B, H]`` (site (b, t) for every trial b).

        Args:
            t: the time step.
            V: ``[k, B, H]``.

        Returns:
            ``[k, B, H]``.
        """
        k, B, H = V.shape
        D, E = self._coeffs(t)
        if self.F is not None:
            udot = {s: V.reshape(k * B, H) if F is None else
                    apply_units({"_": F[:, t]}, {"_": V}, B, F.shape[2] * F.shape[4]).reshape(k * B, -1)
                    for s, F in self.F.items()}
        else:
            udot = jvp(self._sites_fn(t, k), (repeat_probes(self.prev[:, t], k),), (V.reshape(k * B, H),))[1]
        adot = {}
        for name, slot, site in self.terms:
            term = udot[site] @ self._weights_T[name]
            adot[slot] = term if slot not in adot else adot[slot].add_(term)
        out = apply_units(E, {"_": V}, B, H)
        if adot:
            out = out.add_(apply_units({s: D[s] for s in adot}, {s: a.reshape(k, B, -1) for s, a in adot.items()},
                                       B, H))
        return out

    def step_adjoint(self, t: int, Y: torch.Tensor) -> torch.Tensor:
        """``A_tᵀ Y`` for ``Y`` ``[k, B, H]``.

        Args:
            t: the time step.
            Y: ``[k, B, H]``.

        Returns:
            ``[k, B, H]``.
        """
        k, B, H = Y.shape
        params = self.traj.params
        D, E = self._coeffs(t)
        cot = apply_units_adjoint({s: D[s] for s in {slot for _, slot, _ in self.terms}}, Y, B)
        ubar = {}
        for name, slot, site in self.terms:
            term = cot[slot].reshape(k * B, -1) @ params[name]
            ubar[site] = term if site not in ubar else ubar[site].add_(term)
        out = apply_units_adjoint(E, Y, B)["_"]
        if not ubar:
            return out
        if self.F is not None:
            for s, v in ubar.items():
                F = self.F[s]
                out = out.add_(v.reshape(k, B, H) if F is None else
                               apply_units_adjoint({"_": F[:, t]}, v.reshape(k, B, -1), B)["_"])
            return out
        _, pullback = vjp(self._sites_fn(t, k), repeat_probes(self.prev[:, t], k))
        full = {s: ubar.get(s, None) for s in self.zsites}
        full = {s: (v if v is not None else torch.zeros(k * B, self._site_width(s), dtype=Y.dtype,
                                                         device=Y.device)) for s, v in full.items()}
        return out + pullback(full)[0].reshape(k, B, H)

    def _site_width(self, site):
        zp, x = self.prev[:, 0], self.traj.inputs[:, 0]
        return self.traj.model.site_variables(zp, x)[site].shape[1]
