"""Figures of a run from its tidy metrics table: PNG and SVG, matplotlib's Agg backend."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPERATORS = (("K", "K = Jθ Jθ*", "tab:blue"), ("PPstar", "P P*", "tab:orange"), ("NTK", "NTK P K P*", "tab:green"))
VIEW_TITLES = {"temporal": "temporal (trial × time)", "spatial": "spatial (units)", "trial": "trial"}


@dataclass(frozen=True)
class Dimensions:
    """Sizes of the evaluation batch and the model: ``trials`` B, time ``steps`` T, ``state`` size H and the
    number of trained cell ``params``. The state space has ``N = B·T·H`` dimensions."""

    trials: int
    steps: int
    state: int
    params: int

    @property
    def state_space(self) -> int:
        """N = B·T·H, the rank bound of P P* and of the NTK P K P*."""
        return self.trials * self.steps * self.state

    @property
    def k_rank_bound(self) -> int:
        """min(N, #params): K = Jθ Jθ* factors through the parameter space."""
        return min(self.state_space, self.params)

    def view(self, name: str) -> int:
        """The dimension of one compression: temporal (B·T), spatial (H) or trial (B)."""
        return {"temporal": self.trials * self.steps, "spatial": self.state, "trial": self.trials}[name]


def _bounds(ax, lines) -> None:
    """Horizontal reference lines ``[(value, label), ...]`` (grey, dotted), labelled at the right edge."""
    for value, label in lines:
        ax.axhline(value, color="0.45", ls=":", lw=1)
        ax.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.35")


def legend_outside(ax, *, below: bool = False, fontsize: float = 8) -> None:
    """A legend outside the plotting area, right of it (or ``below`` it, for axes with a right-hand twin
    axis), so it never covers data; save the figure with a layout engine or ``bbox_inches="tight"``."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if below:
        ax.legend(handles, labels, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                  borderaxespad=0)
    else:
        ax.legend(handles, labels, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); imported on first use.

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def series(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{metric: (steps, values, stderrs)}`` sorted by step."""
    acc = defaultdict(list)
    for r in rows:
        acc[r["metric"]].append((r["step"], r["value"], r["stderr"]))
    out = {}
    for k, v in acc.items():
        v.sort()
        a = np.array(v, dtype=float)
        out[k] = (a[:, 0], a[:, 1], a[:, 2])
    return out


def save_figure(fig, folder: Path, stem: str) -> Path:
    """Write ``fig`` as PNG and SVG and close it.

    The figure is made with ``layout="constrained"``, which places panels, labels and the legends outside
    the data inside the figure; that layout is computed once, for the PNG, and kept for the SVG (the engine
    is frozen after the first draw). Without ``bbox_inches="tight"`` each file is drawn once instead of
    twice: together a third of the time of a small run's report was spent laying out figures again.

    Args:
        fig: a matplotlib figure with the constrained layout engine.
        folder: where the files go (created).
        stem: the file name without suffix.

    Returns:
        The PNG's path (the SVG lies beside it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{stem}.png"
    fig.savefig(png, dpi=110)
    fig.set_layout_engine("none")  # keep the layout just computed; text sizes are in points, so it holds at any dpi
    fig.savefig(folder / f"{stem}.svg")
    _plt().close(fig)
    return png


# the module's own short names for the two public helpers above (other modules import the public names)
_plt, _save = pyplot, save_figure


def _errorbar(ax, s, label, color=None, **kw):
    x, y, e = s
    e = np.where(np.isfinite(e), e, 0.0)
    ax.errorbar(x, y, yerr=e, label=label, color=color, marker="o", ms=3, capsize=3, lw=1.4, **kw)


def figure_training(train_losses, S, folder: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    if train_losses:
        steps, losses = zip(*train_losses, strict=True)
        axes[0].plot(steps, losses, color="0.6", lw=0.8, label="training batch loss")
    if "loss" in S:
        _errorbar(axes[0], S["loss"], "evaluation loss ± s.e.", color="k")
    axes[0].set(yscale="log", xlabel="GD step", ylabel="loss", title="Loss")
    legend_outside(axes[0])
    if "accuracy" in S:
        _errorbar(axes[1], S["accuracy"], "accuracy ± s.e.", color="tab:purple")
    if "activity_dim" in S:
        ax2 = axes[1].twinx()
        _errorbar(ax2, S["activity_dim"], "activity PR dimension", color="tab:red")
        ax2.set_ylabel("participation ratio", color="tab:red")
    axes[1].set(xlabel="GD step", ylabel="accuracy", ylim=(-0.05, 1.05), title="Accuracy and activity dimension")
    return _save(fig, folder, "training")


def figure_effective_ranks(S, folder: Path, dims: Dimensions | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.6, 4), layout="constrained")
    for key, label, color in OPERATORS:
        if f"{key}_erank" in S:
            _errorbar(ax, S[f"{key}_erank"], f"erank {label}", color=color)
    if dims is not None:  # "low rank" is judged against what the rank could be
        _bounds(ax, [(dims.state_space, f"state dimension N = B·T·H = {dims.state_space}"),
                     (dims.k_rank_bound, f"K's rank bound min(N, #params) = {dims.k_rank_bound}")]
                if dims.k_rank_bound < dims.state_space else
                [(dims.state_space, f"state dimension N = B·T·H = {dims.state_space} (also K's bound)")])
    ax.set(yscale="log", xlabel="GD step", ylabel="effective rank tr(A)²/‖A‖_F²",
           title="Effective rank of the operators of learning")
    legend_outside(ax)
    return _save(fig, folder, "effective_ranks")


def figure_axis_ranks(S, folder: Path, dims: Dimensions | None = None) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
    for ax, (view, title) in zip(axes, VIEW_TITLES.items(), strict=True):
        for key, label, color in OPERATORS:
            m = f"{key}_erank_{view}"
            if m in S:
                _errorbar(ax, S[m], label, color=color)
        if dims is not None:
            _bounds(ax, [(dims.view(view), f"dimension {dims.view(view)}")])
        ax.set(yscale="log", xlabel="GD step", ylabel="effective rank", title=f"{title} effective rank")
    legend_outside(axes[-1])
    return _save(fig, folder, "axis_effective_ranks")


def figure_norms(S, folder: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
    for key, label, color in OPERATORS:
        if f"{key}_trace" in S:
            _errorbar(axes[0], S[f"{key}_trace"], label, color=color)
        if f"{key}_fro" in S:
            _errorbar(axes[1], S[f"{key}_fro"], label, color=color)
    axes[0].set(yscale="log", xlabel="GD step", ylabel="tr(A)", title="trace")
    axes[1].set(yscale="log", xlabel="GD step", ylabel="‖A‖_F", title="Frobenius norm")
    legend_outside(axes[1])
    return _save(fig, folder, "trace_and_norm")


def figure_alignments(S, folder: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    for m, label, color in (("ntk_init_alignment", "cos(NTK, NTK at init)", "tab:green"),
                            ("misdirection", "misdirection cos(PKP*, PP*)", "tab:orange"),
                            ("kernel_target_alignment", "kernel-target alignment cos(Θ, e eᵀ)", "tab:blue")):
        if m in S:
            _errorbar(ax, S[m], label, color=color)
    ax.set(xlabel="GD step", ylabel="cosine", ylim=(-0.05, 1.05), title="Alignments")
    legend_outside(ax)
    return _save(fig, folder, "alignments")


def figure_interference(rows, folder: Path) -> Path | None:
    inter = [r for r in rows if r["metric"].startswith("interference[")]
    if not inter:
        return None
    plt = _plt()
    steps = sorted({r["step"] for r in inter})
    names = []
    for r in inter:
        a = r["metric"][len("interference["):-1].split(",")[0]
        if a not in names:
            names.append(a)
    n = len(names)
    picks = [steps[0], steps[len(steps) // 2], steps[-1]] if len(steps) >= 3 else steps
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.8), squeeze=False, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)  # the constrained layout under-counts the rotated tick labels by ~0.02 in
    for ax, step in zip(axes[0], picks, strict=True):
        M = np.full((n, n), np.nan)
        for r in inter:
            if r["step"] == step:
                a, b = r["metric"][len("interference["):-1].split(",")
                M[names.index(a), names.index(b)] = r["value"]
        im = ax.imshow(M, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_title(f"step {step}: cos(δz_i←j, δz_i←i)", fontsize=9)
        ax.set_xlabel("task j (whose error drives the change)", fontsize=8)
        ax.set_ylabel("task i (whose states change)", fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine")
    return _save(fig, folder, "interference")


def run_figures(rows: list[dict], train_losses, folder: str | Path, *, dims: Dimensions | None = None,
                progress: bool = False) -> list[Path]:
    """Write every figure the metrics support; returns the PNG paths (an SVG lies beside each).

    Args:
        rows: the tidy metrics (``step``, ``metric``, ``value``, ``stderr``).
        train_losses: ``[(step, loss), ...]`` of the training batches.
        folder: where the figures go.
        dims: the evaluation batch's and model's sizes; effective ranks are drawn against them.
        progress: a progress bar over the figures.
    """
    folder = Path(folder)
    S = series(rows)
    jobs = [lambda: figure_training(train_losses, S, folder), lambda: figure_effective_ranks(S, folder, dims)]
    if any(k.endswith("_erank_temporal") for k in S):
        jobs.append(lambda: figure_axis_ranks(S, folder, dims))
    jobs += [lambda: figure_norms(S, folder), lambda: figure_alignments(S, folder),
             lambda: figure_interference(rows, folder)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="report", unit="figure", dynamic_ncols=True)
    return [p for p in (job() for job in jobs) if p is not None]
