"""Fixed points and slow points of a recurrent model under a constant input.

A fixed point of the map ``z ↦ F(z, x̄; θ)`` solves ``F(z*, x̄) = z*``. Following Sussillo & Barak
(2013, *Neural Computation* 25:626) we minimise the speed ``q(z) = ½‖F(z, x̄) − z‖²`` from many
starts (Adam, all starts at once), then polish every candidate with Newton's method in float64,
``(A − I) δ = −(F(z) − z)`` with ``A = ∂F/∂z`` (damped, with backtracking), de-duplicate, drop
distance outliers and classify each point from the spectrum of its Jacobian:

* maps (``model.is_flow`` False): an eigenvalue is unstable when ``|λ| > 1``;
* flows (``model.is_flow`` True, ``F`` is the ``dt`` step of ``ż = f(z)``): the spectrum is that of
  ``∂f/∂z`` and an eigenvalue is unstable when ``Re λ > 0``. ``∂f/∂z`` is the Jacobian of the model's
  ``vector_field(params, z, x)`` when it has one (neural ODEs with any integrator, leaky RNNs): exact,
  whatever the step (reading an RK4 step as ``(A − I)/dt`` is only first-order accurate and moves a
  Hopf point by ``dt·ω²/2``). A flow known only through its step is read as an Euler step,
  ``(A − I)/dt``.

Newton is run until the residual is below tolerance *and* the last step is negligible (or the
residual stops decreasing), so points at a double root (a fold or a pitchfork at its parameter
value, where Newton converges only linearly) are resolved instead of left ~√tol away. Two
candidates are one fixed point when they are within ``unique_tol`` or when the segment between them
consists of accepted fixed points (the acceptance test cannot tell them apart): a line of fixed
points (an eigenvalue exactly at the boundary) comes back as one ``marginal`` point, with
``info["merged"]`` counting the starts it absorbed.

Points whose speed stays above the fixed-point tolerance but below ``slow_q`` are *slow points*
(kept only on request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kpflow.models.base import RecurrentModel

__all__ = [
    "ConstantInputMap",
    "FixedPoints",
    "NoFixedPointError",
    "classify_spectrum",
    "constant_input_map",
    "eig_with_left",
    "find_fixed_points",
    "newton_polish",
    "stability_margin",
]


class NoFixedPointError(RuntimeError):
    """Raised when no start converged to a fixed (or slow) point."""


# ------------------------------------------------------------------------------------------ the map
@dataclass
class ConstantInputMap:
    """``z ↦ F(z, x̄; θ)`` for one model, one parameter set and one constant input, in one dtype.

    ``__call__`` takes ``[N, H]`` states. ``is_flow``/``dt`` say how to read its spectrum.
    """

    model: RecurrentModel
    params: dict[str, torch.Tensor]
    x_bar: torch.Tensor
    is_flow: bool
    dt: float

    @property
    def state_dim(self) -> int:
        return self.model.state_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.x_bar.dtype

    @property
    def device(self) -> torch.device:
        return self.x_bar.device

    def __call__(self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        p = self.params if params is None else params
        x = self.x_bar.expand(z.shape[0], -1)
        return self.model.step(p, z, x)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``F(z) − z`` on ``[N, H]``."""
        return self(z) - z

    def speed(self, z: torch.Tensor) -> torch.Tensor:
        """``q(z) = ½‖F(z) − z‖²`` per row, ``[N]``."""
        return 0.5 * self.residual(z).pow(2).sum(-1)

    def jacobians(self, z: torch.Tensor) -> torch.Tensor:
        """``A = ∂F/∂z`` at every row of ``z``: ``[N, H, H]`` (rows are independent, so one
        reverse-mode Jacobian of ``Σ_n F(z_n)`` gives all of them)."""
        z = z.detach()
        J = torch.func.jacrev(lambda Z: self(Z).sum(0))(z)  # [H_out, N, H_in]
        return J.permute(1, 0, 2).contiguous()

    def vector_field(self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``f(z)`` of a flow on ``[N, H]``: the model's ``vector_field`` or, without one, ``(F(z) − z)/dt``."""
        p = self.params if params is None else params
        vf = getattr(self.model, "vector_field", None)
        if callable(vf):
            return vf(p, z, self.x_bar.expand(z.shape[0], -1))
        return (self(z, p) - z) / self.dt

    def stability_matrices(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, H, H]``: ``A = ∂F/∂z`` for maps; ``∂f/∂z`` for flows (exact from ``vector_field`` when
        the model has one, else ``(A − I)/dt``)."""
        if not self.is_flow:
            return self.jacobians(z)
        if callable(getattr(self.model, "vector_field", None)):
            z = z.detach()
            J = torch.func.jacrev(lambda Z: self.vector_field(Z).sum(0))(z)
            return J.permute(1, 0, 2).contiguous()
        A = self.jacobians(z)
        return (A - torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)) / self.dt

    def with_params(self, params: Mapping[str, torch.Tensor]) -> ConstantInputMap:
        return ConstantInputMap(self.model, _cast_params(params, self.dtype, self.device), self.x_bar,
                                self.is_flow, self.dt)


def _cast_params(params: Mapping[str, torch.Tensor], dtype, device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype=dtype, device=device) for k, v in params.items()}


def constant_input_map(
    model,
    x_bar: torch.Tensor | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> ConstantInputMap:
    """The autonomous map ``z ↦ F(z, x̄; θ)`` of a kpflow model under the constant input ``x̄``.

    Args:
        model: a ``kpflow.models.RecurrentModel`` (anything with a pure ``step(params, z, x)``).
        x_bar: the constant input, shape ``[input_dim]``; zeros when omitted.
        params: cell parameters (``model.cell_params()`` when omitted; a ``state_dict`` with
            ``cell.``-prefixed keys is accepted too).
        dtype, device: where the map is evaluated (float64 by default, for Newton and spectra).
    """
    if not isinstance(model, RecurrentModel):
        raise TypeError(
            f"fixed points need a kpflow RecurrentModel with a pure step(params, z_prev, x_t); got "
            f"{type(model).__name__}, which has no notion of a constant input. Wrap your cell with "
            "kpflow.models.CellAdapter (or subclass kpflow.models.RecurrentModel) first."
        )
    if getattr(model, "has_constant_input", True) is False:
        raise TypeError(
            f"{type(model).__name__} declares has_constant_input=False: its step depends on more than "
            "(state, input), so a fixed point under a constant input is not defined for it."
        )
    model = _analysis_copy(model, dtype)
    p_live = model.cell_params() if params is None else normalise_params(params)
    if not p_live:
        raise ValueError(f"{type(model).__name__} has no cell parameters; nothing defines its map")
    ref = next(iter(p_live.values()))
    device = ref.device if device is None else torch.device(device)
    if x_bar is None:
        x_bar = torch.zeros(model.input_dim, dtype=dtype, device=device)
    x_bar = torch.as_tensor(x_bar)
    if x_bar.dim() == 2 and x_bar.shape[0] == 1:
        x_bar = x_bar[0]
    if x_bar.dim() != 1 or x_bar.shape[0] != model.input_dim:
        raise ValueError(
            f"the constant input x_bar must have shape [input_dim] = [{model.input_dim}], got "
            f"{tuple(x_bar.shape)}"
        )
    x_bar = x_bar.detach().to(dtype=dtype, device=device)
    fmap = ConstantInputMap(model, _cast_params(p_live, dtype, device), x_bar,
                            bool(getattr(model, "is_flow", False)), float(getattr(model, "dt", 1.0)))
    try:
        with torch.no_grad():
            out = fmap(torch.zeros(1, model.state_dim, dtype=dtype, device=device))
    except NotImplementedError as exc:
        raise TypeError(f"{type(model).__name__}.step is not implemented, so it has no map to analyse") from exc
    if tuple(out.shape) != (1, model.state_dim):
        raise ValueError(
            f"{type(model).__name__}.step returned shape {tuple(out.shape)} for a [1, {model.state_dim}] state; "
            "a map on the state space must return the same shape"
        )
    return fmap


def _analysis_copy(model: RecurrentModel, dtype: torch.dtype) -> RecurrentModel:
    """``model`` itself, or a copy cast to ``dtype`` when it holds floating buffers of another dtype
    (parameters are cast on every call; buffers live in the module, so a float32 cell with a float32
    buffer would otherwise mix dtypes in a float64 analysis)."""
    if any(b.is_floating_point() and b.dtype != dtype for b in model.buffers()):
        import copy

        return copy.deepcopy(model).to(dtype)
    return model


def normalise_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept ``cell_params()``-style dicts or full ``state_dict``s (``cell.`` prefix, readout dropped)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"parameters must be a mapping name -> tensor, got {type(params).__name__}")
    if any(k.startswith("cell.") for k in params):
        return {k[len("cell."):]: v for k, v in params.items() if k.startswith("cell.")}
    return {k: v for k, v in params.items() if not k.startswith("readout.")}


# --------------------------------------------------------------------------------------- spectra
def eig_with_left(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues ``λ``, right eigenvectors ``R`` (columns, unit norm) and left eigenvectors ``L``
    (columns) of a batch ``[..., H, H]``, normalised so that ``Lᴴ R = I`` (``L = R^{-H}``)."""
    lam, R = torch.linalg.eig(A)
    R = R / torch.linalg.vector_norm(R, dim=-2, keepdim=True)
    L = torch.linalg.inv(R).mH
    return lam, R, L


def stability_margin(lam: torch.Tensor, is_flow: bool) -> torch.Tensor:
    """Signed distance to instability: ``|λ| − 1`` for maps, ``Re λ`` for flows (positive = unstable)."""
    return lam.real if is_flow else lam.abs() - 1.0


def classify_spectrum(lam: torch.Tensor, is_flow: bool, tol: float = 1e-9) -> tuple[str, int]:
    """Label one spectrum: ``stable``, ``saddle`` (some unstable directions), ``unstable`` (all) or
    ``marginal`` (an eigenvalue on the stability boundary within ``tol``, none beyond). Returns the
    label and the unstable dimension (number of eigenvalues with margin ``> tol``)."""
    m = stability_margin(lam, is_flow)
    n_unstable = int((m > tol).sum())
    n_marginal = int((m.abs() <= tol).sum())
    if n_unstable == 0:
        return ("marginal" if n_marginal else "stable"), 0
    if n_unstable == lam.shape[-1]:
        return "unstable", n_unstable
    return "saddle", n_unstable


# ----------------------------------------------------------------------------------------- result
@dataclass
class FixedPoints:
    """Fixed (and slow) points of one map, with their Jacobian spectra.

    Attributes:
        points: ``[N, H]`` locations (float64 unless asked otherwise).
        q: ``[N]`` speeds ``½‖F(z) − z‖²``.
        jacobians: ``[N, H, H]`` step-map Jacobians ``A = ∂F/∂z``.
        eigenvalues: ``[N, H]`` complex spectra of the *stability matrix*: ``A`` for maps,
            ``∂f/∂z`` for flows (see ``ConstantInputMap.stability_matrices``); most unstable first.
        right_eigenvectors, left_eigenvectors: ``[N, H, H]`` complex, columns matching
            ``eigenvalues``, with ``Lᴴ R = I``.
        stability: label per point (see ``classify_spectrum``); ``unstable_dim``: ``[N]``.
        is_slow: ``[N]`` True for slow points (``q`` above the fixed-point tolerance).
        is_flow, dt, x_bar: how the spectra are to be read and under which input.
    """

    points: torch.Tensor
    q: torch.Tensor
    jacobians: torch.Tensor
    eigenvalues: torch.Tensor
    right_eigenvectors: torch.Tensor
    left_eigenvectors: torch.Tensor
    stability: list[str]
    unstable_dim: torch.Tensor
    is_slow: torch.Tensor
    is_flow: bool
    dt: float
    x_bar: torch.Tensor
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def __getitem__(self, idx) -> FixedPoints:
        """A subset (index, slice, boolean mask or index tensor)."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        idx_t = torch.as_tensor(idx, dtype=torch.long) if not isinstance(idx, slice) else idx
        labels = [self.stability[i] for i in torch.arange(len(self))[idx_t].tolist()]
        return FixedPoints(self.points[idx_t], self.q[idx_t], self.jacobians[idx_t], self.eigenvalues[idx_t],
                           self.right_eigenvectors[idx_t], self.left_eigenvectors[idx_t], labels,
                           self.unstable_dim[idx_t], self.is_slow[idx_t], self.is_flow, self.dt, self.x_bar,
                           dict(self.info))

    @property
    def margins(self) -> torch.Tensor:
        """``[N, H]`` signed distances of each eigenvalue to instability (see ``stability_margin``)."""
        return stability_margin(self.eigenvalues, self.is_flow)

    def stable(self) -> FixedPoints:
        return self[torch.tensor([s == "stable" for s in self.stability], dtype=torch.bool)]

    def fixed(self) -> FixedPoints:
        """Only the true fixed points (no slow points)."""
        return self[~self.is_slow]

    def summary(self) -> list[dict]:
        """One plain dict per point (for tables and JSON)."""
        rows = []
        for i in range(len(self)):
            lam = self.eigenvalues[i]
            rows.append({
                "index": i, "stability": self.stability[i], "unstable_dim": int(self.unstable_dim[i]),
                "q": float(self.q[i]), "slow": bool(self.is_slow[i]), "norm": float(self.points[i].norm()),
                "leading_eigenvalue": complex(lam[0]), "margin": float(stability_margin(lam[:1], self.is_flow)[0]),
            })
        return rows

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for s in self.stability:
            counts[s] = counts.get(s, 0) + 1
        kind = "flow" if self.is_flow else "map"
        return f"FixedPoints(n={len(self)}, {kind}, {counts})"


def spectra(fmap: ConstantInputMap, points: torch.Tensor, tol: float = 1e-9):
    """Jacobians, sorted spectra (stability matrix), eigenvectors, labels and unstable dimensions."""
    H = fmap.state_dim
    if points.shape[0] == 0:
        e = torch.zeros(0, H, H, dtype=fmap.dtype, device=fmap.device)
        ce = e.to(torch.complex128 if fmap.dtype == torch.float64 else torch.complex64)
        return e, ce[:, 0], ce, ce, [], torch.zeros(0, dtype=torch.long)
    A = fmap.jacobians(points)
    S = fmap.stability_matrices(points) if fmap.is_flow else A
    lam, R, L = eig_with_left(S)
    order = torch.argsort(stability_margin(lam, fmap.is_flow), dim=-1, descending=True)
    lam = torch.gather(lam, -1, order)
    R = torch.gather(R, -1, order.unsqueeze(-2).expand_as(R))
    L = torch.gather(L, -1, order.unsqueeze(-2).expand_as(L))
    labels, dims = zip(*(classify_spectrum(lam[i], fmap.is_flow, tol) for i in range(lam.shape[0])), strict=True)
    return A, lam, R, L, list(labels), torch.tensor(dims, dtype=torch.long)


# ------------------------------------------------------------------------------------------ solver
def newton_polish(fmap: ConstantInputMap, z: torch.Tensor, steps: int = 30, tol: float = 1e-13,
                  max_step: float | None = None, max_halvings: int = 30,
                  xtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Newton on ``F(z) − z = 0`` for every row of ``z`` (in the map's dtype).

    Solves ``(A − I) δ = −(F(z) − z)`` (least squares where ``A − I`` is singular), then halves the
    step until the residual norm decreases (at most ``max_halvings``); rows that cannot improve stop.
    A row is done when its residual norm is at most ``tol`` *and* its last step at most
    ``xtol · max(1, ‖z‖)`` (so a root where ``A − I`` is nearly singular, reached only linearly, is
    resolved rather than left where the residual first drops below ``tol``), or when it stops
    improving. ``max_step`` caps ‖δ‖ (keeps continuation on its branch). Returns the points and their
    speeds.
    """
    z = z.detach().clone()
    H = fmap.state_dim
    eye = torch.eye(H, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        r = fmap.residual(z)
    rn = r.norm(dim=-1)
    active = rn > tol
    for _ in range(steps):
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).flatten()
        A = fmap.jacobians(z[idx]) - eye
        delta, info = torch.linalg.solve_ex(A, -r[idx])
        bad = (info != 0) | ~torch.isfinite(delta).all(-1)
        if bool(bad.any()):
            delta[bad] = (torch.linalg.pinv(A[bad]) @ (-r[idx][bad]).unsqueeze(-1)).squeeze(-1)
        if max_step is not None:
            dn = delta.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            delta = delta * torch.clamp(max_step / dn, max=1.0)
        step = torch.ones(idx.shape[0], 1, dtype=z.dtype, device=z.device)
        improved = torch.zeros(idx.shape[0], dtype=torch.bool, device=z.device)
        z_new, r_new = z[idx].clone(), r[idx].clone()
        with torch.no_grad():
            for _ in range(max_halvings):
                todo = ~improved
                if not bool(todo.any()):
                    break
                cand = z[idx][todo] + step[todo] * delta[todo]
                rc = fmap.residual(cand)
                ok = torch.isfinite(rc).all(-1) & (rc.norm(dim=-1) < rn[idx][todo])
                sel = torch.nonzero(todo).flatten()[ok]
                z_new[sel], r_new[sel] = cand[ok], rc[ok]
                improved[sel] = True
                step[todo] *= 0.5
        moved = (z_new - z[idx]).norm(dim=-1)
        z[idx], r[idx] = z_new, r_new
        rn_new = r.norm(dim=-1)
        active_idx = idx[improved]
        still = torch.zeros_like(active)
        big_step = moved[improved] > xtol * z_new[improved].norm(dim=-1).clamp_min(1.0)
        still[active_idx] = (rn_new[active_idx] > tol) | big_step
        rn = rn_new
        active = still
    return z, 0.5 * rn.pow(2)


def _adam_minimise_q(fmap: ConstantInputMap, z0: torch.Tensor, max_iters: int, lr: float, tol_q: float,
                     progress: bool, patience: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint Adam on ``Σ_n q(z_n)`` (Sussillo & Barak 2013); stops when every ``q < tol_q`` or when
    the total has not improved by 0.1 % for ``patience`` iterations."""
    z = z0.detach().clone()
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    b1, b2, eps = 0.9, 0.999, 1e-12
    it = range(max_iters)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="fixed points (Adam on q)", leave=False)
    best, since = float("inf"), 0
    for i in it:
        zr = z.requires_grad_(True)
        q = fmap.speed(zr)
        (g,) = torch.autograd.grad(q.sum(), zr)
        z = zr.detach()
        qd = q.detach()
        if bool((qd < tol_q).all()):
            break
        total = float(qd.sum())
        if total < best * (1 - 1e-3):
            best, since = total, 0
        else:
            since += 1
            if since >= patience:  # stalled: the remaining points are slow points or need Newton
                break
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        mhat = m / (1 - b1 ** (i + 1))
        vhat = v / (1 - b2 ** (i + 1))
        z = z - lr * mhat / (vhat.sqrt() + eps)
    with torch.no_grad():
        q = fmap.speed(z)
    return z.detach(), q


def _deduplicate(points: torch.Tensor, q: torch.Tensor, tol: float, fmap: ConstantInputMap | None = None,
                 accept_q: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of unique points and how many candidates each absorbed: greedy in order of increasing
    ``q``; two points are the same when ``‖z_i − z_j‖ ≤ tol · max(1, ‖z_i‖)``, or (with ``fmap``)
    when the points at 1/4, 1/2 and 3/4 of the segment between them pass the same acceptance test
    ``q ≤ accept_q`` as the points themselves (they are then indistinguishable as fixed points)."""
    order = torch.argsort(q)
    kept: list[int] = []
    counts: list[int] = []
    fracs = torch.tensor([0.25, 0.5, 0.75], dtype=points.dtype, device=points.device).reshape(1, 3, 1)
    for i in order.tolist():
        zi = points[i]
        if kept:
            d = (points[kept] - zi).norm(dim=-1)
            same = d <= tol * max(1.0, float(zi.norm()))
            if not bool(same.any()) and fmap is not None and accept_q is not None:
                zk = points[kept].unsqueeze(1)
                seg = (zk + fracs * (zi - zk)).reshape(-1, zi.shape[-1])
                with torch.no_grad():
                    qs = fmap.speed(seg).reshape(len(kept), 3)
                same = (torch.isfinite(qs) & (qs <= accept_q)).all(-1)
            if bool(same.any()):
                counts[int(torch.nonzero(same)[0])] += 1
                continue
        kept.append(i)
        counts.append(1)
    return torch.tensor(kept, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def _initial_states(fmap: ConstantInputMap, initial_states, n_starts: int, noise_scale: float,
                    generator: torch.Generator) -> torch.Tensor:
    H = fmap.state_dim
    if initial_states is None:
        z = torch.randn(n_starts, H, generator=generator, dtype=fmap.dtype).to(fmap.device)
        return z
    s = torch.as_tensor(initial_states).detach()
    if s.shape[-1] != H:
        raise ValueError(f"initial states must end in the state size H={H}, got shape {tuple(s.shape)}")
    s = s.reshape(-1, H).to(dtype=fmap.dtype, device=fmap.device)
    if s.shape[0] > n_starts:
        pick = torch.randperm(s.shape[0], generator=generator)[:n_starts]
        s = s[pick.to(s.device)]
    if noise_scale > 0:
        s = s + noise_scale * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
    return s


def find_fixed_points(
    model,
    x_bar: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    n_starts: int = 128,
    noise_scale: float = 0.0,
    max_iters: int = 2000,
    lr: float = 1e-2,
    tol_q: float = 1e-20,
    adam_tol: float = 1e-10,
    adam_round: int = 200,
    newton_steps: int = 60,
    slow_points: bool = False,
    slow_q: float = 1e-4,
    unique_tol: float = 1e-6,
    slow_unique_tol: float = 1e-2,
    exclude_outliers: bool = True,
    outlier_distance_scale: float = 10.0,
    stability_tol: float = 1e-9,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    allow_empty: bool = False,
    progress: bool = False,
    fmap: ConstantInputMap | None = None,
) -> FixedPoints:
    """Fixed points of ``z ↦ F(z, x̄; θ)`` (Sussillo & Barak 2013, with a Newton polish).

    Args:
        model: a kpflow ``RecurrentModel``.
        x_bar: constant input ``[input_dim]`` (zeros by default).
        initial_states: states to start from, any shape ending in ``H`` (e.g. recorded
            ``[B, T, H]`` states); ``n_starts`` of them are sampled. Gaussian starts when omitted.
        params: cell parameters to analyse instead of the model's own.
        noise_scale: standard deviation of noise added to the starts.
        max_iters, lr, adam_tol, adam_round: the Adam stage on ``q``: rounds of ``adam_round``
            iterations (at most ``max_iters`` in all), each followed by a Newton polish that retires
            the starts it converges; a round also ends once every ``q < adam_tol``.
        tol_q: a point is *fixed* when ``q ≤ tol_q`` after the Newton polish (at most ``newton_steps``
            damped steps, float64 by default; regular roots need a handful, double roots converge
            linearly and use more).
        slow_points: also keep minima with ``tol_q < q ≤ slow_q`` (labelled ``is_slow``).
        unique_tol: relative distance under which two fixed points are one (two fixed points joined
            by a segment of accepted fixed points are one too); ``slow_unique_tol`` the same for slow
            points (which sit in extended slow regions), also against fixed points.
        exclude_outliers: drop points farther than ``outlier_distance_scale`` × the largest
            distance of a start from the starts' centroid.
        stability_tol: eigenvalues within this margin of the boundary are ``marginal``.
        allow_empty: return an empty result instead of raising ``NoFixedPointError``.

    Returns:
        ``FixedPoints`` sorted by increasing ``q``.
    """
    if fmap is None:
        fmap = constant_input_map(model, x_bar, params, dtype=dtype)
    g = torch.Generator().manual_seed(int(seed))
    z0 = _initial_states(fmap, initial_states, n_starts, noise_scale, g)
    if z0.shape[0] == 0:
        raise ValueError("no initial states to start from (initial_states is empty and n_starts is 0)")
    # Rounds of (Newton polish -> Adam on the starts Newton could not converge). Converged starts
    # leave the pool; Adam moves the others towards minima of q (fixed points or slow points).
    z = z0.clone()
    with torch.no_grad():
        q = fmap.speed(z)
    done = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    n_rounds = max(1, math.ceil(max_iters / adam_round)) if max_iters > 0 else 0
    rounds = range(n_rounds + 1)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="fixed points (Newton/Adam rounds)", leave=False)
    for r in rounds:
        idx = torch.nonzero(~done).flatten()
        zn, qn = newton_polish(fmap, z[idx], steps=newton_steps, tol=(2 * tol_q) ** 0.5)
        conv = torch.isfinite(qn) & (qn <= tol_q)
        z[idx[conv]], q[idx[conv]] = zn[conv], qn[conv]
        done[idx[conv]] = True
        if r == n_rounds or bool(done.all()):
            better = ~conv & torch.isfinite(qn) & (qn < q[idx])
            z[idx[better]], q[idx[better]] = zn[better], qn[better]
            break
        idx = torch.nonzero(~done).flatten()
        za, qa = _adam_minimise_q(fmap, z[idx], adam_round, lr, adam_tol, False)
        z[idx], q[idx] = za, qa
    finite = torch.isfinite(q) & torch.isfinite(z).all(-1)
    is_fixed = finite & (q <= tol_q)
    keep = is_fixed | (finite & (q <= slow_q) if slow_points else is_fixed)
    info = {"n_starts": int(z0.shape[0]), "min_q": float(q[finite].min()) if bool(finite.any()) else float("nan")}
    far_dist = None
    if exclude_outliers and bool(keep.any()):
        centre = z0.mean(0)
        radius = float((z0 - centre).norm(dim=-1).max()) + 1e-12
        dist = (z - centre).norm(dim=-1)
        limit = outlier_distance_scale * max(radius, 1.0)
        far = dist > limit
        info["n_outliers"] = int((far & keep).sum())
        if info["n_outliers"]:
            far_dist = (float(dist[far & keep].min()), limit)
        keep = keep & ~far
    counts = torch.zeros(0, dtype=torch.long)
    if not bool(keep.any()):
        if allow_empty:
            idx = torch.zeros(0, dtype=torch.long)
        elif far_dist is not None:
            raise NoFixedPointError(
                f"{info['n_outliers']} point(s) converged (speed q ≤ {tol_q:g} or slow), but all lie farther from "
                f"the starts' centroid than the outlier limit {far_dist[1]:.3g} (outlier_distance_scale = "
                f"{outlier_distance_scale:g} × the starts' radius); the nearest is at distance {far_dist[0]:.3g}. "
                "Pass exclude_outliers=False or a larger outlier_distance_scale to keep them, or start nearer."
            )
        else:
            what = "fixed or slow point" if slow_points else "fixed point"
            raise NoFixedPointError(
                f"no {what} found from {z0.shape[0]} starts: the smallest speed q = ½‖F(z)−z‖² reached was "
                f"{info['min_q']:.3g} (fixed-point tolerance {tol_q:g}"
                + (f", slow-point tolerance {slow_q:g}" if slow_points else "")
                + "). Try more or different starts (e.g. recorded states), more max_iters, "
                "slow_points=True, or allow_empty=True to get an empty result."
            )
    else:
        cand = torch.nonzero(keep & is_fixed).flatten()
        uniq, counts = _deduplicate(z[cand], q[cand], unique_tol, fmap, tol_q)
        idx = cand[uniq]
        slow = torch.nonzero(keep & ~is_fixed).flatten()
        if slow.numel():  # slow points sit in extended slow regions: merge them on a coarser scale
            slow = slow[_deduplicate(z[slow], q[slow], slow_unique_tol)[0]]
            if idx.numel():
                d = torch.cdist(z[slow], z[idx]).min(1).values
                slow = slow[d > slow_unique_tol * z[slow].norm(dim=-1).clamp_min(1.0)]
            idx = torch.cat([idx, slow])
            counts = torch.cat([counts, torch.ones(slow.numel(), dtype=torch.long)])
        order = torch.argsort(q[idx])
        idx, counts = idx[order], counts[order.cpu()]
    info["merged"] = counts.tolist()
    pts, qs = z[idx], q[idx]
    A, lam, R, L, labels, dims = spectra(fmap, pts, stability_tol)
    return FixedPoints(pts, qs, A, lam, R, L, labels, dims, qs > tol_q, fmap.is_flow, fmap.dt, fmap.x_bar, info)


def fixed_points_at(fmap: ConstantInputMap, points: torch.Tensor, stability_tol: float = 1e-9,
                    tol_q: float = 1e-20) -> FixedPoints:
    """Wrap already-converged points (no search) into a ``FixedPoints`` with their spectra."""
    with torch.no_grad():
        q = fmap.speed(points)
    A, lam, R, L, labels, dims = spectra(fmap, points, stability_tol)
    return FixedPoints(points, q, A, lam, R, L, labels, dims, q > tol_q, fmap.is_flow, fmap.dt, fmap.x_bar)

