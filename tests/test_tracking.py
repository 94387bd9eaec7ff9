"""Tracking metrics against independent dense float64 references (torch.func.jacrev of the unrolled model)."""

from __future__ import annotations

import math

import pytest
import torch

from kpflow.models import GRU, VanillaRNN
from kpflow.operators import DenseOperator
from kpflow.tasks import MultiTask, TaskBatch
from kpflow.tracking import alignment_stat, interference_matrix, measure_checkpoint, participation_ratio, psd_stats
from kpflow.tracking.summaries import DENSE_MAX


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense_jacobians(model, inputs):
    """J = dz/dθ of the unrolled model and the immediate Jθ (previous state held fixed), as matrices."""
    params = {k: v.detach().double() for k, v in model.cell_params().items()}
    names = list(params)
    x = inputs.double()
    B, T, _ = x.shape
    H = model.state_dim

    def unrolled(*flat):
        return model.unroll(dict(zip(names, flat, strict=True)), x).reshape(-1)

    J = torch.cat([j.reshape(B * T * H, -1) for j in torch.func.jacrev(unrolled, argnums=tuple(range(len(names))))(
        *params.values())], 1)
    with torch.no_grad():
        states = model.unroll(params, x)
    prev = torch.cat([torch.zeros(B, 1, H, dtype=torch.float64), states[:, :-1]], 1)

    def immediate(*flat):
        p = dict(zip(names, flat, strict=True))
        return model.step(p, prev.reshape(B * T, H), x.reshape(B * T, -1)).reshape(B, T, H).reshape(-1)

    Jth = torch.cat([j.reshape(B * T * H, -1) for j in torch.func.jacrev(immediate, argnums=tuple(range(len(names))))(
        *params.values())], 1)
    return J, Jth, states


def dense_mse_error(model, states, targets):
    """e = ∂L/∂z for L = mean over (b, t, o) of (C z + d − y)²."""
    W, b = model.readout.weight.detach().double(), model.readout.bias.detach().double()
    y = states @ W.T + b
    return 2 * (y - targets.double()) @ W / targets.numel()


def cos(A, B):
    return float((A * B).sum() / (A.norm() * B.norm()))


def erank(A):
    return float(torch.trace(A) ** 2 / (A * A).sum())


@pytest.mark.parametrize("cls", [VanillaRNN, GRU])
def test_checkpoint_metrics_match_dense_reference(cls):
    torch.manual_seed(0)
    B, T, I, H, O = 2, 4, 2, 3, 2
    model = cls(I, H, O)
    init = cls(I, H, O)
    x, y = torch.randn(B, T, I), torch.randn(B, T, O)
    batch = TaskBatch(inputs=x, targets=y, loss="mse")
    assert B * T * H <= DENSE_MAX  # exact path: no randomness, so tight tolerances apply

    class _Task:
        subtask_names = ()

        def accuracy(self, outputs, batch):
            return torch.ones(outputs.shape[0], dtype=outputs.dtype)

    _, ref = measure_checkpoint(init, _Task(), batch, probes=8, axes=False)
    rows, _ = measure_checkpoint(model, _Task(), batch, probes=8, axes=True, reference=ref)
    got = {r["metric"]: r for r in rows}
    J, Jth, states = dense_jacobians(model, x)
    J0, _, _ = dense_jacobians(init, x)
    K, NTK, NTK0 = Jth @ Jth.T, J @ J.T, J0 @ J0.T
    P = J @ torch.linalg.pinv(Jth)  # not used for PP*: build P from its definition instead
    del P
    # P = (I - A S)^{-1} from dense step Jacobians: P maps immediate forcing to states, J = P Jθ
    n = B * T * H
    A = torch.zeros(n, n, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.cell_params().items()}
    for b in range(B):
        for t in range(1, T):
            zprev = states[b, t - 1]
            Jt = torch.func.jacrev(lambda z, b=b, t=t: model.step(params, z[None], x[b, t][None].double())[0])(zprev)
            r, c = (b * T + t) * H, (b * T + t - 1) * H
            A[r:r + H, c:c + H] = Jt
    Pd = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - A)
    assert torch.allclose(Pd @ Jth, J, atol=1e-8)  # the dense P is right
    PP = Pd @ Pd.T
    for name, M in (("K", K), ("NTK", NTK), ("PPstar", PP)):
        assert got[f"{name}_trace"]["value"] == pytest.approx(float(torch.trace(M)), rel=1e-6)
        assert got[f"{name}_fro"]["value"] == pytest.approx(float(M.norm()), rel=1e-6)
        assert got[f"{name}_erank"]["value"] == pytest.approx(erank(M), rel=1e-6)
    assert got["misdirection"]["value"] == pytest.approx(cos(NTK, PP), rel=1e-6)
    assert got["ntk_init_alignment"]["value"] == pytest.approx(cos(NTK, NTK0), rel=1e-6)
    e = dense_mse_error(model, states, y).reshape(-1)
    kta = float(e @ NTK @ e) / (float(NTK.norm()) * float(e @ e))
    assert got["kernel_target_alignment"]["value"] == pytest.approx(kta, rel=1e-5)
    # temporal view: (1ᵀ⊗I) A (1⊗I) summing over hidden units
    S = torch.kron(torch.eye(B * T, dtype=torch.float64), torch.ones(H, 1, dtype=torch.float64))
    assert got["NTK_erank_temporal"]["value"] == pytest.approx(erank(S.T @ NTK @ S), rel=1e-6)
    Ssp = torch.kron(torch.ones(B * T, 1, dtype=torch.float64), torch.eye(H, dtype=torch.float64))
    assert got["K_erank_spatial"]["value"] == pytest.approx(erank(Ssp.T @ K @ Ssp), rel=1e-6)
    for r in rows:
        assert math.isfinite(r["value"]) and math.isfinite(r["stderr"]) and r["stderr"] >= 0, r


def test_interference_matrix_matches_dense_blocks():
    torch.manual_seed(1)
    task = MultiTask(tasks=("memory_pro", "memory_anti"), context=1, stim=1, mem=1, resp=1)
    batch = task.sample(4, seed=0)
    model = GRU(task.input_dim, 3, task.output_dim)
    J, _, states = dense_jacobians(model, batch.inputs)
    NTK = J @ J.T
    e = dense_mse_error(model, states, batch.targets)
    from kpflow.kernels import ntk, record

    m64 = model.double()
    traj = record(m64, batch.inputs.double(), targets=batch.targets.double(), loss="mse")
    assert torch.allclose(traj.error, e, atol=1e-10)
    got = interference_matrix(ntk(traj), traj.error, batch.task_ids, 2)
    H = 3
    dz = {}
    for j in range(2):
        ej = (e * (batch.task_ids == j).double()[:, None, None]).reshape(-1)
        dz[j] = -(NTK @ ej).reshape(states.shape)
    for i in range(2):
        sel = batch.task_ids == i
        for j in range(2):
            ref = cos(dz[j][sel].reshape(-1), dz[i][sel].reshape(-1))
            assert got[i, j] == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert got[0, 0] == pytest.approx(1.0) and got.shape == (2, 2) and H == 3


def _known_spectrum(n, seed, decay=0.8):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    return U, lam


def test_randomized_psd_stats_agree_with_exact_within_their_error_bars():
    n = 300
    assert n > DENSE_MAX
    U, lam = _known_spectrum(n, 0)
    A = DenseOperator((U * lam) @ U.T, is_psd=True)
    exact = {"trace": float(lam.sum()), "fro": float(lam.norm()), "erank": float(lam.sum() ** 2 / (lam**2).sum())}
    got = psd_stats(A, probes=60, seed=3)
    for k, v in exact.items():
        assert got[k].stderr > 0 and math.isfinite(got[k].stderr)
        assert abs(got[k].value - v) <= 4 * got[k].stderr + 1e-9 * abs(v), (k, got[k], v)


def test_randomized_alignment_agrees_with_exact_within_its_error_bar():
    n = 256
    U, lam = _known_spectrum(n, 1)
    V, mu = _known_spectrum(n, 2, decay=1.2)
    MA, MB = (U * lam) @ U.T, (U * mu) @ U.T + 0.3 * (V * mu) @ V.T
    A, B = DenseOperator(MA, is_psd=True), DenseOperator(MB, is_psd=True)
    got = alignment_stat(A, B, probes=60, seed=0)
    ref = cos(MA, MB)
    assert got.stderr > 0 and abs(got.value - ref) <= 4 * got.stderr


def test_participation_ratio_of_known_covariance():
    N, H = 200, 5
    Q, _ = torch.linalg.qr(torch.randn(N, H + 1, dtype=torch.float64))
    # columns orthogonal to each other and to the all-ones vector => exactly zero-mean, known covariance
    ones = torch.ones(N, 1, dtype=torch.float64) / math.sqrt(N)
    Z = torch.linalg.qr(torch.cat([ones, torch.randn(N, H, dtype=torch.float64)], 1))[0][:, 1:]
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    X = Z * s
    lam = s**2 / (N - 1)
    assert participation_ratio(X) == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=1e-10)
    assert Q.shape == (N, H + 1)


@pytest.mark.parametrize("name", ["context_integration", "flipflop"])
def test_recorded_error_is_the_gradient_of_the_training_loss(name):
    """The direct error e the metrics use is ∂(task_loss)/∂z of the loss the trainer minimises (mask included)."""
    from kpflow.kernels import record
    from kpflow.tasks import make_task, task_loss
    from kpflow.training import build_model

    task = make_task(name, seq_len=8, **({"decision": 3} if name == "context_integration" else {}))
    model = build_model("gru", task.input_dim, 5, task.output_dim, seed=0).double()
    batch = task.sample(3, 0, dtype=torch.float64)
    traj = record(model, batch.inputs, targets=batch.targets, loss=batch.loss, mask=batch.mask)
    z = traj.states.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(task_loss(model.output(z), batch), z)
    assert torch.allclose(traj.error, grad, atol=1e-12, rtol=1e-10)


def test_report_reading_of_one_run_gives_no_claim_verdict():
    # issue 11: a single run's first-vs-last comparison is not a test of the claim; the report describes the change
    # in units of its standard error and points to the pre-registered study instead of calling it "consistent"
    from kpflow.report.html import reading

    rows = []
    for step, p, k in ((0, 13000.0, 90.0), (300, 300.0, 120.0), (600, 280.0, 180.0)):
        rows += [{"run": "r", "step": step, "metric": "PPstar_erank", "value": p, "stderr": 30.0, "method": ""},
                 {"run": "r", "step": step, "metric": "K_erank", "value": k, "stderr": 0.0, "method": ""}]
    text = " ".join(reading(rows, []))
    assert "consistent" not in text, text
    assert f"{(280.0 - 13000.0) / (2 ** 0.5 * 30.0):+.3g} standard errors" in text, text
    assert "kpflow reproduce --only collapse_over_gd" in text
