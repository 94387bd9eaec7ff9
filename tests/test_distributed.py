"""Scale-out on Dask (kpflow.experiments.distributed) with a real LocalCluster of 2 worker processes: a sweep
whose runs equal serial runs, resume of a killed sweep (finished runs are not recomputed), a task whose worker
process is killed (retried on a live worker), failing runs reported together, bad schedulers refused with a
clear error, the SLURM job script built from a config section, one GPU per worker."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import cloudpickle
import pytest
import yaml
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.experiments import distributed as D
from kpflow.experiments.pipeline import run_pipeline, seed_band, sweep_configs
from kpflow.training import validate_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

TINY = {
    "name": "tiny", "seed": 0,
    "task": {"name": "flipflop", "params": {"seq_len": 8, "pulse_prob": 0.3}},
    "model": {"name": "gru", "hidden": 6},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 4},
    "track": {"eval_batch": 2, "probes": 4, "axes": False},
}
runner = CliRunner()


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    cluster = D.local_cluster(2)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _log(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _record_call(log: Path, key: str) -> dict:
    """A run that only says it ran (and where)."""
    _log(log, key)
    return {"key": key, "pid": os.getpid()}


def _tasks(tmp_path: Path, keys, fn=_record_call, fingerprint="v1"):
    log = tmp_path / "calls.log"
    return [D.RunTask(k, tmp_path / k, fingerprint, fn, (log, k)) for k in keys], log


def _calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


# ------------------------------------------------------------------------------------------------------- sweep
def test_sweep_on_two_worker_processes_equals_serial_runs_and_writes_bands(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "runs")}))
    r = runner.invoke(app, ["sweep", str(cfg_path), "--gs", "2", "--seeds", "0,1", "--scheduler", "local",
                            "--workers", "2", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    sweep = tmp_path / "runs" / "tiny_sweep"
    records = {k: json.loads((sweep / k / D.DONE_FILE).read_text()) for k in ("g2_s0", "g2_s1")}
    assert len({rec["pid"] for rec in records.values()} | {os.getpid()}) == 3  # two worker processes, not this one
    # a run on a worker gives exactly the numbers of the same run in this process
    base = validate_config({**TINY, "out": str(tmp_path / "serial")})
    serial = run_pipeline(sweep_configs(base, [2.0], [1])[0], progress=False, report=False)
    with open(serial / "metrics.csv") as f:
        want = {(r["step"], r["metric"]): r["value"] for r in csv.DictReader(f)}
    with open(sweep / "sweep.csv") as f:
        got = {(r["step"], r["metric"]): r["value"] for r in csv.DictReader(f) if r["run"] == "g2_s1"}
    assert got == want and len(want) > 10, (got, want)
    html = (sweep / "report.html").read_text()
    assert "95% Student-t confidence interval" in html and "mean over 2 seed(s)" in html
    # nothing left to do: a re-run starts no cluster and recomputes nothing
    stamp = {k: (sweep / k / D.DONE_FILE).stat().st_mtime_ns for k in records}
    r = runner.invoke(app, ["sweep", str(cfg_path), "--gs", "2", "--seeds", "0,1", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert stamp == {k: (sweep / k / D.DONE_FILE).stat().st_mtime_ns for k in records}


def test_seed_band_is_the_student_t_interval():
    from scipy import stats

    vals = [1.0, 2.0, 4.0]
    b = seed_band(vals)
    lo, hi = stats.t.interval(0.95, 2, loc=sum(vals) / 3, scale=stats.sem(vals))
    assert b.n == 3 and b.mean == pytest.approx(7 / 3) and b.stderr == pytest.approx(stats.sem(vals))
    assert b.mean - b.half_width == pytest.approx(lo) and b.mean + b.half_width == pytest.approx(hi)
    assert seed_band([5.0]) == (5.0, 0.0, 0.0, 1) and seed_band([float("nan")]).n == 0


# ------------------------------------------------------------------------------------------------------ resume
def test_killed_sweep_resumes_without_recomputing_finished_runs(client, tmp_path):
    keys = [f"run{i}" for i in range(6)]
    tasks, log = _tasks(tmp_path, keys)
    # the first sweep "died" after three runs: exactly those carry a done marker
    first = D.run_tasks(tasks[:3], client=client, progress=False)
    assert sorted(first.ran) == keys[:3] and first.skipped == []
    (tmp_path / "run4").mkdir()  # a run that had started (no marker) is not finished
    again = D.run_tasks(tasks, client=client, progress=False)
    assert sorted(again.skipped) == keys[:3] and sorted(again.ran) == keys[3:]
    assert sorted(_calls(log)) == sorted(keys)  # every run computed exactly once
    # a run whose configuration changed is not finished any more; --fresh recomputes everything
    changed = [D.RunTask(t.key, t.run_dir, "v2" if t.key == "run0" else t.fingerprint, t.fn, t.args) for t in tasks]
    assert D.run_tasks(changed, client=client, progress=False).ran == ["run0"]
    assert sorted(D.run_tasks(changed, client=client, progress=False, fresh=True).ran) == keys


def _die_once(log: Path, key: str) -> dict:
    """Kills its own worker process the first time it runs (as the OOM killer would)."""
    marker = log.parent / f"{key}.attempted"
    _log(log, f"{key}:{os.getpid()}")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"pid": os.getpid()}


def test_a_task_whose_worker_dies_is_retried_on_a_live_worker(client, tmp_path):
    tasks, log = _tasks(tmp_path, ["victim"], fn=_die_once)
    rep = D.run_tasks(tasks, client=client, progress=False)
    attempts = _calls(log)
    assert rep.ran == ["victim"] and len(attempts) == 2
    killed = int((tmp_path / "victim.attempted").read_text())
    assert rep.records["victim"]["result"]["pid"] != killed and D.is_finished(tasks[0])
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def _fail_odd(log: Path, key: str) -> str:
    _log(log, key)
    if int(key[-1]) % 2:
        raise ValueError(f"bad input in {key}")
    return key


def test_failing_runs_are_reported_together_and_only_they_rerun(client, tmp_path):
    tasks, log = _tasks(tmp_path, ["r0", "r1", "r2", "r3"], fn=_fail_odd)
    with pytest.raises(D.RunFailures) as exc:
        D.run_tasks(tasks, client=client, progress=False)
    assert sorted(exc.value.failures) == ["r1", "r3"] and "ValueError: bad input in r1" in str(exc.value)
    assert "2 finished" in str(exc.value)
    assert [D.is_finished(t) for t in tasks] == [True, False, True, False]
    with pytest.raises(D.RunFailures):
        D.run_tasks(tasks, progress=False, scheduler="serial")
    assert sorted(_calls(log)) == ["r0", "r1", "r1", "r2", "r3", "r3"]
    with pytest.raises(ValueError, match="unique"):
        D.run_tasks(tasks + tasks[:1], progress=False, scheduler="serial")


# -------------------------------------------------------------------------------------------------- schedulers
def test_bad_scheduler_addresses_give_clear_errors(tmp_path):
    with pytest.raises(D.SchedulerError, match=r"did you mean tcp://localhost:8786"):
        D.check_scheduler("localhost:8786")
    with pytest.raises(D.SchedulerError, match="valid: local .*tcp://host:port.*slurm.*serial"):
        D.check_scheduler("loacl")
    with pytest.raises(D.SchedulerError, match="not valid"):
        D.check_scheduler("tcp://host:99999")
    import socket

    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(D.SchedulerError, match=rf"no Dask scheduler answered at tcp://127.0.0.1:{port} within 1 s"):
        with D.open_client(f"tcp://127.0.0.1:{port}", timeout=1):
            pass
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "runs")}))
    r = runner.invoke(app, ["sweep", str(cfg_path), "--gs", "1", "--scheduler", "tcp//oops"])
    assert r.exit_code == 2 and "is not valid" in r.output and "tcp://host:port" in r.output
    r = runner.invoke(app, ["sweep", str(cfg_path), "--gs", "1", "--workers", "0"])
    assert r.exit_code == 2 and "--workers must be a positive integer" in r.output
    r = runner.invoke(app, ["sweep", str(cfg_path), "--gs", "1", "--scheduler", "slurm"])
    assert r.exit_code == 2 and "--cluster-config" in r.output
    assert not (tmp_path / "runs" / "tiny_sweep" / "g1_s0").exists()


def test_slurm_job_script_is_built_from_the_config_section(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"slurm": {
        "queue": "gpu", "cores": 8, "memory": "32GB", "walltime": "02:30:00", "processes": 2, "account": "lab42",
        "job_extra_directives": ["--gres=gpu:1"], "job_script_prologue": ["module load cuda/12"]}}))
    script = D.slurm_job_script(D.load_slurm_settings(path))
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab42", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G",
                 "#SBATCH -t 02:30:00", "#SBATCH --gres=gpu:1", "#SBATCH -J kpflow-worker", "module load cuda/12"):
        assert line in script, (line, script)
    assert "--nworkers 2" in script and "--nthreads 4" in script and sys.executable in script
    toml = tmp_path / "cluster.toml"
    toml.write_text('[slurm]\nqueue = "short"\ncores = 4\nmemory = "8GB"\nwalltime = "1-00:00:00"\n')
    script = D.slurm_job_script(D.load_slurm_settings(toml))
    assert "--nworkers 4" in script and "--nthreads 1" in script and "#SBATCH -t 1-00:00:00" in script
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"slurm": {"queue": "gpu", "cores": 2, "memory": "lots", "walltime": "2h",
                                             "processes": 4, "partition": "x"}}))
    with pytest.raises(D.SchedulerError) as exc:
        D.load_slurm_settings(bad)
    msg = str(exc.value)
    for needle in ("slurm.memory", "'lots'", "slurm.walltime", "[D-]HH:MM", "slurm.processes", "slurm.partition"):
        assert needle in msg, (needle, msg)
    bad.write_text("local:\n  n: 2\n")
    with pytest.raises(D.SchedulerError, match="no 'slurm' section"):
        D.load_slurm_settings(bad)
    with pytest.raises(D.SchedulerError, match="does not exist"):
        D.load_slurm_settings(tmp_path / "missing.yaml")


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


def test_each_local_worker_owns_one_gpu():
    from distributed import Client

    assert D.gpu_worker_env(3, 2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"},
                                      {"CUDA_VISIBLE_DEVICES": "0"}]
    with D.local_cluster(2, gpus=2) as cluster, Client(cluster) as c:
        seen = c.run(_visible_devices)
    assert sorted(seen.values()) == ["0", "1"]


def test_default_scheduler_uses_local_workers_only_with_cores_and_work(monkeypatch):
    monkeypatch.setattr(D, "available_cores", lambda: 4)
    assert D.default_scheduler(8) == "local" and D.default_scheduler(1) == "serial"
    monkeypatch.setattr(D, "available_cores", lambda: 1)
    assert D.default_scheduler(8) == "serial"


# ---------------------------------------------------------------------------------------------------- analysis
def test_checkpoint_analysis_fanned_out_equals_serial(client, tmp_path):
    import shutil

    from kpflow.tracking.analyze import analyze_run, measure_step

    cfg = validate_config({**TINY, "out": str(tmp_path / "a"), "train": {**TINY["train"], "checkpoint_every": 2}})
    run = run_pipeline(cfg, progress=False, analyze=False)
    twin = tmp_path / "b" / run.name
    shutil.copytree(run, twin)
    with pytest.raises(RuntimeError, match="measure the first checkpoint"):
        measure_step(twin, 4)
    with open(analyze_run(run, progress=False)) as f:
        serial = list(csv.DictReader(f))
    with open(D.analyze_checkpoints(twin, client=client, progress=False)) as f:
        fanned = list(csv.DictReader(f))
    assert len(serial) > 30 and [(r["step"], r["metric"], r["method"]) for r in fanned] == [
        (r["step"], r["metric"], r["method"]) for r in serial]
    for a, b in zip(fanned, serial, strict=True):  # same numbers (the initial NTK rebuilt on a worker: ~1e-13)
        assert float(a["value"]) == pytest.approx(float(b["value"]), rel=1e-9, abs=1e-12), (a, b)
    assert sorted(p.name for p in (twin / "analysis").glob("*.json")) == [
        "step_000000.json", "step_000002.json", "step_000004.json"]
