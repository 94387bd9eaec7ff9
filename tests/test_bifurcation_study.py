"""`kpflow run bifurcation`: a shortened run end to end, and its clear refusals."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.experiments.bifurcation import bifurcation_config, build_student, origin_spectrum
from kpflow.training.config import validate_config


@pytest.mark.slow
def test_shortened_bifurcation_run_reports_the_first_crossing(tmp_path):
    # a large learning rate drives W through |λ| = 1 within 20 steps (a smoke test of the pipeline,
    # not of the study's numbers)
    res = CliRunner().invoke(app, ["run", "bifurcation", "--steps", "20", "--checkpoint-every", "10",
                                   "--eval-batch", "2", "--probes", "8", "--lr", "2.0", "--out", str(tmp_path),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "bifurcation"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {int(r["step"]) for r in rows if r["step"].isdigit()}
    assert steps == {0, 10, 20}
    for s in steps:
        er = [r for r in rows if r["step"] == str(s) and r["metric"] == "ntk_erank"]
        assert len(er) == 1 and float(er[0]["value"]) >= 1.0
    first = [r for r in rows if r["metric"] == "first_bifurcation_step"]
    assert len(first) == 1
    summary = json.loads((run / "bifurcation.json").read_text())
    step = float(first[0]["value"])
    assert step == pytest.approx(summary["first_bifurcation_step"])
    lo, hi = summary["first_bifurcation_interval"]
    assert lo <= step <= hi
    # at the located crossing the critical eigenvalue of the origin is on the unit circle
    assert summary["at"]["origin_abs_lambda1"] == pytest.approx(1.0, abs=1e-6)
    page = (run / "report.html").read_text()
    assert "first_bifurcation_step" in page and "at the crossing" in page
    assert (run / "figures" / "bifurcation_sntk_erank.svg").is_file()
    # `kpflow analyze` and `kpflow report` on the study's folder use the study's own measurements
    (run / "report.html").unlink()
    for command in (["analyze", str(run), "--quiet"], ["report", str(run)]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 0, res.output
        assert "first_bifurcation_step" in (run / "report.html").read_text()


def test_student_starts_as_g_times_the_teachers_base():
    cfg = bifurcation_config()
    task, model = build_student(cfg)
    w = task.teacher_weights()
    torch.testing.assert_close(model.cell.W.detach(), cfg.model.g * w["W_base"])
    assert not model.cell.U.requires_grad and model.cell.W.requires_grad
    lam, _, _ = origin_spectrum(model.to(torch.float64), {k: v.double() for k, v in model.cell_params().items()})
    # planted base (the default): one real eigenvalue g, the other 63 of modulus g · rest_radius
    assert abs(complex(lam[0]) - cfg.model.g) < 1e-6
    torch.testing.assert_close(lam[1:].abs(), torch.full((63,), 0.5 * cfg.model.g, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    # orthogonal base (second regime): every eigenvalue of g W_base has modulus g
    cfg = validate_config(cfg, **{"task.params": {**cfg.task.params, "teacher_spectrum": "orthogonal"}})
    task, model = build_student(cfg)
    lam, _, _ = origin_spectrum(model.to(torch.float64), {k: v.double() for k, v in model.cell_params().items()})
    torch.testing.assert_close(lam.abs(), torch.full((64,), cfg.model.g, dtype=torch.float64), atol=1e-6, rtol=0)


def test_study_refuses_other_tasks_and_mismatched_sizes():
    cfg = validate_config(bifurcation_config(), **{"task.name": "flipflop", "task.params": {}})
    with pytest.raises(ValueError, match="needs task.name = 'student_teacher'"):
        build_student(cfg)
    cfg = validate_config(bifurcation_config(), **{"model.hidden": 32})
    with pytest.raises(ValueError, match="must equal the teacher's hidden"):
        build_student(cfg)
