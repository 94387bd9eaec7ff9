"""One case matrix for the operator and kernel tests, and one way to compare an operator with its matrix.

``CASES`` is models × sizes × dtypes × devices (CUDA only where present); ``cases(...)`` selects from it
as ``pytest.param``s with readable ids. ``build(case)`` makes a *fresh* model, inputs and recording
from fixed seeds every time it is called, so no test sees another test's trajectory (and the lazily
built state on it). ``compare_operator(op, dense)`` checks an operator against an independent dense
matrix: the materialised matrix, batched products, the adjoint, all within a tolerance derived from
the dtype's machine epsilon and the problem size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kpflow.kernels import record
from kpflow.models import GRU, LSTM, CellAdapter, LeakyRNN, NeuralODE, VanillaRNN

#: (B, T, H, I, O): trials, steps, state width (the LSTM's state is 2H), inputs, outputs
SIZES = {"tiny": (2, 3, 3, 2, 1), "small": (3, 7, 5, 2, 2)}
MODELS = ("rnn", "leaky_current", "leaky_rate", "gru", "lstm", "node", "node_euler", "adapter")
#: the weight-based cells (affine slots: Kronecker core, stored per-site coefficients)
AFFINE = ("rnn", "leaky_current", "leaky_rate", "gru", "lstm")
DTYPES = (torch.float64, torch.float32)
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())


@dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    model: str
    size: str = "small"
    dtype: torch.dtype = torch.float64
    device: str = "cpu"

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return SIZES[self.size]

    @property
    def id(self) -> str:
        return f"{self.model}-{self.size}-{str(self.dtype).removeprefix('torch.')}-{self.device}"


CASES = tuple(Case(m, s, d, dev) for m in MODELS for s in SIZES for d in DTYPES for dev in DEVICES)


def cases(models=MODELS, sizes=("small",), dtypes=(torch.float64,), devices=DEVICES) -> list:
    """The matrix restricted to the given axes, as ``pytest.param(Case)`` with readable ids."""
    return [pytest.param(c, id=c.id) for c in CASES
            if c.model in models and c.size in sizes and c.dtype in dtypes and c.device in devices]


def make_model(case: Case):
    """A fresh model for the case (seeded; nonzero biases so bias terms are exercised).

    Built in float64 and then converted, so the float32 case is the float64 model rounded.
    """
    _, _, H, I, O = case.dims
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64)
    builders = {
        "rnn": lambda: VanillaRNN(I, H, O, gain=1.3, **kw),
        "leaky_current": lambda: LeakyRNN(I, H, O, dt=0.3, form="current", gain=1.5, **kw),
        "leaky_rate": lambda: LeakyRNN(I, H, O, dt=0.3, form="rate", gain=1.5, **kw),
        "gru": lambda: GRU(I, H, O, **kw),
        "lstm": lambda: LSTM(I, max(1, H // 2 + 1), O, **kw),  # state [h; c]
        "node": lambda: NeuralODE(I, H, O, width=6, dt=0.4, method="rk4", **kw),
        "node_euler": lambda: NeuralODE(I, H, O, width=6, dt=0.4, method="euler", substeps=2, **kw),
        "adapter": lambda: CellAdapter(torch.nn.RNNCell(I, H, dtype=torch.float64), output_dim=O),
    }
    m = builders[case.model]()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("b") or "bias" in k or k.endswith("b1") or k.endswith("b2"):
                p.normal_(0, 0.3)
    return m.to(device=case.device, dtype=case.dtype)


def make_data(case: Case, model, seed: int = 1):
    """Inputs ``[B, T, I]``, initial state ``[B, H]`` and targets ``[B, T, O]`` for the case."""
    B, T = case.dims[:2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, model.input_dim, generator=g, dtype=torch.float64)
    z0 = 0.5 * torch.randn(B, model.state_dim, generator=g, dtype=torch.float64)
    y = torch.randn(B, T, model.output_dim, generator=g, dtype=torch.float64)
    return tuple(t.to(device=case.device, dtype=case.dtype) for t in (x, z0, y))


@dataclass
class Built:
    """What ``build`` returns: everything a test needs, owned by that test alone."""

    case: Case
    model: object
    inputs: torch.Tensor
    z0: torch.Tensor
    targets: torch.Tensor
    traj: object
    names: list

    def jacobian(self) -> torch.Tensor:
        """``dz/dθ`` by ``torch.func.jacrev`` of the unrolled model: ``[B·T·H, n_params]`` (the independent
        reference for ``P Jθ``)."""
        params = {k: v.detach() for k, v in self.model.cell_params().items()}
        names = self.names
        sizes = [params[n].numel() for n in names]

        def unroll_flat(theta):
            parts = torch.split(theta, sizes)
            p = {n: t.reshape(params[n].shape) for n, t in zip(names, parts, strict=True)}
            return self.model.unroll(p, self.inputs, self.z0)

        theta = torch.cat([params[n].reshape(-1) for n in names])
        return torch.func.jacrev(unroll_flat)(theta).reshape(-1, theta.numel())


def build(case: Case, *, targets: bool = True) -> Built:
    """A fresh model, data and recording for ``case`` (nothing cached between calls)."""
    m = make_model(case)
    x, z0, y = make_data(case, m)
    traj = record(m, x, z0, targets=y if targets else None)
    return Built(case, m, x, z0, y, traj, list(m.cell_params()))


def tolerance(dtype: torch.dtype, n: int) -> float:
    """Relative tolerance for a float computation of depth ~n: ``100 · eps · √n`` (1e-12-ish in float64)."""
    return 100 * torch.finfo(dtype).eps * math.sqrt(max(n, 1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare_operator(op, dense: torch.Tensor, *, rtol: float | None = None, probes: int = 3, seed: int = 0) -> None:
    """Assert that ``op`` is the matrix ``dense`` (``[size_out, size_in]`` or ``[*shape_out, *shape_in]``).

    Checks the materialised matrix, a batch of products ``op.matmat`` and of adjoint products
    ``op.rmatmat`` against the dense ones, and the adjoint identity ⟨A x, y⟩ = ⟨x, A* y⟩, all to
    ``rtol`` (default ``tolerance(op.dtype, size_in + size_out)``).
    """
    M = dense.reshape(op.size_out, op.size_in).to(torch.float64)
    tol = tolerance(op.dtype, op.size_in + op.size_out) if rtol is None else rtol
    got = op.to_matrix()
    assert got.dtype == op.dtype and got.device == op.device, (got.dtype, got.device, op)
    assert tuple(got.shape) == tuple(M.shape), (tuple(got.shape), tuple(M.shape))
    err = rel(got, M.to(got.device))
    assert err <= tol, f"{op!r}: dense matrices differ by {err:.3g} > {tol:.3g}"
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(probes, op.size_in, generator=g, dtype=torch.float64)
    Y = torch.randn(probes, op.size_out, generator=g, dtype=torch.float64)
    dev = op.device
    AX = op.matmat(X.to(op.dtype).to(dev).reshape(probes, *op.shape_in)).reshape(probes, -1).cpu()
    ATY = op.rmatmat(Y.to(op.dtype).to(dev).reshape(probes, *op.shape_out)).reshape(probes, -1).cpu()
    assert rel(AX, X @ M.T.cpu()) <= tol, f"{op!r}: matmat differs by {rel(AX, X @ M.T.cpu()):.3g}"
    assert rel(ATY, Y @ M.cpu()) <= tol, f"{op!r}: rmatmat differs by {rel(ATY, Y @ M.cpu()):.3g}"
    lhs, rhs = (AX.double() * Y).sum(1), (X * ATY.double()).sum(1)
    assert torch.allclose(lhs, rhs, rtol=tol, atol=tol * float(lhs.abs().max())), (lhs, rhs)
