"""Codabench bundle export + structural check, and the `kpflow challenge` command group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from kpflow.challenges import make_challenge
from kpflow.challenges.bundle import check_bundle, export_bundle
from kpflow.cli import app


@pytest.fixture(scope="module")
def sealevel_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c") / "sealevel"
    make_challenge("sealevel", folder, seed=1, scale=0.03)
    return folder


@pytest.fixture(scope="module")
def bundle(sealevel_dir, tmp_path_factory):
    return export_bundle(sealevel_dir, tmp_path_factory.mktemp("b") / "bundle")


def test_exported_bundle_passes_the_structural_check(bundle):
    assert check_bundle(bundle) == []
    comp = yaml.safe_load((bundle / "competition.yaml").read_text())
    assert comp["version"] == 2 and [p["name"] for p in comp["phases"]] == ["Development", "Final"]
    keys = [c["key"] for c in comp["leaderboards"][0]["columns"]]
    assert keys[0] == "Final Grade"
    assert bundle.with_suffix(".zip").is_file()
    assert (bundle / comp["image"]).read_bytes().startswith(b"\x89PNG")
    assert comp["phases"][1]["auto_migrate_to_this_phase"] is True and "auto_migrate_to_this_phase" not in comp[
        "phases"][0]
    assert all((bundle / p["starting_kit"] / "model.py").is_file() for p in comp["phases"])
    assert comp["docker_image"]


def _broken_copy(bundle, tmp_path, edit):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(bundle, copy)
    comp = yaml.safe_load((copy / "competition.yaml").read_text())
    edit(comp, copy)
    (copy / "competition.yaml").write_text(yaml.safe_dump(comp))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c, d: c.__setitem__("version", 1), "version must be 2"),
    (lambda c, d: c["tasks"][0].__setitem__("reference_data", "nowhere"), "reference_data 'nowhere'"),
    (lambda c, d: c["phases"][1].__setitem__("tasks", [7]), "unknown task 7"),
    (lambda c, d: c["leaderboards"][0]["columns"][0].__setitem__("sorting", "up"), "sorting must be"),
    (lambda c, d: c["leaderboards"][0]["columns"].pop(), "differ from leaderboard column keys"),
    (lambda c, d: c["leaderboards"][0]["columns"][1].__setitem__("key", "Final Grade"), "not unique"),
    (lambda c, d: (d / "pages" / "data.md").unlink(), "missing file 'pages/data.md'"),
    (lambda c, d: c.pop("image"), "An image for this competition could not be found in the yaml"),
    (lambda c, d: (d / "logo.png").unlink(), "Unable to find image: logo.png"),
    (lambda c, d: c.pop("docker_image"), "no docker_image named"),
    (lambda c, d: c["phases"][1].pop("auto_migrate_to_this_phase"), "lacks 'auto_migrate_to_this_phase: true'"),
    (lambda c, d: c["phases"][0].__setitem__("auto_migrate_to_this_phase", True), "cannot be set on the first"),
    (lambda c, d: c["phases"][0].pop("starting_kit"), "attaches no starting_kit"),
    (lambda c, d: c["phases"][0].pop("end"), "must have an end time because it has a phase after it"),
    (lambda c, d: c["phases"][1].__setitem__("start", c["phases"][0]["end"]), "must start after the previous"),
    (lambda c, d: c["phases"][0].__setitem__("start", "1-1-2025"), "is not a 'YYYY-MM-DD HH:MM:SS' date-time"),
    (lambda c, d: c["phases"][0].__setitem__("tasks", []), "at least one task"),
    (lambda c, d: (d / "pages" / "terms.md").write_text(""), "'pages/terms.md' is empty"),
])
def test_structural_check_names_each_problem(bundle, tmp_path, edit, message):
    problems = check_bundle(_broken_copy(bundle, tmp_path, edit))
    assert any(message in p for p in problems), problems


def test_the_previous_exporters_bundle_is_rejected_by_the_codabench_rules(bundle, tmp_path):
    """The competition.yaml this kit wrote before (no logo, M-D-YYYY dates, no auto-migration, no
    starting kit per phase) passed the old check; Codabench's unpacker rejects it, and so does this one."""
    def as_before(comp, folder):
        comp.pop("image")
        for phase, (start, end) in zip(comp["phases"], [("1-1-2025", "12-31-2025"), ("1-1-2026", "1-31-2026")],
                                       strict=True):
            phase.pop("starting_kit")
            phase.pop("auto_migrate_to_this_phase", None)
            phase.update(start=start, end=end, solutions=[])
    problems = check_bundle(_broken_copy(bundle, tmp_path, as_before))
    for message in ("An image for this competition could not be found", "is not a 'YYYY-MM-DD HH:MM:SS'",
                    "lacks 'auto_migrate_to_this_phase: true'", "attaches no starting_kit"):
        assert any(message in p for p in problems), (message, problems)


def test_bundle_programs_run_standalone_like_codabench(bundle, tmp_path):
    """ingestion.py + scoring.py from the bundle, outside kpflow's sandbox, as run.sh does."""
    work = tmp_path / "w"
    res, out = work / "input" / "res", work / "output"
    res.mkdir(parents=True)
    run = subprocess.run([sys.executable, str(bundle / "ingestion_program" / "ingestion.py"),
                          str(bundle / "input_data_val"), str(res), str(bundle / "ingestion_program"),
                          str(bundle / "starting_kit"), "--challenge", "sealevel"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    import shutil

    shutil.copytree(bundle / "reference_data_val", work / "input" / "ref")
    run = subprocess.run([sys.executable, str(bundle / "scoring_program" / "scoring.py"), str(work / "input"),
                          str(out), "--challenge", "sealevel"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    scores = json.loads((out / "scores.json").read_text())
    columns = yaml.safe_load((bundle / "competition.yaml").read_text())["leaderboards"][0]["columns"]
    assert set(scores) == {c["key"] for c in columns}


def test_cli_list_make_run_score_leaderboard_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["challenge", "list"])
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.strip().splitlines()] == ["gw", "butterfly", "sealevel"]
    made = runner.invoke(app, ["challenge", "make", "gw", "--out", "c/gw", "--scale", "0.01"])
    assert made.exit_code == 0, made.output
    ran = runner.invoke(app, ["challenge", "run", "gw", "c/gw/starting_kit", "--dir", "c/gw", "--timeout", "120",
                              "--trusted"])
    assert ran.exit_code == 0, ran.output
    lines = dict(line.split("=") for line in ran.output.strip().splitlines())
    assert set(lines) == {"TNR", "TNR_bbh", "TNR_sglf", "ROC_AUC"} and 0 <= float(lines["TNR"]) <= 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.py").write_text("raise SystemExit(3)\n")
    failed = runner.invoke(app, ["challenge", "run", "gw", "bad", "--dir", "c/gw", "--trusted"])
    assert failed.exit_code == 1 and "FAILED" in failed.output
    board = runner.invoke(app, ["challenge", "leaderboard", "gw", "--dir", "c/gw"])
    assert board.exit_code == 0 and "starting_kit" in board.output and "FAILED" in board.output
    from kpflow.challenges.bundle import reference_predictions

    reference_predictions("gw", tmp_path / "c/gw/reference_data/val", tmp_path / "res", "correct")
    scored = runner.invoke(app, ["challenge", "score", "gw", "res/predictions.csv", "--dir", "c/gw"])
    assert scored.exit_code == 0 and json.loads(scored.output)["TNR"] == 1.0
    bundled = runner.invoke(app, ["challenge", "bundle", "gw", "--dir", "c/gw", "--out", "b/gw"])
    assert bundled.exit_code == 0 and "structural check passed" in bundled.output
    unknown = runner.invoke(app, ["challenge", "make", "protein"])
    assert unknown.exit_code == 2 and "valid names" in unknown.output


@pytest.mark.parametrize("command", ["run", "score", "leaderboard", "bundle"])
def test_a_misspelt_challenge_name_lists_the_valid_names(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    args = {"run": ["gww", "sub"], "score": ["gww", "p.csv"], "leaderboard": ["gww"], "bundle": ["gww"]}[command]
    result = CliRunner().invoke(app, ["challenge", command, *args])
    assert result.exit_code == 2
    assert "unknown challenge 'gww'; valid names: gw, butterfly, sealevel" in result.output
    assert "challenge make" not in result.output


def test_make_into_an_existing_folder_names_the_overwrite_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    result = CliRunner().invoke(app, ["challenge", "make", "gw", "--out", "c", "--scale", "0.01"])
    assert result.exit_code == 2
    assert "c exists and is not empty; pass --overwrite to replace it" in result.output
    assert "overwrite=True" not in result.output and (tmp_path / "c" / "keep.txt").is_file()
