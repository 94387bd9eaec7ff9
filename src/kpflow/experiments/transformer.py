"""Study ``kpflow run transformer``: is a self-attention transformer's state-space NTK low-rank over tokens?

The Global Empirical NTK paper (papers.md §2.1, §2.4) claims that the NTK of a self-attention transformer
is *structurally* low-rank, and plots its temporal (token) rank against the input's effective dimension.
Here, at initialisation, for a one-block transformer (d_model 64, 4 heads, no bias, GELU MLP of width
128, post-LayerNorm, bidirectional attention, learned positional embedding — the paper's experiment)
on B = 5 sequences of Gaussian tokens of width d ∈ {1, 4, 16, 64, 256, 512} and length T ∈ {25, 50}, over 3 seeds:

* ``ntk_token_erank``: effective rank ``tr(Θ_t)² / ‖Θ_t‖_F²`` of the token view
  ``Θ_t = (1ᵀ⊗I) Θ (1⊗I)`` (an N×N matrix over the N = B·T token positions, exact: ``J_t J_tᵀ`` from one
  batched VJP) of the NTK of the visible states (residual stream before and after the block);
* ``core_token_erank``: the same for the token view of the exact Kronecker core K (``temporal_gram``);
* ``input_effdim``: uncentred participation ratio ``tr(C)²/tr(C²)`` of the tokens, ``C = XᵀX/N``;
* each divided by N as well (``*_fraction``).

Criterion, fixed before any data (one-sided, mean ± 2 SE over seeds, at every (d, T)):
**agree** if ``ntk_token_erank / N + 2 SE < 0.25`` at every input size and length (low rank: under a
quarter of the token positions even when the input's effective dimension approaches N);
**disagree** if ``ntk_token_erank / N − 2 SE > 0.5`` at some (d, T); **inconclusive** otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from kpflow.training.config import RunConfig, validate_config

from .registry import register_study

INPUT_DIMS = (1, 4, 16, 64, 256, 512)
LENGTHS = (25, 50)
N_SEQUENCES = 5
SEEDS = 3
LOW, HIGH = 0.25, 0.5
MODEL = dict(d_model=64, n_heads=4, n_layers=1, d_ff=128, bias=False, layer_norm=True, causal=False)


def transformer_config() -> RunConfig:
    """The study's config: only ``name``, ``out``, ``seed`` (first of 3 seeds) and ``device`` are read; the
    sizes are the module constants (``INPUT_DIMS``, ``LENGTHS``, ``N_SEQUENCES``, ``MODEL``)."""
    return validate_config({"name": "transformer", "seed": 0})


def erank(G: torch.Tensor) -> float:
    """``tr(G)² / ‖G‖_F²`` of a square matrix (0 for the zero matrix)."""
    fro2 = float((G ** 2).sum())
    return float(torch.trace(G)) ** 2 / fro2 if fro2 > 0 else 0.0


def token_ntk(traj) -> torch.Tensor:
    """The exact token view ``Θ_t = (1ᵀ⊗I) Θ (1⊗I)`` ``[N, N]`` of the visible-state NTK: with
    ``J = dh_vis/dθ``, ``Θ_t = J_t J_tᵀ`` where the rows of ``J_t = (1ᵀ⊗I) J`` are ``J*`` of the N indicator
    cotangents (one batched VJP, no forward-mode pass)."""
    from kpflow.kernels.joint import SiteStateJacobian

    J = SiteStateJacobian(traj)
    B, T, H = traj.shape
    N = B * T
    E = torch.zeros(N, N, H, dtype=traj.dtype, device=traj.device)
    E[torch.arange(N), torch.arange(N)] = 1.0
    Jt = J.rmatmat(E.reshape(N, B, T, H))  # [N, n_params]
    return Jt @ Jt.T


def measure_one(d: int, T: int, seed: int, device="cpu", dtype=torch.float32) -> dict[str, float]:
    """All quantities of one (input size, length, seed)."""
    from kpflow.kernels import kronecker_core, record
    from kpflow.models import Transformer

    gen = torch.Generator().manual_seed(1000 * seed + 7 * d + T)
    torch.manual_seed(seed)
    model = Transformer(d, output_dim=1, max_len=max(LENGTHS), dtype=dtype, device=device, **MODEL)
    x = torch.randn(N_SEQUENCES, T, d, generator=gen, dtype=dtype).to(device) / math.sqrt(d)
    traj = record(model, x)
    N = N_SEQUENCES * T
    X = x.reshape(N, d)
    C = X.T @ X / N
    out = {"input_effdim": float(torch.trace(C)) ** 2 / float(torch.trace(C @ C)),
           "ntk_token_erank": erank(token_ntk(traj)),
           "core_token_erank": erank(kronecker_core(traj).temporal_gram())}
    out |= {"ntk_token_fraction": out["ntk_token_erank"] / N, "core_token_fraction": out["core_token_erank"] / N}
    return out


def verdict(summary: dict) -> tuple[str, str]:
    """The verdict and its reason from ``{(d, T): {metric: (mean, se)}}`` (criterion in the module docstring)."""
    fr = {k: v["ntk_token_fraction"] for k, v in summary.items()}
    worst = max(fr, key=lambda k: fr[k][0] + 2 * fr[k][1])
    hi = max(fr, key=lambda k: fr[k][0] - 2 * fr[k][1])
    if fr[hi][0] - 2 * fr[hi][1] > HIGH:
        return "disagree", (f"at d={hi[0]}, T={hi[1]} the NTK's token erank is {fr[hi][0]:.3f} ± {fr[hi][1]:.3f} of "
                            f"the N token positions, above {HIGH} by more than 2 SE")
    if fr[worst][0] + 2 * fr[worst][1] < LOW:
        return "agree", (f"the NTK's token erank stays below {LOW} of the token positions at every input size and "
                         f"length (largest: {fr[worst][0]:.3f} ± {fr[worst][1]:.3f} at d={worst[0]}, T={worst[1]})")
    return "inconclusive", (f"the largest token erank fraction is {fr[worst][0]:.3f} ± {fr[worst][1]:.3f} "
                            f"(d={worst[0]}, "
                            f"T={worst[1]}): neither below {LOW} everywhere nor above {HIGH} anywhere by 2 SE")


def _figure(summary, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for T, ls in zip(LENGTHS, ("-", "--"), strict=True):
        ks = sorted(k for k in summary if k[1] == T)
        x = [summary[k]["input_effdim"][0] for k in ks]
        for ax, frac in zip(axes, (False, True), strict=True):
            for metric, label, color in (("ntk", "NTK Θ", "C0"), ("core", "Kronecker core K", "C1")):
                key = f"{metric}_token_{'fraction' if frac else 'erank'}"
                y = np.array([summary[k][key][0] for k in ks])
                e = np.array([summary[k][key][1] for k in ks])
                ax.errorbar(x, y, yerr=e, ls=ls, color=color, marker="o", ms=3, capsize=2, label=f"{label}, T={T}")
    axes[0].set_ylabel("token effective rank")
    axes[1].set_ylabel("token effective rank / (B·T)")
    axes[1].axhline(LOW, color="gray", lw=0.8, ls=":")
    axes[1].axhline(HIGH, color="gray", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("input effective dimension (participation ratio of the tokens)")
        ax.legend(fontsize=7)
    fig.suptitle(f"transformer at init: token rank of the NTK and of K ({N_SEQUENCES} sequences, {SEEDS} seeds, ±SE)")
    fig.tight_layout()
    path = folder / "transformer_token_rank.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_transformer_study(cfg: RunConfig | None = None, out_dir: str | Path | None = None, *, progress: bool = True,
                          analyze: bool = True, report: bool = True, fresh: bool = False,
                          stop_after: int | None = None) -> Path:
    """Measure every (input size, length, seed), write metrics.csv, transformer.json, the figure and report.html
    (``analyze``/``stop_after`` do not apply: the study does not train)."""
    from kpflow.tracking.analyze import write_metrics_csv
    from kpflow.training.checkpoints import atomic_write_text

    from .pipeline import prepare_run_dir

    cfg = transformer_config() if cfg is None else cfg
    if out_dir is not None:
        out_dir = Path(out_dir)
        cfg = validate_config(cfg, out=str(out_dir.parent), name=out_dir.name)
    run_dir = prepare_run_dir(cfg, fresh)
    grid = [(d, T, cfg.seed + s) for T in LENGTHS for d in INPUT_DIMS for s in range(SEEDS)]
    it = grid
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(grid, desc="transformer token ranks")
    raw: dict[tuple[int, int], list[dict]] = {}
    for d, T, seed in it:
        raw.setdefault((d, T), []).append(measure_one(d, T, seed, device=cfg.device))
    summary = {}
    for key, vals in raw.items():
        summary[key] = {}
        for m in vals[0]:
            a = np.array([v[m] for v in vals])
            summary[key][m] = (float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0)
    result, reason = verdict(summary)
    rows = [{"run": cfg.name, "step": d, "metric": f"{m}_T{T}", "value": v[0], "stderr": v[1],
             "method": f"mean ± SE over {SEEDS} seeds; step = input width d"}
            for (d, T), ms in summary.items() for m, v in ms.items()]
    write_metrics_csv(run_dir / "metrics.csv", rows)
    doc = {"claim": "the state-space NTK of a self-attention transformer is structurally low-rank (Global Empirical "
                    "NTK, arXiv 2605.08746)",
           "criterion": f"agree if ntk_token_erank/N + 2 SE < {LOW} at every (d, T); disagree if "
                        f"ntk_token_erank/N - 2 SE > {HIGH} at some (d, T); else inconclusive",
           "verdict": result, "reason": reason, "model": MODEL, "sequences": N_SEQUENCES, "seeds": SEEDS,
           "input_dims": INPUT_DIMS, "lengths": LENGTHS,
           "bottleneck_fraction": float(np.mean([ms["ntk_token_erank"][0] <= ms["core_token_erank"][0]
                                                 for ms in summary.values()])),
           "results": [{"d": d, "T": T, **{m: list(v) for m, v in ms.items()}} for (d, T), ms in summary.items()]}
    atomic_write_text(run_dir / "transformer.json", json.dumps(doc, indent=1))
    if report:
        from kpflow.report import write_report

        fig = _figure(summary, run_dir / "figures")
        notes = [f"Claim: {doc['claim']}.", f"Criterion (fixed in code before the data): {doc['criterion']}.",
                 f"Verdict: {result} — {reason}.",
                 "The NTK's token erank is at most the Kronecker core's in "
                 f"{100 * doc['bottleneck_fraction']:.0f}% of the "
                 "(d, T) cells (K's token view bounds what gradient descent can move only through P; this is reported, "
                 "not required)."]
        cells = "".join(
            f"<tr><td>{d}</td><td>{T}</td><td>{ms['input_effdim'][0]:.1f}</td>"
            f"<td>{ms['ntk_token_erank'][0]:.2f} ± {ms['ntk_token_erank'][1]:.2f}</td>"
            f"<td>{ms['core_token_erank'][0]:.2f} ± {ms['core_token_erank'][1]:.2f}</td>"
            f"<td>{ms['ntk_token_fraction'][0]:.3f}</td></tr>"
            for (d, T), ms in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][0])))
        extra = ("<h2>Token ranks</h2><table><tr><th>d</th><th>T</th><th>input effdim</th><th>NTK token erank</th>"
                 f"<th>K token erank</th><th>NTK erank / N</th></tr>{cells}</table>")
        config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
        write_report(run_dir / "report.html", title=f"kpflow transformer study: {cfg.name}", rows=rows, figures=[fig],
                     config_text=config_text, notes=notes, extra_html=extra)
    return run_dir


def _study_runner(cfg: RunConfig, **options) -> Path:
    return run_transformer_study(cfg, **options)


register_study("transformer", transformer_config, run=_study_runner,
               description="self-attention transformer at init: token effective rank of the NTK and of its Kronecker "
                           "core against the input's effective dimension")
