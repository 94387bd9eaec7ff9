"""The claims report: one self-contained HTML page, claim → criterion → measured ± SE → verdict, with a
figure per claim (the claim's own, else its per-seed effects against the threshold)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from kpflow.files import atomic_write_text
from kpflow.report.html import CSS, environment

from .registry import Verdict, get_claim

COLORS = {"agree": "#2e7d32", "disagree": "#c62828", "inconclusive": "#9e9e9e"}


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<figure><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'></figure>"


def _num(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def effect_figure(v: Verdict, ax) -> None:
    """Per-seed effects (dots), mean ± 2 SE (bar) and the threshold (dashed) of every part of ``v``."""
    parts = v.parts or (v,)
    for i, p in enumerate(parts):
        vals = [x for x in p.values if math.isfinite(x)]
        ax.scatter([i] * len(vals), vals, s=14, color="k", alpha=0.6, zorder=3)
        if math.isfinite(p.effect):
            se = p.se if math.isfinite(p.se) else 0.0
            ax.errorbar([i + 0.15], [p.effect], yerr=[2 * se], fmt="o", color=COLORS[p.verdict], capsize=4,
                        zorder=4)
        ax.hlines(p.threshold, i - 0.3, i + 0.45, color=COLORS[p.verdict], ls="--", lw=1)
    ax.set_xticks(range(len(parts)))
    ax.set_xticklabels([p.name for p in parts], fontsize=7, rotation=10)
    ax.set_xlim(-0.6, len(parts) - 0.4)
    ax.set_ylabel("effect per seed (dots), mean ± 2 SE", fontsize=8)


def claim_figure(claim_id: str, v: Verdict, measurements: list[dict], folder: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claim = get_claim(claim_id)
    if claim.figure is not None and measurements:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        try:
            claim.figure(measurements, axes[0])
        except Exception as err:  # a figure must never hide the verdict
            axes[0].text(0.5, 0.5, f"figure failed: {err}", ha="center", transform=axes[0].transAxes, fontsize=7)
        ax = axes[1]
    else:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
    effect_figure(v, ax)
    ax.set_title(f"{claim_id}: {v.verdict}", fontsize=9, color=COLORS[v.verdict])
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = folder / f"{claim_id}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _parts_html(v: Verdict) -> str:
    rows = v.parts or (v,)
    return "<br>".join(
        f"<span style='color:{COLORS[p.verdict]}'>{html.escape(p.name)}: {_num(p.effect)} ± {_num(p.se)} "
        f"({'&gt;' if p.direction == 'above' else '&lt;'} {p.threshold:g}; n={p.n}) → {p.verdict}</span>"
        for p in rows)


def write_claims_report(path: str | Path, results: dict, *, size: str, wall_seconds: float) -> Path:
    """Write the claims report to ``path`` (figures beside it in ``figures/``) and return ``path``."""
    path = Path(path)
    figs = path.parent / "figures"
    table, sections = [], []
    for cid, r in results.items():
        claim, v = get_claim(cid), r["verdict"]
        ms = [rec["measurement"] for rec in r["records"]]
        table.append(f"<tr><td><a href='#{cid}'>{claim.number}. {html.escape(cid)}</a></td>"
                     f"<td style='text-align:left'>{html.escape(claim.criterion)}</td>"
                     f"<td style='text-align:left'>{_parts_html(v)}</td>"
                     f"<td style='color:{COLORS[v.verdict]};font-weight:bold'>{v.verdict}</td></tr>")
        fig = claim_figure(cid, v, ms, figs)
        secs = sum(rec["seconds"] for rec in r["records"])
        errs = "".join(f"<pre>{html.escape(e[-1500:])}</pre>" for e in r["errors"])
        notes = "".join(f"<li>{html.escape(str(n))}</li>" for m in ms for n in m.get("notes", []))
        sections.append(
            f"<h2 id='{cid}'>{claim.number}. {html.escape(cid)} — "
            f"<span style='color:{COLORS[v.verdict]}'>{v.verdict}</span></h2>"
            f"<p class='note'>“{html.escape(claim.quote)}” — {html.escape(claim.paper)}</p>"
            f"<p><b>Criterion (fixed in code):</b> {html.escape(claim.criterion)}</p>"
            f"<p><b>Setting ({size}):</b> {html.escape(claim.setting)}</p>"
            f"<p><b>Measured:</b> {_parts_html(v)}<br>seeds {[rec['task']['seed'] for rec in r['records']]}, "
            f"{secs:.0f} s of measurement</p>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + (_img(fig) if fig is not None else "")
            + (f"<p><b>Failed tasks:</b></p>{errs}" if errs else ""))
    env = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in environment().items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kpflow claims report</title>"
            f"<style>{CSS}</style></head><body><h1>kpflow: the papers' claims, measured</h1>"
            f"<p>Size <b>{size}</b>, wall time {wall_seconds:.0f} s. Each verdict compares the mean effect over "
            "seeds with a threshold fixed in code before the data, in units of its standard error "
            "(agree / disagree beyond 2 SE on either side, else inconclusive).</p>"
            "<table><tr><th>claim</th><th>criterion</th><th>measured ± SE</th><th>verdict</th></tr>"
            + "".join(table) + "</table>" + "".join(sections)
            + f"<h2>Environment</h2><table>{env}</table></body></html>")
    atomic_write_text(path, page)
    return path
