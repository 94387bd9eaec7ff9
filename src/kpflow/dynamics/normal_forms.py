"""Classical codimension-one normal forms of maps, as kpflow models, and their learning landscapes.

Each normal form is a ``RecurrentModel`` whose state is the centre-manifold coordinate ``α``
(scalar; planar for Neimark–Sacker), whose only cell parameter is the bifurcation parameter ``mu``
(bifurcation at ``mu = 0``), and whose input enters additively as a forcing,
``α_{t+1} = f(α_t; μ) + x_t``. The forms are those of Hazelden & Shea-Brown (arXiv 2605.12763,
blog ``bifs.html``):

==================  =============================================
saddle-node         ``α ↦ α − μ − α²``      (pair ±√(−μ) for μ < 0)
transcritical       ``α ↦ (1+μ) α − α²``    (branches 0 and μ exchange stability)
pitchfork           ``α ↦ (1+μ) α + c α³``  (c = −1: stable ±√μ for μ > 0)
flip                ``α ↦ −(1+μ) α + c α³`` (c = −1: subcritical, as in the paper)
Neimark–Sacker      ``z ↦ (1+μ) e^{iω} z − |z|² z`` on ``z = α₁ + i α₂``
==================  =============================================

Being kpflow models, their state-space NTK ``P K P*``, scalar Green's matrix ``P`` (entries
``Φ(t, s) = ∂α_t/∂α_s``) and sensitivity ``d_μα = P D_μf`` come from ``kpflow.kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kpflow.models.base import Params, RecurrentModel

__all__ = [
    "NormalFormMap", "SaddleNodeMap", "TranscriticalMap", "PitchforkMap", "FlipMap", "NeimarkSackerMap",
    "NORMAL_FORMS", "normal_form", "greens_matrix", "mu_sensitivity", "AmplificationLandscape",
    "amplification_landscape",
]


class _MuCell(nn.Module):
    def __init__(self, mu: float, dtype):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(float(mu), dtype=dtype))


class NormalFormMap(RecurrentModel):
    """Base class: state ``α`` of size ``state_dim``, cell parameter ``mu``, additive input forcing.

    The readout is the identity (outputs are the state). ``bifurcation`` names the type and
    ``critical_multiplier`` is the multiplier that crosses the unit circle at ``mu = 0``.
    """

    bifurcation: str = ""
    critical_multiplier: complex = 1.0

    def __init__(self, mu: float = 0.0, state_dim: int = 1, dtype: torch.dtype = torch.float64, device=None):
        super().__init__(state_dim, state_dim, state_dim)
        self.cell = _MuCell(mu, dtype)
        with torch.no_grad():
            self.readout.weight.copy_(torch.eye(state_dim))
            self.readout.bias.zero_()
        self.readout.requires_grad_(False)
        self.to(dtype=dtype, device=device)

    def f(self, mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The unforced map ``f(α; μ)`` on ``[N, state_dim]``."""
        raise NotImplementedError

    def step(self, params: Params, z_prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.f(params["mu"], z_prev) + x_t

    def mu_derivative(self, mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``D_μ f(α; μ)`` on ``[N, state_dim]`` (exact, by forward mode)."""
        return torch.func.jvp(lambda m: self.f(m, a), (mu,), (torch.ones_like(mu),))[1]

    def fixed_points_exact(self, mu: float) -> torch.Tensor:
        """The analytic fixed points of the unforced map at ``mu`` (``[n, state_dim]``)."""
        raise NotImplementedError


class SaddleNodeMap(NormalFormMap):
    """``α ↦ α − μ − α²``: a stable/unstable pair ``±√(−μ)`` for ``μ < 0`` that merges at ``μ = 0``."""

    bifurcation = "saddle-node"

    def f(self, mu, a):
        return a - mu - a * a

    def fixed_points_exact(self, mu):
        if mu > 0:
            return torch.zeros(0, 1, dtype=torch.float64)
        r = math.sqrt(-mu)
        return torch.tensor([[r], [-r]], dtype=torch.float64) if r > 0 else torch.zeros(1, 1, dtype=torch.float64)


class TranscriticalMap(NormalFormMap):
    """``α ↦ (1+μ) α − α²``: branches ``0`` and ``μ`` cross and exchange stability at ``μ = 0``."""

    bifurcation = "transcritical"

    def f(self, mu, a):
        return (1 + mu) * a - a * a

    def fixed_points_exact(self, mu):
        return torch.tensor([[0.0], [mu]], dtype=torch.float64) if mu != 0 else torch.zeros(1, 1, dtype=torch.float64)


class PitchforkMap(NormalFormMap):
    """``α ↦ (1+μ) α + c α³`` (``c = −1``: supercritical, stable branches ``±√μ`` for ``μ > 0``)."""

    bifurcation = "pitchfork"

    def __init__(self, mu: float = 0.0, cubic: float = -1.0, dtype=torch.float64, device=None):
        if cubic == 0:
            raise ValueError("the pitchfork's cubic coefficient must be non-zero (negative = supercritical)")
        self.cubic = float(cubic)
        super().__init__(mu, 1, dtype, device)

    def f(self, mu, a):
        return (1 + mu) * a + self.cubic * a * a * a

    def fixed_points_exact(self, mu):
        r2 = -mu / self.cubic
        if r2 > 0:
            r = math.sqrt(r2)
            return torch.tensor([[0.0], [r], [-r]], dtype=torch.float64)
        return torch.zeros(1, 1, dtype=torch.float64)


class FlipMap(NormalFormMap):
    """``α ↦ −(1+μ) α + c α³``: the multiplier ``−(1+μ)`` of the origin crosses −1 at ``μ = 0``."""

    bifurcation = "flip"
    critical_multiplier = -1.0

    def __init__(self, mu: float = 0.0, cubic: float = -1.0, dtype=torch.float64, device=None):
        self.cubic = float(cubic)
        super().__init__(mu, 1, dtype, device)

    def f(self, mu, a):
        return -(1 + mu) * a + self.cubic * a * a * a

    def fixed_points_exact(self, mu):
        r2 = (2 + mu) / self.cubic
        if r2 > 0:
            r = math.sqrt(r2)
            return torch.tensor([[0.0], [r], [-r]], dtype=torch.float64)
        return torch.zeros(1, 1, dtype=torch.float64)


class NeimarkSackerMap(NormalFormMap):
    """``z ↦ (1+μ) e^{iω} z + d |z|² z`` (``d = −1`` by default) in real coordinates ``(α₁, α₂)``;
    the multipliers ``(1+μ) e^{±iω}`` cross the unit circle at ``μ = 0`` (``ω`` fixed, away from
    strong resonances). ``Re d < 0``: supercritical (an invariant circle of radius √(μ/−Re d))."""

    bifurcation = "neimark-sacker"

    def __init__(self, mu: float = 0.0, omega: float = 1.0, cubic: complex = -1.0, dtype=torch.float64,
                 device=None):
        for k in (1, 2, 3, 4):
            if abs(math.remainder(omega * k, 2 * math.pi)) < 1e-6:
                raise ValueError(f"omega = {omega} is a strong resonance (e^(i k omega) = 1 for k = {k}); "
                                 "pick omega away from 2π/k, k = 1..4")
        cubic = complex(cubic)
        if cubic == 0:
            raise ValueError("the Neimark–Sacker cubic coefficient d must be non-zero")
        self.omega, self.cubic = float(omega), cubic
        self.critical_multiplier = complex(math.cos(omega), math.sin(omega))
        super().__init__(mu, 2, dtype, device)

    def f(self, mu, a):
        c, s = math.cos(self.omega), math.sin(self.omega)
        dr, di = self.cubic.real, self.cubic.imag
        a1, a2 = a[..., :1], a[..., 1:]
        r2 = a1 * a1 + a2 * a2
        rot = torch.cat([c * a1 - s * a2, s * a1 + c * a2], -1)
        return (1 + mu) * rot + r2 * torch.cat([dr * a1 - di * a2, di * a1 + dr * a2], -1)

    def fixed_points_exact(self, mu):
        return torch.zeros(1, 2, dtype=torch.float64)


NORMAL_FORMS: dict[str, type[NormalFormMap]] = {
    "saddle-node": SaddleNodeMap,
    "transcritical": TranscriticalMap,
    "pitchfork": PitchforkMap,
    "flip": FlipMap,
    "neimark-sacker": NeimarkSackerMap,
}


def normal_form(name: str, mu: float = 0.0, **kwargs) -> NormalFormMap:
    """The normal-form model called ``name`` (one of ``NORMAL_FORMS``) at parameter ``mu``."""
    key = name.lower().replace("_", "-").replace(" ", "-")
    if key not in NORMAL_FORMS:
        raise ValueError(f"unknown normal form {name!r}; choose one of {sorted(NORMAL_FORMS)}")
    return NORMAL_FORMS[key](mu=mu, **kwargs)


# --------------------------------------------------------------------------- Green's matrix, d_μα
def _record(model: NormalFormMap, alpha0: torch.Tensor, T: int, forcing: torch.Tensor | None = None):
    from kpflow.kernels import record

    a0 = torch.as_tensor(alpha0, dtype=model.cell.mu.dtype).reshape(-1, model.state_dim)
    B = a0.shape[0]
    if forcing is None:
        forcing = torch.zeros(B, T, model.state_dim, dtype=a0.dtype)
    with torch.no_grad():
        return record(model, forcing.to(a0.dtype), z0=a0)


def greens_matrix(model: NormalFormMap, alpha0: torch.Tensor, T: int, forcing: torch.Tensor | None = None):
    """The scalar (or planar) Green's matrix ``P = (I − A S)^{-1}`` of a normal-form run, dense:
    ``[B, T, H, T, H]`` restricted to each trial's own block, returned as ``[B, T·H, T·H]``.

    Entry ``[b, t, s]`` is ``Φ_b(t, s) = ∂α_t/∂q_s`` (lower triangular in time). Built from
    ``kpflow.kernels.propagator`` applied to one probe per (time, coordinate), shared by all trials.
    """
    from kpflow.kernels import propagator

    traj = _record(model, alpha0, T, forcing)
    B, T_, H = traj.shape
    P = propagator(traj)
    E = torch.zeros(T_ * H, B, T_, H, dtype=traj.dtype, device=traj.device)
    idx = torch.arange(T_ * H)
    E.view(T_ * H, B, T_ * H)[idx, :, idx] = 1.0
    cols = P.matmat(E)  # [T*H (source), B, T, H]
    return cols.reshape(T_ * H, B, T_ * H).permute(1, 2, 0).contiguous()


def mu_sensitivity(model: NormalFormMap, alpha0: torch.Tensor, T: int, forcing: torch.Tensor | None = None):
    """``d_μα = P D_μf`` for every trial: ``[B, T, H]`` (``kpflow.kernels.state_jacobian`` at ``e_μ``).

    Also returns the trajectory so callers can reuse it.
    """
    from kpflow.kernels import state_jacobian

    traj = _record(model, alpha0, T, forcing)
    J = state_jacobian(traj)
    e = torch.ones(J.shape_in, dtype=traj.dtype, device=traj.device)
    return J.apply(e), traj


@dataclass
class AmplificationLandscape:
    """Amplification and loss landscapes of the scalar student–teacher problem over ``(μ, α₀)``.

    Arrays are ``[len(mus), len(alpha0s)]``: ``greens_norm`` = ‖P‖_F, ``sensitivity_norm`` = ‖d_μα‖,
    ``loss`` = ½ mean_t (α_t(μ) − α_t(μ*))², ``gradient`` = ∂loss/∂μ = mean_t (α_t − α*_t) (d_μα)_t,
    ``ntk_trace`` = tr(sNTK) = ‖d_μα‖² (one parameter).
    """

    name: str
    mus: torch.Tensor
    alpha0s: torch.Tensor
    T: int
    mu_star: float
    greens_norm: torch.Tensor
    sensitivity_norm: torch.Tensor
    loss: torch.Tensor
    gradient: torch.Tensor

    @property
    def ntk_trace(self) -> torch.Tensor:
        return self.sensitivity_norm ** 2


def amplification_landscape(name: str = "pitchfork", mus=None, alpha0s=None, T: int = 25, mu_star: float = 1.0,
                            progress: bool = False, **kwargs) -> AmplificationLandscape:
    """Learning landscape of a scalar normal form: student ``μ`` learns the teacher ``μ*`` by MSE on
    the state trajectory from the same ``α₀`` (Hazelden & Shea-Brown, blog ``bifs.html``).

    For every ``μ`` one recorded run batches all ``α₀`` as trials; ``‖P‖_F`` per trial comes from
    the propagator applied to one probe per time step, ``d_μα`` from ``state_jacobian``.
    """
    mus = (torch.linspace(-1.0, 1.5, 51, dtype=torch.float64) if mus is None
           else torch.as_tensor(mus, dtype=torch.float64))
    alpha0s = (torch.linspace(-1.0, 1.0, 41, dtype=torch.float64) if alpha0s is None
               else torch.as_tensor(alpha0s, dtype=torch.float64))
    teacher = normal_form(name, mu_star, **kwargs)
    H = teacher.state_dim
    a0 = alpha0s.reshape(-1, 1).expand(-1, H).contiguous()
    with torch.no_grad():
        target = teacher.unroll(teacher.cell_params(), torch.zeros(a0.shape[0], T, H, dtype=a0.dtype), a0)
    shape = (len(mus), len(alpha0s))
    gn, sn, lo, gr = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))
    it = range(len(mus))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{name} landscape", leave=False)
    for i in it:
        student = normal_form(name, float(mus[i]), **kwargs)
        d, traj = mu_sensitivity(student, a0, T)
        G = greens_matrix(student, a0, T)
        err = traj.states - target
        gn[i] = G.pow(2).sum((1, 2)).sqrt()
        sn[i] = d.pow(2).sum((1, 2)).sqrt()
        lo[i] = 0.5 * err.pow(2).sum(-1).mean(1)
        gr[i] = (err * d).sum(-1).mean(1)
    return AmplificationLandscape(name, mus, alpha0s, T, float(mu_star), gn, sn, lo, gr)
