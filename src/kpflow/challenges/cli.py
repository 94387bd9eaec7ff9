"""``kpflow challenge ...``: list, make, run, score, leaderboard, bundle."""

from __future__ import annotations

import json
from pathlib import Path

import typer

challenge_app = typer.Typer(
    name="challenge",
    help=(
        "FAIR anomaly-detection challenges (gw, butterfly, sealevel), offline.\n\n"
        "Examples:\n\n"
        "  kpflow challenge list\n\n"
        "  kpflow challenge make gw --out challenges/gw\n\n"
        "  kpflow challenge run gw challenges/gw/starting_kit --phase val\n\n"
        "  kpflow challenge leaderboard gw\n\n"
        "  kpflow challenge bundle gw --out bundles/gw"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _default_dir(name: str, folder: Path | None) -> Path:
    return Path(folder) if folder is not None else Path("challenges") / name


def _fail(message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _spec(name: str):
    """The challenge's spec, or exit listing the valid names (before any folder is looked at)."""
    from kpflow.challenges import get_challenge

    try:
        return get_challenge(name)
    except KeyError as err:
        _fail(str(err).strip("'\""))


@challenge_app.command("list")
def list_command():
    """Name, title and primary metric of each challenge."""
    from kpflow.challenges import CHALLENGES

    for spec in CHALLENGES.values():
        typer.echo(f"{spec.name:10s} {spec.title}  [primary metric: {spec.primary}]")


@challenge_app.command("make")
def make_command(
    name: str = typer.Argument(..., help="Challenge name (see `kpflow challenge list`)."),
    out: Path = typer.Option(None, "--out", help="Folder to create (default: challenges/NAME)."),
    seed: int = typer.Option(0, help="Random seed; the same seed and scale give the same checksums."),
    scale: float = typer.Option(1.0, help="Multiply the default dataset sizes by this factor."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
):
    """Generate a challenge folder: data, dataset card, Croissant metadata, checksums, starting kit."""
    from kpflow.challenges import make_challenge

    _spec(name)
    folder = _default_dir(name, out)
    try:
        manifest = make_challenge(name, folder, seed=seed, scale=scale, overwrite=overwrite)
    except FileExistsError:
        _fail(f"{folder} exists and is not empty; pass --overwrite to replace it")
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"made {name} in {folder} ({manifest['seconds']} s, {len(manifest['checksums'])} files, "
               f"Croissant: {manifest['croissant']})")
    for split, info in manifest["splits"].items():
        typer.echo(f"  {split}: {info}")


@challenge_app.command("run")
def run_command(
    name: str = typer.Argument(..., help="Challenge name."),
    submission: Path = typer.Argument(..., help="Submission folder or zip holding model.py."),
    folder: Path = typer.Option(None, "--dir", help="Challenge folder (default: challenges/NAME)."),
    phase: str = typer.Option("val", help="val (Development) or test (Final)."),
    label: str = typer.Option(None, "--name", help="Leaderboard name of the submission."),
    timeout: float = typer.Option(600.0, help="Wall-clock limit of the submission, seconds."),
    memory_gb: float = typer.Option(8.0, help="Memory limit of the submission, GiB."),
    trusted: bool = typer.Option(False, "--trusted", help=(
        "Only where no isolation (bubblewrap) is available: run the code WITHOUT isolation instead of "
        "refusing. Say this only for code you trust.")),
):
    """Run a code submission in an isolated sandbox on the hidden inputs, score it, add it to the leaderboard.

    The submission runs in Linux namespaces (bubblewrap) that show only its code, the phase's inputs
    and the Python environment; scores are computed afterwards by a separate trusted scoring program.
    """
    from kpflow.challenges.isolation import IsolationUnavailable, clean_text
    from kpflow.challenges.runner import run_submission

    spec = _spec(name)
    folder = _default_dir(name, folder)
    try:
        entry = run_submission(folder, submission, phase=phase, name=label, timeout_s=timeout,
                               memory_gb=memory_gb, trusted=trusted)
    except (FileNotFoundError, ValueError, IsolationUnavailable) as err:
        _fail(str(err))
    if entry["isolation"].startswith("NONE"):
        typer.echo(f"WARNING: {entry['isolation']}", err=True)
    if entry["status"] != "ok":
        typer.echo(f"FAILED: {clean_text(entry['error'], 1000, keep='head')}")
        raise typer.Exit(1)
    for key in spec.score_keys:  # printed from the scores, so a submission's output cannot add rows
        typer.echo(f"{key}={float(entry['scores'][key]):.6f}")


@challenge_app.command("score")
def score_command(
    name: str = typer.Argument(..., help="Challenge name."),
    predictions: Path = typer.Argument(..., help=("A predictions file (predictions.csv; butterfly predictions.txt; "
                                                  "gw test.predictions) or the folder holding it.")),
    folder: Path = typer.Option(None, "--dir", help="Challenge folder (default: challenges/NAME)."),
    phase: str = typer.Option("val", help="val or test."),
):
    """Score a predictions file against the reference labels and print scores.json."""
    from kpflow.challenges.runner import score_predictions
    from kpflow.challenges.scoring import ScoringError

    _spec(name)
    try:
        scores = score_predictions(_default_dir(name, folder), predictions, phase=phase)
    except (ScoringError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(json.dumps(scores, indent=2))


@challenge_app.command("leaderboard")
def leaderboard_command(
    name: str = typer.Argument(..., help="Challenge name."),
    folder: Path = typer.Option(None, "--dir", help="Challenge folder (default: challenges/NAME)."),
    phase: str = typer.Option(None, help="Only this phase (val or test)."),
):
    """Print the local leaderboard: successful entries ranked by the primary metric, failed ones last."""
    from kpflow.challenges.runner import format_leaderboard, ranked, read_leaderboard

    spec = _spec(name)
    entries = ranked(read_leaderboard(_default_dir(name, folder)), spec.primary, phase)
    typer.echo(format_leaderboard(entries, spec.score_keys[:4]) if entries else "no entries yet")


@challenge_app.command("bundle")
def bundle_command(
    name: str = typer.Argument(..., help="Challenge name."),
    folder: Path = typer.Option(None, "--dir", help="Challenge folder (default: challenges/NAME)."),
    out: Path = typer.Option(None, "--out", help="Bundle folder (default: bundles/NAME); a .zip is written beside."),
):
    """Export a Codabench-compatible bundle and check its structure."""
    from kpflow.challenges.bundle import check_bundle, export_bundle

    _spec(name)
    folder = _default_dir(name, folder)
    target = Path(out) if out is not None else Path("bundles") / name
    try:
        path = export_bundle(folder, target)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    problems = check_bundle(path)
    if problems:
        typer.echo("bundle check FAILED:\n  " + "\n  ".join(problems))
        raise typer.Exit(1)
    typer.echo(f"bundle written to {path} and {path}.zip; structural check passed")
