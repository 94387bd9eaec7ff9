"""The bifurcation diagram and `kpflow dynamics continue` on a tiny trained run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.dynamics import continue_fixed_points, normal_form, parameter_path
from kpflow.dynamics.diagram import STABLE, UNSTABLE, plot_bifurcation_diagram

runner = CliRunner()
TINY = {
    "name": "tiny", "seed": 0,
    "task": {"name": "flipflop", "params": {"seq_len": 10, "pulse_prob": 0.3}},
    "model": {"name": "gru", "hidden": 6},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 10, "batch_size": 8, "checkpoint_every": 5},
    "track": {"eval_batch": 3, "probes": 8},
}


def test_diagram_colours_stability_and_marks_the_special_points(tmp_path):
    m = normal_form("pitchfork", -0.5)
    res = continue_fixed_points(m, parameter_path(m, "mu"), torch.zeros(1, dtype=torch.float64), s_start=-0.5,
                                s_range=(-0.5, 0.5), switch_branches=True)
    fig = plot_bifurcation_diagram(res, tmp_path / "d.png", coordinate=0)
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "d.svg").is_file()
    ax = fig.axes[0]
    colours = {line.get_color() for line in ax.lines if len(line.get_xdata()) == 2}
    assert colours == {STABLE, UNSTABLE}  # stable origin for μ < 0, unstable after; stable arms
    # the origin is unstable exactly where μ > 0
    for line in ax.lines:
        x = line.get_xdata()
        if len(x) == 2 and max(abs(v) for v in line.get_ydata()) < 1e-12:
            assert (line.get_color() == UNSTABLE) == (min(x) >= 0)
    assert [t.get_text() for t in ax.texts] == ["BP+"]


@pytest.mark.slow
def test_dynamics_continue_command_on_a_tiny_run(tmp_path):
    cfg = {**TINY, "out": str(tmp_path / "runs")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["run", str(tmp_path / "tiny.yaml"), "--no-analyze", "--no-report", "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tiny"
    r = runner.invoke(app, ["dynamics", "continue", str(run), "--param", "interp", "--quiet"])
    assert r.exit_code == 0, r.output
    out = run / "continuation" / "interp"
    data = json.loads((out / "branches.json").read_text())
    assert data["path"] == "interpolation" and data["branches"]
    b = data["branches"][0]
    assert min(b["s"]) >= 0.0 and max(b["s"]) <= 1.0 and len(b["s"]) == len(b["norm"]) == len(b["unstable_dim"])
    rows = list(csv.DictReader(open(out / "special_points.csv")))
    assert len(rows) == len(data["special_points"])
    assert f"{len(rows)} special point(s)" in r.output
    assert (out / "diagram.png").is_file()
    # bad input: an unknown parameter, a step that has no checkpoint, a bad range
    r = runner.invoke(app, ["dynamics", "continue", str(run), "--param", "bogus"])
    assert r.exit_code == 2 and "use interp, input:K or gain" in r.output
    r = runner.invoke(app, ["dynamics", "continue", str(run), "--param", "interp", "--from", "3"])
    assert r.exit_code == 2 and "the run has steps [0, 5, 10]" in r.output
    r = runner.invoke(app, ["dynamics", "continue", str(run), "--param", "gain", "--range", "2,1"])
    assert r.exit_code == 2 and "lo < hi" in r.output
