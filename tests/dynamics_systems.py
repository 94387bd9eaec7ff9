"""Small systems with known answers for the dynamics tests (not part of the library)."""

import math

import torch
from torch import nn

from kpflow.models.base import RecurrentModel

D = torch.float64


def rk4(f, z, dt):
    k1 = f(z)
    k2 = f(z + 0.5 * dt * k1)
    k3 = f(z + 0.5 * dt * k2)
    k4 = f(z + dt * k3)
    return z + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


class _Scalars(nn.Module):
    def __init__(self, **values):
        super().__init__()
        for k, v in values.items():
            self.register_parameter(k, nn.Parameter(torch.tensor(float(v), dtype=D)))


class HopfFlow(RecurrentModel):
    """ż = (μ + iω) z + c |z|² z on z = z₁ + i z₂, stepped by RK4 with step dt (a neural-ODE-style flow).
    Hopf at μ = 0 with first Lyapunov coefficient ℓ₁ = 2 Re c / ω (for ‖q‖ = 1)."""

    is_flow = True

    def __init__(self, mu=0.0, omega=1.0, cubic=-1.0, dt=0.05):
        super().__init__(2, 2, 2)
        self.cell = _Scalars(mu=mu)
        self.omega, self.cubic, self.dt = float(omega), float(cubic), float(dt)
        self.to(D)

    def vector_field(self, params, z, x):
        mu = params["mu"]
        z1, z2 = z[..., :1], z[..., 1:]
        r2 = z1 * z1 + z2 * z2
        lin = torch.cat([mu * z1 - self.omega * z2, self.omega * z1 + mu * z2], -1)
        return lin + self.cubic * r2 * z + x

    def step(self, params, z, x):
        return rk4(lambda y: self.vector_field(params, y, x), z, self.dt)


class HopfFlowStepOnly(HopfFlow):
    """The same RK4 flow without a vector_field: only its step is known (analysis reads it as Euler)."""

    vector_field = None

    def step(self, params, z, x):
        return rk4(lambda y: HopfFlow.vector_field(self, params, y, x), z, self.dt)


class BogdanovTakensFlow(RecurrentModel):
    """ẋ = y, ẏ = β₁ + β₂ x + x² + σ x y (Kuznetsov 2004 §8.4), RK4 steps of dt.

    Equilibria (x, 0) with x² + β₂ x + β₁ = 0; fold curve β₁ = β₂²/4 at x = −β₂/2; Hopf on x = 0,
    β₁ = 0 when β₂ < 0 (ω = √−β₂). For β₂ = −1 the first Lyapunov coefficient is ℓ₁ = σ/4
    (Guckenheimer & Holmes (3.4.11) after (x, y) ↦ (x, −y): a = σ/8, ℓ₁ = 2a/ω)."""

    is_flow = True

    def __init__(self, beta1=0.0, beta2=-1.0, sigma=-1.0, dt=0.05):
        super().__init__(1, 2, 1)
        self.cell = _Scalars(beta1=beta1, beta2=beta2)
        self.sigma, self.dt = float(sigma), float(dt)
        self.to(D)

    def vector_field(self, params, z, x):
        a, b = z[..., :1], z[..., 1:]
        return torch.cat([b, params["beta1"] + params["beta2"] * a + a * a + self.sigma * a * b + 0 * x], -1)

    def step(self, params, z, x):
        return rk4(lambda y: self.vector_field(params, y, x), z, self.dt)


def rotation(H, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=D))
    return Q


class MovingPitchfork(RecurrentModel):
    """F(z) = Q f(Qᵀ(z − c(μ))) + c(μ), f(u) = ((1+μ) u₁ + k u₁³, 0.5 u₂, ..., ),
    c(μ) = (μ + 0.3) d + bend · μ² q (q = Q e₁, the critical direction):
    a pitchfork at μ = 0 whose trivial branch z = c(μ) moves with μ, in rotated coordinates."""

    def __init__(self, mu=0.0, H=3, cubic=-1.0, seed=0, bend=0.0):
        super().__init__(1, H, 1)
        self.cell = _Scalars(mu=mu)
        self.cubic, self.bend = float(cubic), float(bend)
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("Q", rotation(H, seed))
        self.register_buffer("d", torch.randn(H, generator=g, dtype=D))
        self.to(D)

    def centre(self, mu):
        return (mu + 0.3) * self.d + self.bend * mu * mu * self.Q[:, 0]

    def step(self, params, z, x):
        mu = params["mu"]
        c = self.centre(mu)
        u = (z - c) @ self.Q
        u1, rest = u[..., :1], u[..., 1:]
        fu = torch.cat([(1 + mu) * u1 + self.cubic * u1 ** 3, 0.5 * rest], -1)
        return fu @ self.Q.T + c + 0 * x.sum(-1, keepdim=True)


class DoubleCrossing(RecurrentModel):
    """z ↦ (1 + μ) z − z³ componentwise in 2-D, rotated: two eigenvalues cross 1 together at μ = 0."""

    def __init__(self, mu=0.0):
        super().__init__(1, 2, 1)
        self.cell = _Scalars(mu=mu)
        self.register_buffer("Q", rotation(2, 3))
        self.to(D)

    def step(self, params, z, x):
        u = z @ self.Q
        return ((1 + params["mu"]) * u - u ** 3) @ self.Q.T + 0 * x.sum(-1, keepdim=True)


def hopf_lyapunov(omega, cubic):
    return 2.0 * cubic / omega


def ns_coefficient(omega, cubic):
    return 2.0 * cubic * math.cos(omega)
