"""Bifurcation detection, location and classification on systems with known answers."""

import math

import pytest
import torch

from kpflow.dynamics import (
    NORMAL_FORMS,
    bialternate_product,
    bifurcation_test_functions,
    constant_input_map,
    find_bifurcations,
    find_fixed_points,
    normal_form,
    track_bifurcations,
)
from kpflow.models import VanillaRNN

D = torch.float64


def tanh_unit(w, b=None):
    m = VanillaRNN(1, 1, 1, nonlinearity="tanh", bias=b is not None, dtype=D)
    with torch.no_grad():
        m.cell.W.fill_(w)
        m.cell.U.zero_()
        if b is not None:
            m.cell.b.fill_(b)
    return m


def mu(v):
    return {"mu": torch.tensor(float(v), dtype=D)}


def test_pitchfork_of_tanh_unit_located_to_1e6():
    m = tanh_unit(0.5)
    pa = {k: v.detach().clone() for k, v in m.cell_params().items()}
    pb = {**pa, "W": torch.full((1, 1), 1.5, dtype=D)}
    starts = torch.linspace(-1.5, 1.5, 13).reshape(-1, 1)
    scan = find_bifurcations(m, pa, pb, initial_states=starts)
    assert [e.kind for e in scan.events] == ["pitchfork"]
    e = scan.events[0]
    w_star = 0.5 + e.s * 1.0
    assert abs(w_star - 1.0) < 1e-6
    assert e.criticality == "supercritical"
    assert abs(e.eigenvalue - 1.0) < 1e-6
    # tanh x = x - x³/3: the centre-manifold cubic coefficient at w = 1 is -1/3
    assert abs(e.coefficients["c"] + 1.0 / 3.0) < 1e-5
    assert len(scan.fixed_points_a) == 1 and len(scan.fixed_points_b) == 3
    assert len(scan.born) == 2 and scan.lost == []


def test_fold_of_biased_tanh_unit():
    # x ↦ tanh(2x + b): the lower stable point and the saddle merge at b_c = atanh(-1/√2) + √2
    m = tanh_unit(2.0, 0.0)
    pa = {k: v.detach().clone() for k, v in m.cell_params().items()}
    pb = {**pa, "b": torch.full((1,), 1.0, dtype=D)}
    scan = find_bifurcations(m, pa, pb, initial_states=torch.linspace(-1.5, 1.5, 13).reshape(-1, 1))
    b_c = math.atanh(-1 / math.sqrt(2)) + math.sqrt(2)
    assert [e.kind for e in scan.events] == ["saddle-node"]
    e = scan.events[0]
    assert abs(e.s - b_c) < 1e-6
    assert e.change == "lost" and len(scan.lost) == 2
    assert abs(float(e.point[0]) + 1 / math.sqrt(2)) < 1e-4


EXPECTED = {"saddle-node": ("saddle-node", 1.0), "transcritical": ("transcritical", 1.0),
            "pitchfork": ("pitchfork", 1.0), "flip": ("flip", -1.0), "neimark-sacker": ("neimark-sacker", None)}


@pytest.mark.parametrize("name", sorted(NORMAL_FORMS))
def test_every_normal_form_detected_at_zero_and_classified(name):
    m = normal_form(name, -0.1)
    H = m.state_dim
    starts = torch.linspace(-0.6, 0.6, 7).reshape(-1, 1).expand(-1, H).contiguous()
    lo, hi = -0.1, 0.13
    scan = find_bifurcations(m, mu(lo), mu(hi), initial_states=starts)
    kinds = [e.kind for e in scan.events]
    kind, lam = EXPECTED[name]
    assert kinds == [kind], kinds
    e = scan.events[0]
    mu_star = lo + e.s * (hi - lo)
    assert abs(mu_star) < 1e-6
    if lam is not None:
        assert abs(e.eigenvalue - lam) < 1e-6
    else:
        assert abs(abs(e.eigenvalue) - 1) < 1e-6 and abs(e.eigenvalue.imag) > 0.5


@pytest.mark.parametrize("name, changed", [("pitchfork", "fold"), ("flip", "flip"),
                                           ("neimark-sacker", "neimark_sacker")])
def test_test_functions_change_sign_across_the_bifurcation(name, changed):
    signs = []
    for v in (-0.05, 0.05):
        m = normal_form(name, v)
        A = constant_input_map(m).jacobians(torch.zeros(1, m.state_dim, dtype=D))[0]
        tf = bifurcation_test_functions(torch.linalg.eigvals(A), is_flow=False)
        signs.append({k: math.copysign(1, x) for k, x in tf.items()})
    for k in signs[0]:
        assert (signs[0][k] != signs[1][k]) == (k == changed), (k, signs)


def test_test_functions_match_determinants():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 5, generator=g, dtype=D) * 0.6
    tf = bifurcation_test_functions(torch.linalg.eigvals(A), is_flow=False)
    I5 = torch.eye(5, dtype=D)
    assert tf["fold"] == pytest.approx(float(torch.linalg.det(A - I5)), rel=1e-9)
    assert tf["flip"] == pytest.approx(float(torch.linalg.det(A + I5)), rel=1e-9)
    AA = bialternate_product(A)
    assert tf["neimark_sacker"] == pytest.approx(float(torch.linalg.det(AA - torch.eye(10, dtype=D))), rel=1e-8)
    # flows: det(A) and det(2A⊙I) = Π(λi + λj)
    tf_flow = bifurcation_test_functions(torch.linalg.eigvals(A), is_flow=True)
    assert tf_flow["fold"] == pytest.approx(float(torch.linalg.det(A)), rel=1e-9)
    lam = torch.linalg.eigvals(A)
    i, j = torch.triu_indices(5, 5, 1)
    assert tf_flow["hopf"] == pytest.approx(float(torch.prod(lam[i] + lam[j]).real), rel=1e-9)


def test_track_along_checkpoints_interpolates_the_training_step():
    m = tanh_unit(0.5)
    base = {k: v.detach().clone() for k, v in m.cell_params().items()}
    ws = [0.5, 0.8, 1.1, 1.4]
    cps = [{**base, "W": torch.full((1, 1), w, dtype=D)} for w in ws]
    hist = track_bifurcations(m, cps, steps=[0, 100, 200, 300],
                              initial_states=torch.linspace(-1.5, 1.5, 9).reshape(-1, 1))
    assert [e.kind for e in hist.events] == ["pitchfork"]
    e = hist.first
    assert e.interval == (1, 2)
    assert abs(e.step - (100 + 100 * (1.0 - 0.8) / 0.3)) < 1e-4
    assert [len(fp) for fp in hist.fixed_points] == [1, 1, 3, 3]


def test_flow_hopf_detected():
    # Euler step of ż = (μ + iω) z - |z|² z written through a planar map with dt
    class HopfFlow(normal_form("neimark-sacker").__class__.__mro__[1]):
        is_flow = True
        dt = 0.05

        def __init__(self, mu=0.0):
            super().__init__(mu, 2)

        def f(self, mu, a):
            a1, a2 = a[..., :1], a[..., 1:]
            r2 = a1 * a1 + a2 * a2
            v = torch.cat([mu * a1 - 2.0 * a2, 2.0 * a1 + mu * a2], -1) - r2 * a
            return a + self.dt * v

    m = HopfFlow(-0.2)
    fp = find_fixed_points(m, initial_states=torch.zeros(1, 2), n_starts=1)
    assert fp.stability == ["stable"]
    scan = find_bifurcations(m, mu(-0.2), mu(0.3), initial_states=torch.full((3, 2), 0.1))
    assert [e.kind for e in scan.events] == ["hopf"]
    assert abs(-0.2 + 0.5 * scan.events[0].s) < 1e-6
    assert abs(scan.events[0].coefficients["frequency"] - 2.0) < 1e-6


def test_different_architectures_are_refused():
    a = VanillaRNN(1, 3, 1, dtype=D)
    b = VanillaRNN(1, 4, 1, dtype=D)
    with pytest.raises(ValueError, match="different architectures: parameter 'U' has shape"):
        find_bifurcations(a, a.cell_params(), b.cell_params())
    c = VanillaRNN(1, 3, 1, bias=False, dtype=D)
    with pytest.raises(ValueError, match="different architectures"):
        track_bifurcations(a, [a.cell_params(), c.cell_params()])
    with pytest.raises(ValueError, match="at least two checkpoints"):
        track_bifurcations(a, [a.cell_params()])


# ------------------------------------------------------------------ defects found on systems with known answers
@pytest.mark.parametrize("dt, omega", [(0.05, 1.0), (0.1, 2.0)])
def test_rk4_flow_hopf_located_from_the_vector_field(dt, omega):
    from dynamics_systems import HopfFlow

    m = HopfFlow(-0.3, omega, -1.0, dt)
    scan = find_bifurcations(m, mu(-0.3), mu(0.3), initial_states=torch.zeros(1, 2, dtype=D))
    assert [e.kind for e in scan.events] == ["hopf"]
    assert abs(-0.3 + 0.6 * scan.events[0].s) <= 1e-8  # not dt ω²/2 = 0.025 / 0.2
    assert scan.events[0].coefficients["frequency"] == pytest.approx(omega, rel=1e-9)


@pytest.mark.parametrize("bend, lo, hi", [(0.0, -0.5, 0.5), (1.0, -0.5, 0.5), (3.0, -0.3, 0.7), (2.0, -0.37, 0.61)])
def test_moving_pitchfork_is_located_on_its_own_branch(bend, lo, hi):
    from dynamics_systems import MovingPitchfork

    m = MovingPitchfork(lo, H=3, bend=bend)
    starts = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    scan = find_bifurcations(m, mu(lo), mu(hi), initial_states=starts)
    assert [e.kind for e in scan.events] == ["pitchfork"]
    e = scan.events[0]
    s = lo + (hi - lo) * e.s
    assert abs(s) <= 1e-8 and e.criticality == "supercritical"
    assert float((e.point - m.centre(torch.tensor(s, dtype=D))).norm()) <= 1e-8


def test_two_eigenvalues_crossing_together_are_flagged():
    from dynamics_systems import DoubleCrossing

    m = DoubleCrossing(-0.5)
    z = torch.zeros(1, 2, dtype=D)
    for hi in (0.5, 0.37):  # a step landing on the crossing, and one that does not
        scan = find_bifurcations(m, mu(-0.5), mu(hi), search=False, points_a=z)
        (e,) = scan.events
        assert abs(-0.5 + (hi + 0.5) * e.s) <= 1e-8
        assert e.n_crossing == 2 and e.flags == ["simultaneous"]
