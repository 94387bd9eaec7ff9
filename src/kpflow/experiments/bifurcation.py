"""``kpflow run bifurcation``: the student–teacher study of sNTK collapse at the first learned bifurcation.

Setting (Hazelden & Shea-Brown, arXiv 2605.12763; code index ``rnn_student_teacher``): a tanh RNN
student ``h_t = tanh(W h_{t-1} + W_in x_t)``, ``y_t = W_out h_t`` learns by SGD to reproduce a teacher
with the same ``W_in``, ``W_out`` and ``W* = g* W_base`` (``g* = 1.2``: past the bifurcation of the
origin at ``|λ| = 1``). The student starts at ``W = g W_base`` (``g = 0.4``) and only ``W`` is trained,
so it must cross the bifurcation. Inputs have rank 4 in 16 dimensions. ``W_base`` is by default the
*planted* teacher (``task.params.teacher_spectrum: planted``: one real mode at 1, visible in the
readout, the rest at radius 0.5), whose student crosses +1 along a real mode — a pitchfork; with
``teacher_spectrum: orthogonal`` (the paper code's random orthogonal ``W_base``, all eigenvalues of
modulus 1) a complex pair usually reaches the unit circle first (a Neimark–Sacker), the documented
second regime.

At every checkpoint, on a fixed evaluation batch (float64): the loss; the sNTK ``Θ = P K P*`` (K of
``W`` only) — trace, effective rank full / temporal / spatial (one-sided randomized estimates with
standard errors, ``kpflow.estimators.onesided_statistics``); the leading eigenvalues of the fixed
point at the origin (``∂F/∂z(0) = W``); the bifurcation channel of the leading eigenvector (exact
projection, ``kpflow.dynamics.bifurcation_channel``) and its share of ``tr Θ``; the dominant parameter
direction (top right singular vector of ``dz/dθ``, power iteration); and the match of the sNTK
restricted to that direction with the scalar pitchfork/flip normal form of the leading real
eigenvalue. The origin is followed across checkpoints and the first bifurcation is located by
bisection on the interpolated weights (``kpflow.dynamics.track_bifurcations``); the same
measurements are repeated exactly at the located crossing.

Outputs in ``<out>/<name>``: checkpoints, ``metrics.csv`` (tidy: run, step, metric, value, stderr,
method), ``bifurcation.json`` (the headline numbers), ``figures/*.png|svg`` and ``report.html``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from kpflow.training.config import RunConfig, validate_config

from .registry import register_study

PARAM = "W"
CACHE_VERSION = 3  # bump when the per-checkpoint metrics change


def bifurcation_config() -> RunConfig:
    """Default config of the study (under 10 minutes on 2 CPU cores)."""
    return validate_config({
        "name": "bifurcation", "seed": 0,
        "task": {"name": "student_teacher", "params": {"input_dim": 16, "hidden": 64, "input_rank": 4,
                                                        "seq_len": 40, "g_teacher": 1.2, "teacher_seed": 0,
                                                        "teacher_spectrum": "planted"}},
        "model": {"name": "rnn", "hidden": 64, "g": 0.4},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"steps": 1000, "batch_size": 128, "checkpoint_every": 50},
        "track": {"eval_batch": 8, "probes": 48, "eval_seed": 1234, "param_names": [PARAM]},
    })


# ------------------------------------------------------------------------------------ the student
def build_student(cfg: RunConfig):
    """The task and the student: ``W = g W_base``, ``W_in``/``W_out`` the teacher's (frozen), no biases."""
    from kpflow.models import VanillaRNN
    from kpflow.tasks import make_task

    if cfg.task.name != "student_teacher":
        raise ValueError(f"the bifurcation study needs task.name = 'student_teacher', got {cfg.task.name!r}")
    task = make_task(cfg.task.name, **cfg.task.params)
    if cfg.model.hidden != task.hidden:
        raise ValueError(f"model.hidden = {cfg.model.hidden} must equal the teacher's hidden = {task.hidden}")
    w = task.teacher_weights()
    model = VanillaRNN(task.input_dim, task.hidden, task.output_dim, nonlinearity="tanh", bias=False,
                       dtype=cfg.torch_dtype(), device=cfg.device)
    with torch.no_grad():
        model.cell.W.copy_(cfg.model.g * w["W_base"])
        model.cell.U.copy_(w["W_in"])
        model.readout.weight.copy_(w["W_out"])
        model.readout.bias.zero_()
    model.cell.U.requires_grad_(False)
    model.readout.requires_grad_(False)
    return task, model


# ------------------------------------------------------------------------------ measurements
class _SharedForward:
    """``J w`` for a batch of probes, remembered so three compressions of ``J`` share one pass."""

    def __init__(self, J):
        self.J, self.V, self.Y = J, None, None

    def __call__(self, V):
        if self.V is None or self.V.shape != V.shape or not torch.equal(self.V, V):
            self.V, self.Y = V.clone(), self.J.matmat(V)
        return self.Y


def _compressed_factor(shared: _SharedForward, J, reduce, shape_out):
    from kpflow.operators import FunctionOperator

    return FunctionOperator(lambda V: reduce(shared(V)), None, J.shape_in, shape_out, J.dtype, J.device,
                            batched=True)


def ntk_statistics(traj, probes: int, seed: int) -> dict[str, tuple[float, float]]:
    """tr Θ, ‖Θ‖_F and effective ranks of Θ and of its temporal/spatial views (``kpflow.operators.view``),
    from ``probes`` forward probes of ``J = dz/dW`` shared by all four (one-sided estimators)."""
    from kpflow.estimators.onesided import onesided_statistics
    from kpflow.kernels import state_jacobian

    J = state_jacobian(traj, [PARAM])
    B, T, H = traj.shape
    shared = _SharedForward(J)
    factors = {
        "full": _compressed_factor(shared, J, lambda Y: Y, (B, T, H)),
        "temporal": _compressed_factor(shared, J, lambda Y: Y.sum(-1), (B, T)),
        "spatial": _compressed_factor(shared, J, lambda Y: Y.sum((1, 2)), (H,)),
    }
    out = {}
    import warnings

    for name, F in factors.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            st = onesided_statistics(F, num_matvecs=probes, side="forward", seed=seed)
        sfx = "" if name == "full" else f"_{name}"
        out[f"ntk_erank{sfx}"] = (st.effective_rank.value, st.effective_rank.stderr)
        if name == "full":
            out["ntk_trace"] = (st.trace.value, st.trace.stderr)
            f2 = st.frobenius_sq
            out["ntk_fro"] = (math.sqrt(max(f2.value, 0.0)),
                              f2.stderr / (2 * math.sqrt(f2.value)) if f2.value > 0 else math.nan)
    return out


def top_right_singular(J, iters: int = 40, seed: int = 0, start: torch.Tensor | None = None, tol: float = 1e-10):
    """Top right singular vector ``w`` and value² of ``J`` by power iteration on ``Jᵀ J``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(J.shape_in, generator=g, dtype=J.dtype).to(J.device) if start is None else start.clone()
    w = w / w.norm()
    lam = 0.0
    for _ in range(iters):
        v = J.T.apply(J.apply(w))
        new = float(torch.dot(v, w))
        w = v / v.norm()
        if abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return w, lam


def origin_spectrum(model, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (sorted by |λ|, largest first) and right/left eigenvectors of ``∂F/∂z`` at the origin."""
    from kpflow.dynamics import constant_input_map, eig_with_left

    fmap = constant_input_map(model, None, params)
    A = fmap.jacobians(torch.zeros(1, model.state_dim, dtype=fmap.dtype, device=fmap.device))[0]
    lam, R, L = eig_with_left(A)
    order = torch.argsort(lam.abs(), descending=True)
    return lam[order], R[:, order], L[:, order]


NF_KINDS = ("pitchfork", "flip", "neimark-sacker")


def measure(model, params, batch, probes: int, seed: int, critical: torch.Tensor | None = None,
            critical_eigenvalue: complex | None = None) -> dict:
    """All per-checkpoint metrics at the cell parameters ``params`` (float64) on ``batch``."""
    from kpflow.dynamics import bifurcation_channel, normal_form_match
    from kpflow.kernels import record, state_jacobian

    traj = record(model, batch.inputs, targets=batch.targets, param_names=[PARAM], params=params)
    m: dict[str, tuple[float, float]] = {"loss": (float(traj.loss), 0.0)}
    m.update(ntk_statistics(traj, probes, seed))
    lam, R, _ = origin_spectrum(model, params)
    for i in range(3):
        m[f"origin_abs_lambda{i + 1}"] = (float(lam[i].abs()), 0.0)
    m["origin_lambda1_real"] = (float(lam[0].real), 0.0)
    m["origin_lambda1_imag"] = (float(lam[0].imag.abs()), 0.0)
    real = lam.imag.abs() <= 1e-8
    m["origin_leading_real_lambda"] = (float(lam[real][0].real) if bool(real.any()) else math.nan, 0.0)
    q = R[:, 0] if critical is None else critical
    tr, fro = m["ntk_trace"][0], m["ntk_fro"][0]
    ch = bifurcation_channel(traj, q, param_names=[PARAM], totals=(tr, fro))
    m["channel_rank"] = (float(ch.rank), 0.0)
    m["channel_amplification"] = (float(ch.singular_values[0]) ** 2, 0.0)  # σ₁² of the channel
    m["channel_trace_fraction"] = (ch.trace_fraction, ch.trace_fraction * m["ntk_trace"][1] / tr if tr else math.nan)
    m["channel_frobenius_fraction"] = (ch.frobenius_fraction, 0.0)
    m["channel_spatial_fraction"] = (ch.spatial_fraction, 0.0)
    J = state_jacobian(traj, [PARAM])
    w, s2 = top_right_singular(J, start=ch.param_directions[0], seed=seed)
    m["top_direction_fraction"] = (s2 / tr if tr else math.nan, 0.0)
    m["channel_top_direction_overlap"] = (abs(float(torch.dot(w, ch.param_directions[0]))), 0.0)
    extra = {"channel": ch, "direction": w}
    try:
        nf = normal_form_match(traj, torch.zeros(model.state_dim, dtype=traj.dtype, device=traj.device), w,
                               param_names=[PARAM],
                               eigenvalue=critical_eigenvalue)
        m["nf_correlation"] = (abs(nf.correlation), 0.0)
        m["nf_magnitude_ratio"] = (nf.magnitude_ratio, 0.0)
        m["nf_mu"] = (nf.mu, 0.0)
        m["nf_kind_code"] = (float(NF_KINDS.index(nf.kind)), 0.0)
        extra["nf"] = nf
    except ValueError:
        pass
    return {"metrics": m, **extra}


def record_states(model, params, batch, n: int, seed: int) -> torch.Tensor:
    """``n`` states sampled from the model's run on ``batch`` (starts for fixed-point searches)."""
    with torch.no_grad():
        z = model.unroll(params, batch.inputs).reshape(-1, model.state_dim)
    pick = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return z[pick]


# ------------------------------------------------------------------------------------------ runner
def _rows(run: str, step, metrics: dict, method: str = "") -> list[dict]:
    return [{"run": run, "step": step, "metric": k, "value": v, "stderr": se, "method": method}
            for k, (v, se) in metrics.items()]


def _save(fig, folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()  # legends outside the data (report.figures.legend_outside) are kept by bbox_inches
    fig.savefig(folder / f"{stem}.svg", bbox_inches="tight")
    fig.savefig(folder / f"{stem}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return folder / f"{stem}.png"


def _series(rows, metric):
    pts = sorted((r["step"], r["value"], r["stderr"]) for r in rows if r["metric"] == metric
                 and isinstance(r["step"], (int, float)))
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), np.array([p[2] for p in pts]))


def _figures(rows, summary, landscape, nf_at, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpflow.report.figures import legend_outside

    out = []
    step_b = summary.get("first_bifurcation_step")

    def mark(ax):
        if step_b is not None:
            ax.axvline(step_b, color="crimson", ls="--", lw=1,
                       label=f"first bifurcation ({summary['first_bifurcation_kind']})")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for metric, lab in (("ntk_erank", "full"), ("ntk_erank_temporal", "temporal"), ("ntk_erank_spatial", "spatial")):
        s, v, e = _series(rows, metric)
        ax.errorbar(s, v, yerr=e, marker="o", ms=3, label=lab, capsize=2)
    if summary.get("at"):
        ax.plot([step_b], [summary["at"]["ntk_erank"]], "k*", ms=10, label="at the crossing")
    mark(ax)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("sNTK effective rank")
    legend_outside(ax, fontsize=7)
    out.append(_save(fig, folder, "bifurcation_sntk_erank"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i in range(3):
        s, v, _ = _series(rows, f"origin_abs_lambda{i + 1}")
        ax.plot(s, v, marker="o", ms=3, label=f"|λ{i + 1}| at the origin")
    ax.axhline(1.0, color="gray", lw=0.8)
    mark(ax)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("eigenvalue modulus |λ|")
    legend_outside(ax, fontsize=7)
    out.append(_save(fig, folder, "bifurcation_origin_spectrum"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for metric, lab in (("channel_trace_fraction", "channel share of tr Θ"),
                        ("channel_frobenius_fraction", "channel share of ‖Θ‖_F"),
                        ("top_direction_fraction", "top direction σ₁²/tr Θ")):
        s, v, _ = _series(rows, metric)
        ax.plot(s, v, marker="o", ms=3, label=lab)
    s, v, _ = _series(rows, "loss")
    ax2 = ax.twinx()
    ax2.plot(s, v, color="k", lw=1, alpha=0.5, label="loss")
    ax2.set_ylabel("eval loss")
    mark(ax)
    ax.set_xlabel("SGD step")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    legend_outside(ax, below=True, fontsize=7)
    out.append(_save(fig, folder, "bifurcation_channel"))

    if nf_at is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        meas, pred = nf_at.measured.detach().cpu(), nf_at.predicted.detach().cpu()
        sign = 1.0 if float((meas * pred).sum()) >= 0 else -1.0
        if meas.dim() == 3:  # planar (Neimark–Sacker): show Re α
            meas, pred = meas[..., 0], pred[..., 0]
        for b in range(min(2, meas.shape[0])):
            ax.plot(meas[b].numpy(), color=f"C{b}", label=f"network, trial {b}")
            ax.plot(sign * pred[b].numpy(), color=f"C{b}", ls="--", label=f"{nf_at.kind} normal form, trial {b}")
        ax.set_xlabel("time step")
        ax.set_ylabel("centre-coordinate sensitivity (Re α)" if nf_at.kind == "neimark-sacker"
                      else "centre-coordinate sensitivity")
        ax.set_title(f"restricted sNTK profile: corr {abs(nf_at.correlation):.3f}, ratio {nf_at.magnitude_ratio:.3g}",
                     fontsize=9)
        legend_outside(ax, fontsize=6)
        out.append(_save(fig, folder, "bifurcation_normal_form_match"))

    if landscape is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        Z = np.log10(landscape.sensitivity_norm.numpy().T.clip(1e-12, 1e12))
        im = ax.imshow(Z, origin="lower", aspect="auto", cmap="magma",
                       extent=[float(landscape.mus[0]), float(landscape.mus[-1]),
                               float(landscape.alpha0s[0]), float(landscape.alpha0s[-1])])
        fig.colorbar(im, ax=ax, label="log10 ‖d_μ α‖")
        ax.axvline(0.0, color="w", lw=0.8, ls="--")
        ax.set_xlabel("μ (student)")
        ax.set_ylabel("α₀")
        ax.set_title(f"pitchfork normal form: amplification landscape, T = {landscape.T}", fontsize=9)
        out.append(_save(fig, folder, "pitchfork_amplification_landscape"))
    return out


def run_bifurcation_study(cfg: RunConfig | None = None, out_dir: str | Path | None = None, *, progress: bool = True,
                          analyze: bool = True, report: bool = True, fresh: bool = False,
                          stop_after: int | None = None) -> Path:
    """Train the student (resumable checkpoints), measure every checkpoint, locate the first learned
    bifurcation and measure at it, then write metrics.csv, bifurcation.json, figures and report.html."""
    from kpflow.dynamics import amplification_landscape, track_bifurcations
    from kpflow.tracking.analyze import write_metrics_csv
    from kpflow.training.checkpoints import atomic_write_text, list_checkpoints, load_checkpoint
    from kpflow.training.trainer import train

    from .pipeline import prepare_run_dir

    cfg = bifurcation_config() if cfg is None else cfg
    if out_dir is not None:
        out_dir = Path(out_dir)
        cfg = validate_config(cfg, out=str(out_dir.parent), name=out_dir.name)
    run_dir = prepare_run_dir(cfg, fresh)
    task, model = build_student(cfg)
    result = train(model, task, cfg, out_dir=run_dir, progress=progress, stop_after=stop_after)
    if (stop_after is not None and result.final_step < cfg.train.steps and not result.stopped_early) or not analyze:
        return run_dir

    # ---------------------------------------------------------------- measure every checkpoint
    cps = list_checkpoints(run_dir / "checkpoints")
    if len(cps) < 2:
        raise RuntimeError(f"{run_dir} has {len(cps)} checkpoint(s); the study needs at least two")
    probe_model = build_student(cfg)[1].to(torch.float64)
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed, device=cfg.device, dtype=torch.float64)
    steps, params, rows = [], [], []
    cache_dir = run_dir / "bifurcation_cache"
    cache_dir.mkdir(exist_ok=True)
    it = cps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cps, desc="measuring checkpoints")
    for c in it:
        load_checkpoint(c, probe_model)
        p = {k: v.detach().to(torch.float64).clone() for k, v in probe_model.cell_params().items()}
        steps.append(c.step)
        params.append(p)
        tag = f"v{CACHE_VERSION}_{c.meta.get('sha256', '')[:12]}_{cfg.track.probes}_{cfg.track.eval_batch}_" \
              f"{cfg.track.eval_seed}"
        key = cache_dir / f"step_{c.step:06d}_{tag}.json"
        if key.is_file():
            metrics = {k: tuple(v) for k, v in json.loads(key.read_text()).items()}
        else:
            metrics = measure(probe_model, p, batch, cfg.track.probes, cfg.seed)["metrics"]
            atomic_write_text(key, json.dumps(metrics))
        rows += _rows(cfg.name, c.step, metrics)

    # ---------------------------------------------------------------- bifurcations of the origin
    hist = track_bifurcations(probe_model, params, steps=steps, search=False,
                              initial_points=torch.zeros(1, probe_model.state_dim, dtype=torch.float64,
                                                         device=cfg.device),
                              progress=progress)
    summary: dict = {"steps": steps, "events": [e.summary() for e in hist.events]}
    nf_at = None
    first = hist.first
    if first is not None:
        k = first.interval[0]
        summary.update(first_bifurcation_step=first.step, first_bifurcation_kind=first.kind,
                       first_bifurcation_eigenvalue=[first.eigenvalue.real, first.eigenvalue.imag],
                       first_bifurcation_criticality=first.criticality,
                       first_bifurcation_interval=[steps[k], steps[k + 1]])
        at = measure(probe_model, {k2: v.clone() for k2, v in first.params.items()}, batch, cfg.track.probes, cfg.seed,
                     critical=first.right_vector, critical_eigenvalue=first.eigenvalue)
        nf_at = at.get("nf")
        summary["at"] = {k2: v[0] for k2, v in at["metrics"].items()}
        summary["at_stderr"] = {k2: v[1] for k2, v in at["metrics"].items()}
        rows += _rows(cfg.name, first.step, {f"at_bifurcation_{k2}": v for k2, v in at["metrics"].items()},
                      "at the located crossing (interpolated weights)")

        def at_step(s):
            return {r["metric"]: r["value"] for r in rows if r["step"] == s}

        # fixed points born or lost on the crossing interval: fresh searches from recorded states at both ends
        from kpflow.dynamics import find_bifurcations

        starts = record_states(probe_model, params[k], batch, 48, cfg.seed)
        scan = find_bifurcations(probe_model, params[k], params[k + 1], initial_states=starts,
                                 search_kwargs={"n_starts": 48, "max_iters": 600})
        summary["interval_scan"] = {
            "fixed_points_before": len(scan.fixed_points_a), "fixed_points_after": len(scan.fixed_points_b),
            "stability_before": scan.fixed_points_a.stability, "stability_after": scan.fixed_points_b.stability,
            "born": len(scan.born), "lost": len(scan.lost), "events": [e.summary() for e in scan.events]}
        summary["before"] = {"step": steps[k], **at_step(steps[k])}
        summary["after"] = {"step": steps[k + 1], **at_step(steps[k + 1])}
        se = {s: {r["metric"]: r["stderr"] for r in rows if r["step"] == s} for s in (steps[k], steps[k + 1])}
        eb, ea = summary["before"].get("ntk_erank"), summary["after"].get("ntk_erank")
        sb, sa = se[steps[k]].get("ntk_erank", math.nan), se[steps[k + 1]].get("ntk_erank", math.nan)
        summary["erank_drop_across_crossing"] = (eb - ea) if eb is not None and ea is not None else math.nan
        summary["erank_drop_se"] = math.hypot(sb, sa)
        summary["start"] = {"step": steps[0], **at_step(steps[0])}
        summary["end"] = {"step": steps[-1], **at_step(steps[-1])}
    rows.append({"run": cfg.name, "step": "", "metric": "first_bifurcation_step",
                 "value": first.step if first is not None else math.nan, "stderr": 0.0,
                 "method": f"bisection on interpolated weights ({first.kind})" if first is not None else "none found"})
    write_metrics_csv(run_dir / "metrics.csv", rows)
    atomic_write_text(run_dir / "bifurcation.json", json.dumps(summary, indent=1, default=str))

    if report:
        from kpflow.report import write_report
        from kpflow.tracking.analyze import training_losses

        landscape = amplification_landscape("pitchfork", torch.linspace(-0.6, 0.6, 41), torch.linspace(-1, 1, 41),
                                            T=25, mu_star=0.44)
        figs = _figures(rows, summary, landscape, nf_at, run_dir / "figures")
        notes = reading_notes(summary)
        config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
        table_rows = [r for r in rows if isinstance(r["step"], int)]
        write_report(run_dir / "report.html", title=f"kpflow bifurcation study: {cfg.name}", rows=table_rows,
                     figures=figs, config_text=config_text, train_losses=training_losses(run_dir), notes=notes,
                     extra_html=bifurcation_table_html(summary))
    return run_dir


def reading_notes(summary: dict) -> list[str]:
    """The report's plain-language reading of the headline numbers."""
    if "first_bifurcation_step" not in summary:
        return ["No bifurcation of the origin was crossed during training: the leading eigenvalue of W stayed "
                "inside the unit circle. Train longer (--steps) or with a larger learning rate (--lr)."]
    at, b, a = summary["at"], summary["before"], summary["after"]
    lam = complex(*summary["first_bifurcation_eigenvalue"])
    notes = [
        f"First learned bifurcation: {summary['first_bifurcation_kind']} of the origin at step "
        f"{summary['first_bifurcation_step']:.1f} (critical eigenvalue {lam.real:.4f}{lam.imag:+.4f}i, located by "
        "bisection between checkpoints on the interpolated weights).",
        f"sNTK effective rank: {b.get('ntk_erank', math.nan):.3g} at step {b['step']} (before), "
        f"{at['ntk_erank']:.3g} at the crossing, {a.get('ntk_erank', math.nan):.3g} at step {a['step']} (after); "
        f"{summary['start'].get('ntk_erank', math.nan):.3g} at the start and "
        f"{summary['end'].get('ntk_erank', math.nan):.3g} "
        "at the end.",
        f"At the crossing the bifurcation channel (rank {int(at['channel_rank'])}) carries "
        f"{100 * at['channel_trace_fraction']:.1f}% of tr Θ and "
        f"{100 * at['channel_frobenius_fraction']:.1f}% of ‖Θ‖_F; "
        f"the top parameter direction carries {100 * at['top_direction_fraction']:.1f}% of tr Θ.",
    ]
    if "nf_correlation" in at:
        notes.append(
            "Normal-form match along the dominant direction ("
            f"{NF_KINDS[int(at.get('nf_kind_code', 0))]} normal form of the critical eigenvalue, "
            f"μ = {at['nf_mu']:.3g}): "
            f"profile correlation {at['nf_correlation']:.3f}, "
            f"magnitude ratio {at['nf_magnitude_ratio']:.3g} (1 = exact).")
    if summary["first_bifurcation_kind"] != "pitchfork":
        notes.append("The paper reports that the first learned bifurcation is a pitchfork; here the first crossing is "
                     f"a {summary['first_bifurcation_kind']}, so the comparison uses that normal form instead of the "
                     "scalar pitchfork.")
    sc = summary.get("interval_scan")
    if sc:
        notes.append(f"Fixed points on the crossing interval (fresh searches from recorded states): "
                     f"{sc['fixed_points_before']} before ({', '.join(sc['stability_before'])}), "
                     f"{sc['fixed_points_after']} after ({', '.join(sc['stability_after'])}); "
                     f"{sc['born']} born, {sc['lost']} lost.")
    b_er, at_er = b.get("ntk_erank", math.nan), at["ntk_erank"]
    drop, dse = summary.get("erank_drop_across_crossing", math.nan), summary.get("erank_drop_se", math.nan)
    notes.append(f"sNTK effective-rank drop across the crossing interval (checkpoint before → after): {drop:.3g} ± "
                 f"{dse:.2g}, i.e. {drop / dse if dse > 0 else math.nan:.3g} standard errors.")
    notes.append(f"Collapse check: the sNTK effective rank changes by a factor {b_er / at_er:.3g} between the last "
                 "checkpoint before the crossing and the crossing, and by "
                 f"{summary['start'].get('ntk_erank', math.nan) / at_er:.3g}"
                 " from the start of training to the crossing.")
    return notes


def bifurcation_table_html(summary: dict) -> str:
    """The headline table of the report: the first learned bifurcation and the sNTK around it."""
    import html

    if "first_bifurcation_step" not in summary:
        return "<h2>First learned bifurcation</h2><p>None was crossed during training.</p>"
    cols = [("start", summary["start"]), ("before", summary["before"]), ("at the crossing", summary["at"]),
            ("after", summary["after"]), ("end", summary["end"])]
    metrics = ["ntk_erank", "ntk_erank_temporal", "ntk_erank_spatial", "ntk_trace", "origin_abs_lambda1",
               "channel_trace_fraction", "channel_frobenius_fraction", "channel_amplification",
               "top_direction_fraction", "nf_correlation", "nf_magnitude_ratio", "loss"]
    head = "".join(f"<th>{html.escape(n)}<br>step {d.get('step', summary['first_bifurcation_step']):.6g}</th>"
                   for n, d in cols)
    body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(
        f"<td>{d[m]:.4g}</td>" if isinstance(d.get(m), (int, float)) else "<td>–</td>" for _, d in cols) + "</tr>"
        for m in metrics)
    lam = summary["first_bifurcation_eigenvalue"]
    return (f"<h2>First learned bifurcation</h2><p>first_bifurcation_step = {summary['first_bifurcation_step']:.6g} "
            f"({html.escape(str(summary['first_bifurcation_kind']))}, critical eigenvalue "
            f"{lam[0]:.5f}{lam[1]:+.5f}i)</p><table><tr><th>metric</th>{head}</tr>{body}</table>")


def _study_runner(cfg: RunConfig, **options) -> Path:
    return run_bifurcation_study(cfg, **options)


register_study("bifurcation", bifurcation_config, run=_study_runner,
               description="tanh RNN student crossing the teacher's bifurcation: sNTK collapse, channel, normal form")
