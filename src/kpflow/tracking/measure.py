"""Metrics of one checkpoint on a fixed evaluation batch: the operators of learning and the activity.

Every metric is a row ``(metric, value, stderr, method)``. Operators are built from the recorded
trajectory (``kpflow.kernels``) in float64; their summaries come from ``kpflow.estimators`` (see
``summaries``). Names:

* ``loss``, ``accuracy`` — mean over evaluation trials (stderr: across trials);
* ``activity_dim`` — participation ratio ``tr(C)²/tr(C²)`` of the centred state covariance
  (stderr: bootstrap over trials);
* ``{K, PPstar, NTK}_{trace, fro, erank}`` — of ``K = Jθ Jθ*``, ``P P*`` and ``Θ = P K P*`` on ``[B,T,H]``;
  the trace, norm and erank of ``K`` are exact through the Kronecker core for weight-based cells;
* ``{op}_erank_{temporal, spatial, trial}`` — effective rank of the compression onto one view
  (``kpflow.operators.view``: temporal keeps (trial, time), spatial keeps units, trial keeps trials);
* ``ntk_init_alignment`` — ``cos(Θ, Θ₀)`` with ``Θ₀`` the NTK of the initial weights on the same batch;
* ``misdirection`` — ``cos(P K P*, P P*)`` (KPFlow);
* ``kernel_target_alignment`` — ``eᵀΘe / (‖Θ‖_F ‖e‖²)`` with ``e = ∂L/∂z`` the direct error, i.e.
  ``cos(Θ, e eᵀ)``;
* multi-task only: ``interference[i,j]`` — ``cos(δz_{i←j}, δz_{i←i})`` with
  ``δz_{i←j} = −P_i K_ij P_j* e_j`` the change of task i's states driven by task j's error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from kpflow.kernels import kronecker_core, parameter_operator, propagator, record, supports_kronecker
from kpflow.operators import view
from kpflow.tasks import Task, TaskBatch, task_loss

from .summaries import Stat, alignment_stat, psd_stats

VIEWS = ("temporal", "spatial", "trial")


@dataclass
class Reference:
    """What later checkpoints are compared with: the NTK at initialisation on the evaluation batch."""

    ntk: object
    fro: Stat


def _row(metric, stat: Stat):
    return {"metric": metric, "value": float(stat.value), "stderr": float(stat.stderr), "method": stat.method}


def participation_ratio(states: torch.Tensor) -> float:
    """``tr(C)² / tr(C²)`` of the covariance of the rows of ``states [N, H]`` (centred)."""
    X = states - states.mean(0, keepdim=True)
    C = X.T @ X / max(1, X.shape[0] - 1)
    tr2 = float(torch.trace(C @ C))
    return float(torch.trace(C)) ** 2 / tr2 if tr2 > 0 else 0.0


def _bootstrap_pr(states: torch.Tensor, seed: int, n: int = 40) -> Stat:
    B = states.shape[0]
    value = participation_ratio(states.reshape(-1, states.shape[-1]))
    gen = torch.Generator().manual_seed(seed)
    boot = [participation_ratio(states[torch.randint(0, B, (B,), generator=gen)].reshape(-1, states.shape[-1]))
            for _ in range(n)]
    return Stat(value, float(np.std(boot, ddof=1)), f"bootstrap over trials ({n})")


def _per_trial_loss(outputs, batch: TaskBatch) -> torch.Tensor:
    return torch.stack([task_loss(outputs[b:b + 1], batch.subset(slice(b, b + 1))) for b in range(batch.batch_size)])


def _mean_stat(x: torch.Tensor, method: str) -> Stat:
    x = x.detach().double()
    se = float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return Stat(float(x.mean()), se, method)


def _k_stats(traj, K, param_names, probes, seed, exact_k: str) -> dict[str, Stat]:
    """Exact trace / norm / erank of K through the Kronecker core (weight-based cells), else estimated."""
    if exact_k != "never" and supports_kronecker(traj.model):
        try:
            core = kronecker_core(traj, param_names)
            tr, fro = core.trace(), core.frobenius_norm()
        except MemoryError:
            if exact_k == "always":
                raise
        else:
            return {"trace": Stat(tr, 0.0, "exact-kronecker"), "fro": Stat(fro, 0.0, "exact-kronecker"),
                    "erank": Stat(tr**2 / fro**2 if fro > 0 else math.nan, 0.0, "exact-kronecker")}
    return psd_stats(K, probes, seed)


def interference_matrix(ntk_op, error: torch.Tensor, task_ids: torch.Tensor, n_tasks: int) -> np.ndarray:
    """``I[i, j] = cos(δz_{i←j}, δz_{i←i})`` with ``δz_{·←j} = −Θ (e ⊙ 1[trials of task j])`` (exact, one
    NTK application per task)."""
    masks = torch.stack([(task_ids == j).to(error.dtype) for j in range(n_tasks)])  # [n, B]
    E = error.unsqueeze(0) * masks[:, :, None, None]  # [n, B, T, H]
    dZ = -ntk_op.matmat(E)  # dZ[j] = state change driven by task j's error
    out = np.full((n_tasks, n_tasks), np.nan)
    for i in range(n_tasks):
        sel = masks[i].bool()
        own = dZ[i][sel].reshape(-1)
        for j in range(n_tasks):
            other = dZ[j][sel].reshape(-1)
            denom = float(own.norm() * other.norm())
            out[i, j] = float(own @ other) / denom if denom > 0 else np.nan
    return out


def measure_checkpoint(model, task: Task, batch: TaskBatch, *, probes: int = 24, seed: int = 0,
                       param_names=None, axes: bool = True, reference: Reference | None = None,
                       exact_k: str = "auto", dtype=torch.float64) -> tuple[list[dict], Reference]:
    """All metrics of ``model`` on ``batch``; returns ``(rows, reference)`` where ``reference`` holds this
    checkpoint's NTK (pass the first checkpoint's to later calls for ``ntk_init_alignment``)."""
    model = copy.deepcopy(model).to(dtype=dtype)
    model.eval()
    batch = batch.to(dtype=dtype)
    rows = []
    with torch.no_grad():
        states, outputs = model(batch.inputs)
    rows.append(_row("loss", _mean_stat(_per_trial_loss(outputs, batch), "mean over trials")))
    rows.append(_row("accuracy", _mean_stat(task.accuracy(outputs, batch), "mean over trials")))
    rows.append(_row("activity_dim", _bootstrap_pr(states, seed)))

    traj = record(model, batch.inputs, targets=batch.targets, loss=batch.loss, mask=batch.mask,
                  param_names=param_names)
    P = propagator(traj)
    K = parameter_operator(traj, param_names, backend="auto")
    NTK = P @ K @ P.T
    PP = P @ P.T
    stats = {"K": _k_stats(traj, K, param_names, probes, seed, exact_k),
             "PPstar": psd_stats(PP, probes, seed),
             "NTK": psd_stats(NTK, probes, seed)}
    for name, s in stats.items():
        for q in ("trace", "fro", "erank"):
            rows.append(_row(f"{name}_{q}", s[q]))
    if axes:
        for name, op in (("K", K), ("PPstar", PP), ("NTK", NTK)):
            for v in VIEWS:
                rows.append(_row(f"{name}_erank_{v}", psd_stats(view(op, v), probes, seed)["erank"]))
    rows.append(_row("misdirection", alignment_stat(NTK, PP, probes, seed)))
    ref = Reference(NTK, stats["NTK"]["fro"])
    if reference is None:
        rows.append(_row("ntk_init_alignment", Stat(1.0, 0.0, "definition (this is the initial NTK)")))
    else:
        rows.append(_row("ntk_init_alignment", alignment_stat(NTK, reference.ntk, probes, seed)))
    e = traj.error
    fro = stats["NTK"]["fro"]
    quad = float((e * NTK.apply(e)).sum())
    e2 = float((e * e).sum())
    if e2 > 0 and fro.value > 0:
        kta = quad / (fro.value * e2)
        rows.append(_row("kernel_target_alignment", Stat(kta, abs(kta) * fro.stderr / fro.value,
                                                         f"e'Θe exact / ‖Θ‖_F [{fro.method}]")))
    if batch.task_ids is not None and len(task.subtask_names) > 1:
        I = interference_matrix(NTK, e, batch.task_ids, len(task.subtask_names))
        for i, a in enumerate(task.subtask_names):
            for j, b in enumerate(task.subtask_names):
                rows.append({"metric": f"interference[{a},{b}]", "value": float(I[i, j]), "stderr": 0.0,
                             "method": "exact (one NTK application per task)"})
    return rows, ref
