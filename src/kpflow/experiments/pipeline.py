"""The standard study pipeline (train → analyze → report) and sweeps over g and seeds.

A run folder ``<out>/<name>`` holds one run: its ``config.yaml``, checkpoints, metrics and report. Re-running
the same command resumes from the last complete checkpoint; asking for more ``train.steps`` (every other key
unchanged) extends a finished run; any other difference is refused with the differing keys named. While a
run trains, it holds the folder's lock (``.lock``, an ``flock`` released by the kernel when the process ends,
so a lock left by a killed run is taken over safely); a second run into the same folder is refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kpflow.files import write_csv
from kpflow.training.checkpoints import atomic_write_text, list_checkpoints
from kpflow.training.config import RunConfig, config_differences, dump_config, load_config, validate_config

#: the lock file in every run folder (kept between runs; its content names the last holder)
LOCK_NAME = ".lock"
#: keys that may differ between a run folder's config.yaml and a new call: what is measured, where it runs,
#: and the folder's own location
MAY_CHANGE = ("track", "device", "out", "name")


class RunFolderError(RuntimeError):
    """A run folder cannot be used: it is not a folder, not writable, or in use by another run."""


def make_run_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` (and its parents); a path that is a file, or a parent that is not writable, is
    reported as a ``RunFolderError`` naming the path and what to do instead of a raw ``OSError``."""
    run_dir = Path(run_dir)
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"cannot create the run folder {run_dir}: {parent} is a file, not a folder; "
                                 "choose another --out (the parent folder of runs) or --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {_reason(err)}; choose another --out "
                             "(a writable folder)") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunFolderError(f"the run folder {run_dir} is not writable; choose another --out or fix its "
                             "permissions")
    return run_dir


def _reason(err: OSError) -> str:
    text = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on device", errno.ENOTDIR: "a part of the path is a file"}
    return text.get(err.errno, err.strerror or str(err))


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of a run folder (created if needed) for the ``with`` block.

    The lock is an ``flock`` on ``<run_dir>/.lock``: the kernel releases it when the holder exits, however
    it exits, so a lock file left by a killed run is taken over at once; a folder locked by a live process
    raises ``RunFolderError`` naming that process. (On platforms without ``fcntl`` no lock is taken.)

    Raises:
        RunFolderError: the folder is in use by another run, or cannot be created or written.
    """
    run_dir = make_run_dir(run_dir)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield run_dir
        return
    try:
        handle = open(run_dir / LOCK_NAME, "a+")
    except OSError as err:
        raise RunFolderError(f"cannot write the lock file of {run_dir}: {_reason(err)}; choose another --out") \
            from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunFolderError(f"{run_dir} is in use by another run ({owner}); wait for it to finish, or "
                                 "choose another --name / --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"kpflow pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield run_dir
        finally:
            handle.seek(0)
            handle.truncate()  # the lock is released when the file is closed


def _show(value) -> str:
    return "(unset)" if value is None else repr(value)


def prepare_run_dir(cfg: RunConfig, fresh: bool = False) -> Path:
    """Create ``<out>/<name>`` and write its config.yaml.

    An existing run is continued when its config differs only in what may change between calls (the
    tracking settings, the device, the folder's location) and in ``train.steps`` not below the last
    complete checkpoint (more steps extend a finished run). Anything else is refused with the differing
    keys named (``key: old → new``), so checkpoints of two configurations are never mixed. ``fresh``
    deletes the folder's content first (its lock file excepted).

    Raises:
        ValueError: the folder holds a run with another configuration, or more steps than asked for.
        RunFolderError: the folder cannot be created or written.
    """
    run_dir = make_run_dir(cfg.run_dir)
    if fresh:
        for child in run_dir.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path = run_dir / "config.yaml"
    if path.is_file():
        old = load_config(path)
        diffs = config_differences(old, cfg, exclude=MAY_CHANGE)
        steps = diffs.pop("train.steps", None)
        if diffs:
            listed = "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, (a, b) in diffs.items())
            raise ValueError(f"{run_dir} already holds a run with a different configuration ({listed}). Only "
                             "train.steps may change (more --steps extend the run); choose another --name / "
                             "--out, or pass --fresh to delete it")
        done = last_complete_step(run_dir)
        if steps is not None and done is not None and steps[1] < done:
            raise ValueError(f"{run_dir} has already trained to step {done}; train.steps {steps[0]} → {steps[1]} "
                             f"would shorten it. Ask for --steps {done} or more to extend it, choose another "
                             "--name / --out, or pass --fresh to start again")
    try:
        atomic_write_text(path, dump_config(cfg, "yaml"))
    except OSError as err:
        raise RunFolderError(f"cannot write {path}: {_reason(err)}; choose another --out") from None
    return run_dir


def resume_hint(cfg: RunConfig) -> str:
    """What to tell a user who interrupted ``cfg``'s run: where it stands and how to resume it."""
    done = last_complete_step(cfg.run_dir) if cfg.run_dir.is_dir() else None
    if done is None:
        return (f"interrupted before the first checkpoint of {cfg.run_dir}; the same command starts the run "
                "again from the beginning")
    return (f"interrupted: the last complete checkpoint of {cfg.run_dir} is step {done} of {cfg.train.steps}; "
            "run the same command again to resume from it")


def run_pipeline(cfg: RunConfig, *, progress: bool = True, analyze: bool = True, report: bool = True,
                 fresh: bool = False, stop_after: int | None = None) -> Path:
    """Train with checkpoints (resuming or extending the run if it exists), measure every checkpoint, write
    the report; the run folder's lock is held throughout (see ``run_lock``)."""
    import torch

    from kpflow.tracking.analyze import build_from_config
    from kpflow.training.trainer import train

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={cfg.device!r} but CUDA is not available here; use --device cpu")
    try:  # build first: bad task/model parameters must not leave a half-made run folder behind
        task, model = build_from_config(cfg)
    except ValueError as err:
        raise ValueError(f"invalid task.params / model settings in the config: {err}") from None
    with run_lock(cfg.run_dir):
        run_dir = prepare_run_dir(cfg, fresh)
        result = train(model, task, cfg, out_dir=run_dir, progress=progress, stop_after=stop_after)
        if stop_after is not None and result.final_step < cfg.train.steps and not result.stopped_early:
            return run_dir
        if analyze:
            from kpflow.tracking.analyze import analyze_run

            analyze_run(run_dir, progress=progress)
            if report:
                from kpflow.report import report_run

                report_run(run_dir, progress=progress)
    return run_dir


def run_study(cfg: RunConfig, study: str | None = None, **options) -> Path:
    """Run ``cfg`` with the runner of ``study`` (its own runner if it registered one, else the pipeline)."""
    if study is not None:
        from .registry import get_study

        s = get_study(study)
        if s.run is not None:
            return s.run(cfg, **options)
    return run_pipeline(cfg, **options)


# ------------------------------------------------------------------------------------------------ sweeps
def sweep_configs(base: RunConfig, gs, seeds) -> list[RunConfig]:
    """One config per (g, seed), named ``g<g>_s<seed>`` inside ``<out>/<name>_sweep`` (an absolute path, so
    workers on other machines or in other folders write to the same place)."""
    out = str((Path(base.out) / f"{base.name}_sweep").resolve())
    cfgs = []
    for g in gs:
        for s in seeds:
            d = base.model_dump(mode="json")
            d.update(name=f"g{g:g}_s{s}", seed=int(s), out=out)
            d["model"]["g"] = float(g)
            cfgs.append(validate_config(d))
    return cfgs


def study_task(cfg: RunConfig, study: str | None = None, *, fresh: bool = False):
    """The run of ``cfg`` (with ``study``'s runner) as a ``RunTask`` for ``experiments.distributed.run_tasks``;
    its fingerprint is the config without the device (a run may resume on another device)."""
    from .distributed import RunTask, config_fingerprint

    return RunTask(key=cfg.name, run_dir=cfg.run_dir,
                   fingerprint=config_fingerprint(cfg.model_dump(mode="json", exclude={"device"}), study),
                   fn=_run_study_task, args=(cfg.model_dump(mode="json"), study, fresh))


def _run_study_task(cfg_data: dict, study: str | None, fresh: bool) -> str:
    """Worker side of ``study_task``: train, analyze and report one run; returns its folder."""
    return str(run_study(validate_config(cfg_data), study, progress=False, analyze=True, report=True, fresh=fresh))


def run_sweep(base: RunConfig, gs, seeds, *, study: str | None = None, progress: bool = True,
              fresh: bool = False, scheduler: str | None = None, workers: int | None = None,
              cluster_config: str | Path | None = None, threads: int = 1) -> Path:
    """Run every (g, seed) as one task (``experiments.distributed.run_tasks``: serially, on local worker
    processes, an existing Dask cluster or SLURM; finished runs are skipped) and write ``sweep.csv``
    (metrics with g and seed columns), figures and ``report.html`` in ``<out>/<name>_sweep``."""
    import torch

    from .distributed import run_tasks

    cfgs = sweep_configs(base, gs, seeds)
    sweep_dir = Path(cfgs[0].out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep_config.yaml", dump_config(base, "yaml"))
    gpus = torch.cuda.device_count() if base.device == "cuda" else 0
    run_tasks([study_task(c, study, fresh=fresh) for c in cfgs], scheduler=scheduler, workers=workers,
              cluster_config=cluster_config, gpus=gpus, threads=threads, fresh=fresh, progress=progress,
              desc="sweep")
    return write_sweep_report(sweep_dir, cfgs, base)


class SeedBand(NamedTuple):
    """Mean over seeds, its standard error s/√n, the half-width of its confidence interval and n."""

    mean: float
    stderr: float
    half_width: float
    n: int


def seed_band(values, level: float = 0.95) -> SeedBand:
    """Mean over seeds with the Student-t confidence interval at ``level``: half-width
    ``t_{(1+level)/2, n-1} · s/√n`` (0 with one seed, where no spread is known; nan with none)."""
    from scipy.stats import t as student_t

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return SeedBand(float("nan"), float("nan"), float("nan"), 0)
    if v.size == 1:
        return SeedBand(float(v[0]), 0.0, 0.0, 1)
    se = float(v.std(ddof=1) / np.sqrt(v.size))
    return SeedBand(float(v.mean()), se, float(student_t.ppf((1 + level) / 2, v.size - 1) * se), int(v.size))


def _band(ax, x, mean, half, label, color=None, ls="-"):
    mean, half = np.asarray(mean, dtype=float), np.asarray(half, dtype=float)
    line, = ax.plot(x, mean, ls=ls, marker="o", ms=3, lw=1.4, color=color, label=label)
    lo, hi = mean - np.nan_to_num(half), mean + np.nan_to_num(half)
    positive = mean[np.isfinite(mean) & (mean > 0)]
    floor = positive.min() / 10 if positive.size else 1e-12
    ax.fill_between(x, np.maximum(lo, floor), hi, color=line.get_color(), alpha=0.2, lw=0)


def write_sweep_report(sweep_dir: Path, cfgs: list[RunConfig], base: RunConfig) -> Path:
    from kpflow.report import write_report
    from kpflow.report.figures import pyplot, save_figure
    from kpflow.tracking.analyze import read_metrics_csv

    rows = []
    for cfg in cfgs:
        for r in read_metrics_csv(cfg.run_dir / "metrics.csv"):
            rows.append({**r, "g": cfg.model.g, "seed": cfg.seed})
    write_csv(sweep_dir / "sweep.csv", rows, ["g", "seed", "run", "step", "metric", "value", "stderr", "method"])

    gs = sorted({c.model.g for c in cfgs})
    n_seeds = len({c.seed for c in cfgs})
    band_note = (f"mean over {n_seeds} seeds, band: 95% Student-t confidence interval of the mean" if n_seeds > 1
                 else "one seed: no confidence band (pass several --seeds)")

    def per_run(c, key):
        return sorted((r for r in rows if r["run"] == c.name and r["metric"] == key), key=lambda r: r["step"])

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    summary_rows = []
    notes = []
    for ax, (key, label) in zip(axes, (("K_erank", "K"), ("PPstar_erank", "P P*"), ("NTK_erank", "NTK")),
                                strict=True):
        for when, ls in (("initial", "--"), ("final", "-")):
            bands = []
            for g in gs:
                vals = [rs[0 if when == "initial" else -1]["value"] for c in cfgs if c.model.g == g
                        for rs in [per_run(c, key)] if rs]
                bands.append(seed_band(vals))
                summary_rows.append({"run": when, "step": 0, "column": f"g = {g:g}", "g": g,
                                     "metric": f"{key}_{when} (mean over seeds)",
                                     "value": bands[-1].mean, "stderr": bands[-1].stderr,
                                     "method": f"mean over {bands[-1].n} seed(s) ± s/√n; {when}: "
                                               f"{'first' if when == 'initial' else 'last'} checkpoint"})
            _band(ax, np.array(gs), [b.mean for b in bands], [b.half_width for b in bands], when, ls=ls)
        ax.set(xlabel="initial recurrent weight scale g", ylabel="effective rank tr(A)²/‖A‖_F²", yscale="log",
               title=f"effective rank of {label}")
        ax.legend(fontsize=8, title=band_note if key == "K_erank" else None, title_fontsize=7)
    figs = [save_figure(fig, sweep_dir / "figures", "sweep_effective_ranks")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, key in zip(axes, ("PPstar_erank", "K_erank"), strict=True):
        for i, g in enumerate(gs):
            by_step: dict[int, list[float]] = {}
            for c in cfgs:
                if c.model.g == g:
                    for r in per_run(c, key):
                        by_step.setdefault(r["step"], []).append(r["value"])
            steps = sorted(by_step)
            bands = [seed_band(by_step[st]) for st in steps]
            _band(ax, np.array(steps), [b.mean for b in bands], [b.half_width for b in bands], f"g={g:g}",
                  color=cmap(i / max(1, len(gs) - 1)))
        ax.set(yscale="log", xlabel="GD step", ylabel=f"effective rank of {key.removesuffix('_erank')}", title=key)
        ax.legend(fontsize=7)
    figs.append(save_figure(fig, sweep_dir / "figures", "sweep_trajectories"))
    notes.append(f"Each point is the {band_note}.")
    for g in gs:
        p0 = _summary(summary_rows, "PPstar_erank_initial", g)
        p1 = _summary(summary_rows, "PPstar_erank_final", g)
        k0 = _summary(summary_rows, "K_erank_initial", g)
        k1 = _summary(summary_rows, "K_erank_final", g)
        trend = "collapsed" if p1 < 0.5 * p0 else "rose" if p1 > 2 * p0 else "stayed within a factor 2"
        notes.append(f"g = {g:g}: the effective rank of P P* {trend}, {p0:.3g} → {p1:.3g} (ratio {p1 / p0:.3g}); "
                     f"K's went {k0:.3g} → {k1:.3g}.")
    links = "".join(f'<li><a href="{c.name}/report.html">{c.name}</a></li>' for c in cfgs)
    return write_report(sweep_dir / "report.html", title=f"kpflow sweep over g: {base.name}", rows=summary_rows,
                        figures=figs, config_text=sweep_config_text(base, gs, sorted({c.seed for c in cfgs})),
                        notes=notes,
                        extra_html=f"<h2>Runs</h2><ul>{links}</ul>")


def _summary(rows: list[dict], key: str, g: float) -> float:
    return next(r["value"] for r in rows if r["metric"].startswith(f"{key} ") and r["g"] == g)


def sweep_config_text(base: RunConfig, gs, seeds) -> str:
    """The sweep's configuration: every g and seed, then the base config each run starts from (its
    ``model.g`` and ``seed`` replaced by the run's)."""
    import yaml

    head = yaml.safe_dump({"sweep": {"model.g": [float(g) for g in gs], "seed": [int(s) for s in seeds],
                                     "runs": len(gs) * len(seeds)}}, sort_keys=False, default_flow_style=None)
    return (head + "# base configuration of every run; model.g and seed are set from the sweep above\n"
            + dump_config(base, "yaml"))


def last_complete_step(run_dir: Path) -> int | None:
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1].step if found else None
