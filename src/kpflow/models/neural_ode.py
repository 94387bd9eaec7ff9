"""Neural ODE cell: a small MLP vector field integrated with a fixed-step solver on a time grid."""

from __future__ import annotations

import math

import torch

from .base import Params, RecurrentModel
from .cells import ParameterCell, activation


class NeuralODE(RecurrentModel):
    """A neural ODE ``dz/dt = f(z, x) = W2 φ(W1 z + U1 x + b1) + b2``, one model step per ``dt``.

    Each step integrates over a length ``dt`` with ``substeps`` fixed steps of ``method`` ("euler", or the
    classical 4th-order Runge–Kutta "rk4"), the input held constant (Chen et al. 2018, *Neural Ordinary
    Differential Equations*, with a fixed-step solver instead of an adaptive one).

    Parameters: ``W1`` [width, H], ``U1`` [width, I], ``b1`` [width], ``W2`` [H, width], ``b2`` [H].
    """

    is_flow = True

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int = 1, width: int = 32,
                 dt: float = 0.1, method: str = "rk4", substeps: int = 1, nonlinearity: str = "tanh",
                 dtype=None, device=None):
        super().__init__(input_dim, hidden_dim, output_dim)
        if method not in ("euler", "rk4"):
            raise ValueError(f"method must be 'euler' or 'rk4', got {method!r}")
        if not dt > 0 or int(substeps) < 1:
            raise ValueError(f"need dt > 0 and substeps >= 1, got dt={dt}, substeps={substeps}")
        self.hidden_dim, self.width = self.state_dim, int(width)
        self.dt, self.method, self.substeps = float(dt), method, int(substeps)
        self.nonlinearity = nonlinearity
        self.phi = activation(nonlinearity)
        H, Ii, M = self.state_dim, self.input_dim, self.width
        self.cell = ParameterCell({"W1": (M, H), "U1": (M, Ii), "b1": (M,), "W2": (H, M), "b2": (H,)},
                                  dtype, device)
        self.readout.to(dtype=dtype, device=device)
        with torch.no_grad():
            self.cell.W1.normal_(0, 1 / math.sqrt(H))
            self.cell.U1.normal_(0, 1 / math.sqrt(max(Ii, 1)))
            self.cell.b1.zero_()
            self.cell.W2.normal_(0, 1 / math.sqrt(M))
            self.cell.b2.zero_()

    def vector_field(self, params: Params, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The vector field ``f(z, x) = W2 φ(W1 z + U1 x + b1) + b2``.

        Args:
            params: the cell's parameters ``W1, U1, b1, W2, b2``.
            z: the state, ``[N, H]``.
            x: the input, ``[N, I]``.

        Returns:
            ``f(z, x)``, ``[N, H]``.
        """
        hidden = self.phi(z @ params["W1"].T + x @ params["U1"].T + params["b1"])
        return hidden @ params["W2"].T + params["b2"]

    def step(self, params: Params, z_prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """``substeps`` Euler or RK4 steps of size ``dt / substeps`` of ``dz/dt = f(z, x_t)`` from ``z_prev``."""
        h = self.dt / self.substeps
        z = z_prev
        for _ in range(self.substeps):
            if self.method == "euler":
                z = z + h * self.vector_field(params, z, x_t)
            else:
                k1 = self.vector_field(params, z, x_t)
                k2 = self.vector_field(params, z + 0.5 * h * k1, x_t)
                k3 = self.vector_field(params, z + 0.5 * h * k2, x_t)
                k4 = self.vector_field(params, z + h * k3, x_t)
                z = z + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        return z
