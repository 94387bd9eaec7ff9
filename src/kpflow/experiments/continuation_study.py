"""Study: where the dynamics of a multi-task leaky RNN change during training, and the sNTK there.

A leaky (Euler-stepped, continuous-time) RNN learns the angle-memory family that kpflow's built-in
tasks form — Memory-Pro, Memory-Anti, Delay-Pro and Delay-Anti, mixed with one-hot task cues
(``kpflow.tasks.MultiTask``; 4 of the 15 tasks of the paper's family, the others are not built in).
Between every pair of consecutive checkpoints, and for each task's context input (fixation on, the
task's cue on, no stimulus), the fixed points found at the first checkpoint are continued along the
weight interpolation ``θ(s) = (1 − s) θ_k + s θ_{k+1}`` (``continue_fixed_points``); every special point
(fold, branch point, Hopf) is placed at its training step. At every checkpoint the state-space NTK
``Θ = P K P*`` of the evaluation batch is measured (trace, one-sided estimate with its standard error),
and its *amplification* over an interval is ``|log tr Θ_{k+1} − log tr Θ_k|``.

The comparison is fixed in code before any data (``CRITERION``): intervals that contain a
continuation-detected special point are compared with those that do not, by the difference of their mean
amplification, with a one-sided permutation test over the interval labels (10 000 seeded permutations).
``agree`` when it is larger where the dynamics change (p < 0.05), ``disagree`` when it is larger where they
do not (p < 0.05), ``inconclusive`` otherwise — including when no interval, or every interval, has a
special point. Run with ``kpflow dynamics study`` (a few minutes on 2 cores at the default size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CRITERION = ("mean |Δ log tr Θ| over checkpoint intervals containing a continuation special point vs over the "
             "others; one-sided permutation test (10000 permutations, seed 0): agree if larger with the special "
             "points at p < 0.05, disagree if larger without them at p < 0.05, else inconclusive (also when all "
             "or no intervals contain one)")

DEFAULTS = {"hidden": 24, "steps": 400, "checkpoint_every": 40, "batch_size": 32, "lr": 0.01, "dt": 0.2,
            "seed": 0, "eval_batch": 8, "probes": 16, "periods": 6}


def study_config(out: str | Path, **kw) -> dict:
    o = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    p = int(o["periods"])
    return {
        "name": "continuation_multitask", "seed": int(o["seed"]), "out": str(out),
        "task": {"name": "multitask", "params": {"context": p, "stim": p, "mem": p, "resp": p}},
        "model": {"name": "leaky_rnn", "hidden": int(o["hidden"]), "params": {"dt": float(o["dt"])}},
        "optimizer": {"name": "adam", "lr": float(o["lr"])},
        "train": {"steps": int(o["steps"]), "batch_size": int(o["batch_size"]),
                  "checkpoint_every": int(o["checkpoint_every"])},
        "track": {"eval_batch": int(o["eval_batch"]), "probes": int(o["probes"])},
    }


def _permutation_test(values: list[float], labels: list[bool], n_perm: int = 10000, seed: int = 0):
    import numpy as np

    v, lab = np.asarray(values, float), np.asarray(labels, bool)
    if lab.all() or not lab.any():
        return math.nan, math.nan, math.nan
    obs = v[lab].mean() - v[~lab].mean()
    rng = np.random.default_rng(seed)
    perms = np.array([(lambda p: v[p].mean() - v[~p].mean())(rng.permutation(lab)) for _ in range(n_perm)])
    p_greater = (1 + (perms >= obs).sum()) / (n_perm + 1)
    p_less = (1 + (perms <= obs).sum()) / (n_perm + 1)
    return float(obs), float(p_greater), float(p_less)


def verdict(values: list[float], labels: list[bool]) -> dict:
    """The fixed criterion (``CRITERION``) on interval amplifications and special-point labels."""
    diff, p_gt, p_lt = _permutation_test(values, labels)
    if math.isnan(diff):
        v = "inconclusive"
    elif p_gt < 0.05:
        v = "agree"
    elif p_lt < 0.05:
        v = "disagree"
    else:
        v = "inconclusive"
    return {"verdict": v, "difference": diff, "p_larger_at_special_points": p_gt,
            "p_smaller_at_special_points": p_lt, "n_intervals": len(values), "n_with_special_points": sum(labels)}


def run_continuation_study(out: str | Path = "runs", *, progress: bool = True, **kw) -> Path:
    """Train (or resume) the multi-task leaky RNN, continue its fixed points between checkpoints, measure
    the sNTK at every checkpoint and write ``<out>/continuation_multitask/`` (``continuation_study.json``,
    ``special_points.csv``, ``amplification.csv``, figures and ``report.html``). Returns the folder."""
    import torch

    from kpflow.dynamics import ContinuationError, continue_fixed_points, interpolation_path
    from kpflow.dynamics.diagram import plot_bifurcation_diagram
    from kpflow.estimators import onesided_statistics
    from kpflow.files import atomic_write_text, write_csv
    from kpflow.kernels import record, state_jacobian
    from kpflow.report import write_report
    from kpflow.tracking.analyze import build_from_config
    from kpflow.training import validate_config
    from kpflow.training.checkpoints import list_checkpoints, load_checkpoint

    from .pipeline import run_pipeline

    cfg = validate_config(study_config(out, **kw))
    run_dir = run_pipeline(cfg, progress=progress, analyze=False, report=False)
    task, model = build_from_config(cfg)
    cps = list_checkpoints(run_dir / "checkpoints")
    D = torch.float64
    model = model.to(D)
    params = []
    for c in cps:
        load_checkpoint(c, model)
        params.append({k: v.detach().clone() for k, v in model.cell_params().items()})
    steps = [c.step for c in cps]
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed, dtype=D)
    n_tasks = len(task.tasks)
    # sNTK at every checkpoint (eval batch)
    ntk_rows = []
    it = range(len(cps))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sNTK at the checkpoints", leave=False)
    for i in it:
        traj = record(model, batch.inputs, params=params[i])
        st = onesided_statistics(state_jacobian(traj), cfg.track.probes, seed=cfg.track.eval_seed)
        ntk_rows.append({"step": steps[i], "ntk_trace": st.trace.value, "ntk_trace_se": st.trace.stderr,
                         "ntk_erank": st.effective_rank.value, "ntk_erank_se": st.effective_rank.stderr})
    # continuation between consecutive checkpoints, per task context input
    special, failures, diagram_result = [], [], None
    pairs = [(k, t) for k in range(len(cps) - 1) for t in range(n_tasks)]
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc="continuation between checkpoints", leave=False)
    for k, t in it:
        x_bar = torch.zeros(model.input_dim, dtype=D)
        x_bar[0] = 1.0
        x_bar[3 + t] = 1.0
        path = interpolation_path(model, params[k], params[k + 1], x_bar,
                                  label=f"s (step {steps[k]} → {steps[k + 1]}, {task.tasks[t]} context)")
        traj = record(model, batch.inputs, params=params[k])
        starts = traj.states.reshape(-1, model.state_dim)
        starts = starts[torch.randperm(starts.shape[0], generator=torch.Generator().manual_seed(k))[:48]]
        try:
            res = continue_fixed_points(model, path, None, s_start=0.0, s_range=(0.0, 1.0), direction="forward",
                                        initial_states=starts, search_kwargs={"n_starts": 48, "max_iters": 400},
                                        max_steps=200, ds_max=0.1, max_branches=6)
        except ContinuationError as err:
            failures.append({"interval": [steps[k], steps[k + 1]], "task": task.tasks[t], "error": str(err)})
            continue
        for sp in res.special_points:
            special.append({"interval_start": steps[k], "interval_end": steps[k + 1], "task": task.tasks[t],
                            "step": steps[k] + sp.s * (steps[k + 1] - steps[k]), **sp.summary()})
        if res.special_points and diagram_result is None:
            diagram_result = res
    # the comparison fixed above
    amp = [abs(math.log(ntk_rows[k + 1]["ntk_trace"]) - math.log(ntk_rows[k]["ntk_trace"]))
           for k in range(len(cps) - 1)]
    has = [any(r["interval_start"] == steps[k] for r in special) for k in range(len(cps) - 1)]
    ver = verdict(amp, has)
    amp_rows = [{"interval_start": steps[k], "interval_end": steps[k + 1], "amplification": amp[k],
                 "special_points": sum(r["interval_start"] == steps[k] for r in special)} for k in range(len(amp))]
    summary = {"criterion": CRITERION, **ver, "tasks": list(task.tasks), "hidden": cfg.model.hidden,
               "steps": steps, "special_points": len(special), "failures": failures,
               "kinds": sorted({r["kind"] for r in special})}
    atomic_write_text(run_dir / "continuation_study.json", json.dumps(summary, indent=1, default=str))
    write_csv(run_dir / "special_points.csv", special)
    write_csv(run_dir / "amplification.csv", amp_rows)
    figures = [_figure_amplification(run_dir / "figures" / "ntk_and_special_points.png", ntk_rows, special)]
    if diagram_result is not None:
        figures.append(run_dir / "figures" / "bifurcation_diagram.png")
        plot_bifurcation_diagram(diagram_result, figures[-1], title=diagram_result.path.label)
    notes = [f"Criterion (fixed before the data): {CRITERION}.",
             f"Verdict: {ver['verdict']} (difference of mean amplification {ver['difference']:.3g}, "
             f"p = {ver['p_larger_at_special_points']:.3g} / {ver['p_smaller_at_special_points']:.3g}; "
             f"{ver['n_with_special_points']} of {ver['n_intervals']} intervals contain a special point).",
             f"{len(special)} special point(s) located by continuation: "
             + (", ".join(f"{r['label']} ({r['task']}) at step {r['step']:.1f}" for r in special[:12]) or "none")
             + ("." if len(special) <= 12 else ", ...")]
    rows = [{"step": r["step"], "metric": "ntk_trace", "value": r["ntk_trace"], "stderr": r["ntk_trace_se"]}
            for r in ntk_rows]
    write_report(run_dir / "report.html", title="Continuation study: multi-task leaky RNN", rows=rows,
                 figures=figures, config_text=json.dumps(study_config(out, **kw), indent=1), notes=notes)
    return run_dir


def _figure_amplification(path: Path, ntk_rows: list[dict], special: list[dict]) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from kpflow.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    s = [r["step"] for r in ntk_rows]
    v = [r["ntk_trace"] for r in ntk_rows]
    e = [r["ntk_trace_se"] for r in ntk_rows]
    ax.errorbar(s, v, yerr=e, marker="o", ms=3, capsize=3, color="tab:green", label="tr Θ ± s.e.")
    for i, r in enumerate(special):
        ax.axvline(r["step"], color="tab:red", lw=0.8, alpha=0.6, label="special point" if i == 0 else None)
    ax.set(yscale="log", xlabel="training step", ylabel="tr Θ (eval batch)",
           title="sNTK trace and continuation-detected changes of the dynamics")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix, kw in ((".png", {"dpi": 110}), (".svg", {})):
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix[1:], bbox_inches="tight", **kw)
        atomic_write_bytes(path.with_suffix(suffix), buf.getvalue())
    plt.close(fig)
    return path
