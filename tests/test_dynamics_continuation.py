"""Pseudo-arclength continuation: special points of systems with known answers, branch switching,
flows stepped by RK4, bad input, and the learning operators along a branch."""

import math

import pytest
import torch
from dynamics_systems import (
    BogdanovTakensFlow,
    D,
    DoubleCrossing,
    HopfFlow,
    MovingPitchfork,
    hopf_lyapunov,
    ns_coefficient,
)
from torch import nn

from kpflow.dynamics import normal_form
from kpflow.dynamics.continuation import (
    ContinuationError,
    continue_fixed_points,
    custom_path,
    gain_path,
    input_path,
    interpolation_path,
    learning_along_branch,
    parameter_path,
)
from kpflow.models import CellAdapter, VanillaRNN

# (name, kwargs, start at mu = -0.5, kind, criticality, coefficient name, its exact value)
NORMAL_FORM_CASES = [
    ("saddle-node", {}, [0.5 ** 0.5], "saddle-node", None, "a", -1.0),
    ("transcritical", {}, [0.0], "transcritical", None, "a", -1.0),
    ("pitchfork", {}, [0.0], "pitchfork", "supercritical", "c", -1.0),
    ("pitchfork", {"cubic": 1.0}, [0.0], "pitchfork", "subcritical", "c", 1.0),
    ("flip", {}, [0.0], "flip", "subcritical", "c", -1.0),
    ("flip", {"cubic": 1.0}, [0.0], "flip", "supercritical", "c", 1.0),
    ("neimark-sacker", {}, [0.0, 0.0], "neimark-sacker", "supercritical", "d", ns_coefficient(1.0, -1.0)),
    ("neimark-sacker", {"cubic": 1.0}, [0.0, 0.0], "neimark-sacker", "subcritical", "d", ns_coefficient(1.0, 1.0)),
]


def _continue(m, start, lo=-0.5, hi=0.5, name="mu", **kw):
    return continue_fixed_points(m, parameter_path(m, name), torch.tensor(start, dtype=D), s_start=lo,
                                 s_range=(lo, hi), **kw)


@pytest.mark.parametrize("name, kw, start, kind, crit, coef, value", NORMAL_FORM_CASES)
def test_normal_form_located_at_zero_classified_with_its_coefficient(name, kw, start, kind, crit, coef, value):
    res = _continue(normal_form(name, -0.5, **kw), start)
    sps = res.special_points
    assert [sp.kind for sp in sps] == [kind]
    sp = sps[0]
    assert abs(sp.s) <= 1e-8
    assert sp.criticality == crit
    assert sp.coefficients[coef] == pytest.approx(value, rel=1e-8, abs=1e-10)
    assert sp.flags == []
    # the branch passes through the analytic fixed points
    for s, z in zip(res.branches[0].s.tolist(), res.branches[0].points, strict=True):
        if name == "saddle-node":
            assert abs(float(z[0]) ** 2 + s) < 1e-9
        else:
            assert float(z.abs().max()) < 1e-9


@pytest.mark.parametrize("dt, omega, cubic", [(0.05, 1.0, -1.0), (0.1, 2.0, 1.0), (0.1, 2.0, -0.5)])
def test_hopf_of_an_rk4_flow_from_the_exact_vector_field(dt, omega, cubic):
    m = HopfFlow(-0.3, omega, cubic, dt)
    res = continue_fixed_points(m, parameter_path(m, "mu"), torch.zeros(2, dtype=D), s_start=-0.3, s_range=(-0.3, 0.3))
    (sp,) = res.special_points
    assert sp.kind == "hopf" and abs(sp.s) <= 1e-8
    assert sp.coefficients["frequency"] == pytest.approx(omega, rel=1e-10)
    assert sp.coefficients["l1"] == pytest.approx(hopf_lyapunov(omega, cubic), rel=1e-8)
    assert sp.criticality == ("supercritical" if cubic < 0 else "subcritical")
    # eigenvalues along the branch are μ ± iω exactly (not first-order (A − I)/dt)
    b = res.branches[0]
    lam = b.eigenvalues[:, 0]
    assert torch.allclose(lam.real, b.s, atol=1e-10) and torch.allclose(lam.imag.abs(), torch.full_like(b.s, omega))


@pytest.mark.parametrize("beta2", [-1.0, -0.6])
@pytest.mark.parametrize("sigma", [-1.0, 1.0])
def test_bogdanov_takens_flow_fold_curve_and_hopf_point(beta2, sigma):
    m = BogdanovTakensFlow(-0.5, beta2, sigma)
    x0 = (-beta2 - math.sqrt(beta2 ** 2 + 2.0)) / 2  # lower equilibrium at beta1 = -0.5
    res = continue_fixed_points(m, parameter_path(m, "beta1"), torch.tensor([x0, 0.0], dtype=D), s_start=-0.5,
                                s_range=(-0.5, 0.5))
    b = res.branches[0]
    x = b.points[:, 0]
    assert float((x * x + beta2 * x + b.s).abs().max()) < 1e-9 and float(b.points[:, 1].abs().max()) < 1e-12
    kinds = {sp.kind: sp for sp in res.special_points}
    assert sorted(kinds) == ["hopf", "saddle-node"]
    lp, h = kinds["saddle-node"], kinds["hopf"]
    assert abs(lp.s - beta2 ** 2 / 4) <= 1e-8 and abs(float(lp.point[0]) + beta2 / 2) <= 1e-6
    assert abs(h.s) <= 1e-8 and float(h.point.norm()) <= 1e-8
    assert h.coefficients["frequency"] == pytest.approx(math.sqrt(-beta2), rel=1e-9)
    assert h.criticality == ("supercritical" if sigma < 0 else "subcritical")
    if beta2 == -1.0:  # Guckenheimer & Holmes (3.4.11): ℓ₁ = σ/4 here
        assert h.coefficients["l1"] == pytest.approx(sigma / 4, rel=1e-8)


@pytest.mark.parametrize("bend, lo, hi, cubic", [(1.0, -0.5, 0.5, -1.0), (3.0, -0.3, 0.7, -1.0),
                                                 (2.0, -0.37, 0.61, 1.0), (-5.0, -0.2, 0.9, -1.0)])
def test_moving_pitchfork_located_on_its_own_branch(bend, lo, hi, cubic):
    m = MovingPitchfork(lo, H=3, cubic=cubic, bend=bend)
    res = continue_fixed_points(m, parameter_path(m, "mu"), m.centre(torch.tensor(lo, dtype=D)), s_start=lo,
                                s_range=(lo, hi), switch_branches=True)
    (sp,) = res.special_points
    assert sp.kind == "pitchfork" and sp.criticality == ("supercritical" if cubic < 0 else "subcritical")
    assert abs(sp.s) <= 1e-8
    assert float((sp.point - m.centre(torch.tensor(sp.s, dtype=D))).norm()) <= 1e-8
    assert sp.coefficients["c"] == pytest.approx(cubic, rel=1e-6)
    # the two arms born there: u₁ = ±√(−μ/c) in the rotated frame, on the side given by the cubic
    assert len(res.branches) == 3
    for b in res.branches[1:]:
        u = (b.points - m.centre(b.s.unsqueeze(-1))) @ m.Q
        assert float((u[:, 0] ** 2 + b.s / cubic).abs().max()) < 1e-9
        assert float(u[:, 1:].abs().max()) < 1e-9


def test_transcritical_branch_switching_finds_the_crossing_branch():
    res = _continue(normal_form("transcritical", -0.5), [0.0], switch_branches=True)
    assert len(res.branches) == 3
    for b in res.branches[1:]:
        assert torch.allclose(b.points[:, 0], b.s, atol=1e-10)  # the branch α = μ
        assert b.s.min() < -0.49 or b.s.max() > 0.49


def test_two_eigenvalues_crossing_together_are_flagged():
    res = _continue(DoubleCrossing(-0.5), [0.0, 0.0])
    (sp,) = res.special_points
    assert abs(sp.s) <= 1e-8 and sp.n_crossing == 2 and "simultaneous" in sp.flags


def test_gain_input_and_interpolation_paths_agree_on_a_tanh_pitchfork():
    # x ↦ tanh(w x): pitchfork at w = 1 whichever way w is reached
    m = VanillaRNN(1, 1, 1, bias=False, dtype=D)
    with torch.no_grad():
        m.cell.W.fill_(0.5)
        m.cell.U.zero_()
    p = {k: v.detach().clone() for k, v in m.cell_params().items()}
    res = continue_fixed_points(m, gain_path(m), torch.zeros(1, dtype=D), s_start=1.0, s_range=(1.0, 3.0))
    assert abs(0.5 * res.special_points[0].s - 1.0) <= 1e-8
    pb = {**p, "W": torch.full((1, 1), 1.5, dtype=D)}
    res = continue_fixed_points(m, interpolation_path(m, p, pb), torch.zeros(1, dtype=D), s_start=0.0, s_range=(0, 1))
    (sp,) = res.special_points
    assert sp.kind == "pitchfork" and abs(0.5 + sp.s - 1.0) <= 1e-8
    assert sp.coefficients["c"] == pytest.approx(-1.0 / 3.0, rel=1e-8)
    # a constant input breaks the symmetry: at w = 2 the input level moves the branch through two folds
    m2 = VanillaRNN(1, 1, 1, bias=False, dtype=D)
    with torch.no_grad():
        m2.cell.W.fill_(2.0)
        m2.cell.U.fill_(1.0)
    x_lo = -1.0
    z0 = torch.tensor([-0.9999], dtype=D)
    res = continue_fixed_points(m2, input_path(m2, 0), z0, s_start=x_lo, s_range=(-1.0, 1.0), start_radius=1.0)
    folds = sorted(sp.s for sp in res.special_points if sp.kind == "saddle-node")
    b_c = math.atanh(1 / math.sqrt(2)) * 1 - 2 * (1 / math.sqrt(2))  # x ↦ tanh(2x + b): fold at |b| = 2x* − atanh(x*)
    assert folds == pytest.approx([b_c, -b_c], abs=1e-8)


def test_bad_input_gives_clear_errors():
    m = normal_form("pitchfork", -0.5)
    path = parameter_path(m, "mu")
    with pytest.raises(ContinuationError, match="not near a fixed point"):
        continue_fixed_points(m, path, torch.tensor([3.0], dtype=D), s_start=-0.5, s_range=(-0.5, 0.5),
                              start_radius=0.1)
    with pytest.raises(ValueError, match="outside the path's domain"):
        m2 = VanillaRNN(1, 1, 1, dtype=D)
        continue_fixed_points(m2, gain_path(m2), torch.zeros(1, dtype=D), s_start=0.5, s_range=(-1.0, 1.0))

    class Line(nn.Module):  # z ↦ A z with an eigenvalue exactly 1: a line of fixed points for every s
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5, dtype=D))

        def forward(self, x, h):
            return torch.stack([h[:, 0], self.a * h[:, 1]], -1)

    line = CellAdapter(Line(), 1, 2)
    with pytest.raises(ContinuationError, match="singular Jacobian"):
        continue_fixed_points(line, parameter_path(line, "a"), torch.zeros(2, dtype=D), s_start=0.5,
                              s_range=(0.0, 0.9))
    # a user path that leaves the model's domain: sqrt of a negative gain gives NaN
    m3 = VanillaRNN(1, 1, 1, bias=False, dtype=D)
    with torch.no_grad():
        m3.cell.W.fill_(0.5)
    path = custom_path(m3, lambda s: {"W": torch.sqrt(s).reshape(1, 1)})
    with pytest.raises(ContinuationError, match="domain"):
        continue_fixed_points(m3, path, torch.zeros(1, dtype=D), s_start=0.25, s_range=(-1.0, 0.5))


def test_float32_cell_with_a_float32_buffer():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(0.5 * torch.eye(2))
            self.register_buffer("M", 0.1 * torch.eye(2))

        def forward(self, x, h):
            return torch.tanh(h @ self.W.T + h @ self.M + x)

    m = CellAdapter(Cell(), 2, 2)
    res = continue_fixed_points(m, gain_path(m, "W"), torch.zeros(2), s_start=1.0, s_range=(1.0, 3.0))
    (sp,) = res.special_points  # x ↦ tanh((0.5 g + 0.1) x): a double pitchfork at g = 1.8
    assert abs(sp.s - 1.8) <= 1e-8 and "simultaneous" in sp.flags


def test_learning_operators_along_a_saddle_node_branch_match_the_closed_form():
    # α ↦ α − μ − α² on its stable branch α* = √(−μ): the run from α* stays there, A = 1 − 2α*, and the
    # sNTK of the one parameter μ is d dᵀ with d_t = −Σ_{k<t} A^k = −(1 − A^t)/(1 − A)
    m = normal_form("saddle-node", -0.5)
    res = _continue(m, [0.5 ** 0.5], hi=0.0)
    rows = learning_along_branch(m, res, T=12, probes=4, n_points=6)
    assert len(rows) >= 6
    stable = [r for r in rows if r["stable"] and r["margin"] < -1e-3]
    for r in stable:
        a = math.sqrt(-r["s"])
        A = 1 - 2 * a
        d = [-(1 - A ** t) / (1 - A) for t in range(1, 13)]
        assert r["ntk_trace"] == pytest.approx(sum(v * v for v in d), rel=1e-10)
        assert r["ntk_trace_se"] == 0.0  # one parameter: the one-sided estimator is exact
        assert r["K_trace"] == pytest.approx(12.0, rel=1e-12)  # ∂F/∂μ = −1 at every step
    traces = [r["ntk_trace"] for r in sorted(stable, key=lambda r: r["distance"])]
    assert traces == sorted(traces, reverse=True)  # amplification grows towards the fold
