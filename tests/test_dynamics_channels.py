"""The bifurcation channel of the sNTK: exact totals, planted directions, growth towards μ = 0."""

import pytest
import torch
from torch import nn

from kpflow.dynamics import (
    NormalFormMap,
    bifurcation_channel,
    critical_subspace,
    jacobian_summary,
    normal_form,
    normal_form_match,
)
from kpflow.kernels import ntk, record
from kpflow.models import VanillaRNN
from kpflow.operators import view

D = torch.float64


def planted_linear_rnn(mu, H=6, seed=0):
    """Symmetric linear RNN W = (1+μ) v vᵀ + Σ_i d_i u_i u_iᵀ with |d_i| ≤ 0.3: v is the critical direction."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(H, generator=g, dtype=D)
    v = v / v.norm()
    Q, _ = torch.linalg.qr(torch.cat([v[:, None], torch.randn(H, H - 1, generator=g, dtype=D)], 1))
    Q[:, 0] = v
    d = torch.tensor([1 + mu, 0.3, -0.2, 0.1, 0.25, -0.3][:H], dtype=D)
    m = VanillaRNN(2, H, 1, nonlinearity="identity", bias=False, dtype=D)
    with torch.no_grad():
        m.cell.W.copy_(Q @ torch.diag(d) @ Q.T)
        m.cell.U.zero_()
    z0 = torch.randn(3, H, generator=g, dtype=D)
    return m, v, z0


def test_exact_summary_matches_dense_ntk_and_views():
    m, v, z0 = planted_linear_rnn(-0.2)
    with torch.no_grad():
        m.cell.U.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 9, 2, generator=torch.Generator().manual_seed(5), dtype=D)
    traj = record(m, x, z0=z0, param_names=["W"])
    s = jacobian_summary(traj, chunk_size=7)
    Theta = ntk(traj)
    M = Theta.to_matrix()
    assert s.trace == pytest.approx(float(torch.trace(M)), rel=1e-10)
    assert s.frobenius == pytest.approx(float(M.norm()), rel=1e-10)
    assert s.effective_rank == pytest.approx(float(torch.trace(M)) ** 2 / float(M.norm()) ** 2, rel=1e-10)
    torch.testing.assert_close(s.temporal, view(Theta, "temporal").to_matrix(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.spatial, view(Theta, "spatial").to_matrix(), rtol=1e-10, atol=1e-10)
    # the top eigenvalue of F = JᵀJ is the top eigenvalue of Θ
    assert s.top_value == pytest.approx(float(torch.linalg.eigvalsh(M)[-1]), rel=1e-10)


def test_channel_split_is_exact_and_recovers_the_planted_direction():
    fractions, overlaps = [], []
    for mu in (-0.5, -0.2, -0.05, -0.01):
        m, v, z0 = planted_linear_rnn(mu)
        traj = record(m, torch.zeros(2, 40, 2, dtype=D), z0=z0[:2], param_names=["W"])
        s = jacobian_summary(traj)
        ch = bifurcation_channel(traj, v, totals=s)
        fractions.append(ch.trace_fraction)
        vv = torch.outer(v, v).reshape(-1)
        overlaps.append(abs(float(ch.param_directions[0] @ vv)))
        # the channel's spatial direction is v: every channel vector is (temporal profile) ⊗ v
        C = ch.channel_vectors[0]
        torch.testing.assert_close(C, torch.einsum("bt,h->bth", C @ v, v), atol=1e-12, rtol=0)
        if mu == -0.05:
            Theta = ntk(traj)
            Tc, Tr = ch.split_ntk(Theta)
            Mc, Mr = Tc.to_matrix(), Tr.to_matrix()
            M = Theta.to_matrix()
            assert float(torch.trace(Mc) + torch.trace(Mr)) == pytest.approx(float(torch.trace(M)), rel=1e-10)
            assert float(torch.trace(Mc)) == pytest.approx(ch.trace_fraction * s.trace, rel=1e-9)
            torch.testing.assert_close(Mc, ch.channel_ntk().to_matrix(), rtol=1e-9, atol=1e-9)
            # the Jacobian split: J_c + J_r = J and J_c J_cᵀ = Θ_c
            from kpflow.kernels import state_jacobian

            J = state_jacobian(traj)
            Jc, Jr = ch.split_jacobian(J)
            Jc_m, Jr_m = Jc.to_matrix(), Jr.to_matrix()
            torch.testing.assert_close(Jc_m + Jr_m, J.to_matrix(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(Jc_m @ Jc_m.T, Mc, rtol=1e-9, atol=1e-8)
            # the rank-one channel is the best rank-one approximation of Θ inside the critical subspace
            assert torch.linalg.matrix_rank(Mc, rtol=1e-8) == 1
    assert all(b > a for a, b in zip(fractions, fractions[1:], strict=False)), fractions
    assert fractions[-1] > 0.9
    assert overlaps[-1] > 0.99 and overlaps[-1] > overlaps[0]


class NormalFormWithResidual(NormalFormMap):
    """A normal form α plus two stable residual units ε driven by α: ε' = tanh(R ε + c α).
    Parameters: mu (the bifurcation parameter) and R, c (the residual)."""

    def __init__(self, base: NormalFormMap):
        k = base.state_dim
        super().__init__(float(base.cell.mu.detach()), k + 2)
        self.base, self.k = base, k
        g = torch.Generator().manual_seed(0)
        self.cell.R = nn.Parameter(0.4 * torch.randn(2, 2, generator=g, dtype=D))
        self.cell.c = nn.Parameter(torch.randn(2, k, generator=g, dtype=D))

    def step(self, params, z_prev, x_t):
        a, e = z_prev[..., :self.k], z_prev[..., self.k:]
        a_new = self.base.f(params["mu"], a)
        e_new = torch.tanh(e @ params["R"].T + a @ params["c"].T)
        return torch.cat([a_new, e_new], -1) + x_t


@pytest.mark.parametrize("name", ["pitchfork", "transcritical", "flip", "neimark-sacker"])
def test_channel_fraction_tends_to_one_on_normal_forms(name):
    fracs = []
    for mu in (-0.3, -0.1, -0.01):
        model = NormalFormWithResidual(normal_form(name, mu))
        k = model.k
        z0 = torch.zeros(2, k + 2, dtype=D)
        z0[0, :k], z0[1, :k] = 0.05, 0.02
        z0[:, k:] = 0.3
        traj = record(model, torch.zeros(2, 60, k + 2, dtype=D), z0=z0)
        zero = torch.zeros(1, k + 2, dtype=D)
        A = torch.func.jacrev(model.step, argnums=1)(traj.params, zero, zero)[0, :, 0]
        lam, R = torch.linalg.eig(A)
        critical = (1 + mu) * complex(model.base.critical_multiplier)
        i = int(torch.argmin((lam - critical).abs()))
        ch = bifurcation_channel(traj, R[:, i], totals="exact")
        assert ch.rank == (2 if name == "neimark-sacker" else 1)
        fracs.append(ch.trace_fraction)
    # closest to the bifurcation the channel carries almost all of tr Θ, more than farther away
    assert fracs[2] > max(fracs[:2]), fracs
    assert fracs[2] > 0.9, fracs


def test_critical_subspace_of_real_and_complex_vectors():
    q = torch.tensor([1.0, 2.0, 2.0], dtype=D)
    torch.testing.assert_close(critical_subspace(q)[:, 0], q / 3)
    qc = torch.tensor([1 + 1j, 1j, -1.0], dtype=torch.complex128)
    V = critical_subspace(qc)
    assert V.shape == (3, 2)
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=D))
    coef = torch.linalg.lstsq(V, torch.stack([qc.real, qc.imag], 1)).solution
    torch.testing.assert_close(V @ coef, torch.stack([qc.real, qc.imag], 1))


@pytest.mark.parametrize("name, kind", [("pitchfork", "pitchfork"), ("flip", "flip"),
                                        ("neimark-sacker", "neimark-sacker")])
def test_normal_form_match_is_exact_for_the_normal_form_itself(name, kind):
    # a normal form compared with itself, driven by a forcing: the same profile (correlation 1, ratio 1)
    m = normal_form(name, -0.05)
    H = m.state_dim
    g = torch.Generator().manual_seed(2)
    x = 0.02 * torch.randn(3, 30, H, generator=g, dtype=D)
    z0 = 0.1 * torch.randn(3, H, generator=g, dtype=D)
    traj = record(m, x, z0=z0)
    nf = normal_form_match(traj, torch.zeros(H, dtype=D), torch.ones(1, dtype=D))
    assert nf.kind == kind
    assert nf.mu == pytest.approx(-0.05, abs=1e-12)
    assert nf.correlation == pytest.approx(1.0, abs=1e-9)
    assert nf.magnitude_ratio == pytest.approx(1.0, rel=1e-8)
    if kind != "neimark-sacker":
        assert nf.cubic == pytest.approx(-1.0, rel=1e-9)
    else:  # α = pᴴz with ‖q‖ = 1 rescales the planar coordinate: |d| changes, its phase (π) does not
        assert abs(complex(nf.cubic).imag) < 1e-9 and complex(nf.cubic).real < 0


def test_channel_bad_inputs():
    m, v, z0 = planted_linear_rnn(-0.1)
    traj = record(m, torch.zeros(3, 5, 2, dtype=D), z0=z0, param_names=["W"])
    with pytest.raises(ValueError, match="has 4 entries but the model's state has H=6"):
        bifurcation_channel(traj, torch.ones(4, dtype=D), totals="dense")
    with pytest.raises(ValueError, match="exceed max_params"):
        jacobian_summary(traj, max_params=10)
