"""The ``run``, ``sweep``, ``analyze`` and ``report`` commands (registered on the typer app by kpflow.cli).

Heavy imports happen inside the commands so ``kpflow --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

RUN_HELP = """Train a built-in study or a config file, measure K, P P* and the NTK at every checkpoint,
and write runs/<name>/ with checkpoints, metrics.csv, figures and report.html.

TARGET is a study name (default: flipflop; see the list below) or a .yaml/.toml config file.
Re-running the same command resumes from the last complete checkpoint.

Examples:

  kpflow run                                   # default: GRU (64 units) on 3-bit flip-flop, < 5 min on 2 cores

  kpflow run --steps 60 --checkpoint-every 20 --out /tmp/runs    # smoke test in under a minute

  kpflow run my_study.yaml --name try2 --g 2.0

  kpflow run flipflop --print-defaults --format toml > my_study.toml
"""


def _fail(err: Exception):
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _config(target: str | None, overrides: dict):
    from kpflow.training.config import ConfigError, load_config, validate_config

    from .registry import get_study, study_names

    target = target or "flipflop"
    study = None
    try:
        if target.endswith((".yaml", ".yml", ".toml", ".json")) or Path(target).is_file():
            cfg = load_config(target, **overrides)
        else:
            if target not in study_names():
                raise ValueError(f"unknown study {target!r}; valid studies: {', '.join(study_names())} "
                                 "(or pass a .yaml/.toml config file)")
            study = target
            cfg = validate_config(get_study(target).default_config(), **overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(err)
    return cfg, study


def _overrides(steps, checkpoint_every, batch_size, out, name, seed, g, lr, eval_batch, probes, device):
    return {"train.steps": steps, "train.checkpoint_every": checkpoint_every, "train.batch_size": batch_size,
            "out": out, "name": name, "seed": seed, "model.g": g, "optimizer.lr": lr,
            "track.eval_batch": eval_batch, "track.probes": probes, "device": device}


def _threads(n: int):
    if n > 0:
        import torch

        torch.set_num_threads(n)


# shared options -------------------------------------------------------------------------------------
STEPS = typer.Option(None, "--steps", help="Optimizer steps (shorten for a smoke test, e.g. 60).")
EVERY = typer.Option(None, "--checkpoint-every", help="Checkpoint (and measure) every k steps, e.g. 20.")
BATCH = typer.Option(None, "--batch-size", help="Training batch size.")
OUT = typer.Option(None, "--out", help="Parent folder of the run folder (default: runs).")
NAME = typer.Option(None, "--name", help="Run folder name (default: the study's name).")
SEED = typer.Option(None, "--seed", help="Seed of the weights and of every training batch.")
G = typer.Option(None, "--g", help="Initial recurrent weight scale g.")
LR = typer.Option(None, "--lr", help="Learning rate.")
EVAL = typer.Option(None, "--eval-batch", help="Trials in the fixed evaluation batch (smaller = faster analysis).")
PROBES = typer.Option(None, "--probes", help="Random probes per randomized estimate (smaller = faster, noisier).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps.")
THREADS = typer.Option(1, "--threads", help="torch CPU threads (0: torch's default). The default models are small: "
                       "one thread avoids oversubscription on shared machines.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
SCHEDULER = typer.Option(None, "--scheduler", help="Where the runs go: local (worker processes here; the default "
                         "with more than one core), tcp://host:port (an existing Dask cluster), slurm (from "
                         "--cluster-config) or serial (one after another in this process).")
WORKERS = typer.Option(None, "--workers", help="Worker processes (local: default one per core; slurm: total; "
                       "tcp://: wait for this many).")
CLUSTER = typer.Option(None, "--cluster-config", help="YAML/TOML file with a 'slurm' section (queue, cores, memory, "
                       "walltime, ...) for --scheduler slurm; see docs/scale_out.md.")


def run_command(
    target: str = typer.Argument(None, metavar="[STUDY_OR_CONFIG]", help="Study name or config file."),
    steps: int = STEPS, checkpoint_every: int = EVERY, batch_size: int = BATCH, out: str = OUT,
    name: str = NAME, seed: int = SEED, g: float = G, lr: float = LR, eval_batch: int = EVAL,
    probes: int = PROBES, device: str = DEVICE, threads: int = THREADS,
    print_defaults: bool = typer.Option(False, "--print-defaults",
                                        help="Print the full config (defaults + overrides) and exit."),
    fmt: str = typer.Option("yaml", "--format", help="Format of --print-defaults: yaml, toml or json."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete an existing run folder of this name first."),
    no_analyze: bool = typer.Option(False, "--no-analyze", help="Train only (analyze later with `kpflow analyze`)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the report (write it later with `kpflow report`)."),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop after this step's checkpoint, as if interrupted."),
    quiet: bool = QUIET,
):
    cfg, study = _config(target, _overrides(steps, checkpoint_every, batch_size, out, name, seed, g, lr,
                                            eval_batch, probes, device))
    if print_defaults:
        from kpflow.training.config import dump_config

        try:
            typer.echo(dump_config(cfg, fmt), nl=False)
        except ValueError as err:
            _fail(err)
        return
    _threads(threads)
    from .pipeline import resume_hint, run_study

    try:
        run_dir = run_study(cfg, study, progress=not quiet, analyze=not no_analyze, report=not no_report,
                            fresh=fresh, stop_after=stop_after)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo(f"\n{resume_hint(cfg)}", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"run folder: {run_dir}")
    if (run_dir / "report.html").is_file():
        typer.echo(f"report: {run_dir / 'report.html'}")


def sweep_command(
    target: str = typer.Argument(None, metavar="[STUDY_OR_CONFIG]", help="Study name or config file."),
    gs: str = typer.Option("0.5,1,2", "--gs", help="Comma-separated initial recurrent weight scales g."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    steps: int = STEPS, checkpoint_every: int = EVERY, batch_size: int = BATCH, out: str = OUT,
    name: str = NAME, lr: float = LR, eval_batch: int = EVAL, probes: int = PROBES, device: str = DEVICE,
    threads: int = THREADS, fresh: bool = typer.Option(False, "--fresh", help="Re-run existing runs from scratch."),
    scheduler: str = SCHEDULER, workers: int = WORKERS, cluster_config: Path = CLUSTER, quiet: bool = QUIET,
):
    """Sweep the initial recurrent weight scale g (and seeds): one run per (g, seed), each a task on Dask
    workers, then sweep.csv, figures of effective rank against g (mean over seeds, 95% confidence bands) and
    report.html in <out>/<name>_sweep. Re-running skips finished runs (a killed sweep resumes).

    Examples:

      kpflow sweep flipflop --gs 0.5,1,2,4 --seeds 0,1 --steps 300            # local worker processes

      kpflow sweep flipflop --gs 0.5,1,2 --seeds 0,1,2 --scheduler tcp://10.0.0.5:8786

      kpflow sweep flipflop --scheduler slurm --cluster-config cluster.yaml --workers 16
    """
    try:
        g_list = [float(x) for x in gs.split(",") if x.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        _fail(ValueError(f"--gs and --seeds take comma-separated numbers, got --gs {gs!r} --seeds {seeds!r}"))
    if not g_list or not seed_list or any(g < 0 for g in g_list):
        _fail(ValueError(f"--gs needs non-negative values and --seeds at least one seed; got {gs!r}, {seeds!r}"))
    cfg, study = _config(target, _overrides(steps, checkpoint_every, batch_size, out, name, None, None, lr,
                                            eval_batch, probes, device))
    _threads(threads)
    from .distributed import check_scheduler, check_workers
    from .pipeline import run_sweep

    try:
        if scheduler is not None:
            check_scheduler(scheduler)
        check_workers(workers)
        path = run_sweep(cfg, g_list, seed_list, study=study, progress=not quiet, fresh=fresh, scheduler=scheduler,
                         workers=workers, cluster_config=cluster_config, threads=threads)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: run the same sweep command again to resume (finished runs are skipped, the "
                   "others resume from their last complete checkpoint)", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"sweep report: {path}")


def analyze_command(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>)."),
    every: int = typer.Option(None, "--every", help="Measure every n-th checkpoint (first and last always)."),
    force: bool = typer.Option(False, "--force", help="Ignore cached per-checkpoint results."),
    threads: int = THREADS, quiet: bool = QUIET,
    scheduler: str = typer.Option("serial", "--scheduler", help="serial (default), or fan the checkpoints out "
                                  "as tasks: local, tcp://host:port or slurm (as for kpflow sweep)."),
    workers: int = WORKERS, cluster_config: Path = CLUSTER,
):
    """Measure every checkpoint of RUN on its fixed evaluation batch and write RUN/metrics.csv.

    Examples:

      kpflow analyze runs/flipflop --every 2

      kpflow analyze runs/flipflop --scheduler local --workers 2     # one checkpoint per worker at a time
    """
    _threads(threads)
    from kpflow.tracking.analyze import analyze_run

    from .distributed import analyze_checkpoints, check_scheduler, check_workers

    if _is_bifurcation_run(run):
        typer.echo(f"report: {_rerun_bifurcation_study(run, progress=not quiet) / 'report.html'}")
        return
    try:
        if check_scheduler(scheduler) == "serial":
            path = analyze_run(run, every=every, force=force, progress=not quiet)
        else:
            path = analyze_checkpoints(run, every=every, force=force, scheduler=scheduler,
                                       workers=check_workers(workers), cluster_config=cluster_config,
                                       threads=threads, progress=not quiet)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"metrics: {path}")


def report_command(run: Path = typer.Argument(..., help="Run folder (runs/<name>) with metrics.csv."),
                   quiet: bool = QUIET):
    """Write RUN/figures/*.png|svg and the self-contained RUN/report.html from RUN/metrics.csv.

    Example:

      kpflow report runs/flipflop
    """
    from kpflow.report import report_run

    if _is_bifurcation_run(run):
        typer.echo(f"report: {_rerun_bifurcation_study(run, progress=False) / 'report.html'}")
        return
    try:
        path = report_run(run, progress=not quiet)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"report: {path}")


def _is_bifurcation_run(run: Path) -> bool:
    """A ``kpflow run bifurcation`` folder (its own measurements and report, marked by bifurcation.json)."""
    return (Path(run) / "bifurcation.json").exists() and (Path(run) / "config.yaml").exists()


def _rerun_bifurcation_study(run: Path, progress: bool) -> Path:
    """Re-measure (cached per checkpoint) and re-report a bifurcation run in place; training is complete."""
    import yaml

    from kpflow.experiments.bifurcation import run_bifurcation_study
    from kpflow.training import validate_config

    try:
        cfg = validate_config(yaml.safe_load((Path(run) / "config.yaml").read_text()))
        return run_bifurcation_study(cfg, out_dir=Path(run), progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)


class _RunCommand(TyperCommand):
    """``kpflow run``: its help lists the built-in studies, found (by importing their modules) only when the
    help is shown, so ``kpflow --help`` stays fast."""

    def format_help(self, ctx, formatter):
        from .registry import get_study, study_names

        studies = "\n\n".join(f"  {n}: {get_study(n).description}" for n in study_names())
        self.help = RUN_HELP + "\nBuilt-in studies:\n\n" + studies
        return super().format_help(ctx, formatter)


def register_commands(app: typer.Typer) -> None:
    """Add run / sweep / analyze / report to the kpflow app."""
    app.command("run", cls=_RunCommand, help=RUN_HELP,
                short_help="Train a study or config file, measure every checkpoint, write the report.")(run_command)
    app.command("sweep")(sweep_command)
    app.command("analyze")(analyze_command)
    app.command("report")(report_command)
    from .claims.command import reproduce_command  # torch-free until the command runs

    app.command("reproduce", short_help="Every paper claim as a seeded study with a verdict; claims report.")(
        reproduce_command)
    from .lm_command import lm_app  # torch-free until a command runs

    app.add_typer(lm_app, name="lm", short_help="Hugging Face language models: NTK statistics (kpflow lm stats).")
