"""The ``kpflow`` command line. Each command group lives beside the module it drives."""

from __future__ import annotations

import typer

from kpflow import __version__

app = typer.Typer(
    name="kpflow",
    help=(
        "Matrix-free operators of learning for recurrent networks.\n\n"
        "Examples:\n\n"
        "  kpflow run                              # default study: GRU-64 on 3-bit flip-flop, with report\n\n"
        "  kpflow run --steps 40 --checkpoint-every 20 --out /tmp/smoke   # a one-minute smoke test\n\n"
        "  kpflow run bifurcation                  # student-teacher study through a learned bifurcation\n\n"
        "  kpflow run my_config.yaml               # your own study (kpflow run --print-defaults)\n\n"
        "  kpflow sweep flipflop --gs 0.5,1,2,4    # initial weight scale sweep\n\n"
        "  kpflow analyze runs/flipflop            # (re)measure every checkpoint\n\n"
        "  kpflow dynamics continue runs/flipflop --param interp   # fixed points between checkpoints\n\n"
        "  kpflow report runs/flipflop             # write runs/flipflop/report.html\n\n"
        "  kpflow challenge list                   # the anomaly-detection challenges\n\n"
        "  kpflow --version"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"kpflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """kpflow command line."""


from kpflow.challenges.cli import challenge_app  # noqa: E402  (challenge command group)

app.add_typer(challenge_app, name="challenge")


from kpflow.experiments.commands import register_commands  # noqa: E402  (run, sweep, analyze, report)
from kpflow.experiments.continuation import dynamics_app  # noqa: E402  (dynamics continue)

app.add_typer(dynamics_app, name="dynamics")

register_commands(app)


def main():
    app()
