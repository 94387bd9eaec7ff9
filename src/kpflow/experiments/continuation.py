"""``kpflow dynamics continue RUN --param ...``: continue the fixed points of a trained run's model.

The parameter (``--param``) is one of

* ``interp``: the weight interpolation ``θ(s) = (1 − s) θ_a + s θ_b`` between two checkpoints
  (``--from``/``--to`` steps, default the first and the last), ``s ∈ [0, 1]``;
* ``input:K``: the level of input ``K`` (a constant input, all other inputs at ``--input``'s values,
  zero by default), over ``--range`` (default ``-1,1``), at the checkpoint ``--at`` (default the last);
* ``gain`` or ``gain:NAME``: a gain on the recurrent weight (or on weight ``NAME``) over ``--range``
  (default ``0.5,1.5``), at ``--at``.

Fixed points at the start of the range are found from the states of an evaluation batch of the run's
task (``find_fixed_points``), every branch through them is continued across the range with its special
points located and classified (``continue_fixed_points``, branches switched at branch points), and the
results go to ``RUN/continuation/<param>/``: ``branches.json``, ``special_points.csv``, the bifurcation
diagram ``diagram.png``/``.svg`` and, with ``--learning``, ``learning.csv`` (sNTK/K/P summaries of short
runs started on the first branch, ``learning_along_branch``). Heavy imports happen inside the functions
so that ``kpflow --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

dynamics_app = typer.Typer(help="Dynamics of a trained run: continuation of fixed points, bifurcation diagrams.",
                           no_args_is_help=True, add_completion=False, rich_markup_mode=None)


def _parse_range(text: str | None, default: tuple[float, float]) -> tuple[float, float]:
    if text is None:
        return default
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--range must be two numbers 'lo,hi', got {text!r}") from None
    if not lo < hi:
        raise ValueError(f"--range needs lo < hi, got {text!r}")
    return lo, hi


def _checkpoint(checkpoints, step: int | None, what: str):
    if step is None:
        return checkpoints[-1] if what != "from" else checkpoints[0]
    for c in checkpoints:
        if c.step == step:
            return c
    raise ValueError(f"--{what} {step}: no checkpoint at that step; the run has steps {[c.step for c in checkpoints]}")


def continue_run(run_dir: str | Path, param: str, *, s_range: str | None = None, from_step: int | None = None,
                 to_step: int | None = None, at_step: int | None = None, input_values: str | None = None,
                 n_states: int = 64, learning: bool = False, switch_branches: bool = True, max_steps: int = 400,
                 ds_max: float = 0.05, out: str | Path | None = None, progress: bool = True) -> dict:
    """Continue the fixed points of the model of a kpflow run folder along ``param`` (see the module
    docstring); writes the outputs and returns ``{"out": folder, "result": ContinuationResult, ...}``.

    Raises:
        FileNotFoundError: not a run folder, or no checkpoints.
        ValueError: an unknown ``param``, a bad range, a step with no checkpoint.
        ContinuationError: no branch could be started or followed (with the reason).
    """
    import torch

    from kpflow.dynamics import (
        continue_fixed_points,
        gain_path,
        input_path,
        interpolation_path,
        learning_along_branch,
    )
    from kpflow.dynamics.diagram import plot_bifurcation_diagram
    from kpflow.files import atomic_write_text, write_csv
    from kpflow.kernels import record
    from kpflow.tracking.analyze import build_from_config, run_config
    from kpflow.training.checkpoints import list_checkpoints, load_checkpoint

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint; train first (`kpflow run`)")
    task, model = build_from_config(cfg)
    kind, _, arg = param.partition(":")
    D = torch.float64

    def params_at(ck):
        load_checkpoint(ck, model)
        return {k: v.detach().to(D).clone() for k, v in model.cell_params().items()}

    x_bar = torch.zeros(model.input_dim, dtype=D)
    if input_values is not None:
        vals = [float(v) for v in input_values.split(",")]
        if len(vals) != model.input_dim:
            raise ValueError(f"--input needs {model.input_dim} comma-separated values (the model's input_dim), "
                             f"got {len(vals)}")
        x_bar = torch.tensor(vals, dtype=D)
    model = model.to(D)
    if kind == "interp":
        ca, cb = _checkpoint(checkpoints, from_step, "from"), _checkpoint(checkpoints, to_step, "to")
        if ca.step == cb.step:
            raise ValueError(f"--from and --to are the same checkpoint (step {ca.step}); give two different steps")
        path = interpolation_path(model, params_at(ca), params_at(cb), x_bar,
                                  label=f"s (step {ca.step} → step {cb.step})")
        lo, hi = 0.0, 1.0
        base = params_at(ca)
        where = f"steps {ca.step}→{cb.step}"
    elif kind in ("input", "gain"):
        ck = _checkpoint(checkpoints, at_step, "at")
        base = params_at(ck)
        if kind == "input":
            try:
                k = int(arg)
            except ValueError:
                raise ValueError(f"--param input:K needs an input index K in 0..{model.input_dim - 1}, "
                                 f"got {param!r}") from None
            path = input_path(model, k, x_bar, base, label=f"input {k} level")
            lo, hi = _parse_range(s_range, (-1.0, 1.0))
        else:
            path = gain_path(model, arg or None, base, x_bar)
            lo, hi = _parse_range(s_range, (0.5, 1.5))
        where = f"step {ck.step}"
    else:
        raise ValueError(f"unknown --param {param!r}; use interp, input:K or gain[:NAME]")
    # starts: states of an evaluation batch, run with the parameters at the start of the range
    p0, x0 = path(torch.tensor(lo, dtype=D))
    p0 = {k: v.detach() for k, v in p0.items()}
    batch = task.sample(max(1, n_states // 8), cfg.track.eval_seed, dtype=D)
    traj = record(model, batch.inputs, params=p0)
    states = traj.states.reshape(-1, model.state_dim)
    g = torch.Generator().manual_seed(0)
    states = states[torch.randperm(states.shape[0], generator=g)[:n_states]]
    result = continue_fixed_points(model, path, None, s_start=lo, s_range=(lo, hi), initial_states=states,
                                   switch_branches=switch_branches, max_steps=max_steps, ds_max=ds_max,
                                   progress=progress)
    folder = Path(out) if out is not None else run_dir / "continuation" / param.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "branches.json", json.dumps(result.to_dict(), indent=1, default=str))
    rows = result.table()
    write_csv(folder / "special_points.csv", rows)
    plot_bifurcation_diagram(result, folder / "diagram.png",
                             title=f"{cfg.name}: fixed points along {path.label} ({where})")
    learn = None
    if learning and result.branches:
        learn = learning_along_branch(model, result, 0, T=20, probes=16, progress=progress)
        write_csv(folder / "learning.csv", learn)
    return {"out": folder, "result": result, "special_points": rows, "learning": learn}


@dynamics_app.command("continue")
def continue_command(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>) with config.yaml and checkpoints/."),
    param: str = typer.Option(..., "--param", help="interp | input:K | gain[:NAME] (see `kpflow dynamics "
                                                   "continue --help`)."),
    s_range: str = typer.Option(None, "--range", help="lo,hi of the parameter (input: -1,1; gain: 0.5,1.5)."),
    from_step: int = typer.Option(None, "--from", help="interp: first checkpoint step (default the first)."),
    to_step: int = typer.Option(None, "--to", help="interp: second checkpoint step (default the last)."),
    at_step: int = typer.Option(None, "--at", help="input/gain: checkpoint step (default the last)."),
    input_values: str = typer.Option(None, "--input", help="The constant input, comma-separated (default 0)."),
    learning: bool = typer.Option(False, "--learning", help="Also sNTK/K/P summaries along the first branch."),
    out: Path = typer.Option(None, "--out", help="Output folder (default RUN/continuation/<param>)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Continue the fixed points of a trained run along a parameter and locate its bifurcations.

    Examples:

      kpflow dynamics continue runs/flipflop --param interp --from 0 --to 400

      kpflow dynamics continue runs/flipflop --param input:0 --range -1,1

      kpflow dynamics continue runs/flipflop --param gain --range 0.5,2 --learning
    """
    from kpflow.dynamics import ContinuationError

    try:
        res = continue_run(run, param, s_range=s_range, from_step=from_step, to_step=to_step, at_step=at_step,
                           input_values=input_values, learning=learning, out=out, progress=not quiet)
    except (ValueError, FileNotFoundError, ContinuationError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    result = res["result"]
    typer.echo(f"{len(result.branches)} branch(es), {len(res['special_points'])} special point(s) along "
               f"{result.path.label}:")
    for sp in result.special_points:
        crit = f" {sp.criticality}" if sp.criticality else ""
        flags = f" [{', '.join(sp.flags)}]" if sp.flags else ""
        typer.echo(f"  {sp.label:<3} {sp.kind}{crit} at {sp.s:.10g} (branch {sp.branch}, λ = {sp.eigenvalue:.5g})"
                   f"{flags}")
    typer.echo(f"written: {res['out']}/branches.json, special_points.csv, diagram.png"
               + (", learning.csv" if res["learning"] is not None else ""))


@dynamics_app.command("study")
def study_command(
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder of the study folder."),
    steps: int = typer.Option(None, "--steps", help="Training steps (default 400)."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Checkpoint interval (default 40)."),
    hidden: int = typer.Option(None, "--hidden", help="Units of the leaky RNN (default 24)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the weights and batches (default 0)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Multi-task leaky RNN (Memory-Pro, Memory-Anti, Delay-Pro, Delay-Anti): continuation between checkpoints
    finds where the dynamics change; the sNTK amplification is compared with those points (fixed criterion,
    verdict agree / disagree / inconclusive). A few minutes on 2 cores at the default size.

    Example: kpflow dynamics study --steps 80 --checkpoint-every 20 --hidden 12   # smoke test
    """
    from .continuation_study import run_continuation_study

    try:
        folder = run_continuation_study(out, progress=not quiet, steps=steps, checkpoint_every=checkpoint_every,
                                        hidden=hidden, seed=seed)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    summary = json.loads((folder / "continuation_study.json").read_text())
    typer.echo(f"{summary['special_points']} special point(s) ({', '.join(summary['kinds']) or 'none'}) in "
               f"{summary['n_with_special_points']} of {summary['n_intervals']} checkpoint intervals")
    typer.echo(f"verdict: {summary['verdict']} ({summary['criterion']})")
    typer.echo(f"report: {folder / 'report.html'}")
