"""A self-contained HTML report of a run: figures embedded as base64 PNG, the config, the environment,
the metrics with error bars and a short automatic reading of what happened."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import sys
import time
from pathlib import Path

from .figures import series

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.scroll{max-width:100%;overflow-x:auto}.scroll td,.scroll th{white-space:nowrap}
.scroll td:first-child,.scroll th:first-child{position:sticky;left:0;background:#fff}
.scroll th:first-child{background:#f5f5f5}.wrap td{white-space:normal;overflow-wrap:anywhere}
pre{background:#f7f7f7;padding:.8em;
overflow-x:auto;font-size:.85em}.note{background:#f3f8ff;border-left:4px solid #4a90d9;padding:.6em 1em}
"""

CAPTIONS = {
    "training": "Training loss (grey: each training batch; black: the fixed evaluation batch, mean ± standard "
                "error over trials), accuracy and the participation-ratio dimension of the hidden activity.",
    "effective_ranks": "Effective rank tr(A)²/‖A‖_F² of K, P P* and the NTK P K P* on the evaluation batch, "
                       "with standard errors of the randomized estimates (0 where exact). Dotted lines: the "
                       "state dimension N = B·T·H (trials × time steps × state size), the largest rank P P* and "
                       "the NTK can have, and K's bound min(N, number of trained parameters); an effective rank "
                       "is low relative to these.",
    "axis_effective_ranks": "Effective ranks of the compressions (1ᵀ⊗I)A(1⊗I) onto one view: temporal keeps "
                            "(trial, time), spatial keeps units, trial keeps trials. Dotted: the view's "
                            "dimension (B·T, H or B), the largest possible rank.",
    "trace_and_norm": "Trace and Frobenius norm of each operator.",
    "alignments": "Alignment of the NTK with its value at initialisation, the misdirection cos(PKP*, PP*), and the "
                  "kernel-target alignment cos(Θ, e eᵀ) with e = ∂L/∂z.",
    "interference": "Task-by-task interference: cosine between the state change of task i driven by task j's "
                    "error, −P_i K_ij P_j* e_j, and the one driven by task i's own error.",
    "sweep_effective_ranks": "Effective ranks at initialisation and at the end of training against the initial "
                             "recurrent weight scale g (mean over seeds; band: 95% Student-t confidence interval "
                             "of that mean, none with a single seed).",
    "sweep_trajectories": "Effective rank of P P* and of K over training for each g (mean over seeds with its 95% "
                          "confidence band).",
    "bifurcation_sntk_erank": "Effective rank of the state-space NTK Θ = P K P* over training (full, and its "
                              "temporal and spatial compressions), ± standard error of the randomized estimate; "
                              "dashed red: the first learned bifurcation, star: the measurement at the crossing.",
    "bifurcation_origin_spectrum": "Moduli |λ| of the three leading eigenvalues of the recurrence's Jacobian at "
                                   "the origin over training; a bifurcation of the origin is where one crosses "
                                   "the grey line |λ| = 1.",
    "bifurcation_channel": "Share of the sNTK carried by the bifurcation channel (of its trace and of its "
                           "Frobenius norm) and the top direction's share σ₁²/tr Θ, left axis; the evaluation "
                           "loss, right axis.",
    "bifurcation_normal_form_match": "The sNTK restricted to the centre coordinate at the crossing: the network's "
                                     "profile over time (solid) against the normal form's prediction (dashed) "
                                     "for two trials; the title gives their correlation and magnitude ratio.",
    "pitchfork_amplification_landscape": "Amplification ‖d_μ α‖ of the pitchfork normal form over the parameter "
                                         "μ and the initial condition α₀ (log scale); the dashed line is the "
                                         "bifurcation μ = 0.",
}


def environment() -> dict[str, str]:
    import numpy
    import torch

    from kpflow import __version__

    return {"kpflow": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "machine": platform.machine(),
            "torch threads": str(torch.get_num_threads()),
            "cuda": torch.version.cuda or "none", "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _fmt(v: float, se: float) -> str:
    if se != se or se == 0:
        return f"{v:.4g}" + ("" if se == 0 else " ± n/a")
    return f"{v:.4g} ± {se:.2g}"


def _ratio_text(a, b) -> str:
    if a <= 0 or b <= 0:
        return "n/a"
    r = b / a
    return f"×{r:.2g}" if r >= 1 else f"÷{1 / r:.2g}"


def reading(rows: list[dict], train_losses, dims=None) -> list[str]:
    """A few sentences on what the metrics show, computed from them (no claims the numbers do not support);
    with ``dims`` (:class:`~kpflow.report.figures.Dimensions`) the effective ranks are put against the
    state dimension and K's rank bound."""
    S = series(rows)
    if not S:
        return ["No metrics were recorded."]
    out = []

    def first_last(m):
        x, y, e = S[m]
        return (int(x[0]), y[0], e[0]), (int(x[-1]), y[-1], e[-1])

    if "loss" in S:
        (s0, l0, _), (s1, l1, _) = first_last("loss")
        acc = ""
        if "accuracy" in S:
            (_, a0, _), (_, a1, _) = first_last("accuracy")
            acc = f"; accuracy went from {a0:.2f} to {a1:.2f}"
        out.append(f"Between step {s0} and step {s1} the evaluation loss went from {l0:.3g} to {l1:.3g}{acc}.")
    parts = []
    for key, label in (("PPstar", "P P*"), ("K", "K"), ("NTK", "the NTK P K P*")):
        m = f"{key}_erank"
        if m in S:
            (_, a, ea), (_, b, eb) = first_last(m)
            x, y, _ = S[m]
            parts.append(f"{label}: {_fmt(a, ea)} → {_fmt(b, eb)} ({_ratio_text(a, b)}; minimum {y.min():.3g} at "
                         f"step {int(x[y.argmin()])})")
    if parts:
        out.append("Effective rank tr(A)²/‖A‖_F² from the first to the last checkpoint — " + "; ".join(parts) + ".")
    if dims is not None and parts:
        N, bound = dims.state_space, dims.k_rank_bound
        shares = []
        for key, label, cap in (("PPstar", "P P*", N), ("NTK", "the NTK", N), ("K", "K", bound)):
            if f"{key}_erank" in S:
                last = float(S[f"{key}_erank"][1][-1])
                shares.append(f"{label} {last:.3g} of at most {cap} ({100 * last / cap:.2g}%)")
        out.append(f"Against what the ranks could be (state dimension N = B·T·H = {dims.trials}·{dims.steps}·"
                   f"{dims.state} = {N}; K at most min(N, {dims.params} trained parameters) = {bound}), the "
                   "final effective ranks are " + "; ".join(shares) + ".")
    views = []
    for key, label in (("PPstar", "P P*"), ("K", "K"), ("NTK", "NTK")):
        m = f"{key}_erank_temporal"
        if m in S:
            (_, a, _), (_, b, _) = first_last(m)
            views.append(f"{label} {a:.3g} → {b:.3g}")
    if views:
        out.append("Temporal effective rank (compression onto trial × time): " + "; ".join(views) + ".")
    if "PPstar_erank" in S and "K_erank" in S:
        # A description of this one run, not a verdict: the pre-registered test of the claim (several seeds, effect
        # against its standard error, K judged against its own rank bound) is `kpflow reproduce`'s collapse claim.
        (s0, p0, e0), (s1, p1, e1) = first_last("PPstar_erank")
        _, y, _ = S["K_erank"]
        se = math.hypot(float(e0), float(e1))
        change = f"{(p1 - p0) / se:+.3g} standard errors" if se > 0 and math.isfinite(se) else "no standard error"
        out.append(
            f"KPFlow reading (P's effective rank collapses under GD while K stays low-rank): the effective rank of "
            f"P P* went from {_fmt(p0, e0)} at step {s0} to {_fmt(p1, e1)} at step {s1} ({change}), and K's ranged "
            f"between {y.min():.3g} and {y.max():.3g} over the checkpoints. One seed cannot test the claim: "
            "`kpflow reproduce --only collapse_over_gd` does, over seeds, with a criterion fixed in code.")
    if "ntk_init_alignment" in S:
        (_, _, _), (s1, a1, e1) = first_last("ntk_init_alignment")
        regime = "lazy (kernel) regime" if a1 > 0.9 else "rich (feature-learning) regime" if a1 < 0.5 else \
            "intermediate regime"
        article = "an" if regime[0] in "aeiou" else "a"
        out.append(f"The NTK at step {s1} has cosine {_fmt(a1, e1)} with the NTK at initialisation: {article} "
                   f"{regime}.")
    if "misdirection" in S:
        (_, m0, _), (_, m1, _) = first_last("misdirection")
        out.append(f"Misdirection cos(PKP*, PP*) went from {m0:.3g} to {m1:.3g} (1 would mean K passes P's "
                   f"directions unchanged).")
    inter = [r for r in rows if r["metric"].startswith("interference[")]
    if inter:
        last = max(r["step"] for r in inter)
        off = [r for r in inter if r["step"] == last and r["metric"].split("[")[1].split(",")[0]
               != r["metric"].split(",")[1].rstrip("]")]
        if off:
            best = max(off, key=lambda r: r["value"])
            worst = min(off, key=lambda r: r["value"])
            out.append(f"At step {last} the most cooperative task pair is {best['metric'][12:]} "
                       f"(cos {best['value']:.2f}) and the most interfering is {worst['metric'][12:]} "
                       f"(cos {worst['value']:.2f}).")
    return out


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _metrics_table(rows: list[dict]) -> str:
    """Metrics by row, one column per checkpoint step, or per ``column`` label where the rows carry one (a
    sweep's g values); the table scrolls sideways inside the page, the metric names staying in view."""
    columns: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: (r.get("column") is not None, int(r.get("step") or 0))):
        col = str(r["column"]) if r.get("column") is not None else f"step {int(r['step'])}"
        if col not in columns:
            columns.append(col)
        cells.setdefault(r["metric"], {})[col] = _fmt(float(r["value"]), float(r["stderr"]))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{row.get(c, '')}</td>" for c in columns)
                   + "</tr>" for m, row in cells.items())
    methods = {}
    for r in rows:
        methods.setdefault(r["metric"], r.get("method", ""))
    meth = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in methods.items())
    return (f"<div class='scroll'><table><tr><th>metric (value ± standard error)</th>{head}</tr>{body}</table>"
            "</div><details><summary>How each metric was computed</summary><div class='scroll wrap'><table>"
            f"<tr><th>metric</th><th>method</th></tr>{meth}</table></div></details>")


def write_report(path: str | Path, *, title: str, rows: list[dict], figures: list[Path], config_text: str,
                 train_losses=(), notes: list[str] | None = None, extra_html: str = "", dims=None) -> Path:
    """Write the self-contained HTML report to ``path`` (atomically). Rows may carry a ``column`` label
    (e.g. ``g = 2``) to be tabulated by it instead of by step; ``dims`` puts effective ranks against the
    state dimension in the reading."""
    from kpflow.files import atomic_write_text

    paragraphs = notes if notes is not None else reading(rows, list(train_losses), dims)
    env = environment()
    meta = html.escape(json.dumps({"figures": [p.stem for p in figures]}))
    figs = "".join(f"<figure>{_img(p)}<figcaption><b>{html.escape(p.stem)}</b>: "
                   f"{html.escape(CAPTIONS.get(p.stem, ''))}</figcaption></figure>" for p in figures)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Reading</h2><div class="note">{''.join(f'<p>{html.escape(p)}</p>' for p in paragraphs)}</div>
<h2>Figures</h2>{figs}
{extra_html}
<h2>Metrics</h2>{_metrics_table(rows) if rows else '<p>No metrics.</p>'}
<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>
<h2>Environment</h2><table>{''.join(f'<tr><td>{html.escape(k)}</td><td style="text-align:left">'
                                    f'{html.escape(v)}</td></tr>' for k, v in env.items())}</table>
<script type="application/json" id="kpflow-metadata">{meta}</script>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, doc)
    return path
