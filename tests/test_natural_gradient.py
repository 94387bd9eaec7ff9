"""Low-rank natural gradient: the generic pieces against dense float64 references, the optimizer's step
against the exact Gauss–Newton step (torch.func.jacrev of the unrolled model), and its error messages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kpflow.models.base import RecurrentModel
from kpflow.operators import DenseOperator, FunctionOperator
from kpflow.training.natural_gradient import (
    LevenbergMarquardtDamping,
    LowRankEig,
    LowRankNaturalGradient,
    clip_to_trust_region,
    damped_lowrank_solve,
    nystrom_eigh,
)

D = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def psd_with_spectrum(eigenvalues, seed=0, shape=None):
    """A dense PSD operator Q diag(eigenvalues) Qᵀ with a random orthogonal Q; returns (op, Q)."""
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=gen(seed)))
    M = Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=D)) @ Q.T
    M = 0.5 * (M + M.T)
    shape = shape or (n,)
    return DenseOperator(M, shape, shape, is_psd=True), Q


def sin_angle(basis, Q_top):
    """Largest principal-angle sine between span(basis rows) and span(Q_top columns)."""
    U = basis.reshape(basis.shape[0], -1).T
    resid = U - Q_top @ (Q_top.T @ U)
    return float(torch.linalg.matrix_norm(resid, ord=2))


# ------------------------------------------------------------------------------ Nyström
def test_nystrom_exact_on_operator_of_rank_r():
    lam = [5.0, 2.0, 0.5] + [0.0] * 9
    A, Q = psd_with_spectrum(lam, seed=1, shape=(3, 4))
    eig = nystrom_eigh(A, 3, generator=gen(0))
    assert torch.allclose(eig.eigenvalues, torch.tensor(lam[:3], dtype=D), atol=1e-10)
    rebuilt = eig.basis.reshape(3, -1).T @ torch.diag(eig.eigenvalues) @ eig.basis.reshape(3, -1)
    assert torch.allclose(rebuilt, A.to_matrix(), atol=1e-10)
    # orthonormal basis with the operator's input shape
    assert eig.basis.shape == (3, 3, 4)
    G = eig.basis.reshape(3, -1) @ eig.basis.reshape(3, -1).T
    assert torch.allclose(G, torch.eye(3, dtype=D), atol=1e-12)


def test_nystrom_warm_start_converges_to_top_eigenspace_at_gap_rate():
    # gap λ_3/λ_2 = 0.5: subspace iteration contracts tan θ by 0.5 per pass (Golub & Van Loan Thm 8.2.2)
    lam = [10.0, 8.0, 4.0, 3.0, 2.0] + [1.0] * 35
    A, Q = psd_with_spectrum(lam, seed=2)
    r, ratio = 2, lam[2] / lam[1]
    eig = nystrom_eigh(A, r, generator=gen(3))
    s0 = sin_angle(eig.basis, Q[:, :r])
    tan0 = s0 / math.sqrt(max(1 - s0**2, 1e-300))
    sines = [s0]
    for _ in range(30):
        eig = nystrom_eigh(A, r, init=eig.basis, generator=gen(4))
        sines.append(sin_angle(eig.basis, Q[:, :r]))
    for q, s in enumerate(sines):  # each call is one pass; the bound holds up to rounding
        assert s <= tan0 * ratio**q + 1e-12, (q, s, tan0 * ratio**q)
    assert sines[-1] < 1e-8
    assert torch.allclose(eig.eigenvalues, torch.tensor(lam[:r], dtype=D), rtol=1e-10)
    # without a gap between λ_r and λ_{r+1} the rate would be 1; with it the error really shrinks
    assert sines[10] < 0.01 * sines[0]


def test_nystrom_power_iterations_match_repeated_warm_starts():
    lam = [9.0, 3.0, 1.0, 0.5, 0.25, 0.1]
    A, Q = psd_with_spectrum(lam, seed=5)
    e1 = nystrom_eigh(A, 1, power_iters=6, generator=gen(1))
    assert sin_angle(e1.basis, Q[:, :1]) <= (lam[1] / lam[0]) ** 6 * 10
    assert abs(float(e1.eigenvalues[0]) - lam[0]) < 1e-4 * lam[0]


def test_nystrom_rank_zero_and_bad_input():
    A, _ = psd_with_spectrum([1.0, 2.0, 3.0])
    assert nystrom_eigh(A, 0).rank == 0
    with pytest.raises(ValueError, match="larger than the dimension 3"):
        nystrom_eigh(A, 4)
    with pytest.raises(ValueError, match=">= 0"):
        nystrom_eigh(A, -1)
    with pytest.raises(TypeError, match="LinearOperator"):
        nystrom_eigh(torch.eye(3), 1)


# ------------------------------------------------------------------------------ Woodbury solve
def test_damped_lowrank_solve_matches_dense_inverse():
    n, r = 7, 3
    U, _ = torch.linalg.qr(torch.randn(n, r, dtype=D, generator=gen(0)))
    lam = torch.tensor([4.0, 1.0, 0.3], dtype=D)
    eig = LowRankEig(lam, U.T.reshape(r, 7).clone())
    x = torch.randn(n, dtype=D, generator=gen(1))
    for damping, c in [(0.1, 1.0), (2.0, 0.25), (1e-6, 3.0)]:
        M = c * U @ torch.diag(lam) @ U.T + damping * torch.eye(n, dtype=D)
        ref = torch.linalg.solve(M, x)
        got = damped_lowrank_solve(eig, damping, x, scale=c)
        # a backward-stable solve is accurate to cond(M)·eps relative to ‖x‖/λ_min (both sides carry that error)
        cond = float((c * lam.max() + damping) / damping)
        err = float((got - ref).norm() / ref.norm())
        assert err <= 100 * cond * torch.finfo(D).eps, (damping, c, err)
    with pytest.raises(ValueError, match="damping must be > 0"):
        damped_lowrank_solve(eig, 0.0, x)


# ------------------------------------------------------------------------------ damping, trust region
def test_levenberg_marquardt_rule():
    lm = LevenbergMarquardtDamping(1.0)
    assert lm.update(actual=-0.9, predicted=-1.0) == pytest.approx(0.9) and lm.value == pytest.approx(2 / 3)
    assert lm.update(actual=-0.1, predicted=-1.0) == pytest.approx(0.1) and lm.value == pytest.approx(1.0)
    lm.update(actual=-0.5, predicted=-1.0)  # 1/4 <= ρ <= 3/4: unchanged
    assert lm.value == pytest.approx(1.0)
    lm.update(actual=+0.3, predicted=-1.0)  # the loss went up: more damping
    assert lm.value == pytest.approx(1.5)
    small = LevenbergMarquardtDamping(1e-3, minimum=1e-3)
    small.update(-1.0, -1.0)
    assert small.value == 1e-3
    with pytest.raises(ValueError, match="positive initial value"):
        LevenbergMarquardtDamping(-1.0)


def test_trust_region_clip():
    v = torch.tensor([3.0, 4.0], dtype=D)
    clipped, f = clip_to_trust_region(v, 1.0)
    assert float(clipped.norm()) == pytest.approx(1.0) and f == pytest.approx(0.2)
    same, f1 = clip_to_trust_region(v, 10.0)
    assert torch.equal(same, v) and f1 == 1.0
    assert clip_to_trust_region(v, None)[0] is v


# ------------------------------------------------------------------------------ tiny model, dense reference
class TinyRNN(RecurrentModel):
    """z_t = tanh(W z_{t-1} + U x_t + b): the reference cell for these tests (float64)."""

    def __init__(self, input_dim=1, state_dim=2, output_dim=1, seed=0):
        super().__init__(input_dim, state_dim, output_dim)
        g = gen(seed)
        self.cell = nn.ParameterDict({
            "W": nn.Parameter(0.6 * torch.randn(state_dim, state_dim, dtype=D, generator=g)),
            "U": nn.Parameter(torch.randn(state_dim, input_dim, dtype=D, generator=g)),
            "b": nn.Parameter(0.1 * torch.randn(state_dim, dtype=D, generator=g)),
        })
        self.readout = self.readout.to(D)

    def step(self, params, z_prev, x_t):
        return torch.tanh(z_prev @ params["W"].T + x_t @ params["U"].T + params["b"])


def dense_jacobian(model, inputs, names):
    """dz/dθ as a [B*T*H, P] matrix by torch.func.jacrev of the unrolled model (independent reference)."""
    params = {k: v.detach() for k, v in model.cell_params().items()}
    sizes = [params[n].numel() for n in names]

    def states(flat):
        p = dict(params)
        for n, piece in zip(names, torch.split(flat, sizes), strict=True):
            p[n] = piece.reshape(params[n].shape)
        return model.unroll(p, inputs).reshape(-1)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.jacrev(states)(flat)


def state_targets_problem(B, T, seed=0, c=0.5):
    """Loss L = ½ c ‖z − z*‖² on the states; e = c (z − z*)."""
    model = TinyRNN(seed=seed)
    inputs = torch.randn(B, T, 1, dtype=D, generator=gen(seed + 1))
    z_star = 0.8 * torch.tanh(torch.randn(B, T, 2, dtype=D, generator=gen(seed + 2)))

    def closure():
        with torch.no_grad():
            z = model.unroll(model.cell_params(), inputs)
        resid = z - z_star
        return SimpleNamespace(states=z, error=c * resid, loss=0.5 * c * float(resid.pow(2).sum()),
                               params=model.cell_params())

    def dense_J(traj, names):
        Jm = dense_jacobian(model, inputs, names)
        return DenseOperator(Jm, (Jm.shape[1],), (B, T, 2))

    return model, closure, dense_J, inputs, z_star


def flat_params(model, names):
    return torch.cat([model.cell_params()[n].detach().reshape(-1) for n in names])


@pytest.mark.parametrize("B,T,form", [(1, 3, "state"), (2, 4, "parameter")])
def test_full_rank_small_damping_is_exact_gauss_newton(B, T, form):
    c = 0.5
    model, closure, dense_J, inputs, z_star = state_targets_problem(B, T, c=c)
    names = ["W", "U", "b"]
    P, n = 8, B * T * 2
    full = min(P, n)
    lam = 1e-9
    opt = LowRankNaturalGradient(model, lr=1.0, rank=full, damping=lam, adaptive_damping=False,
                                 trust_region=None, jacobian=dense_J, curvature="auto")
    Jm = dense_jacobian(model, inputs, names)
    traj = closure()
    ref_step = -torch.linalg.pinv(Jm) @ (traj.error.reshape(-1) / c)  # exact GN step of ½c‖z − z*‖²
    # damping biases the step by a relative λ / (c σ_min²) at most; allow that plus rounding
    smin2 = float(torch.linalg.svdvals(Jm)[-1]) ** 2
    rtol = 2 * lam / (c * smin2) + 1e-9
    before = flat_params(model, names)
    opt.step(closure)
    got = flat_params(model, names) - before
    assert opt.last_stats["form"] == form
    assert opt.last_stats["curvature"] == pytest.approx(c, rel=1e-12)
    assert float((got - ref_step).norm()) <= rtol * float(ref_step.norm()), (got, ref_step)


def test_rank_zero_is_gradient_descent_scaled_by_inverse_damping():
    model, closure, dense_J, inputs, z_star = state_targets_problem(2, 5, seed=3)
    lr, lam = 0.3, 4.0
    opt = LowRankNaturalGradient(model, lr=lr, rank=0, damping=lam, adaptive_damping=False,
                                 trust_region=None, jacobian=dense_J)
    # independent gradient: autograd of the loss through the unrolled model
    loss = 0.5 * 0.5 * (model.unroll(model.cell_params(), inputs) - z_star).pow(2).sum()
    grads = torch.autograd.grad(loss, [model.cell_params()[n] for n in ("W", "U", "b")])
    g = torch.cat([x.reshape(-1) for x in grads])
    before = flat_params(model, ["W", "U", "b"])
    opt.step(closure)
    got = flat_params(model, ["W", "U", "b"]) - before
    assert torch.allclose(got, -(lr / lam) * g, rtol=1e-10, atol=1e-14)
    assert opt.last_stats["products"] == 1  # exactly SGD's one backward pass


@pytest.mark.parametrize("complement", ["damping", "nystrom"])
@pytest.mark.parametrize("form", ["state", "parameter"])
def test_low_rank_step_matches_dense_top_r_formula(form, complement):
    # rank r < full: the step equals −η J*(cU_rΛ_rU_r* + λI)⁻¹e with the exact top-r eigenpairs of JJ*,
    # once the warm-started sketch has converged (same batch, parameters held fixed by lr ~ 0)
    c, lam, r = 0.5, 1e-2, 2
    model, closure, dense_J, inputs, z_star = state_targets_problem(2, 3, seed=7, c=c)
    names = ["W", "U", "b"]
    opt = LowRankNaturalGradient(model, lr=1e-12, rank=r, damping=lam, adaptive_damping=False,
                                 trust_region=None, jacobian=dense_J, form=form, warmup_iters=60,
                                 complement=complement)
    opt.step(closure)  # converge the basis (60 passes; the parameters move by ~1e-12)
    Jm = dense_jacobian(model, inputs, names)
    e = closure().error.reshape(-1)
    evals, evecs = torch.linalg.eigh(Jm @ Jm.T)
    U, L = evecs[:, -r:], evals[-r:]
    # (cΘ_r + λI)⁻¹, or the Nyström preconditioner that gives the complement the curvature λ_r
    fill = float(L[0]) if complement == "nystrom" else 0.0
    Pc = torch.eye(U.shape[0], dtype=D) - U @ U.T
    x = torch.linalg.solve(c * U @ torch.diag(L) @ U.T + c * fill * Pc + lam * torch.eye(U.shape[0], dtype=D), e)
    ref = -Jm.T @ x
    for g in opt.param_groups:
        g["lr"] = 1.0
    before = flat_params(model, names)
    opt.step(closure)
    got = flat_params(model, names) - before
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-9 * float(ref.norm()))


def test_product_counts_are_reported():
    model, closure, dense_J, *_ = state_targets_problem(2, 5)
    opt = LowRankNaturalGradient(model, rank=2, jacobian=dense_J, form="parameter", refresh_every=2)
    opt.step(closure)  # cold sketch: (warmup 2 + 1) passes × 2 probes of J*J, plus the gradient
    assert (opt.last_stats["jvps"], opt.last_stats["vjps"]) == (6, 7)
    opt.step(closure)  # reuses the basis: only the gradient
    assert opt.last_stats["products"] == 1 and not opt.last_stats["refreshed"]
    opt.step(closure)  # warm refresh: one pass of 2 probes
    assert (opt.last_stats["jvps"], opt.last_stats["vjps"]) == (2, 3)
    assert opt.products_per_step == pytest.approx((13 + 1 + 5) / 3)
    opt_s = LowRankNaturalGradient(model, rank=1, jacobian=dense_J, form="state", warmup_iters=0)
    opt_s.step(closure)  # one pass of 1 probe of JJ*, then J* of [preconditioned error, error]
    assert (opt_s.last_stats["jvps"], opt_s.last_stats["vjps"]) == (1, 3)


def test_steps_decrease_the_loss_and_adapt_damping():
    model, closure, dense_J, *_ = state_targets_problem(4, 6, seed=11)
    opt = LowRankNaturalGradient(model, lr=1.0, rank=4, damping=1.0, jacobian=dense_J)
    losses = [float(opt.step(closure)) for _ in range(15)]
    assert losses[-1] < 0.6 * losses[0]
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True))  # every step reduced the loss
    assert opt.damping < 1.0  # good steps (ρ > 3/4) lowered λ
    assert opt.last_stats["rho"] is not None


# ------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors():
    model, closure, dense_J, *_ = state_targets_problem(1, 2)
    with pytest.raises(ValueError, match="damping"):
        LowRankNaturalGradient(model, damping=-1.0, jacobian=dense_J)
    with pytest.raises(ValueError, match="rank"):
        LowRankNaturalGradient(model, rank=-2, jacobian=dense_J)
    with pytest.raises(ValueError, match="larger than the number of trained parameters"):
        LowRankNaturalGradient(model, rank=9, jacobian=dense_J)
    with pytest.raises(ValueError, match="valid names"):
        LowRankNaturalGradient(model, param_names=["nope"], jacobian=dense_J)
    with pytest.raises(TypeError, match="RecurrentModel"):
        LowRankNaturalGradient(nn.Linear(2, 2))
    # B·T·H = 4 < rank 5 <= P = 8: the state space is too small
    opt = LowRankNaturalGradient(model, rank=5, form="state", jacobian=dense_J)
    with pytest.raises(ValueError, match="larger than the state dimension B·T·H = 4"):
        opt.step(closure)
    opt = LowRankNaturalGradient(model, rank=1, jacobian=dense_J)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="not a recorded trajectory"):
        opt.step(lambda: None)
    no_error = SimpleNamespace(states=torch.zeros(1, 2, 2, dtype=D), error=None, loss=None)
    with pytest.raises(ValueError, match="without targets"):
        opt.step(lambda: no_error)


def test_function_operator_jacobian_and_float32():
    # the optimizer only needs J as a LinearOperator: a matrix-free one in float32 works the same way
    model, closure, dense_J, inputs, _ = state_targets_problem(2, 3)
    Jm = dense_jacobian(model, inputs, ["W", "U", "b"]).float()

    def J32(traj, names):
        return FunctionOperator(lambda v: (Jm @ v).reshape(2, 3, 2), lambda y: Jm.T @ y.reshape(-1),
                                (8,), (2, 3, 2), dtype=torch.float32)

    def closure32():
        t = closure()
        return SimpleNamespace(states=t.states.float(), error=t.error.float(), loss=t.loss)

    opt = LowRankNaturalGradient(model, rank=2, damping=1e-2, jacobian=J32, trust_region=None,
                                 adaptive_damping=False)
    ref = LowRankNaturalGradient(TinyRNN(seed=0), rank=2, damping=1e-2, jacobian=dense_J, trust_region=None,
                                 adaptive_damping=False, warmup_iters=2)
    before = flat_params(model, ["W", "U", "b"])
    opt.step(closure32)
    got = flat_params(model, ["W", "U", "b"]) - before
    assert torch.isfinite(got).all() and got.norm() > 0
    assert ref.last_stats == {}


# ------------------------------------------------------------------------------ with kpflow.kernels
def _cells():
    from kpflow.models import GRU, LSTM, CellAdapter, LeakyRNN, NeuralODE, VanillaRNN

    return {
        "vanilla": lambda: VanillaRNN(1, 2, 2, dtype=D),
        "leaky": lambda: LeakyRNN(1, 2, 2, dtype=D),
        "gru": lambda: GRU(1, 2, 2, dtype=D),
        "lstm": lambda: LSTM(1, 1, 2, dtype=D),
        "node": lambda: NeuralODE(1, 2, 2, width=3, dtype=D),
        "adapter": lambda: CellAdapter(nn.RNNCell(1, 2).double(), output_dim=2),
    }


@pytest.mark.parametrize("jacobian", ["auto", "unrolled", "kernels"])
@pytest.mark.parametrize("cell", ["vanilla", "leaky", "gru", "lstm", "node", "adapter"])
def test_full_rank_gauss_newton_with_recorded_trajectory_for_every_cell(cell, jacobian):
    from kpflow.kernels import record

    torch.manual_seed(0)
    model = _cells()[cell]()
    B, T = 1, 3
    inputs = torch.randn(B, T, 1, dtype=D, generator=gen(1))
    targets = torch.randn(B, T, 2, dtype=D, generator=gen(2))
    names = list(model.cell_params())
    P, n = sum(p.numel() for p in model.cell_params().values()), B * T * model.state_dim
    full = min(P, n)
    # independent reference: J by jacrev of the unrolled model, e by autograd of the loss in the states
    Jm = dense_jacobian(model, inputs, names)
    z = model.unroll({k: v.detach() for k, v in model.cell_params().items()}, inputs).requires_grad_(True)
    loss = ((model.output(z) - targets) ** 2).mean()
    (e,) = torch.autograd.grad(loss, z)
    c = float(e.pow(2).sum()) / (2 * float(loss.detach()))
    ref = -torch.linalg.pinv(Jm) @ (e.reshape(-1) / c)
    lam = 1e-9
    smin2 = float(torch.linalg.svdvals(Jm)[full - 1]) ** 2
    opt = LowRankNaturalGradient(model, lr=1.0, rank=full, damping=lam, adaptive_damping=False,
                                 trust_region=None, jacobian=jacobian)
    before = flat_params(model, names)
    if jacobian == "kernels":  # the closure records with kpflow.kernels.record (adjoint included)
        out = opt.step(lambda: record(model, inputs, targets=targets))
    else:  # the closure hands over the batch; the optimizer records it on one autograd graph
        out = opt.step(lambda: {"inputs": inputs, "targets": targets})
    got = flat_params(model, names) - before
    assert float(out) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert float((got - ref).norm()) <= (4 * lam / (c * smin2) + 1e-8) * float(ref.norm())
    assert opt.last_stats["products"] == opt.last_stats["jvps"] + opt.last_stats["vjps"] > 1


def test_unrolled_jacobian_matches_jacrev_and_its_adjoint():
    from kpflow.models import GRU
    from kpflow.training.natural_gradient import UnrolledJacobian

    model = GRU(2, 3, 1, dtype=D)
    inputs = torch.randn(2, 4, 2, dtype=D, generator=gen(0))
    names = ["weight_hh", "bias_ih"]
    Jm = dense_jacobian(model, inputs, names)
    J = UnrolledJacobian(model, model.cell_params(), names, inputs, torch.zeros(2, 3, dtype=D))
    assert torch.allclose(J.to_matrix(), Jm, atol=1e-12)
    Y = torch.randn(3, 2, 4, 3, dtype=D, generator=gen(1))
    assert torch.allclose(J.rmatmat(Y), Y.reshape(3, -1) @ Jm, atol=1e-12)


def test_trainer_path_records_the_batch_and_trains_the_readout():
    from kpflow.models import VanillaRNN
    from kpflow.tasks import TaskBatch

    model = VanillaRNN(1, 3, 2, dtype=D)
    inputs = torch.randn(4, 5, 1, dtype=D, generator=gen(0))
    batch = TaskBatch(inputs=inputs, targets=torch.randn(4, 5, 2, dtype=D, generator=gen(1)))
    opt = LowRankNaturalGradient(model, rank=2, readout_lr=0.1, param_names=["W"])
    C0, U0 = model.readout.weight.detach().clone(), model.cell.U.detach().clone()
    losses = []
    for _ in range(5):
        opt.set_batch(batch)
        losses.append(float(opt.step(lambda: pytest.fail("the closure must not be called"))))
    assert losses[-1] < losses[0]
    assert not torch.equal(model.readout.weight, C0)  # readout trained by plain gradient steps
    assert torch.equal(model.cell.U, U0)  # only W was selected
    # checkpoint-friendly state: tensors and JSON scalars only
    sd = opt.state_dict()
    st = sd["state"][0]
    assert all(isinstance(v, (torch.Tensor, int, float, str, type(None))) for v in st.values())
    opt2 = LowRankNaturalGradient(model, rank=2, readout_lr=0.1, param_names=["W"])
    opt2.load_state_dict(sd)
    assert torch.equal(opt2._st["eig_basis"], opt._st["eig_basis"]) and opt2.damping == opt.damping


def test_registered_for_configs_and_trains_with_checkpoints(tmp_path):
    from kpflow.models import VanillaRNN
    from kpflow.tasks import StudentTeacher
    from kpflow.training.config import RunConfig
    from kpflow.training.optimizers import make_optimizer
    from kpflow.training.trainer import train

    cfg = RunConfig.model_validate({"optimizer": {"name": "lowrank-ng", "lr": 0.5,
                                                  "params": {"rank": 1, "param_names": ["W"]}}})
    assert cfg.optimizer.name == "lowrank-ng"
    with pytest.raises(ValueError, match="no option"):
        make_optimizer("lowrank-ng", VanillaRNN(2, 3), bogus=1)
    task = StudentTeacher(input_dim=2, hidden=4, output_dim=1, input_rank=1, seq_len=6)
    model = VanillaRNN(2, 4, 1)
    opt = make_optimizer("lowrank-ng", model, lr=0.5, rank=1, param_names=["W"])
    res = train(model, task, {"steps": 4, "batch_size": 3, "checkpoint_every": 2}, optimizer=opt,
                out_dir=tmp_path, progress=False)
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses.values())
    assert opt._st["steps"] == 4 and opt._st["eig_basis"] is not None
    # resume from the last checkpoint restores the optimizer state (basis, damping, step count)
    model2 = VanillaRNN(2, 4, 1)
    opt2 = make_optimizer("lowrank-ng", model2, lr=0.5, rank=1, param_names=["W"])
    train(model2, task, {"steps": 4, "batch_size": 3, "checkpoint_every": 2}, optimizer=opt2,
          out_dir=tmp_path, progress=False)
    assert opt2._st["steps"] == 4
    assert torch.allclose(opt2._st["eig_basis"], opt._st["eig_basis"])


@pytest.mark.parametrize("B,T", [(1, 3), (3, 4)])
def test_output_space_full_rank_is_exact_gauss_newton_of_the_readout_loss(B, T):
    from kpflow.models import VanillaRNN

    torch.manual_seed(3)
    model = VanillaRNN(1, 2, 2, dtype=D)
    inputs = torch.randn(B, T, 1, dtype=D, generator=gen(4))
    targets = torch.randn(B, T, 2, dtype=D, generator=gen(5))
    names = ["W", "U", "b"]
    C = model.readout.weight.detach()
    Jm = dense_jacobian(model, inputs, names)  # [B*T*H, P]
    G = torch.einsum("oh,nhp->nop", C, Jm.reshape(B * T, 2, -1)).reshape(B * T * 2, -1)  # C J
    y = model(inputs)[1].detach().requires_grad_(True)
    loss = ((y - targets) ** 2).mean()
    (e_y,) = torch.autograd.grad(loss, y)
    c = float(e_y.pow(2).sum()) / (2 * float(loss.detach()))
    assert c == pytest.approx(2 / (B * T * 2))  # the MSE's Hessian in output space
    ref = -torch.linalg.pinv(G) @ (e_y.reshape(-1) / c)  # Gauss–Newton step of the readout loss
    full = min(8, B * T * 2)
    lam = 1e-9
    smin2 = float(torch.linalg.svdvals(G)[full - 1]) ** 2
    opt = LowRankNaturalGradient(model, lr=1.0, rank=full, damping=lam, adaptive_damping=False,
                                 trust_region=None, space="output")
    before = flat_params(model, names)
    opt.step(lambda: {"inputs": inputs, "targets": targets})
    got = flat_params(model, names) - before
    assert opt.last_stats["space"] == "output"
    assert float((got - ref).norm()) <= (4 * lam / (c * smin2) + 1e-8) * float(ref.norm())


@pytest.mark.parametrize("form", ["state", "parameter"])
def test_ritz_update_recovers_exact_eigenpairs_from_a_rotated_top_basis(form):
    from kpflow.estimators.nystrom import ritz_update as _ritz_update

    n, P, r = 12, 7, 2
    Jm = torch.randn(n, P, dtype=D, generator=gen(0))
    J = DenseOperator(Jm, (P,), (3, 4))
    Us, sv, Vh = torch.linalg.svd(Jm, full_matrices=False)
    Q, _ = torch.linalg.qr(torch.randn(r, r, dtype=D, generator=gen(1)))
    basis = (Q @ Us[:, :r].T).reshape(r, 3, 4)  # the top-r left singular space, in a random basis
    eig, rotated = _ritz_update(J, basis, r, form)
    assert torch.allclose(eig.eigenvalues, sv[:r] ** 2, rtol=1e-12)
    ref = Us[:, :r].T if form == "state" else Vh[:r]
    got = eig.basis.reshape(r, -1)
    assert torch.allclose((got * ref).sum(1).abs(), torch.ones(r, dtype=D), atol=1e-10)  # same vectors up to sign
    assert torch.allclose(rotated.reshape(r, -1).abs(), Us[:, :r].T.abs(), atol=1e-10)


def test_ritz_updates_between_refreshes_use_vjps_only():
    from kpflow.models import VanillaRNN

    *_, inputs, z_star = state_targets_problem(2, 5, seed=2)
    batch = {"inputs": inputs, "targets": z_star}  # the same trials every step
    torch.manual_seed(0)
    model = VanillaRNN(1, 2, 2, dtype=D)
    # no adaptive damping: a poor reduction ratio would force a refresh and hide what is counted here
    opt = LowRankNaturalGradient(model, rank=2, refresh_every=3, form="parameter", param_names=["W", "U"],
                                 ritz_updates=True, update="nystrom", adaptive_damping=False)
    opt.step(lambda: batch)
    assert opt.last_stats["refreshed"]
    opt.step(lambda: batch)
    st = opt.last_stats
    assert not st["refreshed"] and st["ritz_updated"] and st["jvps"] == 0 and st["vjps"] == 1 + 2
    opt2 = LowRankNaturalGradient(model, rank=2, refresh_every=3, param_names=["W", "U"],  # off by default
                                  update="nystrom", adaptive_damping=False)
    opt2.step(lambda: batch)
    opt2.step(lambda: batch)
    assert not opt2.last_stats["ritz_updated"] and opt2.last_stats["products"] == 1


# ------------------------------------------------------------------------------ Krylov / Rayleigh–Ritz update
def test_ritz_sketch_is_rayleigh_ritz_of_the_dense_sntk():
    from kpflow.training.natural_gradient import CountingOperator, ritz_sketch

    n, P, r = 12, 9, 2
    Jm = torch.randn(n, P, dtype=D, generator=gen(20))
    J = CountingOperator(DenseOperator(Jm, (P,), (3, 4)))
    e = torch.randn(3, 4, dtype=D, generator=gen(21))
    sketch = [torch.randn(3, 4, dtype=D, generator=gen(22 + i)) for i in range(3)]
    ritz = ritz_sketch(J, e, sketch, r)
    assert J.vjps == 4 and J.jvps == 0  # one batched J* product of e and the sketch, nothing else
    # independent reference: orthonormal basis of span(e, sketch) by SVD, Θ projected on it
    X = torch.stack([e.reshape(-1)] + [s.reshape(-1) for s in sketch], 1)
    Qs = torch.linalg.svd(X, full_matrices=False)[0]
    Theta = Jm @ Jm.T
    vals, vecs = torch.linalg.eigh(Qs.T @ Theta @ Qs)
    top = Qs @ vecs[:, -r:]
    assert torch.allclose(ritz.values, vals.flip(0)[:r], rtol=1e-10)
    U = ritz.state_basis.reshape(r, -1).T
    assert torch.allclose(U @ U.T, top @ top.T, atol=1e-10)  # same Ritz subspace (projectors)
    assert torch.allclose(ritz.adjoint_basis, (Jm.T @ U).T, atol=1e-10)
    assert torch.allclose(ritz.gradient, Jm.T @ e.reshape(-1), atol=1e-10)
    # parameter side: V Λ V* = J* U Λ U* ... = the top-r part of J* Q Q* J, V orthonormal
    V = ritz.eig("parameter").basis.reshape(r, -1).T
    assert torch.allclose(V.T @ V, torch.eye(r, dtype=D), atol=1e-10)
    FS = Jm.T @ Qs @ Qs.T @ Jm
    fv, fU = torch.linalg.eigh(FS)
    assert torch.allclose(V @ torch.diag(ritz.values) @ V.T, fU[:, -r:] @ torch.diag(fv[-r:]) @ fU[:, -r:].T,
                          atol=1e-9)
    # Ritz values are lower bounds of the true top eigenvalues (interlacing)
    true = torch.linalg.eigvalsh(Theta).flip(0)[:r]
    assert bool((ritz.values <= true * (1 + 1e-12)).all())


def krylov_problem(B, T, seed=0, c=0.5):
    """state_targets_problem whose trajectories carry their inputs, so the optimizer sees the same batch."""
    model, closure, dense_J, inputs, z_star = state_targets_problem(B, T, seed=seed, c=c)

    def with_inputs():
        traj = closure()
        traj.inputs = inputs
        return traj

    return model, with_inputs, dense_J, inputs, z_star


def test_krylov_update_at_full_rank_is_exact_gauss_newton():
    c, lam = 0.5, 1e-9
    model, closure, dense_J, inputs, _ = krylov_problem(1, 3, c=c)  # state dim 6 < 8 parameters
    names = ["W", "U", "b"]
    opt = LowRankNaturalGradient(model, lr=0.5, rank=6, damping=lam, adaptive_damping=False, trust_region=None,
                                 jacobian=dense_J, update="krylov", refresh_every=1)
    opt.step(closure)  # cold start: a Nyström sketch
    assert not opt.last_stats["krylov"]
    Jm = dense_jacobian(model, inputs, names)
    e = closure().error.reshape(-1)
    ref = -torch.linalg.pinv(Jm) @ (e / c)
    before = flat_params(model, names)
    for g in opt.param_groups:
        g["lr"] = 1.0
    opt.step(closure)  # same batch: a Ritz step on span(e, U, secant) = the whole state space
    got = flat_params(model, names) - before
    assert opt.last_stats["krylov"] and opt.last_stats["secant"] and opt.last_stats["form"] == "state"
    assert opt.last_stats["jvps"] == 0 and opt.last_stats["vjps"] == 6  # one batched J* product
    smin2 = float(torch.linalg.svdvals(Jm)[-1]) ** 2
    assert float((got - ref).norm()) <= (2 * lam / (c * smin2) + 1e-9) * float(ref.norm())


@pytest.mark.parametrize("form", ["state", "parameter"])
def test_krylov_low_rank_step_matches_dense_ritz_formula(form):
    # r = 2 < full: the second step is −η J*(cΘ_S + cλ_r(I − UU*) + λI)⁻¹e with (U, Λ) the top-2 Ritz pairs
    # of Θ = JJ* on span(e, U_prev, z_2 − z_1), all from dense float64 matrices at the current parameters
    c, lam, r, lr = 0.5, 1e-2, 2, 0.7
    model, closure, dense_J, inputs, _ = krylov_problem(3, 4, seed=5, c=c)  # state dim 24, 8 parameters
    names = ["W", "U", "b"]
    opt = LowRankNaturalGradient(model, lr=lr, rank=r, damping=lam, adaptive_damping=False, trust_region=None,
                                 jacobian=dense_J, form=form, refresh_every=1)
    z1 = closure().states
    opt.step(closure)
    U_prev = opt._st["state_basis"].reshape(r, -1)
    traj = closure()
    Jm = dense_jacobian(model, inputs, names)
    e = traj.error.reshape(-1)
    X = torch.stack([e, *U_prev, (traj.states - z1).reshape(-1)], 1)
    Qs = torch.linalg.svd(X, full_matrices=False)[0]
    vals, vecs = torch.linalg.eigh(Qs.T @ Jm @ Jm.T @ Qs)
    L, U = vals.flip(0)[:r], (Qs @ vecs.flip(1)[:, :r])
    if form == "state":
        Pc = torch.eye(U.shape[0], dtype=D) - U @ U.T
        M = c * U @ torch.diag(L) @ U.T + c * float(L[-1]) * Pc + lam * torch.eye(U.shape[0], dtype=D)
        x = torch.linalg.solve(M, e)
        ref = -lr * Jm.T @ x
    else:
        V = Jm.T @ U / L.sqrt()
        Pc = torch.eye(V.shape[0], dtype=D) - V @ V.T
        M = c * V @ torch.diag(L) @ V.T + c * float(L[-1]) * Pc + lam * torch.eye(V.shape[0], dtype=D)
        ref = -lr * torch.linalg.solve(M, Jm.T @ e)
    before = flat_params(model, names)
    opt.step(closure)
    got = flat_params(model, names) - before
    assert opt.last_stats["krylov"] and opt.last_stats["form"] == form
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12 * float(ref.norm()))


def test_krylov_reuses_the_basis_between_updates_and_falls_back_without_a_secant():
    model, closure, dense_J, *_ = krylov_problem(2, 5)
    opt = LowRankNaturalGradient(model, rank=2, jacobian=dense_J, form="parameter", refresh_every=2,
                                 stale_rho=-math.inf)
    opt.step(closure)  # cold: Nyström
    assert opt.last_stats["refreshed"] and not opt.last_stats["krylov"]
    opt.step(closure)  # odd step: reuse (V, Λ); only the gradient
    assert opt.last_stats["products"] == 1 and not opt.last_stats["krylov"]
    opt.step(closure)  # periodic Ritz update: J* of [e, U_1, U_2, secant] in one product
    assert opt.last_stats["krylov"] and (opt.last_stats["jvps"], opt.last_stats["vjps"]) == (0, 4)
    model2, plain, dense_J2, *_ = state_targets_problem(2, 5)  # no inputs on the trajectory: no secant
    opt2 = LowRankNaturalGradient(model2, rank=2, jacobian=dense_J2, form="parameter")
    opt2.step(plain)
    opt2.step(plain)
    assert opt2.last_stats["refreshed"] and not opt2.last_stats["krylov"]
    with pytest.raises(ValueError, match="update"):
        LowRankNaturalGradient(model, update="lanczos", jacobian=dense_J)
    with pytest.raises(ValueError, match="stale_rho"):
        LowRankNaturalGradient(model, stale_rho=2.0, jacobian=dense_J)


def test_krylov_updates_exactly_when_the_secant_curvature_test_fires():
    # default refresh_every=None: after the cold start, a Ritz update happens iff the measured ‖z_k − z_{k−1}‖²
    # exceeds stale_curvature × the low-rank model's Δθ*(VΛV* + λ_r(I − VV*))Δθ of the previous step
    kappa = 1.05
    model, closure, dense_J, inputs, _ = krylov_problem(3, 4, seed=9)
    opt = LowRankNaturalGradient(model, lr=0.8, rank=2, damping=1e-3, jacobian=dense_J, form="parameter",
                                 stale_curvature=kappa, stale_rho=-math.inf, trust_region=None)
    names = opt.param_names  # the optimizer's flat layout
    fired = []
    for _ in range(8):
        z_prev, before = closure().states, flat_params(model, names)
        opt.step(closure)
        st, stats = opt._st, opt.last_stats
        delta = flat_params(model, names) - before
        V = st["eig_basis"].reshape(2, -1)
        coeff = V @ delta
        floor = stats["complement_floor"]
        model_quad = float((st["eig_values"] * coeff**2).sum() + floor * (delta @ delta - coeff @ coeff))
        assert st["pending_quad"] == pytest.approx(model_quad, rel=1e-10)
        fired.append(float((closure().states - z_prev).pow(2).sum()) / model_quad)  # the next step's secant
    # replay the rule on the recorded ratios: step k+1 ran a Ritz update iff q_k > κ
    model, closure, dense_J, *_ = krylov_problem(3, 4, seed=9)
    opt = LowRankNaturalGradient(model, lr=0.8, rank=2, damping=1e-3, jacobian=dense_J, form="parameter",
                                 stale_curvature=kappa, stale_rho=-math.inf, trust_region=None)
    opt.step(closure)
    for q in fired[:-1]:
        opt.step(closure)
        assert opt.last_stats["curvature_ratio"] == pytest.approx(q, rel=1e-8)
        assert opt.last_stats["krylov"] == (q > kappa)
        assert opt.last_stats["products"] == (4 if q > kappa else 1)
    assert any(q > kappa for q in fired[:-1]) and any(q <= kappa for q in fired[:-1])  # both branches ran


@pytest.mark.parametrize("cell", ["vanilla", "leaky", "gru", "lstm", "node", "adapter"])
def test_krylov_step_on_the_recorded_graph_is_exact_gauss_newton_for_every_cell(cell):
    # second step on the same batch: one batched J* pass (is_grads_batched, or its per-probe fallback) over
    # the recording's graph; at full rank the Ritz subspace is the whole space, so the step is −J⁺e/c
    torch.manual_seed(0)
    model = _cells()[cell]()
    B, T = 1, 3
    inputs = torch.randn(B, T, 1, dtype=D, generator=gen(1))
    targets = torch.randn(B, T, 2, dtype=D, generator=gen(2))
    names = list(model.cell_params())
    P, n = sum(p.numel() for p in model.cell_params().values()), B * T * model.state_dim
    full, lam = min(P, n), 1e-9
    opt = LowRankNaturalGradient(model, lr=1e-3, rank=full, damping=lam, adaptive_damping=False,
                                 trust_region=None, jacobian="unrolled", refresh_every=1)
    batch = {"inputs": inputs, "targets": targets}
    opt.step(lambda: batch)
    Jm = dense_jacobian(model, inputs, names)
    z = model.unroll({k: v.detach() for k, v in model.cell_params().items()}, inputs).requires_grad_(True)
    loss = ((model.output(z) - targets) ** 2).mean()
    (e,) = torch.autograd.grad(loss, z)
    c = float(e.pow(2).sum()) / (2 * float(loss.detach()))
    ref = -torch.linalg.pinv(Jm) @ (e.reshape(-1) / c)
    for g in opt.param_groups:
        g["lr"] = 1.0
    before = flat_params(model, names)
    opt.step(lambda: batch)
    got = flat_params(model, names) - before
    assert opt.last_stats["krylov"] and opt.last_stats["jvps"] == 0
    smin2 = float(torch.linalg.svdvals(Jm)[full - 1]) ** 2
    assert float((got - ref).norm()) <= (4 * lam / (c * smin2) + 1e-8) * float(ref.norm())


def test_krylov_step_in_output_space_is_exact_gauss_newton_of_the_readout_loss():
    # space="output": the Ritz subspace is span(∂L/∂y, U, y_k − y_{k−1}) in output space; at full rank the
    # second step on the same batch is −(CJ)⁺ ∂L/∂y / c
    from kpflow.models import VanillaRNN

    torch.manual_seed(3)
    B, T = 1, 3
    model = VanillaRNN(1, 2, 2, dtype=D)
    inputs = torch.randn(B, T, 1, dtype=D, generator=gen(4))
    targets = torch.randn(B, T, 2, dtype=D, generator=gen(5))
    names = ["W", "U", "b"]
    full, lam = min(8, B * T * 2), 1e-9
    opt = LowRankNaturalGradient(model, lr=1e-3, rank=full, damping=lam, adaptive_damping=False,
                                 trust_region=None, space="output", refresh_every=1)
    batch = {"inputs": inputs, "targets": targets}
    opt.step(lambda: batch)
    C = model.readout.weight.detach()
    Jm = dense_jacobian(model, inputs, names)
    G = torch.einsum("oh,nhp->nop", C, Jm.reshape(B * T, 2, -1)).reshape(B * T * 2, -1)
    y = model(inputs)[1].detach().requires_grad_(True)
    loss = ((y - targets) ** 2).mean()
    (e_y,) = torch.autograd.grad(loss, y)
    c = float(e_y.pow(2).sum()) / (2 * float(loss.detach()))
    ref = -torch.linalg.pinv(G) @ (e_y.reshape(-1) / c)
    for g in opt.param_groups:
        g["lr"] = 1.0
    before = flat_params(model, names)
    opt.step(lambda: batch)
    got = flat_params(model, names) - before
    assert opt.last_stats["krylov"] and opt.last_stats["secant"] and opt.last_stats["space"] == "output"
    smin2 = float(torch.linalg.svdvals(G)[full - 1]) ** 2
    assert float((got - ref).norm()) <= (4 * lam / (c * smin2) + 1e-8) * float(ref.norm())
