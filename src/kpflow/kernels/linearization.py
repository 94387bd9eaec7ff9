"""Step Jacobians of affine-slot cells from stored per-site coefficients (no autodiff of the step).

For the built-in weight-based cells the step is ``z_t = post(a, z_{t-1}, x_t)`` with slots
``a_s = Σ_W W u_W(z_{t-1}, x_t)``, and ``post`` is *unit-structured*: output unit j reads only the
entries j of each gate block of the slots and of ``z_{t-1}``. Hence

    ``A_t v = Σ_s D_s ⊙ (Σ_{W→s} W (∂u_W/∂z) v)  +  E ⊙ v``

with per-site, per-unit coefficients ``D_s = ∂post/∂a_s`` ``[N, O_b, G_s, U]`` and
``E = ∂post/∂z_prev`` ``[N, O_b, O_b, U]`` read off once with one JVP per gate block (and checked
against a random JVP). Applying ``A`` or ``Aᵀ`` is then one matmul per weight plus a few elementwise
products; the site variables (``z``, ``φ(z)``, a slice of z) are differentiated with a cheap JVP/VJP.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp

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


def unit_coefficients(fn, primal: torch.Tensor | dict, sizes: dict | int, N: int, H: int, U: int):
    """Per-unit coefficients of a unit-structured linear map ``d fn`` at ``primal``.

    The coefficients are read off with one JVP per gate block (a one-hot tangent on block g of slot s)
    and checked against one random JVP (relative error ≤ 1e-6, seed 0).

    Args:
        fn: maps a dict of ``[N, R_s]`` tensors (or one ``[N, R]`` tensor) to ``[N, H]``.
        primal: the point of linearization, of the form ``fn`` takes.
        sizes: ``{s: R_s}`` (or one ``R``) widths of the inputs.
        N: number of sites.
        H: output width.
        U: unit size (the output unit j of each block reads only entries j of each input block).

    Returns:
        ``{s: C_s [N, H/U, R_s/U, U]}`` (or one tensor) with ``out[n, o·U + j] = Σ_{s,g} C_s[n, o, g, j] ·
        in_s[n, g·U + j]``, or None when ``U ≤ 0``, U does not divide the sizes, or the random JVP disagrees.
    """
    single = not isinstance(primal, dict)
    prim = {"_": primal} if single else primal
    sz = {"_": sizes} if single else sizes
    if U <= 0 or H % U or any(R % U for R in sz.values()):
        return None

    def f(d):
        return fn(d["_"]) if single else fn(d)

    Ob = H // U
    C = {}
    for s, R in sz.items():
        cols = []
        for g in range(R // U):
            t = {q: torch.zeros_like(v) for q, v in prim.items()}
            t[s][:, g * U:(g + 1) * U] = 1.0
            cols.append(jvp(f, (prim,), (t,))[1].reshape(N, Ob, U))
        C[s] = torch.stack(cols, 2).detach()
    gen = torch.Generator(device="cpu").manual_seed(0)
    Z = {s: torch.randn(N, R, generator=gen, dtype=prim[s].dtype).to(prim[s].device) for s, R in sz.items()}
    ref = jvp(f, (prim,), (Z,))[1]
    got = apply_units(C, {s: z.unsqueeze(0) for s, z in Z.items()}, N, H)[0]
    if float((got - ref).norm()) > 1e-6 * float(ref.norm().clamp_min(1e-30)):
        return None
    return C["_"] if single else C


def apply_units(C: dict, Z: dict, N: int, H: int) -> torch.Tensor:
    """``Σ_s C_s · Z_s`` for ``Z_s`` ``[k, N, R_s]`` -> ``[k, N, H]`` (see ``unit_coefficients``)."""
    out = None
    for s, Cs in C.items():
        _, Ob, G, U = Cs.shape
        k = Z[s].shape[0]
        Zs = Z[s].reshape(k, N, 1, G, U)
        for g in range(G):
            term = Cs[:, :, g] * Zs[:, :, :, g]
            out = term if out is None else out + term
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
            Zs = Zs + Cs[:, o:o + 1] * Yr[:, :, o:o + 1]
        out[s] = Zs.reshape(k, N, G * U)
    return out


class StepLinearization:
    """``A`` of an affine-slot, unit-structured cell from stored coefficients (see module docstring).

    ``StepLinearization.build(traj)`` returns None for cells without that structure; the operators
    then fall back to JVP/VJP of the whole step.
    """

    def __init__(self, traj: Trajectory, D: dict, E: torch.Tensor, zsites: tuple[str, ...]):
        B, T, H = traj.shape
        self.traj, self.B, self.T, self.H = traj, B, T, H
        self.D = {s: v.reshape(B, T, *v.shape[1:]) for s, v in D.items()}
        self.E = E.reshape(B, T, *E.shape[1:])
        self.zsites = zsites
        model = traj.model
        self.terms = [(name, slot, site) for name, (slot, site) in model.affine_terms.items() if site in zsites]
        self.prev = traj.prev_states

    @staticmethod
    def build(traj: Trajectory) -> StepLinearization | None:
        """The stored coefficients of ``A`` for a cell that declares ``unit_size() > 0``.

        Args:
            traj: a recorded trajectory.

        Returns:
            The ``StepLinearization``, or None for a cell that is not an ``AffineRecurrentModel`` or
            declares ``unit_size() = 0``.

        Raises:
            ValueError: a cell whose declared unit structure a random JVP contradicts, or whose
                ``state_sites`` are not among its site variables.
        """
        from kpflow.models.cells import AffineRecurrentModel

        model = traj.model
        if not isinstance(model, AffineRecurrentModel) or model.unit_size() <= 0:
            return None
        U = int(model.unit_size())
        B, T, H = traj.shape
        N = B * T
        zp, x = traj.sites()
        with torch.no_grad():
            slots = {k: v.detach() for k, v in model.slots(traj.params, zp, x).items()}
        D = unit_coefficients(lambda a: model.post(a, zp, x), slots, {s: v.shape[1] for s, v in slots.items()},
                              N, H, U)
        E = None if D is None else unit_coefficients(lambda z: model.post(slots, z, x), zp, H, N, H, U)
        if D is None or E is None:
            raise ValueError(f"{type(model).__name__} declares unit_size()={U}, but its post is not unit-structured "
                             f"with blocks of {U} (state {H}, slots {({s: v.shape[1] for s, v in slots.items()})}; a "
                             "random JVP disagrees with the unit coefficients): declare unit_size() = 0")
        names = set(model.site_variables(zp[:1], x[:1]))
        zsites = tuple(model.state_sites)
        if not zsites or not set(zsites) <= names:
            raise ValueError(f"{type(model).__name__}.state_sites = {zsites} must name the site variables that depend "
                             f"on the previous state, among {sorted(names)}")
        return StepLinearization(traj, D, E, zsites)

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
        """``A_t V`` for ``V`` ``[k, B, H]`` (site (b, t) for every trial b)."""
        k, B, H = V.shape
        params = self.traj.params
        D, E = self._coeffs(t)
        udot = jvp(self._sites_fn(t, k), (repeat_probes(self.prev[:, t], k),), (V.reshape(k * B, H),))[1]
        adot = {}
        for name, slot, site in self.terms:
            term = udot[site] @ params[name].T
            adot[slot] = term if slot not in adot else adot[slot] + term
        out = apply_units(E, {"_": V}, B, H)
        if adot:
            out = out + apply_units({s: D[s] for s in adot}, {s: a.reshape(k, B, -1) for s, a in adot.items()},
                                    B, H)
        return out

    def step_adjoint(self, t: int, Y: torch.Tensor) -> torch.Tensor:
        """``A_tᵀ Y`` for ``Y`` ``[k, B, H]``."""
        k, B, H = Y.shape
        params = self.traj.params
        D, E = self._coeffs(t)
        cot = apply_units_adjoint({s: D[s] for s in {slot for _, slot, _ in self.terms}}, Y, B)
        ubar = {}
        for name, slot, site in self.terms:
            term = cot[slot].reshape(k * B, -1) @ params[name]
            ubar[site] = term if site not in ubar else ubar[site] + term
        out = apply_units_adjoint(E, Y, B)["_"]
        if ubar:
            _, pullback = vjp(self._sites_fn(t, k), repeat_probes(self.prev[:, t], k))
            full = {s: ubar.get(s, None) for s in self.zsites}
            full = {s: (v if v is not None else torch.zeros(k * B, self._site_width(s), dtype=Y.dtype,
                                                             device=Y.device)) for s, v in full.items()}
            out = out + pullback(full)[0].reshape(k, B, H)
        return out

    def _site_width(self, site):
        zp, x = self.prev[:, 0], self.traj.inputs[:, 0]
        return self.traj.model.site_variables(zp, x)[site].shape[1]
