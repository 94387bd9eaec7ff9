"""The ``kpflow`` command line. Each command group lives beside the module it drives."""

from __future__ import annotations

import typer

from kpflow import __version__

app = typer.Typer(
    name="kpflow",
    help=(
        "Matrix-free operators of learning for recurrent networks.\n\n"
        "Examples:\n\n"
        "  kpflow run                      # train the default GRU on 3-bit flip-flop and report\n\n"
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


@app.command("demo")
def demo(
    size: int = typer.Option(400, help="Dimension of the synthetic PSD operator."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Estimate the trace and effective rank of a PSD operator matrix-free, next to the exact values."""
    from kpflow.demo import operator_demo

    operator_demo(size=size, seed=seed)


from kpflow.challenges.cli import challenge_app  # noqa: E402  (challenge command group)

app.add_typer(challenge_app, name="challenge")


from kpflow.experiments.commands import register_commands  # noqa: E402  (run, sweep, analyze, report)

register_commands(app)


def main():
    app()
