"""End to end: a tiny config through run → analyze → report; interruption (a real kill) and resume;
corrupted checkpoints; unknown names and invalid values through the CLI."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kpflow.cli import app

TINY = {
    "name": "tiny", "seed": 0,
    "task": {"name": "flipflop", "params": {"seq_len": 10, "pulse_prob": 0.3}},
    "model": {"name": "gru", "hidden": 8},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10},
    "track": {"eval_batch": 3, "probes": 8},
}

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def write_config(tmp_path, **changes) -> Path:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for dotted, value in changes.items():
        sec, key = dotted.split(".")
        cfg[sec][key] = value
    cfg["out"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_run_analyze_report(tmp_path):
    cfg = write_config(tmp_path)
    r = invoke("run", cfg, "--no-analyze", "-q", "--threads", "1")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == [
        "step_000000.safetensors", "step_000010.safetensors", "step_000020.safetensors"]
    r = invoke("analyze", run, "-q", "--threads", "1")
    assert r.exit_code == 0, r.output
    r = invoke("report", run)
    assert r.exit_code == 0, r.output

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"run", "step", "metric", "value", "stderr", "method"}
    assert {int(r["step"]) for r in rows} == {0, 10, 20}
    metrics = {r["metric"] for r in rows}
    for op in ("K", "PPstar", "NTK"):
        for q in ("trace", "fro", "erank", "erank_temporal", "erank_spatial", "erank_trial"):
            assert f"{op}_{q}" in metrics
    for m in ("loss", "accuracy", "activity_dim", "misdirection", "ntk_init_alignment", "kernel_target_alignment"):
        assert m in metrics
    for r in rows:  # every metric finite, with a finite non-negative error bar
        assert math.isfinite(float(r["value"])), r
        assert math.isfinite(float(r["stderr"])) and float(r["stderr"]) >= 0, r
    randomized = [r for r in rows if not r["method"].startswith("exact") and r["metric"] != "ntk_init_alignment"]
    assert randomized and all(float(r["stderr"]) > 0 for r in randomized)

    html = (run / "report.html").read_text()
    pngs = sorted((run / "figures").glob("*.png"))
    assert len(pngs) >= 5 and all(p.with_suffix(".svg").is_file() for p in pngs)
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert sorted(embedded) == sorted(p.stem for p in pngs)  # every figure embedded, nothing linked
    assert "src=\"http" not in html and "Reading" in html and "KPFlow reading" in html
    assert "± " in html  # error bars in the metrics table
    # analyze again: cached, same table
    before = (run / "metrics.csv").read_text()
    assert invoke("analyze", run, "-q").exit_code == 0
    assert (run / "metrics.csv").read_text() == before
    # an interrupted analysis resumes: the missing checkpoint is re-measured against the rebuilt initial NTK
    (run / "analysis" / "step_000020.json").unlink()
    assert invoke("analyze", run, "-q").exit_code == 0
    again = {(r["step"], r["metric"]): float(r["value"]) for r in csv.DictReader(open(run / "metrics.csv"))}
    for r in rows:
        assert again[(r["step"], r["metric"])] == pytest.approx(float(r["value"]), rel=1e-9, abs=1e-12)


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
    cfg = write_config(tmp_path, **{"train.steps": 400, "train.checkpoint_every": 10})
    run = tmp_path / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kpflow", "run", str(cfg), "--no-analyze", "-q", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / "step_000020.json"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.exists(), proc.stderr.read().decode()[-2000:]
    from kpflow.training import list_checkpoints

    done = [c.step for c in list_checkpoints(run / "checkpoints")]
    assert done[0] == 0 and done[-1] < 400, done
    r = invoke("run", cfg, "--no-analyze", "-q", "--threads", "1")
    assert r.exit_code == 0, r.output
    steps = [c.step for c in list_checkpoints(run / "checkpoints")]
    assert steps == list(range(0, 401, 10))  # resumed: nothing lost, nothing duplicated
    # and the resumed weights equal those of an uninterrupted run, bit for bit
    from safetensors.torch import load_file

    ref_cfg = tmp_path / "ref" / "tiny.yaml"
    ref_cfg.parent.mkdir()
    ref_cfg.write_text(cfg.read_text().replace(str(tmp_path / "runs"), str(tmp_path / "ref" / "runs")))
    r = invoke("run", ref_cfg, "--no-analyze", "-q", "--threads", "1")
    assert r.exit_code == 0, r.output
    resumed = load_file(str(run / "checkpoints" / "step_000400.safetensors"))
    reference = load_file(str(tmp_path / "ref" / "runs" / "tiny" / "checkpoints" / "step_000400.safetensors"))
    model_keys = [k for k in reference if k.startswith("model.")]
    assert model_keys and all(torch.equal(resumed[k], reference[k]) for k in model_keys)


def test_corrupted_checkpoint_is_reported_and_skipped_by_analyze(tmp_path):
    cfg = write_config(tmp_path)
    assert invoke("run", cfg, "--no-analyze", "-q").exit_code == 0
    run = tmp_path / "runs" / "tiny"
    bad = run / "checkpoints" / "step_000010.safetensors"
    bad.write_bytes(bad.read_bytes()[:-16] + b"\x00" * 16)
    from kpflow.training import CorruptCheckpointWarning

    with pytest.warns(CorruptCheckpointWarning, match="step_000010.safetensors"):
        r = invoke("analyze", run, "-q", "--threads", "1")
    assert r.exit_code == 0
    steps = {int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))}
    assert steps == {0, 20}


def test_cli_names_unknown_and_invalid_values(tmp_path):
    r = runner.invoke(app, ["run", "no_such_study"])
    assert r.exit_code == 2 and "valid studies: " in r.output and "flipflop" in r.output
    for change, needle in ((("optimizer.name", "adamx"), "optimizer.name = 'adamx'"),
                           (("model.name", "gruu"), "model.name = 'gruu'"),
                           (("task.name", "flipflap"), "task.name = 'flipflap'"),
                           (("train.checkpoint_every", 0), "train.checkpoint_every = 0")):
        cfg = write_config(tmp_path, **{change[0]: change[1]})
        r = runner.invoke(app, ["run", str(cfg)])
        assert r.exit_code == 2 and needle in r.output, r.output
    assert "valid optimizers: " in runner.invoke(app, ["run", str(write_config(tmp_path, **{
        "optimizer.name": "adamx"}))]).output
    r = runner.invoke(app, ["run", "--steps", "-4"])
    assert r.exit_code == 2 and "train.steps = -4" in r.output


def test_print_defaults_round_trips_and_help_documents_shortening(tmp_path):
    r = invoke("run", "--print-defaults")
    assert r.exit_code == 0
    from kpflow.experiments.registry import flipflop_config

    assert yaml.safe_load(r.output) == flipflop_config().model_dump(mode="json")
    r = invoke("run", "--print-defaults", "--format", "toml", "--steps", "7")
    assert "steps = 7" in r.output
    helptext = invoke("run", "--help").output
    for opt in ("--steps", "--checkpoint-every", "--out", "--eval-batch", "--probes"):
        assert opt in helptext
    assert "report" in invoke("--help").output


def test_report_without_metrics_says_what_to_do(tmp_path):
    from kpflow.training import save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 0, torch.nn.Linear(2, 2))  # trained, not measured: analyze it
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "kpflow analyze" in r.output


def test_sweep_over_g_writes_table_figures_and_report(tmp_path):
    cfg = write_config(tmp_path, **{"train.steps": 10, "train.checkpoint_every": 10, "model.hidden": 4,
                                    "track.eval_batch": 2, "track.probes": 4})
    r = invoke("sweep", cfg, "--gs", "0.5,2", "--seeds", "0", "-q")
    assert r.exit_code == 0, r.output
    sweep = tmp_path / "runs" / "tiny_sweep"
    with open(sweep / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert {float(r["g"]) for r in rows} == {0.5, 2.0}
    assert all(math.isfinite(float(r["value"])) for r in rows)
    html = (sweep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((sweep / "figures").glob("*.png"))) == 2
    for run in ("g0.5_s0", "g2_s0"):
        assert (sweep / run / "report.html").is_file()
    r = runner.invoke(app, ["sweep", str(cfg), "--gs", "a,b"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_bad_task_params_or_missing_cuda_leave_no_run_folder_behind(tmp_path):
    import torch

    bad = write_config(tmp_path, **{"task.params": {**TINY["task"]["params"], "n_bits": 0}})
    r = runner.invoke(app, ["run", str(bad)])
    assert r.exit_code != 0 and "n_bits" in r.output and "task.params" in r.output, r.output
    assert not (tmp_path / "runs").exists()
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["run", str(write_config(tmp_path)), "--device", "cuda:7"])
        assert r.exit_code != 0 and "CUDA is not available" in r.output, r.output
        assert not (tmp_path / "runs").exists()
    # the corrected config then runs in the same place without --fresh
    r = runner.invoke(app, ["run", str(write_config(tmp_path)), "--quiet"])
    assert r.exit_code == 0, r.output
