"""Normal forms as kpflow models: their maps, fixed points, Green's matrix, d_μα and sNTK."""

import math

import pytest
import torch

from kpflow.dynamics import (
    NORMAL_FORMS,
    amplification_landscape,
    find_fixed_points,
    greens_matrix,
    mu_sensitivity,
    normal_form,
)
from kpflow.kernels import ntk, record

D = torch.float64
A0 = torch.tensor([[0.3], [-0.2], [0.05]], dtype=D)


def unrolled(model, mu, alpha0, T):
    return model.unroll({"mu": mu}, torch.zeros(alpha0.shape[0], T, model.state_dim, dtype=D), alpha0)


@pytest.mark.parametrize("name", sorted(NORMAL_FORMS))
def test_fixed_points_match_the_analytic_ones(name):
    for mu in (-0.2, 0.15):
        m = normal_form(name, mu)
        exact = m.fixed_points_exact(mu)
        starts = torch.linspace(-1.2, 1.2, 25).reshape(-1, 1).expand(-1, m.state_dim).contiguous()
        fp = find_fixed_points(m, initial_states=starts, n_starts=25, allow_empty=True, max_iters=400)
        if name == "flip":  # ±sqrt(-(2 + μ)) are complex for c = -1: only the origin
            assert exact.shape[0] == 1
        assert len(fp) == exact.shape[0], (name, mu, fp.points)
        for z in exact:
            assert float((fp.points - z).norm(dim=-1).min()) < 1e-10


@pytest.mark.parametrize("name", sorted(NORMAL_FORMS))
def test_mu_sensitivity_and_greens_matrix_against_jacrev(name):
    mu0 = 0.05
    m = normal_form(name, mu0)
    a0 = A0.expand(-1, m.state_dim).contiguous()
    T = 12
    d, traj = mu_sensitivity(m, a0, T)
    ref = torch.func.jacrev(lambda mu: unrolled(m, mu, a0, T))(torch.tensor(mu0, dtype=D))
    torch.testing.assert_close(d, ref, atol=1e-12, rtol=1e-10)
    # Green's matrix: ∂α_t/∂q_s for an additive forcing q, per trial, by jacrev of the forced unroll
    G = greens_matrix(m, a0, T)
    H = m.state_dim

    def forced(q):
        return m.unroll({"mu": torch.tensor(mu0, dtype=D)}, q, a0)

    Jq = torch.func.jacrev(forced)(torch.zeros(a0.shape[0], T, H, dtype=D))  # [B,T,H,B,T,H]
    for b in range(a0.shape[0]):
        torch.testing.assert_close(G[b], Jq[b, :, :, b].reshape(T * H, T * H), atol=1e-12, rtol=1e-10)
    # lower triangular in time (causality) with identity blocks on the diagonal
    Gb = G[0].reshape(T, H, T, H)
    for t in range(T):
        torch.testing.assert_close(Gb[t, :, t], torch.eye(H, dtype=D))
        assert float(Gb[t, :, t + 1:].abs().max() if t + 1 < T else 0.0) == 0.0


def test_sntk_of_a_normal_form_is_rank_one_d_dT():
    m = normal_form("pitchfork", -0.05)
    T = 10
    traj = record(m, torch.zeros(3, T, 1, dtype=D), z0=A0)
    d, _ = mu_sensitivity(m, A0, T)
    Theta = ntk(traj).to_matrix()
    dv = d.reshape(-1)
    torch.testing.assert_close(Theta, torch.outer(dv, dv), atol=1e-12, rtol=1e-10)


def test_linear_regime_closed_form_sensitivity():
    # for α₀ → 0 the pitchfork is linear, α_t = g^t α₀ with g = 1 + μ, so (d_μ α)_t = t g^{t-1} α₀
    g, T, a = 0.9, 15, 1e-7
    m = normal_form("pitchfork", g - 1)
    d, _ = mu_sensitivity(m, torch.tensor([[a]], dtype=D), T)
    t = torch.arange(1, T + 1, dtype=D)
    torch.testing.assert_close(d[0, :, 0], t * g ** (t - 1) * a, rtol=1e-6, atol=0)


def test_landscape_gradient_is_the_derivative_of_the_loss_and_peaks_near_zero():
    mus = torch.tensor([-0.5, -0.2, -0.05, -0.01])
    L = amplification_landscape("pitchfork", mus, torch.tensor([0.1, 0.3]), T=25, mu_star=0.5)
    h = 1e-6
    for i, mu in enumerate(mus.tolist()):
        lp = amplification_landscape("pitchfork", [mu + h], torch.tensor([0.1, 0.3]), T=25, mu_star=0.5).loss[0]
        lm = amplification_landscape("pitchfork", [mu - h], torch.tensor([0.1, 0.3]), T=25, mu_star=0.5).loss[0]
        torch.testing.assert_close(L.gradient[i], (lp - lm) / (2 * h), rtol=1e-5, atol=1e-9)
    # the amplification ‖d_μα‖ grows as the student approaches the bifurcation from the stable side
    assert bool((L.sensitivity_norm[1:] > L.sensitivity_norm[:-1]).all())
    assert torch.allclose(L.ntk_trace, L.sensitivity_norm ** 2)


def test_bad_normal_form_arguments():
    with pytest.raises(ValueError, match="unknown normal form"):
        normal_form("cusp")
    with pytest.raises(ValueError, match="strong resonance"):
        normal_form("neimark-sacker", omega=math.pi / 2)
    with pytest.raises(ValueError, match="cubic coefficient must be non-zero"):
        normal_form("pitchfork", cubic=0.0)
