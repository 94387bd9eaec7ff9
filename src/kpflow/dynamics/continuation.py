"""Pseudo-arclength continuation of fixed points in one parameter, with the special points on the branch.

A parameter path ``θ(s)`` (``ParameterPath``: a constant input level, a weight interpolation between
two checkpoints, a gain on some weights, or any differentiable function of ``s``) turns a kpflow model
into a one-parameter family of autonomous systems. Their equilibria solve ``g(z, s) = 0`` with

* maps (``model.is_flow`` False): ``g = F(z, x̄(s); θ(s)) − z``; stability matrix ``A = ∂F/∂z``,
  an eigenvalue is unstable when ``|λ| > 1``;
* flows: ``g = f(z, x̄(s); θ(s))``, the model's ``vector_field`` (the exact vector field, whatever the
  integrator: an RK4 step's fixed points are the zeros of ``f``), or ``(F − z)/dt`` for a flow given
  only by its step (an Euler reading); stability matrix ``∂f/∂z``, unstable when ``Re λ > 0``.

The solution set is a curve in ``(z, s)`` that is followed by arclength (Keller's pseudo-arclength
method; Allgower & Georg, *Introduction to Numerical Continuation Methods*, ch. 2; Kuznetsov 2004,
*Elements of Applied Bifurcation Theory*, ch. 10). With ``u = (z, s)`` and the unit tangent ``t``
(the null vector of ``[g_z, g_s]``, oriented by the previous one):

* predictor ``u_pred = u + h t``;
* corrector: Newton in float64 on ``g(u) = 0, tᵀ(u − u_pred) = 0`` (bordered Jacobian
  ``[[g_z, g_s], [tᵀ]]``, regular at folds);
* step control: the step is halved when Newton fails, when the corrected point lies farther than
  ``h`` from the prediction, or when the tangent turns by more than ``max_turn`` radians; it grows by
  1.3 after an easy step (≤ 3 Newton iterations), within ``[ds_min, ds_max]``.

Special points are detected where the number of unstable eigenvalues changes between two accepted
points and located *on the branch*: the secant/bisection iteration on the test function
``ψ = k-th largest stability margin`` (``k`` the smaller of the two counts; ``ψ`` changes sign
exactly where that eigenvalue crosses the boundary) evaluates every trial point with a corrector
constrained to the hyperplane through the linear interpolation of the *current bracket's* end points,
orthogonal to its chord, with steps capped by the bracket's length. As the bracket shrinks the
prediction error falls quadratically while the distance to any other branch (one born at a pitchfork,
``~√|s − s*|``) falls more slowly, so the corrector cannot jump branches. At the located point the
critical eigenvalue and the numerical normal form (Kuznetsov 2004 §§ 3.5, 4.7, 5.4, 8.7; Govaerts,
Kuznetsov & Dhooge 2005) give the type, with right/left eigenvectors ``q``, ``p`` (``pᴴq = 1``,
``‖q‖ = 1``), ``B = D²g``, ``C = D³g`` (nested forward mode):

* λ = 1 (maps) / λ = 0 (flows): ``pᵀ g_s ≠ 0`` → **saddle-node** (fold, ``LP``), with
  ``a = ½ pᵀB(q,q)``; ``pᵀ g_s = 0`` → branch point (``BP``): **transcritical** if ``a ≠ 0``, else
  **pitchfork** with ``c = ⅙ pᵀ[C(q,q,q) + 3B(q,w)]``, ``g_z w = −(B(q,q) − 2a q)``, ``pᵀw = 0``;
  ``c < 0`` supercritical;
* λ = −1 (maps): **flip** (``PD``), ``c = ⅙ pᵀ[C(q,q,q) + 3B(q,(I − A)⁻¹B(q,q))]`` for the centre
  map ``ξ ↦ −ξ + c ξ³``: ``c > 0`` supercritical (a stable 2-cycle beside the unstable point);
* ``λ = e^{±iθ}`` (maps): **Neimark–Sacker** (``NS``), ``d = ½ Re{e^{−iθ} pᴴ[C(q,q,q̄)
  + 2B(q,(I−A)⁻¹B(q,q̄)) + B(q̄,(e^{2iθ}I−A)⁻¹B(q,q))]}`` (Kuznetsov eq. 4.39): ``d < 0``
  supercritical (a stable invariant circle);
* ``λ = ±iω`` (flows): **Hopf** (``H``), first Lyapunov coefficient ``ℓ₁ = (1/2ω) Re pᴴ[C(q,q,q̄)
  − 2B(q,A⁻¹B(q,q̄)) + B(q̄,(2iωI−A)⁻¹B(q,q))]`` (Kuznetsov eq. 3.20): ``ℓ₁ < 0`` supercritical.

When more eigenvalues cross than the critical one explains (two real ones together, two pairs), the
point is flagged ``simultaneous``. At a branch point the second branch is entered along the kernel
direction of ``[g_z, g_s]`` orthogonal to the old tangent, on both sides (``switch_branches``).

Along a branch ``learning_along_branch`` records a short run started on the branch at chosen points
and measures ``tr Θ``, ``erank Θ`` (Θ = P K P*), ``tr K`` and ``‖P‖_F²`` with the one-sided estimators,
against the distance to the nearest special point.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kpflow.models.base import RecurrentModel

from .fixedpoints import eig_with_left, normalise_params, stability_margin

__all__ = [
    "Branch", "ContinuationError", "ContinuationResult", "ParameterPath", "SpecialPoint", "continue_fixed_points",
    "custom_path", "gain_path", "input_path", "interpolation_path", "learning_along_branch", "parameter_path",
]

LABELS = {"saddle-node": "LP", "transcritical": "BP", "pitchfork": "BP", "branch-point": "BP", "flip": "PD",
          "neimark-sacker": "NS", "hopf": "H", "degenerate": "D"}


class ContinuationError(RuntimeError):
    """Raised when a branch cannot be started or followed (with what went wrong and what to try)."""


# ------------------------------------------------------------------------------------- the path
@dataclass
class ParameterPath:
    """A one-parameter family ``s ↦ (θ(s), x̄(s))`` of cell parameters and constant inputs.

    ``fn(s)`` takes a 0-d tensor ``s`` and returns ``(params, x_bar)``: a complete cell-parameter
    dict and the constant input ``[input_dim]``, built from ``s`` with torch operations (so that
    ``∂/∂s`` exists). ``domain`` is the closed interval of ``s`` on which the path is defined;
    ``label`` names ``s`` in tables and figures.
    """

    fn: Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]
    domain: tuple[float, float] = (-math.inf, math.inf)
    label: str = "s"
    kind: str = "custom"

    def __call__(self, s: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.fn(s)

    def check(self, s: float) -> None:
        lo, hi = self.domain
        if not (lo <= s <= hi):
            raise ValueError(f"{self.label} = {s:g} is outside the path's domain [{lo:g}, {hi:g}] ({self.kind} path); "
                             f"choose a range inside it")


def _as_input(model: RecurrentModel, x_bar, dtype, device) -> torch.Tensor:
    if x_bar is None:
        return torch.zeros(model.input_dim, dtype=dtype, device=device)
    x = torch.as_tensor(x_bar).detach().to(dtype=dtype, device=device).reshape(-1)
    if x.shape[0] != model.input_dim:
        raise ValueError(f"the constant input must have shape [input_dim] = [{model.input_dim}], got "
                         f"{tuple(torch.as_tensor(x_bar).shape)}")
    return x


def _base_params(model: RecurrentModel, params, dtype, device) -> dict[str, torch.Tensor]:
    p = model.cell_params() if params is None else normalise_params(params)
    model.check_params(p, complete=True)
    return {k: v.detach().to(dtype=dtype, device=device) for k, v in p.items()}


def input_path(model: RecurrentModel, direction, x_base=None, params=None, *, dtype=torch.float64,
               device=None, label: str = "input level") -> ParameterPath:
    """``x̄(s) = x_base + s · direction`` (a constant input level), parameters fixed.

    ``direction`` may be an input index (``int``) or a vector ``[input_dim]``.
    """
    base = _base_params(model, params, dtype, device)
    dev = next(iter(base.values())).device
    if isinstance(direction, int):
        if not 0 <= direction < model.input_dim:
            raise ValueError(f"input index {direction} is out of range for input_dim = {model.input_dim}")
        d = torch.zeros(model.input_dim, dtype=dtype, device=dev)
        d[direction] = 1.0
    else:
        d = _as_input(model, direction, dtype, dev)
    x0 = _as_input(model, x_base, dtype, dev)
    return ParameterPath(lambda s: (base, x0 + s * d), label=label, kind="input")


def interpolation_path(model: RecurrentModel, params_a, params_b, x_bar=None, *, dtype=torch.float64, device=None,
                       label: str = "s (checkpoint a → b)") -> ParameterPath:
    """``θ(s) = (1 − s) θ_a + s θ_b`` between two parameter sets (checkpoints); domain ``[0, 1]``."""
    from .bifurcations import check_same_architecture

    pa, pb = _base_params(model, params_a, dtype, device), _base_params(model, params_b, dtype, device)
    check_same_architecture(pa, pb)
    x = _as_input(model, x_bar, dtype, next(iter(pa.values())).device)
    return ParameterPath(lambda s: ({k: (1 - s) * pa[k] + s * pb[k] for k in pa}, x), domain=(0.0, 1.0),
                         label=label, kind="interpolation")


def gain_path(model: RecurrentModel, names: Sequence[str] | str | None = None, params=None, x_bar=None, *,
              dtype=torch.float64, device=None, label: str = "gain") -> ParameterPath:
    """``θ(s)[n] = s · θ[n]`` for the weights ``names`` (default: the recurrent weight, the first of
    ``W``, ``W_hh``, ``W1``), the others fixed; domain ``[0, ∞)``."""
    base = _base_params(model, params, dtype, device)
    if names is None:
        names = [next((n for n in ("W", "W_hh", "weight_hh", "W1") if n in base), None)]
        if names[0] is None:
            raise ValueError(f"no recurrent weight to scale among {sorted(base)}; name the weights with names=[...]")
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in base]
    if unknown:
        raise ValueError(f"gain_path: no parameter(s) {unknown}; the cell's parameters are {sorted(base)}")
    x = _as_input(model, x_bar, dtype, next(iter(base.values())).device)
    return ParameterPath(lambda s: ({k: (s * v if k in names else v) for k, v in base.items()}, x),
                         domain=(0.0, math.inf), label=label if label != "gain" else f"gain on {', '.join(names)}",
                         kind="gain")


def parameter_path(model: RecurrentModel, name: str, index=None, params=None, x_bar=None, *, dtype=torch.float64,
                   device=None, domain=(-math.inf, math.inf)) -> ParameterPath:
    """``θ(s)[name][index] = s`` (one scalar entry, or the whole scalar parameter ``name``), others fixed."""
    base = _base_params(model, params, dtype, device)
    if name not in base:
        raise ValueError(f"parameter_path: no parameter {name!r}; the cell's parameters are {sorted(base)}")
    x = _as_input(model, x_bar, dtype, next(iter(base.values())).device)
    ref = base[name]
    if index is None and ref.numel() != 1:
        raise ValueError(f"parameter {name!r} has shape {tuple(ref.shape)}; give index=... to pick one entry")
    mask = torch.zeros_like(ref)
    if index is None:
        mask.fill_(1.0)
    else:
        mask[index] = 1.0

    def fn(s):
        return {**base, name: ref * (1 - mask) + s * mask}, x

    return ParameterPath(fn, domain=domain, label=f"{name}" + (f"[{index}]" if index is not None else ""),
                         kind="parameter")


def custom_path(model: RecurrentModel, fn: Callable, x_bar=None, *, params=None, dtype=torch.float64, device=None,
                domain=(-math.inf, math.inf), label: str = "s") -> ParameterPath:
    """A user's ``θ(s)``: ``fn(s)`` returns a (partial) parameter dict, or ``(params, x_bar)``; missing
    parameters keep their values in ``params`` (the model's own by default)."""
    base = _base_params(model, params, dtype, device)
    x0 = _as_input(model, x_bar, dtype, next(iter(base.values())).device)

    def wrapped(s):
        out = fn(s)
        p, x = (out if isinstance(out, tuple) else (out, x0))
        if not isinstance(p, Mapping):
            raise TypeError("the path function must return a parameter dict (or (params, x_bar)), got "
                            f"{type(p).__name__}")
        unknown = sorted(set(p) - set(base))
        if unknown:
            raise ValueError(f"the path function returned unknown parameter(s) {unknown}; the cell has {sorted(base)}")
        return {**base, **{k: v.to(dtype) for k, v in p.items()}}, x.to(dtype)

    return ParameterPath(wrapped, domain=domain, label=label, kind="custom")


# ----------------------------------------------------------------------------------- the system
def _analysis_copy(model: RecurrentModel, dtype) -> RecurrentModel:
    """The model itself, or a copy cast to ``dtype`` when it holds floating buffers of another dtype
    (a float32 cell with a float32 buffer would otherwise mix dtypes in float64 analysis)."""
    bufs = [b for b in model.buffers() if b.is_floating_point() and b.dtype != dtype]
    if not bufs:
        return model
    return copy.deepcopy(model).to(dtype)


class _System:
    """``g(z, s)``, its Jacobians, stability matrices and directional derivatives, in one dtype."""

    def __init__(self, model: RecurrentModel, path: ParameterPath, dtype, device):
        if not isinstance(model, RecurrentModel):
            raise TypeError(f"continuation needs a kpflow RecurrentModel, got {type(model).__name__}; wrap a cell "
                            "with kpflow.models.CellAdapter")
        self.model = _analysis_copy(model, dtype)
        self.path, self.dtype = path, dtype
        self.is_flow = bool(getattr(model, "is_flow", False))
        self.dt = float(getattr(model, "dt", 1.0))
        self.has_vf = self.is_flow and callable(getattr(self.model, "vector_field", None))
        self.H = model.state_dim
        p, x = path(torch.tensor(0.0, dtype=dtype) if path.domain[0] <= 0 <= path.domain[1]
                    else torch.tensor(float(path.domain[0]), dtype=dtype))
        self.device = next(iter(p.values())).device
        self.n_evals = 0
        self.n_jacobians = 0

    def s_tensor(self, s) -> torch.Tensor:
        return torch.as_tensor(s, dtype=self.dtype, device=self.device).reshape(())

    def g(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        p, x = self.path(s)
        if self.has_vf:
            return self.model.vector_field(p, z.unsqueeze(0), x.unsqueeze(0))[0]
        out = self.model.step(p, z.unsqueeze(0), x.unsqueeze(0))[0] - z
        return out / self.dt if self.is_flow else out

    def residual(self, u: torch.Tensor) -> torch.Tensor:
        self.n_evals += 1
        with torch.no_grad():
            r = self.g(u[:-1], u[-1])
        if not bool(torch.isfinite(r).all()):
            raise ContinuationError(
                f"the model is not defined at {self.path.label} = {float(u[-1]):.6g} (its map returned NaN/Inf at a "
                f"state of norm {float(u[:-1].norm()):.3g}): the parameter path leaves the model's domain there; "
                "restrict s_range to where the model is defined"
            )
        return r

    def jacobian(self, u: torch.Tensor) -> torch.Tensor:
        """``[g_z, g_s]`` at ``u``: ``[H, H + 1]``."""
        self.n_jacobians += 1
        z, s = u[:-1].detach(), u[-1].detach()
        # g_z by reverse mode over the state only (θ(s) evaluated once); g_s = ∂g/∂s by the double-backward
        # trick (the gradient of the linear map u ↦ ⟨u, g_s⟩: two reverse passes, no forward mode)
        gz = torch.func.jacrev(self.g_at(s))(z)
        with torch.enable_grad():
            s_ = s.clone().requires_grad_(True)
            y = self.g(z, s_)
            probe = torch.zeros_like(y, requires_grad=True)
            (ds,) = torch.autograd.grad(y, s_, grad_outputs=probe, create_graph=True, allow_unused=True)
            gs = torch.zeros_like(y) if ds is None else torch.autograd.grad(ds, probe, allow_unused=True)[0]
            gs = torch.zeros_like(y) if gs is None else gs.detach()
        J = torch.cat([gz, gs.reshape(-1, 1)], 1)
        if not bool(torch.isfinite(J).all()):
            raise ContinuationError(f"the Jacobian is not finite at {self.path.label} = {float(u[-1]):.6g}: the path "
                                    "leaves the model's domain there; restrict s_range")
        return J

    def stability_matrix(self, J: torch.Tensor) -> torch.Tensor:
        gz = J[:, :-1]
        return gz if self.is_flow else gz + torch.eye(self.H, dtype=gz.dtype, device=gz.device)

    def margins(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues sorted most unstable first, and their margins (positive = unstable)."""
        lam = torch.linalg.eigvals(self.stability_matrix(J))
        m = stability_margin(lam, self.is_flow)
        order = torch.argsort(m, descending=True)
        return lam[order], m[order]

    # multilinear forms of g in z at (z, s)
    def g_at(self, s: torch.Tensor):
        """``z ↦ g(z, s)`` with ``θ(s)``, ``x̄(s)`` evaluated once (for nested derivatives in ``z``)."""
        p, x = self.path(s)
        p = {k: v.detach() for k, v in p.items()}
        x = x.detach().unsqueeze(0)
        if self.has_vf:
            return lambda y: self.model.vector_field(p, y.unsqueeze(0), x)[0]
        if self.is_flow:
            return lambda y: (self.model.step(p, y.unsqueeze(0), x)[0] - y) / self.dt
        return lambda y: self.model.step(p, y.unsqueeze(0), x)[0] - y

    def forms(self, z, s, *dirs: torch.Tensor) -> torch.Tensor:
        """``D^k g(z)[d_1[i], ..., d_k[i]]`` for batches of real directions ``d_j`` ``[n, H]`` (one vmapped
        nested forward-mode pass): ``[n, H]``."""
        f = self.g_at(s)

        def along(*vs):
            h = f
            for v in vs:
                h = (lambda fun, w: (lambda y: torch.func.jvp(fun, (y,), (w,))[1]))(h, v)
            return h(z)

        return torch.func.vmap(along)(*[d.to(self.dtype) for d in dirs])

    def B(self, z, s, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``B(u, v) = D²g[u, v]`` for complex ``(u, v)`` pairs (real and imaginary parts by bilinearity)."""
        us, vs, idx = [], [], []
        for k, (u, v) in enumerate(pairs):
            for (ur, cu) in ((u.real, 1.0), (u.imag, 1j)) if u.is_complex() else ((u, 1.0),):
                for (vr, cv) in ((v.real, 1.0), (v.imag, 1j)) if v.is_complex() else ((v, 1.0),):
                    us.append(ur)
                    vs.append(vr)
                    idx.append((k, cu * cv))
        vals = self.forms(z, s, torch.stack(us), torch.stack(vs)).to(torch.complex128)
        out = torch.zeros(len(pairs), self.H, dtype=torch.complex128, device=vals.device)
        for row, (k, c) in enumerate(idx):
            out[k] += c * vals[row]
        return out

    def C_qqqbar(self, z, s, q: torch.Tensor) -> torch.Tensor:
        """``C(q, q, q̄) = C(a,a,a) + C(a,b,b) + i[C(a,a,b) + C(b,b,b)]`` for ``q = a + ib``."""
        a, b = q.real.to(self.dtype), q.imag.to(self.dtype)
        v = self.forms(z, s, torch.stack([a, a, a, b]), torch.stack([a, b, a, b]), torch.stack([a, b, b, b]))
        return (v[0] + v[1]).to(torch.complex128) + 1j * (v[2] + v[3]).to(torch.complex128)


# ------------------------------------------------------------------------------------- results
@dataclass
class SpecialPoint:
    """A located special point on a branch.

    Attributes:
        kind: ``saddle-node``, ``transcritical``, ``pitchfork``, ``flip``, ``neimark-sacker``, ``hopf`` or
            ``degenerate``; ``label`` the short name (LP, BP, PD, NS, H).
        s: parameter value; point: state ``[H]``; index: its position in the branch arrays.
        eigenvalue: the critical eigenvalue of the stability matrix; eigenvalues: all, most unstable first.
        right_vector, left_vector: critical ``q``, ``p`` with ``pᴴ q = 1``, ``‖q‖ = 1``.
        coefficients: normal-form coefficients (``a``, ``c``, ``d``, ``l1``, ``frequency``, ``p_gs``, ...).
        criticality: ``supercritical``/``subcritical`` where a cubic coefficient decides it, else None.
        change: ``gained instability`` or ``lost instability`` (going along the branch).
        n_crossing: eigenvalues that changed side; flags: e.g. ``simultaneous``.
    """

    kind: str
    s: float
    point: torch.Tensor
    index: int
    eigenvalue: complex
    eigenvalues: torch.Tensor
    right_vector: torch.Tensor
    left_vector: torch.Tensor
    coefficients: dict[str, float]
    criticality: str | None
    change: str
    n_crossing: int
    flags: list[str] = field(default_factory=list)
    branch: int = 0
    location_error: float = 0.0

    @property
    def label(self) -> str:
        return LABELS.get(self.kind, "?")

    def summary(self) -> dict:
        return {"kind": self.kind, "label": self.label, "s": self.s, "branch": self.branch,
                "eigenvalue_re": self.eigenvalue.real, "eigenvalue_im": self.eigenvalue.imag,
                "criticality": self.criticality, "change": self.change, "n_crossing": self.n_crossing,
                "flags": ",".join(self.flags), "norm": float(self.point.norm()),
                **{k: float(v) for k, v in self.coefficients.items()}}

    def __repr__(self) -> str:
        crit = f", {self.criticality}" if self.criticality else ""
        flags = f", flags={self.flags}" if self.flags else ""
        return f"SpecialPoint({self.label} {self.kind}{crit} at s = {self.s:.12g}, λ = {self.eigenvalue:.6g}{flags})"


@dataclass
class Branch:
    """One continued branch: arrays along the curve, ordered by arclength.

    ``s`` ``[N]``, ``points`` ``[N, H]``, ``eigenvalues`` ``[N, H]`` (complex, most unstable first),
    ``margins`` ``[N, H]``, ``unstable_dim`` ``[N]``, ``stable`` ``[N]`` (no eigenvalue beyond the
    boundary), ``arclength`` ``[N]``; ``special_points`` located on it; ``info``: why each end stopped,
    steps, Newton iterations.
    """

    s: torch.Tensor
    points: torch.Tensor
    eigenvalues: torch.Tensor
    margins: torch.Tensor
    unstable_dim: torch.Tensor
    arclength: torch.Tensor
    special_points: list[SpecialPoint]
    is_flow: bool
    info: dict = field(default_factory=dict)

    @property
    def stable(self) -> torch.Tensor:
        return self.unstable_dim == 0

    def __len__(self) -> int:
        return int(self.s.shape[0])

    def __repr__(self) -> str:
        return (f"Branch({len(self)} points, s in [{float(self.s.min()):.4g}, {float(self.s.max()):.4g}], "
                f"special points {[sp.label for sp in self.special_points]})")


@dataclass
class ContinuationResult:
    """Branches of fixed points along a parameter path, and every special point located on them."""

    branches: list[Branch]
    path: ParameterPath
    is_flow: bool
    info: dict = field(default_factory=dict)

    @property
    def special_points(self) -> list[SpecialPoint]:
        return sorted([sp for b in self.branches for sp in b.special_points], key=lambda p: (p.branch, p.s))

    def table(self) -> list[dict]:
        return [sp.summary() for sp in self.special_points]

    def to_dict(self) -> dict:
        """Plain data (JSON-ready): every branch's ``s``, ``norm``, ``unstable_dim`` and the special points."""
        return {
            "parameter": self.path.label, "path": self.path.kind, "is_flow": self.is_flow, "info": self.info,
            "branches": [{"s": b.s.tolist(), "norm": b.points.norm(dim=-1).tolist(),
                          "unstable_dim": b.unstable_dim.tolist(), "leading_margin": b.margins[:, 0].tolist(),
                          "info": b.info} for b in self.branches],
            "special_points": self.table(),
        }

    def __repr__(self) -> str:
        return f"ContinuationResult({len(self.branches)} branches, {[sp.label for sp in self.special_points]})"


# ------------------------------------------------------------------------------ linear algebra
def _tangent(J: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Unit null vector of ``J = [g_z, g_s]`` oriented along ``ref`` (bordered solve, SVD fallback)."""
    n = J.shape[1]
    M = torch.cat([J, ref.reshape(1, -1)], 0)
    rhs = torch.zeros(n, dtype=J.dtype, device=J.device)
    rhs[-1] = 1.0
    t, info = torch.linalg.solve_ex(M, rhs)
    if int(info) != 0 or not bool(torch.isfinite(t).all()) or float(t.norm()) > 1e12:
        t = torch.linalg.svd(J, full_matrices=True).Vh[-1]
    t = t / t.norm()
    return t if float(torch.dot(t, ref)) >= 0 else -t


def _correct(sys: _System, u_pred: torch.Tensor, d: torch.Tensor, tol: float, max_iter: int = 10,
             max_step: float | None = None, xtol: float = 1e-12):
    """Newton on ``g(u) = 0, dᵀ(u − u_pred) = 0`` (bordered Jacobian ``[[g_z, g_s], [dᵀ]]``).

    Converged when ``‖g‖ ≤ tol`` *and* the Newton step is at most ``xtol · (1 + ‖u‖)``: a small
    residual alone is not enough where ``g_z`` is nearly singular (beside a branch point a residual
    of 1e-11 allows an error ~ 1e-11/σ_min). Returns ``(u, iterations, [g_z, g_s] at u)``, or
    ``(None, iterations, None)`` on failure.
    """
    u = u_pred.clone()
    d = d / d.norm()
    for it in range(1, max_iter + 1):
        r = sys.residual(u)
        c = torch.dot(d, u - u_pred)
        J = sys.jacobian(u)
        M = torch.cat([J, d.reshape(1, -1)], 0)
        rhs = -torch.cat([r, c.reshape(1)])
        delta, info = torch.linalg.solve_ex(M, rhs)
        if int(info) != 0 or not bool(torch.isfinite(delta).all()):
            delta = torch.linalg.pinv(M) @ rhs
        dn = float(delta.norm())
        if float(r.norm()) <= tol and abs(float(c)) <= tol and dn <= xtol * (1.0 + float(u.norm())):
            return u + delta, it, J
        if max_step is not None and dn > max_step:
            delta = delta * (max_step / dn)
        u = u + delta
        if not bool(torch.isfinite(u).all()):
            return None, it, None
    return None, max_iter, None


# ------------------------------------------------------------------------------ special points
def _classify(sys: _System, u: torch.Tensor, J: torch.Tensor, zero_tol: float, imag_tol: float = 1e-6):
    """Kind, critical eigenvalue, eigenvalues (sorted), q, p, coefficients, criticality, n_near."""
    z, s = u[:-1].detach(), u[-1].detach()
    S = sys.stability_matrix(J)
    gz, gs = J[:, :-1], J[:, -1]
    H = sys.H
    lam, R, L = eig_with_left(S)
    m = stability_margin(lam, sys.is_flow)
    order = torch.argsort(m, descending=True)
    lam, R, L, m = lam[order], R[:, order], L[:, order], m[order]
    i = int(torch.argmin(m.abs()))
    lam_c = complex(lam[i])
    n_near = int((m.abs() <= max(1e-6, 10 * abs(float(m[i])))).sum())
    q, p = R[:, i], L[:, i]
    coeffs: dict[str, float] = {"margin": float(m[i])}
    eye = torch.eye(H, dtype=torch.complex128, device=J.device)
    Sc = S.to(torch.complex128)
    if abs(lam_c.imag) > imag_tol * max(1.0, abs(lam_c)):
        # complex pair: make Im λ > 0 the representative
        if lam_c.imag < 0:
            q, p, lam_c = q.conj(), p.conj(), lam_c.conjugate()
        qb = q.conj()
        Bqq, Bqqb = sys.B(z, s, [(q, q), (q, qb)])
        Cqqqb = sys.C_qqqbar(z, s, q)

        def ip(v):  # ⟨p, v⟩ = pᴴ v
            return complex(torch.dot(p.conj(), v))

        if sys.is_flow:
            w = abs(lam_c.imag)
            h11 = torch.linalg.solve(Sc, Bqqb)
            h20 = torch.linalg.solve(2j * w * eye - Sc, Bqq)
            B1, B2 = sys.B(z, s, [(q, h11), (qb, h20)])
            val = ip(Cqqqb) - 2 * ip(B1) + ip(B2)
            l1 = val.real / (2 * w)
            coeffs.update({"l1": l1, "frequency": w})
            return "hopf", lam_c, lam, q, p, coeffs, ("supercritical" if l1 < 0 else "subcritical"), n_near
        theta = math.atan2(lam_c.imag, lam_c.real)
        e2 = complex(math.cos(2 * theta), math.sin(2 * theta))
        h11 = torch.linalg.solve(eye - Sc, Bqqb)
        h20 = torch.linalg.solve(e2 * eye - Sc, Bqq)
        B1, B2 = sys.B(z, s, [(q, h11), (qb, h20)])
        val = ip(Cqqqb) + 2 * ip(B1) + ip(B2)
        d = 0.5 * (complex(math.cos(theta), -math.sin(theta)) * val).real
        coeffs.update({"d": d, "frequency": abs(theta)})
        return "neimark-sacker", lam_c, lam, q, p, coeffs, ("supercritical" if d < 0 else "subcritical"), n_near
    qr = q.real / q.real.norm()
    pr = p.real / torch.dot(p.real, qr)
    B = sys.forms(z, s, qr[None], qr[None])[0]
    C = sys.forms(z, s, qr[None], qr[None], qr[None])[0]
    if not sys.is_flow and lam_c.real < 0:  # λ = −1
        w = torch.linalg.solve(-gz, B)
        c = float(torch.dot(pr, C + 3 * sys.forms(z, s, qr[None], w[None])[0])) / 6.0
        coeffs["c"] = c
        return "flip", lam_c, lam, qr, pr, coeffs, ("supercritical" if c > 0 else "subcritical"), n_near
    p_gs = float(torch.dot(pr, gs))
    gs_rel = abs(p_gs) / (float(pr.norm()) * float(gs.norm())) if float(gs.norm()) > 1e-300 else 0.0
    a = 0.5 * float(torch.dot(pr, B))
    scale_a = float(pr.norm()) * (float(B.norm()) + float(C.norm()))
    a_rel = abs(a) / scale_a if scale_a > 1e-300 else 0.0
    coeffs.update({"a": a, "p_gs": p_gs, "p_gs_rel": gs_rel, "a_rel": a_rel})
    if gs_rel > zero_tol:
        return "saddle-node", lam_c, lam, qr, pr, coeffs, None, n_near
    if a_rel > zero_tol:
        return "transcritical", lam_c, lam, qr, pr, coeffs, None, n_near
    rhs = -(B - 2 * a * qr)
    w = torch.linalg.lstsq(gz.unsqueeze(0), rhs.reshape(1, -1, 1)).solution.reshape(-1) \
        if gz.device.type == "cpu" else torch.linalg.pinv(gz) @ rhs
    w = w - torch.dot(pr, w) * qr
    c = float(torch.dot(pr, C + 3 * sys.forms(z, s, qr[None], w[None])[0])) / 6.0
    coeffs["c"] = c
    if abs(c) <= zero_tol * float(pr.norm()) * (float(C.norm()) + 1e-300) or abs(c) < 1e-14:
        return "degenerate", lam_c, lam, qr, pr, coeffs, None, n_near
    return "pitchfork", lam_c, lam, qr, pr, coeffs, ("supercritical" if c < 0 else "subcritical"), n_near


def _hermite(ua, ta, ub, tb, tau: float) -> torch.Tensor:
    L = float((ub - ua).norm())
    t2, t3 = tau * tau, tau * tau * tau
    return ((2 * t3 - 3 * t2 + 1) * ua + (t3 - 2 * t2 + tau) * L * ta + (-2 * t3 + 3 * t2) * ub
            + (t3 - t2) * L * tb)


def _locate(sys: _System, ua, Ja, ma, ub, Jb, mb, k: int, tol: float, u_tol: float, max_iter: int = 80):
    """Zero of ``ψ(u) = margins[k]`` on the branch between ``ua`` and ``ub`` (opposite signs).

    Secant (Illinois) steps inside the bracket, bisection every third step; every trial point is
    predicted by the cubic Hermite interpolant of the bracket's end points and tangents (error
    ``O(L⁴)`` in the bracket length ``L``), corrected on the hyperplane orthogonal to the chord with
    Newton steps capped by ``L``, and rejected if it moved more than ``L/2`` (no branch jumping).
    Points very near a branch point are ill-conditioned (``g_z`` has a singular value ~ their
    distance ``δ``, so round-off moves them by ``~eps/δ``); the returned point is therefore the
    Hermite interpolant, at the located parameter value, of two branch points corrected at distance
    ``δ = 1e-3 (1 + ‖u‖)`` on either side (error ``O(δ⁴)``). Returns ``(u, [g_z, g_s] at u, final bracket length)``.
    """
    lo, flo, tlo = ua, float(ma[k]), _tangent(Ja, ub - ua)
    hi, fhi, thi = ub, float(mb[k]), _tangent(Jb, ub - ua)
    Jlo, Jhi = Ja, Jb
    anchor_len = 1e-3 * (1.0 + float(ua.norm()))
    wide_chord = ub - ua
    it = 0
    side = 0
    while it < max_iter:
        it += 1
        chord = hi - lo
        L = float(chord.norm())
        if L >= 10 * anchor_len:
            wide_chord = chord
        if L <= u_tol * (1.0 + float(lo.norm())):
            break
        tau = 0.5 if (it % 3 == 0 or flo == fhi) else min(max(flo / (flo - fhi), 0.02), 0.98)
        u = None
        for tau_try in ((tau, 0.5) if tau != 0.5 else (0.5,)):
            u_pred = _hermite(lo, tlo, hi, thi, tau_try)
            u, _, J = _correct(sys, u_pred, chord, tol, max_iter=40, max_step=L)
            if u is not None and float((u - u_pred).norm()) <= 0.5 * L:
                break
            u = None
        if u is None:
            break
        _, m = sys.margins(J)
        f = float(m[k])
        if abs(f) <= 1e-14:  # on the special point (where the tangent is ambiguous at a branch point)
            lo = hi = u
            Jlo = Jhi = J
            break
        t = _tangent(J, chord)
        if float(torch.dot(t, chord)) < 0.7 * L:  # beside a branch point the kernel is nearly 2-D
            t = chord / L
        if (f > 0) == (flo > 0):
            lo, flo, tlo, Jlo = u, f, t, J
            if side == -1:  # Illinois: the other end stayed twice
                fhi *= 0.5
            side = -1
        else:
            hi, fhi, thi, Jhi = u, f, t, J
            if side == 1:
                flo *= 0.5
            side = 1
    best, Jbest = (lo, Jlo) if abs(flo) <= abs(fhi) else (hi, Jhi)
    # re-derive the point from two well-conditioned branch points at distance ~anchor on either side
    d = wide_chord / wide_chord.norm()  # a direction not swamped by the points' own errors
    dist = anchor_len
    ends = []
    for sign in (-1.0, 1.0):
        pred = best + sign * dist * d
        u, _, J = _correct(sys, pred, d, tol, max_iter=40, max_step=dist)
        if u is None or float((u - pred).norm()) > 0.5 * dist:
            break
        ends.append((u, _tangent(J, d)))
    if len(ends) == 2:
        (a0, ta), (a1, tb) = ends
        s_star = float(best[-1])
        ts = [0.5, 0.5 + 1e-3]
        hs = [float(_hermite(a0, ta, a1, tb, t)[-1]) - s_star for t in ts]
        for _ in range(8):  # secant on the interpolant's s-coordinate (skipped where the branch is vertical)
            if hs[-1] == hs[-2] or abs(hs[-1]) <= 1e-16 * (1.0 + abs(s_star)):
                break
            ts.append(ts[-1] - hs[-1] * (ts[-1] - ts[-2]) / (hs[-1] - hs[-2]))
            hs.append(float(_hermite(a0, ta, a1, tb, ts[-1])[-1]) - s_star)
        tau = ts[-1] if (abs(hs[-1]) < 1e-13 * (1.0 + abs(s_star)) and 0.25 <= ts[-1] <= 0.75) else 0.5
        u_h = _hermite(a0, ta, a1, tb, tau)
        if float((u_h - best).norm()) <= 0.1 * dist:
            best, Jbest = u_h, sys.jacobian(u_h)
    return best, Jbest, float((hi - lo).norm())


def _special_point(sys: _System, u, J, n_before: int, n_after: int, zero_tol: float, err: float) -> SpecialPoint:
    kind, lam_c, lam, q, p, coeffs, crit, n_near = _classify(sys, u, J, zero_tol)
    n_cross = abs(n_after - n_before)
    expected = 2 if kind in ("neimark-sacker", "hopf") else 1
    flags = []
    if n_cross > expected or n_near > expected:
        flags.append("simultaneous")
    change = "gained instability" if n_after > n_before else "lost instability"
    return SpecialPoint(kind, float(u[-1]), u[:-1].detach().clone(), -1, lam_c, lam, q, p, coeffs, crit, change,
                        n_cross, flags, location_error=err)


# --------------------------------------------------------------------------------- one direction
@dataclass
class _Half:
    us: list[torch.Tensor]
    lams: list[torch.Tensor]
    margins: list[torch.Tensor]
    specials: list[tuple[int, SpecialPoint]]  # (position in us, point)
    reason: str
    steps: int
    newton: int
    rejected: int
    bps: list[tuple[SpecialPoint, torch.Tensor, torch.Tensor]]  # (point, u, tangent) for branch switching


def _march(sys: _System, u0: torch.Tensor, t0: torch.Tensor, s_lo: float, s_hi: float, opts: dict,
           progress=None) -> _Half:
    """Follow the branch from ``u0`` along ``t0`` until ``s`` leaves ``[s_lo, s_hi]`` or it stops."""
    tol, zero_tol = opts["newton_tol"], opts["zero_tol"]
    h, ds_min, ds_max = opts["ds"], opts["ds_min"], opts["ds_max"]
    J = sys.jacobian(u0)
    t = _tangent(J, t0)
    lam, m = sys.margins(J)
    us, lams, ms = [u0], [lam], [m]
    n = int((m > 0).sum())
    specials: list[tuple[int, SpecialPoint]] = []
    bps = []
    steps = newton = rejected = 0
    reason = "max_steps"
    u = u0
    while steps < opts["max_steps"]:
        u_pred = u + h * t
        u_new, its, J_new = _correct(sys, u_pred, t, tol, max_iter=opts["max_newton"], max_step=max(h, 1e-300) * 2)
        newton += its
        ok = u_new is not None and float((u_new - u_pred).norm()) <= h
        if ok:
            t_new = _tangent(J_new, t)
            ok = float(torch.dot(t_new, t)) >= math.cos(opts["max_turn"])
        if not ok:
            rejected += 1
            h *= 0.5
            if h < ds_min:
                reason = (f"step size fell below ds_min = {ds_min:g} at {sys.path.label} = {float(u[-1]):.6g} "
                          "(the corrector kept failing: a singular point, or the path leaves the model's domain)")
                break
            continue
        steps += 1
        s_new = float(u_new[-1])
        boundary = None
        if s_new > s_hi or s_new < s_lo:
            boundary = s_hi if s_new > s_hi else s_lo
            # the point on the branch at s = boundary (hyperplane s = boundary)
            frac = (boundary - float(u[-1])) / (s_new - float(u[-1]))
            e_s = torch.zeros_like(u)
            e_s[-1] = 1.0
            u_b, _, J_b = _correct(sys, u + frac * (u_new - u), e_s, tol, max_iter=opts["max_newton"],
                                   max_step=float((u_new - u).norm()))
            if u_b is None:
                reason = f"reached {sys.path.label} = {boundary:g} (end point not refined)"
                break
            u_new, J_new = u_b, J_b
            t_new = _tangent(J_new, t)
        lam_new, m_new = sys.margins(J_new)
        n_new = int((m_new > 0).sum())
        if n_new != n and opts["locate"]:
            k = min(n, n_new)
            u_sp, J_sp, err = _locate(sys, u, J, m, u_new, J_new, m_new, k, tol, opts["u_tol"])
            sp = _special_point(sys, u_sp, J_sp, n, n_new, zero_tol, err)
            lam_sp, m_sp = sys.margins(J_sp)
            us.append(u_sp)
            lams.append(lam_sp)
            ms.append(m_sp)
            specials.append((len(us) - 1, sp))
            if sp.kind in ("transcritical", "pitchfork", "degenerate"):
                chord = u_new - u  # the old branch's direction (its tangent is ambiguous at the branch point)
                bps.append((sp, u_sp, chord / chord.norm()))
        us.append(u_new)
        lams.append(lam_new)
        ms.append(m_new)
        if progress is not None:
            progress.update(1)
        u, t, n, m, J = u_new, t_new, n_new, m_new, J_new
        if boundary is not None:
            reason = f"reached {sys.path.label} = {boundary:g}"
            break
        if float(u[:-1].norm()) > opts["max_norm"]:
            reason = f"state norm exceeded max_norm = {opts['max_norm']:g} (the branch runs off to infinity)"
            break
        if its <= 3:
            h = min(h * 1.3, ds_max)
    return _Half(us, lams, ms, specials, reason, steps, newton, rejected, bps)


def _assemble(sys: _System, back: _Half | None, fwd: _Half, branch_id: int) -> Branch:
    us, lams, ms, specials = [], [], [], []
    if back is not None:
        nb = len(back.us)
        us += back.us[::-1][:-1]
        lams += back.lams[::-1][:-1]
        ms += back.margins[::-1][:-1]
        for pos, sp in back.specials:
            sp.index = nb - 1 - pos
            sp.change = {"gained instability": "lost instability",
                         "lost instability": "gained instability"}[sp.change]
            specials.append(sp)
    off = len(us)
    us += fwd.us
    lams += fwd.lams
    ms += fwd.margins
    for pos, sp in fwd.specials:
        sp.index = off + pos
        specials.append(sp)
    U = torch.stack(us)
    arclength = torch.cat([U.new_zeros(1), (U[1:] - U[:-1]).norm(dim=-1).cumsum(0)])
    M = torch.stack(ms)
    for sp in specials:
        sp.branch = branch_id
    info = {"end_forward": fwd.reason, "end_backward": back.reason if back is not None else None,
            "steps": fwd.steps + (back.steps if back else 0),
            "newton_iterations": fwd.newton + (back.newton if back else 0),
            "rejected_steps": fwd.rejected + (back.rejected if back else 0)}
    return Branch(U[:, -1].clone(), U[:, :-1].clone(), torch.stack(lams), M, (M > 0).sum(-1), arclength,
                  sorted(specials, key=lambda p: p.index), sys.is_flow, info)


def _on_branch(b: Branch, u: torch.Tensor, tol: float) -> bool:
    pts = torch.cat([b.points, b.s.unsqueeze(-1)], -1)
    if pts.shape[0] < 2:
        return bool(((pts - u).norm(dim=-1) <= tol).any())
    a, c = pts[:-1], pts[1:]
    d = c - a
    tau = (((u - a) * d).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-300)).clamp(0, 1)
    dist = (a + tau.unsqueeze(-1) * d - u).norm(dim=-1)
    return bool((dist <= tol).any())


# ------------------------------------------------------------------------------------ public API
def continue_fixed_points(
    model: RecurrentModel,
    path: ParameterPath,
    start: torch.Tensor | None = None,
    *,
    s_start: float,
    s_range: tuple[float, float],
    direction: str = "both",
    initial_states: torch.Tensor | None = None,
    search_kwargs: dict | None = None,
    ds: float = 0.02,
    ds_min: float = 1e-7,
    ds_max: float = 0.1,
    max_steps: int = 400,
    max_newton: int = 8,
    max_turn: float = 0.5,
    newton_tol: float = 1e-11,
    zero_tol: float = 1e-6,
    u_tol: float = 1e-13,
    start_radius: float | None = None,
    max_norm: float = 1e6,
    locate: bool = True,
    switch_branches: bool = False,
    max_branches: int = 8,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> ContinuationResult:
    """Follow fixed points of ``model`` along ``path`` from ``s_start`` (pseudo-arclength continuation).

    Args:
        model: a kpflow ``RecurrentModel`` (maps and flows).
        path: ``θ(s)`` and ``x̄(s)`` (``input_path``, ``interpolation_path``, ``gain_path``,
            ``parameter_path``, ``custom_path``).
        start: a state ``[H]`` (or ``[N, H]``, one branch each) near a fixed point at ``s_start``;
            when omitted, ``find_fixed_points`` at ``s_start`` (from ``initial_states``, with
            ``search_kwargs``) supplies the starts and every branch through them is followed.
        s_start: parameter value of the start. s_range: ``(s_min, s_max)``, inside ``path.domain``.
        direction: ``both``, ``forward`` (increasing ``s`` first) or ``backward``.
        ds, ds_min, ds_max: initial, smallest and largest arclength step; max_steps: per direction.
        max_newton, newton_tol: corrector iterations and residual tolerance ``‖g‖`` (float64).
        max_turn: largest angle (radians) between consecutive tangents before the step is halved.
        zero_tol: relative size under which a normal-form coefficient counts as zero.
        u_tol: relative length of the final bracket when locating a special point.
        start_radius: the corrected start may lie at most this far from ``start`` (default
            ``0.1 · max(1, ‖start‖)``), so that a start far from a fixed point is an error, not a
            silent jump to another branch.
        max_norm: a branch stops when ``‖z‖`` exceeds it.
        locate: locate and classify special points; switch_branches: follow the second branch at
            every branch point (at most ``max_branches`` branches in all).

    Returns:
        ``ContinuationResult`` with the branches and their special points.

    Raises:
        ValueError: ``s_start``/``s_range`` outside the path's domain, or bad shapes.
        ContinuationError: the start is not near a fixed point, the Jacobian is singular there (the
            fixed points are not isolated), or the path leaves the model's domain.
    """
    s_lo, s_hi = float(s_range[0]), float(s_range[1])
    if not s_lo < s_hi:
        raise ValueError(f"s_range must be (s_min, s_max) with s_min < s_max, got {s_range}")
    path.check(s_lo)
    path.check(s_hi)
    if not s_lo <= float(s_start) <= s_hi:
        raise ValueError(f"s_start = {s_start:g} is outside s_range = [{s_lo:g}, {s_hi:g}]")
    if direction not in ("both", "forward", "backward"):
        raise ValueError(f"direction must be 'both', 'forward' or 'backward', got {direction!r}")
    for name, v in (("ds", ds), ("ds_min", ds_min), ("ds_max", ds_max)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")
    sys = _System(model, path, dtype, None)
    H = sys.H
    s0 = float(s_start)
    if start is None:
        from .fixedpoints import ConstantInputMap, find_fixed_points

        p0, x0 = path(sys.s_tensor(s0))
        fmap = ConstantInputMap(sys.model, {k: v.detach() for k, v in p0.items()}, x0.detach(), sys.is_flow, sys.dt)
        kw = {"n_starts": 64 if initial_states is None else max(64, torch.as_tensor(initial_states).numel() // H),
              "allow_empty": True, **(search_kwargs or {})}
        fps = find_fixed_points(sys.model, initial_states=initial_states, fmap=fmap, **kw)
        if len(fps) == 0:
            raise ContinuationError(f"no fixed point found at {path.label} = {s0:g} to start from; pass start=...")
        starts = fps.points
    else:
        starts = torch.as_tensor(start).detach().to(dtype=dtype, device=sys.device)
        if starts.shape[-1] != H:
            raise ValueError(f"start must end in the state size H = {H}, got shape {tuple(starts.shape)}")
        starts = starts.reshape(-1, H)
    opts = dict(newton_tol=newton_tol, zero_tol=zero_tol, ds=ds, ds_min=ds_min, ds_max=ds_max, max_steps=max_steps,
                max_newton=max_newton, max_turn=max_turn, u_tol=u_tol, max_norm=max_norm, locate=locate)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="continuation steps", leave=False)
    e_s = torch.zeros(H + 1, dtype=dtype, device=sys.device)
    e_s[-1] = 1.0
    branches: list[Branch] = []
    queue: list[tuple[torch.Tensor, torch.Tensor | None, str]] = []
    for z in starts:
        u_guess = torch.cat([z, sys.s_tensor(s0).reshape(1)])
        radius = 0.1 * max(1.0, float(z.norm())) if start_radius is None else float(start_radius)
        u0 = _start_point(sys, u_guess, e_s, newton_tol, radius, max_newton)
        queue.append((u0, None, "start"))
    while queue and len(branches) < max_branches:
        u0, t_ref, origin = queue.pop(0)
        tol_on = 1e-6 * max(1.0, float(u0.norm()))
        if any(_on_branch(b, u0, tol_on) for b in branches):
            continue
        if t_ref is None:
            J0 = sys.jacobian(u0)
            _check_regular(sys, J0, u0)
            fwd = bwd = None
            if direction in ("both", "forward"):
                fwd = _march(sys, u0, _tangent(J0, e_s), s_lo, s_hi, opts, bar)
            if direction in ("both", "backward"):
                bwd = _march(sys, u0, _tangent(J0, -e_s), s_lo, s_hi, opts, bar)
            if fwd is None:
                fwd, bwd = bwd, None
            halves = [fwd] + ([bwd] if bwd is not None else [])
            br = _assemble(sys, bwd, fwd, len(branches))
        else:
            fwd = _march(sys, u0, t_ref, s_lo, s_hi, opts, bar)
            halves = [fwd]
            br = _assemble(sys, None, fwd, len(branches))
        br.info["origin"] = origin
        branches.append(br)
        if switch_branches:
            for half in halves:
                for sp, u_bp, t_bp in half.bps:
                    for u_new, t_new in _branch_switch(sys, u_bp, t_bp, opts):
                        queue.append((u_new, t_new, f"branch point at {path.label} = {sp.s:.6g}"))
    if bar is not None:
        bar.close()
    info = {"n_residuals": sys.n_evals, "n_jacobians": sys.n_jacobians, "s_range": (s_lo, s_hi)}
    return ContinuationResult(branches, path, sys.is_flow, info)


def _start_point(sys: _System, u_guess, e_s, tol, radius, max_newton) -> torch.Tensor:
    u, _, _ = _correct(sys, u_guess, e_s, tol, max_iter=max(max_newton, 30), max_step=radius)
    s = float(u_guess[-1])
    r0 = float(sys.residual(u_guess).norm())
    if u is None:
        raise ContinuationError(
            f"the start is not near a fixed point at {sys.path.label} = {s:g}: Newton (steps capped at "
            f"start_radius = {radius:g}) did not converge from it (initial residual ‖g‖ = {r0:.3g}). Start from a "
            "fixed point (e.g. find_fixed_points(...).points[i]) or raise start_radius; a singular Jacobian there "
            "(a fold or a non-isolated fixed point) also stops Newton at fixed s"
        )
    moved = float((u - u_guess).norm())
    if moved > radius:
        raise ContinuationError(
            f"the start is not near a fixed point at {sys.path.label} = {s:g}: the nearest one Newton reached is "
            f"{moved:.3g} away (start_radius = {radius:g}); it may belong to another branch. Start closer."
        )
    return u


def _check_regular(sys: _System, J: torch.Tensor, u: torch.Tensor) -> None:
    sv = torch.linalg.svdvals(J)
    if sv.numel() and float(sv[-1]) <= 1e-10 * max(float(sv[0]), 1e-300):
        raise ContinuationError(
            f"singular Jacobian at the start ({sys.path.label} = {float(u[-1]):.6g}): [∂g/∂z, ∂g/∂s] has rank "
            f"< H = {sys.H} (smallest singular value {float(sv[-1]):.3g}, largest {float(sv[0]):.3g}), so the fixed "
            "points there are not isolated on a curve (a branch point, or a line/plane of fixed points). Start at "
            "another parameter value or another point."
        )


def _branch_switch(sys: _System, u_bp: torch.Tensor, t_bp: torch.Tensor, opts: dict):
    """Starts on the second branch at a branch point: along the kernel direction ⊥ the old tangent."""
    J = sys.jacobian(u_bp)
    Vh = torch.linalg.svd(J, full_matrices=True).Vh
    V2 = Vh[-2:].T  # [H+1, 2]: the (numerical) 2-D kernel at a simple branch point
    coef = V2.T @ t_bp
    phi = V2 @ torch.stack([-coef[1], coef[0]])
    phi = phi / phi.norm()
    out = []
    h = max(opts["ds"], 1e-4)
    for sign in (1.0, -1.0):
        d = sign * phi
        u, _, _ = _correct(sys, u_bp + h * d, d, opts["newton_tol"], max_iter=opts["max_newton"] * 2, max_step=h)
        if u is not None and float((u - u_bp).norm()) > 0.5 * h:
            out.append((u, d))
    return out


# --------------------------------------------------------------------- learning along the branch
def learning_along_branch(model: RecurrentModel, result: ContinuationResult, branch: int = 0,
                          indices: Sequence[int] | None = None, *, n_points: int = 8, T: int = 20, batch: int = 1,
                          noise: float = 0.0, probes: int = 16, seed: int = 0, param_names=None,
                          progress: bool = False) -> list[dict]:
    """sNTK, K and P summaries of short runs started on a branch, against the distance to its special points.

    At each chosen branch point the model with ``θ(s)`` is run for ``T`` steps under the constant
    input ``x̄(s)`` from ``z*(s)`` (plus Gaussian ``noise`` per trial), then, through
    ``kpflow.kernels`` and the one-sided estimators of ``kpflow.estimators`` (``probes`` probes,
    seeded): ``tr Θ`` and ``erank Θ`` from ``J = P Jθ``, ``tr K`` from ``Jθ``, ``‖P‖_F² = tr PP*``
    from ``P``. ``distance`` is ``|s − s*|`` to the nearest special point on the branch and
    ``margin`` the leading stability margin there (amplification grows as it approaches 0).
    Returns one dict per point.
    """
    from kpflow.estimators import onesided_statistics
    from kpflow.kernels import param_jacobian, propagator, record, state_jacobian

    br = result.branches[branch]
    N = len(br)
    if indices is None:
        indices = sorted(set(torch.linspace(0, N - 1, min(n_points, N)).round().long().tolist())
                         | {sp.index for sp in br.special_points})
    dtype = br.points.dtype
    work = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    it = indices
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(indices, desc="learning operators along the branch", leave=False)
    for i in it:
        s = br.s[i]
        p, x = result.path(s.to(dtype))
        p = {k: v.detach() for k, v in p.items()}
        z0 = br.points[i].reshape(1, -1).expand(batch, -1).clone()
        if noise > 0:
            z0 = z0 + noise * torch.randn(z0.shape, generator=g, dtype=dtype).to(z0.device)
        inputs = x.detach().reshape(1, 1, -1).expand(batch, T, -1).contiguous()
        traj = record(work, inputs, z0=z0, params=p, param_names=param_names)
        st = onesided_statistics(state_jacobian(traj), probes, seed=seed)
        k = onesided_statistics(param_jacobian(traj), probes, seed=seed)
        pp = onesided_statistics(propagator(traj), probes, seed=seed)
        sps = br.special_points
        dist = min((abs(float(s) - sp.s) for sp in sps), default=math.nan)
        rows.append({"index": int(i), "s": float(s), "distance": dist, "margin": float(br.margins[i, 0]),
                     "stable": bool(br.unstable_dim[i] == 0),
                     "ntk_trace": float(st.trace.value), "ntk_trace_se": float(st.trace.stderr),
                     "ntk_erank": float(st.effective_rank.value), "ntk_erank_se": float(st.effective_rank.stderr),
                     "K_trace": float(k.trace.value), "K_trace_se": float(k.trace.stderr),
                     "P_fro_sq": float(pp.trace.value), "P_fro_sq_se": float(pp.trace.stderr)})
    return rows
