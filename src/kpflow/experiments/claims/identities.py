"""Claims 1 and 5: the KP gradient-flow identity and the exact Kronecker core, on trained models.

* ``kp_gradient_flow`` — under gradient flow on the cell parameters, ``dz/dτ = −P K P* e``
  (KPFlow, Prop. 1). Independent reference: the states' change under a parameter step along the
  autograd gradient ``−∇_θ L`` (plain ``torch.autograd`` of the loss through the unrolled model),
  by a central difference of the unrolled model in float64; compared with kpflow's matrix-free
  ``Θ e = P K P* e`` (``kpflow.kernels.ntk``).
* ``kronecker_core`` — ``K = M (G ⊗ I) M*`` exactly for weight-based cells (Global Empirical NTK,
  Kronecker-core theorem): kpflow's Kronecker-core K (``kpflow.kernels.kronecker_core``) against the
  autodiff K = Jθ Jθ* (``parameter_operator(backend="autodiff")``) on random probes, and its exact
  trace against the trace of the autodiff K's dense matrix, on a trained model of every built-in
  weight-based kind (vanilla RNN, leaky RNN, GRU, LSTM).
"""

from __future__ import annotations

import math

import torch

from .common import eval_batch, pick, rel_err, trained
from .registry import Claim, column, register_claim, threshold_verdict

KP_THRESHOLD = -6.0  # log10 relative error: float64 central differences reach ~1e-9; a wrong identity ~1
KRON_THRESHOLD = -9.0  # log10 relative error of an exact identity in float64


def _flipflop(size):
    from kpflow.tasks import make_task

    return make_task("flipflop", n_bits=3, seq_len=pick(size, 20, 40))


def measure_kp_flow(seed: int, size: str) -> dict:
    """Relative error of ``−P K P* e`` against the finite-difference ``dz/dτ`` on a trained GRU."""
    from kpflow.kernels import ntk, record

    task = _flipflop(size)
    _, snaps = trained("gru", task, pick(size, 16, 32), seed, pick(size, 60, 300))
    model = snaps[max(snaps)]
    batch = eval_batch(task, pick(size, 4, 8), seed)
    traj = record(model, batch.inputs, targets=batch.targets)
    predicted = -ntk(traj).apply(traj.error)
    names = list(model.cell_params())
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.cell_params().items()}
    loss = ((model.output(model.unroll(params, batch.inputs)) - batch.targets) ** 2).mean()
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    gnorm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    eps = 1e-4 / gnorm

    def states(sign):
        with torch.no_grad():
            p = {k: params[k].detach() - sign * eps * g for k, g in zip(names, grads, strict=True)}
            return model.unroll(p, batch.inputs)

    fd = (states(1.0) - states(-1.0)) / (2 * eps)  # dz/dτ along dθ/dτ = −∇θL
    err = rel_err(predicted, fd)
    return {"rel_err": err, "log10_rel_err": math.log10(max(err, 1e-300)), "loss": float(traj.loss),
            "states": int(traj.states.numel()), "params": sum(int(p.numel()) for p in params.values())}


def verdict_kp_flow(ms):
    return threshold_verdict(column(ms, "log10_rel_err"), KP_THRESHOLD, "below", name="log10 rel. error of −PKP*e")


KINDS = {"rnn": {}, "leaky_rnn": {}, "gru": {}, "lstm": {}}


def measure_kronecker(seed: int, size: str) -> dict:
    """Worst relative error of the Kronecker-core K (probes and exact trace) over the built-in kinds."""
    from kpflow.kernels import kronecker_core, parameter_operator, record

    task = _flipflop(size)
    out, worst = {}, -math.inf
    for kind, params in KINDS.items():
        _, snaps = trained(kind, task, pick(size, 8, 16), seed, pick(size, 30, 200), **params)
        model = snaps[max(snaps)]
        batch = eval_batch(task, pick(size, 2, 4), seed)
        traj = record(model, batch.inputs, targets=batch.targets)
        core = kronecker_core(traj)
        K_ad = parameter_operator(traj, backend="autodiff")
        V = torch.randn((4, *traj.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        e_apply = rel_err(core.operator().matmat(V), K_ad.matmat(V))
        dense_tr = float(torch.trace(K_ad.to_matrix()))
        e_trace = abs(core.trace() - dense_tr) / abs(dense_tr)
        e = max(e_apply, e_trace)
        out[f"{kind}_rel_err_apply"], out[f"{kind}_rel_err_trace"] = e_apply, e_trace
        out[f"{kind}_erank"] = core.effective_rank()
        out[f"{kind}_rank_bound"] = core.rank_bound()
        worst = max(worst, math.log10(max(e, 1e-300)))
    out["log10_worst_rel_err"] = worst
    out["kinds"] = list(KINDS)
    return out


def verdict_kronecker(ms):
    return threshold_verdict(column(ms, "log10_worst_rel_err"), KRON_THRESHOLD, "below",
                             name="log10 worst rel. error over kinds")


register_claim(Claim(
    id="kp_gradient_flow", number=1,
    quote="the gradient flow, which describes how the model's dynamics evolve over GD, can be decomposed into a "
          "product that involves two operators: a Parameter Operator, K, and a Linearized Flow Propagator, P "
          "(dz/dτ = −P K P* e)",
    paper="Hazelden et al., KPFlow (arXiv 2507.06381)",
    criterion=f"log10 of ‖−PKP*e − dz/dτ‖/‖dz/dτ‖ on a trained GRU (dz/dτ: central difference of the unrolled "
              f"model along −∇θL from autograd, float64) is below {KP_THRESHOLD:g}",
    measure=measure_kp_flow, verdict=verdict_kp_flow,
    setting="GRU trained with Adam on 3-bit flip-flop (quick: H=16, T=20, 60 steps, 4 trials; full: H=32, T=40, "
            "300 steps, 8 trials); all cell parameters",
))

register_claim(Claim(
    id="kronecker_core", number=5,
    quote="we prove a universal Kronecker-core theorem showing that K admits an exact, computable form given by "
          "the Gram matrix of weight-site variables",
    paper="Hazelden et al., The Global Empirical NTK (arXiv 2605.08746)",
    criterion=f"log10 of the worst relative error of the Kronecker-core K = M(G⊗I)M* (4 random probes and the "
              f"exact trace) against autodiff K = Jθ Jθ*, over trained vanilla RNN, leaky RNN, GRU and LSTM, is "
              f"below {KRON_THRESHOLD:g}",
    measure=measure_kronecker, verdict=verdict_kronecker,
    setting="each kind trained with Adam on 3-bit flip-flop (quick: H=8, T=20, 30 steps, 2 trials; full: H=16, "
            "T=40, 200 steps, 4 trials); all cell parameters",
))
