"""Bifurcation diagrams of continued branches: stable and unstable parts coloured, special points marked."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch

from .continuation import ContinuationResult

__all__ = ["plot_bifurcation_diagram", "branch_coordinate"]

STABLE, UNSTABLE = "tab:blue", "tab:red"
MARKERS = {"LP": ("o", "k"), "BP": ("s", "tab:green"), "PD": ("D", "tab:purple"), "NS": ("^", "tab:orange"),
           "H": ("^", "tab:orange"), "D": ("x", "0.3")}


def branch_coordinate(points: torch.Tensor, coordinate) -> torch.Tensor:
    """The plotted state coordinate of ``[N, H]`` points: ``"norm"`` (‖z‖), an int (that unit),
    ``"mean"`` (mean over units) or a callable ``[N, H] -> [N]``."""
    if callable(coordinate):
        return torch.as_tensor(coordinate(points)).reshape(-1)
    if coordinate == "norm":
        return points.norm(dim=-1)
    if coordinate == "mean":
        return points.mean(-1)
    if isinstance(coordinate, int):
        if not -points.shape[-1] <= coordinate < points.shape[-1]:
            raise ValueError(f"coordinate {coordinate} is out of range for a state of size {points.shape[-1]}")
        return points[:, coordinate]
    raise ValueError(f"coordinate must be 'norm', 'mean', a unit index or a callable, got {coordinate!r}")


def plot_bifurcation_diagram(result: ContinuationResult, path: str | Path | None = None, *, ax=None,
                             coordinate: str | int | Callable = "norm", title: str | None = None,
                             ylabel: str | None = None):
    """Draw every branch of ``result`` against its parameter: solid blue where the fixed point is
    stable, dashed red where some eigenvalue is beyond the boundary (``|λ| > 1`` for maps, ``Re λ > 0``
    for flows), with each special point marked and labelled (LP fold, BP branch point, PD flip, NS
    Neimark–Sacker, H Hopf; a ``+``/``−`` after the label for super/subcritical).

    Args:
        result: a ``ContinuationResult``.
        path: when given, the figure is written there as PNG and beside it as SVG (atomically).
        ax: an existing matplotlib axis to draw into (else a new figure).
        coordinate: what to plot on the vertical axis (see ``branch_coordinate``).
        title, ylabel: labels (defaults from the path and the coordinate).

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    for b in result.branches:
        s = b.s.detach().cpu().numpy()
        y = branch_coordinate(b.points, coordinate).detach().cpu().numpy()
        stable = b.stable.cpu().numpy()
        for i in range(len(s) - 1):
            st = bool(stable[i] and stable[i + 1])
            ax.plot(s[i:i + 2], y[i:i + 2], color=STABLE if st else UNSTABLE, ls="-" if st else "--", lw=1.6)
    seen = set()
    for sp in result.special_points:
        y = float(branch_coordinate(sp.point.unsqueeze(0), coordinate)[0])
        marker, color = MARKERS.get(sp.label, ("x", "k"))
        crit = {"supercritical": "+", "subcritical": "−"}.get(sp.criticality, "")
        ax.plot([sp.s], [y], marker=marker, color=color, ms=7, ls="none", zorder=5)
        ax.annotate(sp.label + crit + ("*" if sp.flags else ""), (sp.s, y), textcoords="offset points",
                    xytext=(4, 5), fontsize=8)
        seen.add(sp.label)
    handles = [Line2D([], [], color=STABLE, lw=1.6, label="stable"),
               Line2D([], [], color=UNSTABLE, lw=1.6, ls="--", label="unstable")]
    names = {"LP": "fold (LP)", "BP": "branch point (BP)", "PD": "flip (PD)", "NS": "Neimark–Sacker (NS)",
             "H": "Hopf (H)", "D": "degenerate"}
    for lab in sorted(seen):
        m, c = MARKERS.get(lab, ("x", "k"))
        handles.append(Line2D([], [], marker=m, color=c, ls="none", label=names.get(lab, lab)))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel(result.path.label)
    default_y = {"norm": "‖z*‖", "mean": "mean of z*"}.get(coordinate, f"z*[{coordinate}]"
                                                           if isinstance(coordinate, int) else "coordinate")
    ax.set_ylabel(ylabel or default_y)
    ax.set_title(title or f"fixed points along {result.path.label} ({'flow' if result.is_flow else 'map'})",
                 fontsize=10)
    if path is not None:
        from kpflow.files import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix, kw in ((".png", {"dpi": 110}), (".svg", {})):
            buf = io.BytesIO()
            fig.savefig(buf, format=suffix[1:], bbox_inches="tight", **kw)
            atomic_write_bytes(path.with_suffix(suffix), buf.getvalue())
    return fig
