"""Figures (PNG + SVG) and a self-contained HTML report of a run or a sweep."""

from __future__ import annotations

from pathlib import Path

from .figures import Dimensions, run_figures, series
from .html import environment, reading, write_report


def run_dimensions(run_dir: str | Path) -> Dimensions | None:
    """The sizes the effective ranks are judged against, from the run's config: the evaluation batch's
    trials B, positions T (time steps; tokens of a transformer; depth of an MLP) and state size H (the state
    space has N = B·T·H dimensions, a bound on the rank of P P* and of the NTK) and the number of trained
    cell parameters (K = Jθ Jθ* has rank at most min(N, #params)). None when the config cannot be read."""
    from kpflow.tracking.analyze import build_from_config, run_config

    try:
        cfg = run_config(run_dir)
        task, model = build_from_config(cfg)
    except (OSError, ValueError):
        return None
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed)
    cell = model.cell_params()
    names = cfg.track.param_names or list(cell)
    n_params = sum(cell[n].numel() for n in names if n in cell)
    positions = getattr(model, "positions", None)  # site models: the operators' position space
    B, T = positions(batch.inputs) if positions is not None else batch.inputs.shape[:2]
    B, T = int(B), int(T)
    return Dimensions(trials=B, steps=T, state=int(model.state_dim), params=int(n_params))


def report_run(run_dir: str | Path, *, progress: bool = False) -> Path:
    """Figures in ``<run>/figures`` and ``<run>/report.html`` from ``<run>/metrics.csv``.

    Raises:
        FileNotFoundError: the run folder does not exist, holds no checkpoint (train it with ``kpflow run``)
            or has not been measured (``kpflow analyze``); the message says which command to run.
    """
    from kpflow.tracking.analyze import read_metrics_csv, training_losses
    from kpflow.training.checkpoints import list_checkpoints

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"the run folder {run_dir} does not exist; train a run first, e.g. `kpflow run "
                                f"--out {run_dir.parent} --name {run_dir.name}`, or pass an existing run folder")
    if not metrics.is_file():
        if not list_checkpoints(run_dir / "checkpoints"):
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to measure; train it first with `kpflow run` "
                                    "(see `kpflow run --help`), which also writes the report")
        raise FileNotFoundError(f"{metrics} does not exist; measure the run first with `kpflow analyze {run_dir}`")
    rows = read_metrics_csv(metrics)
    losses = training_losses(run_dir)
    dims = run_dimensions(run_dir)
    figures = run_figures(rows, losses, run_dir / "figures", dims=dims, progress=progress)
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    name = rows[0]["run"] if rows else run_dir.name
    return write_report(run_dir / "report.html", title=f"kpflow run: {name}", rows=rows, figures=figures,
                        config_text=config_text, train_losses=losses, dims=dims)


__all__ = ["Dimensions", "environment", "reading", "report_run", "run_dimensions", "run_figures", "series",
           "write_report"]
