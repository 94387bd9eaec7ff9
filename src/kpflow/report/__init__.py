"""Figures (PNG + SVG) and a self-contained HTML report of a run or a sweep."""

from __future__ import annotations

from pathlib import Path

from .figures import run_figures, series
from .html import environment, reading, write_report


def report_run(run_dir: str | Path) -> Path:
    """Figures in ``<run>/figures`` and ``<run>/report.html`` from ``<run>/metrics.csv`` (run ``analyze`` first)."""
    from kpflow.tracking.analyze import read_metrics_csv, training_losses

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist; measure the run first with `kpflow analyze {run_dir}`")
    rows = read_metrics_csv(metrics)
    losses = training_losses(run_dir)
    figures = run_figures(rows, losses, run_dir / "figures")
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    name = rows[0]["run"] if rows else run_dir.name
    return write_report(run_dir / "report.html", title=f"kpflow run: {name}", rows=rows, figures=figures,
                        config_text=config_text, train_losses=losses)


__all__ = ["environment", "reading", "report_run", "run_figures", "series", "write_report"]
