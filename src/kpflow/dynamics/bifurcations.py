"""Bifurcations of fixed points between two parameter sets and along training.

Between two parameter sets θ_a, θ_b (two checkpoints) the parameters are interpolated,
``θ(s) = (1 − s) θ_a + s θ_b``, and every fixed point is continued in ``s`` by a warm-started,
step-limited Newton corrector. Along each branch the number of unstable eigenvalues of the
stability matrix (``|λ| > 1`` for maps, ``Re λ > 0`` for flows) is watched; where it changes, the
crossing is located by bisection in ``s`` (to ``s_tol``). This count changes exactly where the
classical test functions change sign (maps: ``det(A − I)`` for λ = +1, ``det(A + I)`` for λ = −1,
``det(A⊙A − I)`` (bialternate product) for a complex pair on the unit circle; flows: ``det(A)``
and ``det(2A⊙I)``), and is not fooled by two eigenvalues crossing together. Branches that end
between the two sets (fixed points lost, or born when continuing backwards from θ_b) are located by
bisection on existence: that is where a fold happens.

At the located crossing the type is read from the critical eigenvalue and Lyapunov–Schmidt
coefficients in the original coordinates (Kuznetsov 2004, *Elements of Applied Bifurcation
Theory*, §§ 3–5; Govaerts, Kuznetsov & Dhooge 2005), with right/left eigenvectors ``q``, ``p``
(``pᵀq = 1``), ``B = D²F``, ``C = D³F`` by nested forward-mode AD:

* λ = +1 (maps) or λ = 0 (flows): ``g_s = pᵀ ∂F/∂s`` (how the parameter path pushes along the
  centre direction) and ``a = ½ pᵀ B(q, q)``. ``g_s ≠ 0`` → saddle-node (fold);
  ``g_s = 0, a ≠ 0`` → transcritical; ``g_s = a = 0`` → pitchfork, with cubic coefficient
  ``c = ⅙ pᵀ[C(q,q,q) + 3 B(q, w)]``, ``(I − A) w = B(q,q) − 2a q`` (``c < 0`` supercritical).
* λ = −1 (maps): flip (period doubling), ``c = ⅙ pᵀ[C(q,q,q) + 3 B(q, (I − A)^{-1} B(q,q))]``
  (``c > 0`` supercritical for ``x ↦ −x + c x³``).
* complex pair: Neimark–Sacker (maps) or Hopf (flows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .fixedpoints import (
    ConstantInputMap,
    FixedPoints,
    constant_input_map,
    eig_with_left,
    find_fixed_points,
    fixed_points_at,
    newton_polish,
    normalise_params,
    stability_margin,
)

__all__ = [
    "BifurcationEvent", "BifurcationScan", "BifurcationHistory", "check_same_architecture",
    "interpolate_params", "bifurcation_test_functions", "bialternate_product", "find_bifurcations",
    "track_bifurcations", "classify_crossing",
]


# ------------------------------------------------------------------------------------ parameters
def check_same_architecture(pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
                            names: tuple[str, str] = ("first", "second")) -> None:
    """Raise a ValueError unless two parameter sets have the same names and shapes."""
    ka, kb = set(pa), set(pb)
    if ka != kb:
        raise ValueError(
            f"checkpoints of different architectures: the {names[0]} has parameters {sorted(ka - kb)} that the "
            f"{names[1]} lacks, and the {names[1]} has {sorted(kb - ka)} that the {names[0]} lacks"
        )
    for k in sorted(ka):
        if tuple(pa[k].shape) != tuple(pb[k].shape):
            raise ValueError(
                f"checkpoints of different architectures: parameter {k!r} has shape {tuple(pa[k].shape)} in the "
                f"{names[0]} and {tuple(pb[k].shape)} in the {names[1]}"
            )


def interpolate_params(pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor], s: float):
    """``θ(s) = (1 − s) θ_a + s θ_b``."""
    return {k: (1 - s) * pa[k] + s * pb[k] for k in pa}


# -------------------------------------------------------------------------------- test functions
def bialternate_product(A: torch.Tensor) -> torch.Tensor:
    """``A ⊙ A`` (bialternate product, size ``n(n−1)/2``): entries ``det[[a_pr, a_ps], [a_qr, a_qs]]``
    over index pairs ``p > q``, ``r > s``. Its eigenvalues are ``λ_i λ_j`` (i < j). Dense; small n."""
    n = A.shape[-1]
    p, q = torch.tril_indices(n, n, -1)
    App, Aps = A[p][:, p], A[p][:, q]
    Aqp, Aqs = A[q][:, p], A[q][:, q]
    return App * Aqs - Aps * Aqp


def bifurcation_test_functions(lam: torch.Tensor, is_flow: bool) -> dict[str, float]:
    """Classical bifurcation test functions evaluated from a spectrum ``lam`` ([H], complex).

    Maps: ``fold = det(A − I) = Π(λ−1)``, ``flip = det(A + I) = Π(λ+1)``,
    ``neimark_sacker = det(A⊙A − I) = Π_{i<j}(λ_iλ_j − 1)``.
    Flows: ``fold = det(A) = Πλ``, ``hopf = det(2A⊙I) = Π_{i<j}(λ_i + λ_j)``.
    Values are real up to round-off; they may overflow to ±inf for large H but keep their sign.
    """
    lam = lam.to(torch.complex128)
    i, j = torch.triu_indices(lam.shape[0], lam.shape[0], 1)

    def prod(x):
        return float(torch.prod(x).real) if x.numel() else 1.0

    if is_flow:
        return {"fold": prod(lam), "hopf": prod(lam[i] + lam[j])}
    return {"fold": prod(lam - 1), "flip": prod(lam + 1), "neimark_sacker": prod(lam[i] * lam[j] - 1)}


# ---------------------------------------------------------------------------------------- events
@dataclass
class BifurcationEvent:
    """One located bifurcation.

    Attributes:
        kind: ``saddle-node``, ``transcritical``, ``pitchfork``, ``flip``, ``neimark-sacker``, ``hopf``
            or ``degenerate`` (critical eigenvalue found but all coefficients vanish).
        s: location in the interpolation parameter (0 = first set, 1 = second); ``bracket`` its bracket.
        point: fixed point at the crossing ``[H]``; params: interpolated parameters there.
        eigenvalue: the critical eigenvalue of the stability matrix; eigenvalues: all of them.
        right_vector, left_vector: critical right/left eigenvectors (``pᴴ q = 1``, ``‖q‖ = 1``).
        coefficients: ``g_s``, ``a``, ``c`` and their normalised sizes (see module docstring).
        criticality: ``supercritical``/``subcritical`` where a cubic coefficient decides it.
        source: ``crossing`` (eigenvalue count changed along a branch) or ``branch-end``.
        change: ``born``/``lost`` for branch ends, ``gained instability``/``lost instability`` else.
        interval, step: checkpoint interval ``(k, k+1)`` and interpolated training step (tracking).
        n_crossing: how many eigenvalues changed side there; flags: ``simultaneous`` when more
            eigenvalues crossed together than the critical one explains (two real ones, two pairs).
    """

    kind: str
    s: float
    bracket: tuple[float, float]
    point: torch.Tensor
    params: dict[str, torch.Tensor]
    eigenvalue: complex
    eigenvalues: torch.Tensor
    right_vector: torch.Tensor
    left_vector: torch.Tensor
    coefficients: dict[str, float]
    criticality: str | None
    source: str
    change: str
    is_flow: bool
    interval: tuple[int, int] | None = None
    step: float | None = None
    n_crossing: int = 1
    flags: list[str] = field(default_factory=list)

    @property
    def distance(self) -> float:
        """Signed distance of the critical eigenvalue to the stability boundary at ``point``."""
        lam = torch.tensor([self.eigenvalue])
        return float(stability_margin(lam, self.is_flow)[0])

    def summary(self) -> dict:
        return {"kind": self.kind, "s": self.s, "step": self.step, "interval": self.interval,
                "eigenvalue": self.eigenvalue, "criticality": self.criticality, "source": self.source,
                "change": self.change, "norm": float(self.point.norm()), "n_crossing": self.n_crossing,
                "flags": ",".join(self.flags),
                **{k: v for k, v in self.coefficients.items()}}

    def __repr__(self) -> str:
        where = f"step {self.step:.6g}" if self.step is not None else f"s = {self.s:.10g}"
        crit = f", {self.criticality}" if self.criticality else ""
        flags = f", flags={self.flags}" if self.flags else ""
        return f"BifurcationEvent({self.kind}{crit} at {where}, λ = {self.eigenvalue:.6g}, {self.change}{flags})"


# ----------------------------------------------------------------------------- local derivatives
def directional_derivatives(fmap: ConstantInputMap, z: torch.Tensor, q: torch.Tensor):
    """``B(q,q) = D²F[q,q]`` and ``C(q,q,q) = D³F[q,q,q]`` at ``z`` (nested forward mode)."""
    def F(y):
        return fmap(y.unsqueeze(0))[0]

    def dF(y):
        return torch.func.jvp(F, (y,), (q,))[1]

    def d2F(y):
        return torch.func.jvp(dF, (y,), (q,))[1]

    B = d2F(z)
    C = torch.func.jvp(d2F, (z,), (q,))[1]
    return B, C


def bilinear(fmap: ConstantInputMap, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``B(u, v)`` by polarisation: ``¼[B(u+v,u+v) − B(u−v,u−v)]``."""
    Bp, _ = directional_derivatives(fmap, z, u + v)
    Bm, _ = directional_derivatives(fmap, z, u - v)
    return 0.25 * (Bp - Bm)


def _param_velocity(fmap: ConstantInputMap, z: torch.Tensor, pa, pb, s: float, q: torch.Tensor):
    """``∂F/∂s`` and ``(∂A/∂s) q`` at fixed ``z`` along ``θ(s) = (1−s)θ_a + sθ_b``."""
    keys = list(pa)
    p_s = [(1 - s) * pa[k] + s * pb[k] for k in keys]
    dirs = [pb[k] - pa[k] for k in keys]

    def F(*vals):
        return fmap(z.unsqueeze(0), dict(zip(keys, vals, strict=True)))[0]

    def Aq(*vals):
        return torch.func.jvp(lambda y: fmap(y.unsqueeze(0), dict(zip(keys, vals, strict=True)))[0], (z,), (q,))[1]

    Fs = torch.func.jvp(F, tuple(p_s), tuple(dirs))[1]
    Asq = torch.func.jvp(Aq, tuple(p_s), tuple(dirs))[1]
    return Fs, Asq


def classify_crossing(fmap: ConstantInputMap, z: torch.Tensor, pa, pb, s: float, zero_tol: float = 1e-4,
                      imag_tol: float = 1e-6):
    """Type of the bifurcation at a located crossing (see module docstring).

    Returns ``(kind, critical eigenvalue, eigenvalues, q, p, coefficients, criticality)``.
    """
    fm = fmap.with_params(interpolate_params(pa, pb, s))
    H = fm.state_dim
    A = fm.jacobians(z.unsqueeze(0))[0]
    eye = torch.eye(H, dtype=A.dtype, device=A.device)
    S = fm.stability_matrices(z.unsqueeze(0))[0] if fm.is_flow else A
    lam, R, L = eig_with_left(S)
    m = stability_margin(lam, fm.is_flow)
    i = int(torch.argmin(m.abs()))
    lam_c = complex(lam[i])
    q, p = R[:, i], L[:, i]
    coeffs: dict[str, float] = {"margin": float(m[i])}
    scale_im = max(1.0, abs(lam_c))
    if abs(lam_c.imag) > imag_tol * scale_im:
        kind = "hopf" if fm.is_flow else "neimark-sacker"
        coeffs["frequency"] = abs(lam_c.imag) if fm.is_flow else abs(math.atan2(lam_c.imag, lam_c.real))
        return kind, lam_c, lam, q, p, coeffs, None
    # real critical eigenvalue: work with real vectors, p^T q = 1, |q| = 1
    qr = q.real / q.real.norm()
    pr = p.real / torch.dot(p.real, qr)
    B, C = directional_derivatives(fm, z, qr)
    if not fm.is_flow and lam_c.real < 0:
        w = torch.linalg.solve(eye - A, B)
        c = float(torch.dot(pr, C + 3 * bilinear(fm, z, qr, w))) / 6.0
        coeffs["c"] = c
        return "flip", lam_c, lam, qr, pr, coeffs, ("supercritical" if c > 0 else "subcritical")
    # λ = +1 (maps) / λ = 0 (flows): use F (same zeros and the same ratios as f = (F - z)/dt)
    Fs, As_q = _param_velocity(fm, z, pa, pb, s, qr)
    g_s = float(torch.dot(pr, Fs))
    g_as = float(torch.dot(pr, As_q))  # speed of the critical eigenvalue along the path, dλ/ds
    a = 0.5 * float(torch.dot(pr, B))
    pn = float(pr.norm())
    length = max(1.0, float(z.norm()))
    denom = abs(g_s) + abs(g_as) * length
    gs_rel = abs(g_s) / denom if denom > 1e-300 else 0.0
    scale_a = pn * (float(B.norm()) + float(C.norm()))
    a_rel = abs(a) / scale_a if scale_a > 1e-300 else 0.0
    coeffs.update({"g_s": g_s, "g_s_rel": gs_rel, "eigenvalue_speed": g_as, "a": a, "a_rel": a_rel})
    if gs_rel > zero_tol:
        return "saddle-node", lam_c, lam, qr, pr, coeffs, None
    if a_rel > zero_tol:
        return "transcritical", lam_c, lam, qr, pr, coeffs, None
    rhs = B - 2 * a * qr
    w = torch.linalg.lstsq((eye - A).unsqueeze(0), rhs.reshape(1, -1, 1)).solution.reshape(-1) \
        if A.device.type == "cpu" else torch.linalg.pinv(eye - A) @ rhs
    w = w - torch.dot(pr, w) * qr
    c = float(torch.dot(pr, C + 3 * bilinear(fm, z, qr, w))) / 6.0
    coeffs["c"] = c
    c_rel = abs(c) / (pn * float(C.norm()) + 1e-300) if float(C.norm()) > 0 else 0.0
    if c_rel <= zero_tol and abs(c) < 1e-12:
        return "degenerate", lam_c, lam, qr, pr, coeffs, None
    return "pitchfork", lam_c, lam, qr, pr, coeffs, ("supercritical" if c < 0 else "subcritical")


# --------------------------------------------------------------------------------- continuation
def _n_unstable(fm: ConstantInputMap, z: torch.Tensor) -> tuple[int, torch.Tensor]:
    A = fm.stability_matrices(z.unsqueeze(0))[0]
    lam = torch.linalg.eigvals(A)
    return int((stability_margin(lam, fm.is_flow) > 0).sum()), lam


@dataclass
class _Corrector:
    fmap: ConstantInputMap
    pa: dict
    pb: dict
    tol: float
    jump: float

    def at(self, s: float) -> ConstantInputMap:
        return self.fmap.with_params(interpolate_params(self.pa, self.pb, s))

    def system(self):
        """The same segment as a continuation system ``g(z, s)`` (for locating crossings on the branch)."""
        if getattr(self, "_system", None) is None:
            from .continuation import ParameterPath, _System

            pa, pb, x = self.pa, self.pb, self.fmap.x_bar
            path = ParameterPath(lambda s: ({k: (1 - s) * pa[k] + s * pb[k] for k in pa}, x), (0.0, 1.0), "s",
                                 "interpolation")
            self._system = _System(self.fmap.model, path, self.fmap.dtype, None)
        return self._system

    def correct(self, s: float, z_pred: torch.Tensor, z_ref: torch.Tensor,
                max_step: float | None = None) -> torch.Tensor | None:
        """Newton at ``s`` from ``z_pred``; None if it fails or jumps farther than allowed from ``z_ref``."""
        fm = self.at(s)
        z, q = newton_polish(fm, z_pred.unsqueeze(0), steps=60, tol=self.tol,
                             max_step=self.jump if max_step is None else max_step, max_halvings=10)
        ok = bool(torch.isfinite(q).all()) and float(q[0]) <= 0.5 * self.tol ** 2 * 4
        if not ok:
            return None
        if float((z[0] - z_ref).norm()) > self.jump * 4:
            return None
        return z[0]


def _bisect_count(cor: _Corrector, lo, hi, s_tol: float):
    """Bisect between (s, z, n) triples with different unstable counts. Returns the final bracket."""
    s_lo, z_lo, n_lo = lo
    s_hi, z_hi, n_hi = hi
    while s_hi - s_lo > s_tol:
        s_m = 0.5 * (s_lo + s_hi)
        # Stay on this branch: predict from the current bracket, cap Newton's steps by the bracket's
        # size and reject a point that moved farther than half of it (near a pitchfork the branch born
        # there lies ~√|s − s*| away, much farther than the bracket once it is small).
        width = float((z_hi - z_lo).norm())
        scale = 1e-12 * max(1.0, float(z_lo.norm()))
        pred = 0.5 * (z_lo + z_hi)
        z_m = cor.correct(s_m, pred, z_lo, max_step=width + scale)
        if z_m is not None and float((z_m - pred).norm()) > 0.5 * width + scale:
            z_m = None
        if z_m is None:  # the branch is lost inside the bracket: treat as the high end
            s_hi, z_hi = s_m, z_lo
            continue
        n_m, _ = _n_unstable(cor.at(s_m), z_m)
        if n_m == n_lo:
            s_lo, z_lo = s_m, z_m
        else:
            s_hi, z_hi, n_hi = s_m, z_m, n_m
    return (s_lo, z_lo, n_lo), (s_hi, z_hi, n_hi)


def _locate_on_branch(cor: _Corrector, s_path, z_path, n: int, s_new: float, z_new: torch.Tensor, n_new: int):
    """Locate a change of the unstable count between the last accepted point and ``(s_new, z_new)`` on
    the branch (``kpflow.dynamics.continuation``'s locator: Hermite predictor, chord-hyperplane
    corrector, no branch jumping, ill-conditioned points beside a branch point avoided). The lower end
    is moved back along the path while its margin is within 1e-6 of the boundary (a step that landed
    on the bifurcation, where the point is ill-conditioned). Returns ``(s, z, bracket)`` or None."""
    from .continuation import _locate

    sys = cor.system()
    k = min(n, n_new)

    def end(s_, z_):
        u = torch.cat([z_, torch.tensor([s_], dtype=z_.dtype, device=z_.device)])
        J = sys.jacobian(u)
        return u, J, sys.margins(J)[1]

    i = len(s_path) - 1
    ua, Ja, ma = end(s_path[i], z_path[i])
    while abs(float(ma[k])) <= 1e-6 and i > 0:
        i -= 1
        ua, Ja, ma = end(s_path[i], z_path[i])
    ub, Jb, mb = end(s_new, z_new)
    if (float(ma[k]) > 0) == (float(mb[k]) > 0):
        return None
    u, _, err = _locate(sys, ua, Ja, ma, ub, Jb, mb, k, cor.tol, 1e-13)
    s_at = float(u[-1])
    return s_at, u[:-1].detach().clone(), (s_at - err, s_at + err)


def _bisect_existence(cor: _Corrector, s_ok: float, z_ok: torch.Tensor, s_bad: float, s_tol: float):
    """Bisect between an ``s`` where the branch exists and one where the corrector fails."""
    while abs(s_bad - s_ok) > s_tol:
        s_m = 0.5 * (s_ok + s_bad)
        z_m = cor.correct(s_m, z_ok, z_ok)
        if z_m is None:
            s_bad = s_m
        else:
            s_ok, z_ok = s_m, z_m
    return s_ok, z_ok, s_bad


@dataclass
class _Branch:
    s_path: list[float]
    z_path: list[torch.Tensor]
    events: list[BifurcationEvent]
    end: torch.Tensor | None  # point at the target s, or None when lost


def _make_event(cor: _Corrector, s: float, bracket, z: torch.Tensor, source: str, change: str,
                zero_tol: float) -> BifurcationEvent:
    kind, lam_c, lam, q, p, coeffs, crit = classify_crossing(cor.fmap, z, cor.pa, cor.pb, s, zero_tol)
    params = interpolate_params(cor.pa, cor.pb, s)
    return BifurcationEvent(kind, float(s), (float(bracket[0]), float(bracket[1])), z.detach().clone(), params,
                            lam_c, lam, q, p, coeffs, crit, source, change, cor.fmap.is_flow)


def _continue(cor: _Corrector, z0: torch.Tensor, s0: float, s1: float, n_substeps: int, s_tol: float,
              zero_tol: float, max_halvings: int = 5) -> _Branch:
    """Follow one fixed point from ``s0`` to ``s1`` (either direction), locating crossings and its end."""
    direction = 1.0 if s1 >= s0 else -1.0
    ds_full = abs(s1 - s0) / max(1, n_substeps)
    s, z = s0, z0
    n, _ = _n_unstable(cor.at(s), z)
    s_path, z_path, events = [s], [z], []
    z_prev, s_prev = None, None
    ds = ds_full
    while direction * (s1 - s) > 1e-15:
        ds = min(ds, abs(s1 - s))
        s_new = s + direction * ds
        pred = z if z_prev is None else z + (z - z_prev) * (ds / max(abs(s - s_prev), 1e-300))
        z_new = cor.correct(s_new, pred, z)
        if z_new is None and z_prev is not None:
            z_new = cor.correct(s_new, z, z)
        if z_new is None:
            if ds > ds_full / 2 ** max_halvings:
                ds /= 2
                continue
            s_ok, z_ok, s_bad = _bisect_existence(cor, s, z, s_new, s_tol)
            change = "lost" if direction > 0 else "born"
            events.append(_make_event(cor, s_ok, tuple(sorted((s_ok, s_bad))), z_ok, "branch-end", change, zero_tol))
            return _Branch(s_path, z_path, events, None)
        n_new, _ = _n_unstable(cor.at(s_new), z_new)
        if n_new != n:
            located = _locate_on_branch(cor, s_path, z_path, n, s_new, z_new, n_new)
            if located is None:  # fall back to bisection in s
                lo, hi = _bisect_count(cor, (s, z, n), (s_new, z_new, n_new), s_tol) if direction > 0 else \
                    _bisect_count(cor, (s_new, z_new, n_new), (s, z, n), s_tol)
                z_at = lo[1] if direction > 0 else hi[1]  # report at the side nearer to the boundary
                s_at, bracket = 0.5 * (lo[0] + hi[0]), (lo[0], hi[0])
            else:
                s_at, z_at, bracket = located
            n_before, n_after = (n, n_new) if direction > 0 else (n_new, n)
            change = "gained instability" if n_after > n_before else "lost instability"
            ev = _make_event(cor, s_at, bracket, z_at, "crossing", change, zero_tol)
            margins = stability_margin(ev.eigenvalues, cor.fmap.is_flow).abs()
            n_near = int((margins <= max(1e-6, 10 * abs(ev.coefficients.get("margin", 0.0)))).sum())
            ev.n_crossing = max(abs(n_new - n), n_near)
            if ev.n_crossing > (2 if ev.kind in ("neimark-sacker", "hopf") else 1):
                ev.flags.append("simultaneous")
            events.append(ev)
        z_prev, s_prev = z, s
        s, z, n = s_new, z_new, n_new
        s_path.append(s)
        z_path.append(z)
        ds = min(ds * 2, ds_full)
    return _Branch(s_path, z_path, events, z)


# ------------------------------------------------------------------------------------- scanning
@dataclass
class BifurcationScan:
    """Fixed points at both ends of an interpolation, the events between, and what was born/lost."""

    fixed_points_a: FixedPoints
    fixed_points_b: FixedPoints
    events: list[BifurcationEvent]
    matches: list[tuple[int, int | None]]  # (index at a, index at b or None if lost)
    born: list[int]   # indices at b not reached from a
    lost: list[int]   # indices at a whose branch ended

    def __repr__(self) -> str:
        return (f"BifurcationScan({len(self.fixed_points_a)} -> {len(self.fixed_points_b)} fixed points, "
                f"events={[e.kind for e in self.events]}, born={len(self.born)}, lost={len(self.lost)})")


def _merge_events(events: list[BifurcationEvent], s_tol: float) -> list[BifurcationEvent]:
    merged: list[BifurcationEvent] = []
    for e in sorted(events, key=lambda e: (e.source != "crossing", e.s)):
        dup = False
        for m in merged:
            close_s = abs(m.s - e.s) <= max(1e3 * s_tol, 1e-6)
            close_z = float((m.point - e.point).norm()) <= 1e-2 * max(1.0, float(m.point.norm()))
            if close_s and close_z and m.kind == e.kind:
                dup = True
                break
        if not dup:
            merged.append(e)
    return sorted(merged, key=lambda e: e.s)


def _as_points(fp: FixedPoints | torch.Tensor | None, H: int):
    if fp is None:
        return None
    pts = fp.points if isinstance(fp, FixedPoints) else torch.as_tensor(fp)
    return pts.reshape(-1, H)


def find_bifurcations(
    model,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    x_bar: torch.Tensor | None = None,
    *,
    points_a: FixedPoints | torch.Tensor | None = None,
    points_b: FixedPoints | torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    search: bool = True,
    n_substeps: int = 8,
    s_tol: float = 1e-12,
    newton_tol: float = 1e-11,
    max_jump: float | None = None,
    zero_tol: float = 1e-4,
    search_kwargs: dict | None = None,
    dtype: torch.dtype = torch.float64,
) -> BifurcationScan:
    """Bifurcations of the fixed points of ``model`` on the segment from ``params_a`` to ``params_b``.

    Args:
        params_a, params_b: two cell-parameter sets of the same architecture (dicts or state_dicts).
        points_a, points_b: known fixed points at either end (warm starts); with ``search=True``
            a fresh search from ``initial_states`` (and these points) is run at both ends too.
        n_substeps: continuation steps per branch (refined automatically where Newton struggles).
        s_tol: bisection tolerance in ``s``. newton_tol: residual norm for a converged point.
        max_jump: largest Newton step (default: 0.25 · max(1, scale of the points)).
        zero_tol: normalised size under which a normal-form coefficient counts as zero.
    """
    pa, pb = normalise_params(params_a), normalise_params(params_b)
    check_same_architecture(pa, pb)
    if hasattr(model, "check_params"):
        model.check_params(pa)
    fmap = constant_input_map(model, x_bar, pa, dtype=dtype)
    pa = {k: v.detach().to(dtype=dtype, device=fmap.device) for k, v in pa.items()}
    pb = {k: v.detach().to(dtype=dtype, device=fmap.device) for k, v in pb.items()}
    H = fmap.state_dim
    kw = dict(search_kwargs or {})
    kw.setdefault("allow_empty", True)

    def endpoint(p, pts):
        fm = fmap.with_params(p)
        starts = [x for x in (_as_points(pts, H),) if x is not None]
        if search:
            if initial_states is not None:
                starts.append(torch.as_tensor(initial_states).reshape(-1, H).to(dtype=dtype, device=fmap.device))
            if not starts:
                starts.append(torch.zeros(1, H, dtype=dtype, device=fmap.device))
            n_total = sum(s.shape[0] for s in starts)
            kw.setdefault("n_starts", max(n_total, 64))
            return find_fixed_points(model, initial_states=torch.cat(starts, 0), fmap=fm, **kw)
        if not starts:
            raise ValueError("search=False needs points_a (and optionally points_b) to follow")
        z, q = newton_polish(fm, starts[0], tol=newton_tol)
        good = q <= 0.5 * newton_tol ** 2 * 4
        return fixed_points_at(fm, z[good])

    fpa = endpoint(pa, points_a)
    fpb = endpoint(pb, points_b) if (search or points_b is not None) else None
    scale = max([1.0] + [float(fpa.points.norm(dim=-1).max())] if len(fpa) else [1.0])
    jump = 0.25 * scale if max_jump is None else float(max_jump)
    cor = _Corrector(fmap, pa, pb, newton_tol, jump)
    events: list[BifurcationEvent] = []
    ends: list[torch.Tensor | None] = []
    for i in range(len(fpa)):
        br = _continue(cor, fpa.points[i], 0.0, 1.0, n_substeps, s_tol, zero_tol)
        events += br.events
        ends.append(br.end)
    if fpb is None:
        reached = [e for e in ends if e is not None]
        fpb = fixed_points_at(fmap.with_params(pb), torch.stack(reached) if reached else
                              torch.zeros(0, H, dtype=dtype, device=fmap.device))
    # match continued ends to the points found at b
    matches: list[tuple[int, int | None]] = []
    hit = torch.zeros(len(fpb), dtype=torch.bool)
    for i, e in enumerate(ends):
        if e is None:
            matches.append((i, None))
            continue
        if len(fpb):
            d = (fpb.points - e).norm(dim=-1)
            j = int(torch.argmin(d))
            if float(d[j]) <= 1e-6 * max(1.0, float(e.norm())):
                hit[j] = True
                matches.append((i, j))
                continue
        matches.append((i, None))
    lost = [i for i, e in enumerate(ends) if e is None]
    born = [j for j in range(len(fpb)) if not bool(hit[j])]
    for j in born:  # follow new points backwards to where they appear
        br = _continue(cor, fpb.points[j], 1.0, 0.0, n_substeps, s_tol, zero_tol)
        events += br.events
    return BifurcationScan(fpa, fpb, _merge_events(events, s_tol), matches, born, lost)


@dataclass
class BifurcationHistory:
    """Fixed points at every checkpoint and the bifurcations between consecutive ones."""

    steps: list[float]
    fixed_points: list[FixedPoints]
    scans: list[BifurcationScan]
    events: list[BifurcationEvent] = field(default_factory=list)

    @property
    def first(self) -> BifurcationEvent | None:
        """The first bifurcation along training (None when there is none)."""
        return self.events[0] if self.events else None

    def table(self) -> list[dict]:
        return [e.summary() for e in self.events]


def track_bifurcations(
    model,
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    x_bar: torch.Tensor | None = None,
    *,
    steps: Sequence[float] | None = None,
    initial_states: torch.Tensor | None = None,
    initial_points: torch.Tensor | None = None,
    search: bool = True,
    progress: bool = False,
    **scan_kwargs,
) -> BifurcationHistory:
    """Follow fixed points from checkpoint to checkpoint (warm starts) and locate every bifurcation
    between consecutive checkpoints (``find_bifurcations`` on each interval).

    ``steps`` labels the checkpoints (default 0, 1, 2, ...); each event gets ``interval`` and a
    training ``step`` interpolated linearly inside its interval. With ``search=False`` only the
    points in ``initial_points`` (e.g. the origin) are followed.
    """
    cps = [normalise_params(c) for c in checkpoints]
    if len(cps) < 2:
        raise ValueError(f"need at least two checkpoints to look for bifurcations, got {len(cps)}")
    for k in range(1, len(cps)):
        check_same_architecture(cps[0], cps[k], ("checkpoint 0", f"checkpoint {k}"))
    steps = list(range(len(cps))) if steps is None else [float(s) for s in steps]
    if len(steps) != len(cps):
        raise ValueError(f"got {len(steps)} steps for {len(cps)} checkpoints")
    it = range(len(cps) - 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="bifurcations along training", leave=False)
    fps: list[FixedPoints] = []
    scans: list[BifurcationScan] = []
    events: list[BifurcationEvent] = []
    warm = initial_points
    for k in it:
        scan = find_bifurcations(model, cps[k], cps[k + 1], x_bar, points_a=warm if not fps else fps[-1],
                                 initial_states=initial_states, search=search, **scan_kwargs)
        if not fps:
            fps.append(scan.fixed_points_a)
        fps.append(scan.fixed_points_b)
        scans.append(scan)
        for e in scan.events:
            e.interval = (k, k + 1)
            e.step = steps[k] + e.s * (steps[k + 1] - steps[k])
            events.append(e)
    return BifurcationHistory(steps, fps, scans, events)
