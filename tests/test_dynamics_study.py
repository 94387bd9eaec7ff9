"""The continuation study: its fixed criterion, and a smoke run through the command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.experiments.continuation_study import verdict


def test_criterion_gives_each_verdict_on_planted_data():
    # 8 intervals, two with special points: exact permutation p = 1/28 for the planted extreme labelling
    big_at_special = verdict([10, 10, 1, 1, 1, 1, 1, 1], [True, True] + [False] * 6)
    assert big_at_special["verdict"] == "agree" and big_at_special["p_larger_at_special_points"] < 0.05
    small_at_special = verdict([1, 1, 10, 10, 10, 10, 10, 10], [True, True] + [False] * 6)
    assert small_at_special["verdict"] == "disagree"
    assert verdict([1, 2, 2, 1, 1, 2, 2, 1], [True, False] * 4)["verdict"] == "inconclusive"  # equal means
    assert verdict([1.0, 2.0, 3.0], [False] * 3)["verdict"] == "inconclusive"  # no special point anywhere
    assert verdict([1.0, 2.0, 3.0], [True] * 3)["verdict"] == "inconclusive"


@pytest.mark.slow
def test_study_smoke_run(tmp_path):
    r = CliRunner().invoke(app, ["dynamics", "study", "--out", str(tmp_path), "--steps", "20", "--checkpoint-every",
                                 "10", "--hidden", "6", "--quiet"])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "continuation_multitask"
    summary = json.loads((folder / "continuation_study.json").read_text())
    assert summary["verdict"] in ("agree", "disagree", "inconclusive")
    assert summary["tasks"] == ["memory_pro", "memory_anti", "delay_pro", "delay_anti"]
    assert summary["n_intervals"] == 2 and summary["steps"] == [0, 10, 20]
    assert (folder / "report.html").is_file() and (folder / "amplification.csv").is_file()
    assert f"verdict: {summary['verdict']}" in r.output
