"""``kpflow reproduce``: run every claim study (or some), write the claims report, print one line per claim."""

from __future__ import annotations

from pathlib import Path

import typer


def reproduce_command(
    quick: bool = typer.Option(False, "--quick", help="Reduced size of every study (all 12 in < 15 min on 2 cores)."),
    only: str = typer.Option(None, "--only", help="Comma-separated claim ids (default: all; see --list)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per claim (default: each claim's own, ≥ 5 where it fits)."),
    out: Path = typer.Option(Path("runs/claims"), "--out", help="Folder of the task results and the report."),
    jobs: int = typer.Option(None, "--jobs", help="Short for --scheduler local --workers N (1: serial)."),
    scheduler: str = typer.Option(None, "--scheduler", help="Where the tasks run: local (worker processes here, "
                                  "one torch thread each; the default with more than one core), tcp://host:port "
                                  "(an existing Dask cluster), slurm (from --cluster-config) or serial."),
    workers: int = typer.Option(None, "--workers", help="Worker processes (local: default one per core)."),
    cluster_config: Path = typer.Option(None, "--cluster-config", help="File with a 'slurm' section for "
                                        "--scheduler slurm (docs/scale_out.md)."),
    list_claims: bool = typer.Option(False, "--list", help="List the claim ids and exit."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Every paper claim as a pre-registered, seeded study with a verdict (agree | disagree | inconclusive).

    Each (claim, seed) is an independent task written to OUT/tasks/<claim>/<size>/seed_<k>.json; a re-run
    resumes. Writes OUT/claims.json and OUT/report.html and prints
    `claim=<id> verdict=<...> effect=<value> se=<value>` per claim.

    Examples:

      kpflow reproduce --quick

      kpflow reproduce --only kp_gradient_flow,kronecker_core --seeds 3 --out /tmp/claims
    """
    from .registry import claim_ids, get_claim
    from .runner import claim_line, reproduce

    if list_claims:
        for cid in claim_ids():
            c = get_claim(cid)
            typer.echo(f"{c.number:>2}. {cid}: {c.criterion}")
        return
    ids = None
    if only:
        ids = [x.strip() for x in only.split(",") if x.strip()]
        bad = [x for x in ids if x not in claim_ids()]
        if bad or not ids:
            typer.echo(f"error: unknown claim id(s) {bad or only!r}; valid ids: {', '.join(claim_ids())}", err=True)
            raise typer.Exit(2)
    if seeds is not None and seeds < 1:
        typer.echo(f"error: --seeds must be at least 1, got {seeds}", err=True)
        raise typer.Exit(2)
    if jobs is not None and jobs < 1:
        typer.echo(f"error: --jobs must be at least 1, got {jobs}", err=True)
        raise typer.Exit(2)
    from kpflow.experiments.distributed import SchedulerError, check_scheduler, check_workers

    try:
        if scheduler is not None:
            check_scheduler(scheduler)
        check_workers(workers)
    except SchedulerError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    import torch

    torch.set_num_threads(1)
    try:
        results = reproduce(ids, seeds, quick=quick, out=out, jobs=jobs, scheduler=scheduler, workers=workers,
                            cluster_config=cluster_config, progress=not quiet, report=not no_report)
    except SchedulerError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for cid, r in results.items():
        typer.echo(claim_line(cid, r["verdict"]))
        for err in r["errors"]:
            typer.echo(f"  {cid}: a task failed: {err.strip().splitlines()[-1]}", err=True)
    if not no_report:
        typer.echo(f"report: {out / 'report.html'}")
