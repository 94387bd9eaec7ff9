"""Fixed points and their stability on systems with known answers."""

import math

import pytest
import torch
from torch import nn

from kpflow.dynamics import (
    NoFixedPointError,
    classify_spectrum,
    constant_input_map,
    find_fixed_points,
    normal_form,
)
from kpflow.models import LeakyRNN, VanillaRNN

D = torch.float64


def linear_rnn(W, U=None, b=None):
    H = W.shape[0]
    I = 1 if U is None else U.shape[1]
    m = VanillaRNN(I, H, 1, nonlinearity="identity", bias=b is not None, dtype=D)
    with torch.no_grad():
        m.cell.W.copy_(W)
        m.cell.U.copy_(torch.zeros(H, I, dtype=D) if U is None else U)
        if b is not None:
            m.cell.b.copy_(b)
    return m


def tanh_unit(w):
    m = VanillaRNN(1, 1, 1, nonlinearity="tanh", bias=False, dtype=D)
    with torch.no_grad():
        m.cell.W.fill_(w)
        m.cell.U.zero_()
    return m


def random_matrix_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(len(eigs), len(eigs), generator=g, dtype=D)
    return S @ torch.diag(torch.tensor(eigs, dtype=D)) @ torch.linalg.inv(S)


@pytest.mark.parametrize("eigs, label, dim", [
    ([0.5, -0.3, 0.9, 0.1], "stable", 0),
    ([1.5, -0.3, 0.9, 0.1], "saddle", 1),
    ([1.5, -1.2, 0.9, 0.1], "saddle", 2),
    ([1.5, -1.2, 2.0, 1.1], "unstable", 4),
])
def test_linear_map_fixed_point_and_stability(eigs, label, dim):
    A = random_matrix_with_spectrum(eigs)
    U = torch.tensor([[1.0], [0.5], [-1.0], [2.0]], dtype=D)
    b = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=D)
    m = linear_rnn(A, U, b)
    x_bar = torch.tensor([0.7], dtype=D)
    fp = find_fixed_points(m, x_bar, n_starts=8, seed=1)
    z_exact = torch.linalg.solve(torch.eye(4, dtype=D) - A, b + U[:, 0] * 0.7)
    assert len(fp) == 1
    torch.testing.assert_close(fp.points[0], z_exact, atol=1e-10, rtol=1e-10)
    assert fp.stability == [label] and int(fp.unstable_dim[0]) == dim
    # spectrum (sorted by |λ|, most unstable first) and eigenvectors
    torch.testing.assert_close(fp.eigenvalues[0].abs(), torch.tensor(sorted(map(abs, eigs), reverse=True), dtype=D),
                               atol=1e-10, rtol=1e-10)
    R, L, lam = fp.right_eigenvectors[0], fp.left_eigenvectors[0], fp.eigenvalues[0]
    Ac = A.to(R.dtype)
    torch.testing.assert_close(Ac @ R, R * lam, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(L.mH @ Ac, lam.unsqueeze(-1) * L.mH, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(L.mH @ R, torch.eye(4, dtype=R.dtype), atol=1e-10, rtol=1e-10)


def test_tanh_unit_fixed_points_pitchfork_branches():
    fp = find_fixed_points(tanh_unit(1.5), initial_states=torch.linspace(-2, 2, 21).reshape(-1, 1), n_starts=21)
    assert len(fp) == 3
    pts = fp.points[:, 0]
    order = torch.argsort(pts)
    xs = pts[order]
    assert abs(float(xs[1])) < 1e-12
    # x* = tanh(1.5 x*), checked against a bisection solve that knows nothing of the library
    lo, hi = 0.1, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.tanh(1.5 * mid) > mid else (lo, mid)
    assert abs(float(xs[2]) - lo) < 1e-12 and abs(float(xs[0]) + lo) < 1e-12
    labels = [fp.stability[i] for i in order.tolist()]
    assert labels == ["stable", "unstable", "stable"]
    # multipliers: 1.5 at the origin, 1.5 sech²(1.5 x*) < 1 on the branches
    mult = fp.eigenvalues[order, 0].real
    torch.testing.assert_close(mult[1], torch.tensor(1.5, dtype=D))
    torch.testing.assert_close(mult[2], torch.tensor(1.5 / math.cosh(1.5 * lo) ** 2, dtype=D))
    below = find_fixed_points(tanh_unit(0.5), initial_states=torch.linspace(-2, 2, 9).reshape(-1, 1), n_starts=9)
    assert len(below) == 1 and below.stability == ["stable"]


def test_flow_uses_real_part_rule():
    # Euler step of ż = -z + W z: multiplier -1.5 (|λ| > 1 as a map) is a stable direction of the flow
    dt = 0.1
    m = LeakyRNN(1, 2, 1, dt=dt, nonlinearity="identity", dtype=D)
    W = torch.diag(torch.tensor([-24.0, 0.5], dtype=D))
    with torch.no_grad():
        for p in m.cell.parameters():
            p.zero_()
        m.cell.W.copy_(W)
    fp = find_fixed_points(m, n_starts=4)
    assert m.is_flow and fp.is_flow
    assert fp.stability == ["stable"]
    torch.testing.assert_close(fp.eigenvalues[0].real.sort().values, torch.tensor([-25.0, -0.5], dtype=D))
    label_as_map, _ = classify_spectrum(1 + dt * fp.eigenvalues[0], is_flow=False)
    assert label_as_map == "saddle"


def test_slow_points_on_request():
    # saddle-node ghost: α ↦ α − μ − α² with μ > 0 has no fixed point, a slow point at α = 0 (q = μ²/2)
    m = normal_form("saddle-node", 1e-3)
    with pytest.raises(NoFixedPointError, match="no fixed point"):
        find_fixed_points(m, initial_states=torch.linspace(-0.5, 0.5, 11).reshape(-1, 1), n_starts=11,
                          max_iters=400)
    fp = find_fixed_points(m, initial_states=torch.linspace(-0.5, 0.5, 11).reshape(-1, 1), n_starts=11,
                           slow_points=True, slow_q=1e-5, max_iters=3000, lr=3e-2)
    assert len(fp) == 1 and bool(fp.is_slow[0])
    assert abs(float(fp.points[0, 0])) < 1e-4
    assert abs(float(fp.q[0]) - 0.5e-6) < 1e-9


def test_deduplication_and_summary():
    fp = find_fixed_points(tanh_unit(2.0), initial_states=torch.linspace(-3, 3, 60).reshape(-1, 1), n_starts=60)
    assert len(fp) == 3
    rows = fp.summary()
    assert {r["stability"] for r in rows} == {"stable", "unstable"}
    assert len(fp.stable()) == 2


def test_bad_inputs_have_clear_messages():
    with pytest.raises(TypeError, match="no notion of a constant input"):
        constant_input_map(nn.GRUCell(2, 3))
    m = tanh_unit(0.5)
    m.has_constant_input = False
    with pytest.raises(TypeError, match="has_constant_input=False"):
        find_fixed_points(m)
    m.has_constant_input = True
    with pytest.raises(ValueError, match=r"shape \[input_dim\] = \[1\]"):
        constant_input_map(m, torch.zeros(3))
    with pytest.raises(ValueError, match="end in the state size H=1"):
        find_fixed_points(m, initial_states=torch.zeros(4, 2))


# ------------------------------------------------------------------ defects found on systems with known answers
def test_rk4_flow_spectrum_is_that_of_the_vector_field():
    from dynamics_systems import HopfFlow, HopfFlowStepOnly

    # ż = (μ + iω) z − |z|² z stepped by RK4 (dt ω²/2 = 0.2 would move a first-order reading past μ)
    m = HopfFlow(0.05, 2.0, -1.0, 0.1)
    fp = find_fixed_points(m, initial_states=torch.zeros(1, 2, dtype=D), n_starts=1)
    assert fp.stability == ["unstable"]
    lam = fp.eigenvalues[0]
    assert torch.allclose(lam.real, torch.full((2,), 0.05, dtype=D), atol=1e-12)
    assert torch.allclose(lam.imag.abs(), torch.full((2,), 2.0, dtype=D), atol=1e-12)
    # a flow known only through its step is read as an Euler step, (A − I)/dt: documented, first order
    m2 = HopfFlowStepOnly(0.05, 2.0, -1.0, 0.1)
    A = constant_input_map(m2).jacobians(torch.zeros(1, 2, dtype=D))[0]
    lam2 = find_fixed_points(m2, initial_states=torch.zeros(1, 2, dtype=D), n_starts=1).eigenvalues[0]
    expected = torch.linalg.eigvals((A - torch.eye(2, dtype=D)) / 0.1)
    assert torch.allclose(torch.sort(lam2.imag).values, torch.sort(expected.imag).values, atol=1e-12)


@pytest.mark.parametrize("name, mu", [("saddle-node", 0.0), ("pitchfork", 0.0), ("pitchfork", -1e-10)])
def test_double_root_comes_back_as_one_marginal_point(name, mu):
    m = normal_form(name, mu)
    fp = find_fixed_points(m, initial_states=torch.linspace(-1, 1, 64).reshape(-1, 1).to(D))
    assert len(fp) == 1, fp
    assert fp.stability == ["marginal"]
    assert float(fp.points.abs().max()) < 1e-7
    assert fp.info["merged"] == [64]


def test_line_of_fixed_points_is_one_marginal_point():
    class Line(nn.Module):  # z ↦ diag(1, 0.5) z: every point of the first axis is fixed
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.diag(torch.tensor([1.0, 0.5], dtype=D)))

        def forward(self, x, h):
            return h @ self.A.T

    from kpflow.models import CellAdapter

    g = torch.Generator().manual_seed(0)
    fp = find_fixed_points(CellAdapter(Line(), 1, 2), initial_states=torch.randn(64, 2, generator=g, dtype=D))
    assert len(fp) == 1 and fp.stability == ["marginal"] and fp.info["merged"] == [64]
    assert abs(float(fp.points[0, 1])) < 1e-12


def test_float32_cell_with_a_float32_buffer_is_analysed_in_float64():
    from kpflow.models import CellAdapter

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(0.5 * torch.eye(2))
            self.register_buffer("M", 0.1 * torch.eye(2))

        def forward(self, x, h):
            return torch.tanh(h @ self.W.T + h @ self.M + x + 0.2)

    m = CellAdapter(Cell(), 2, 2)
    fp = find_fixed_points(m, n_starts=8)
    assert len(fp) == 1 and fp.points.dtype == D
    z = fp.points[0]
    assert torch.allclose(z, torch.tanh(0.6 * z + 0.2), atol=1e-12)  # the float64 fixed point, not float32's
    assert m.cell.M.dtype == torch.float32  # the user's cell is untouched


def test_far_fixed_point_dropped_as_an_outlier_is_reported_as_such():
    from kpflow.models import CellAdapter

    class Far(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5, dtype=D))

        def forward(self, x, h):
            return self.a * (h - 100.0) + 100.0

    m = CellAdapter(Far(), 1, 1)
    starts = torch.randn(8, 1, generator=torch.Generator().manual_seed(0), dtype=D)
    with pytest.raises(NoFixedPointError, match="outlier") as err:
        find_fixed_points(m, initial_states=starts)
    assert "reached was 0" not in str(err.value) and "distance 100" in str(err.value)
    fp = find_fixed_points(m, initial_states=starts, exclude_outliers=False)
    assert float(fp.points[0, 0]) == pytest.approx(100.0, abs=1e-10)
