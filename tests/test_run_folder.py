"""Run folders from a newcomer's point of view (issue 14, "Run and resume"): extending a finished run, naming
the keys that differ, one run per folder (lock), the message on Ctrl-C, empty config files, unusable --out
folders, a full disk, checkpoint file modes and the sidecar's checksum. Each test says which defect it pins."""

from __future__ import annotations

import errno
import json
import os
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
from kpflow.experiments.pipeline import RunFolderError, prepare_run_dir, run_lock
from kpflow.training import CorruptCheckpointError, list_checkpoints, load_checkpoint, save_checkpoint, validate_config
from kpflow.training.checkpoints import CheckpointWriteError, CorruptCheckpointWarning, verify_checkpoint

TINY = {
    "name": "tiny", "seed": 0,
    "task": {"name": "flipflop", "params": {"seq_len": 6, "pulse_prob": 0.3}},
    "model": {"name": "gru", "hidden": 4},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 6, "batch_size": 4, "checkpoint_every": 3},
    "track": {"eval_batch": 2, "probes": 4},
}
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def config_file(tmp_path: Path, out: Path | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out": str(out or tmp_path / "runs")}))
    return path


def train_only(cfg, *extra):
    return invoke("run", cfg, "--no-analyze", "-q", "--threads", "1", *extra)


def weights(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "checkpoints" / f"step_{step:06d}.safetensors")).items()
            if k.startswith("model.")}


# ------------------------------------------------------------------------------------- extend / differ
@pytest.mark.slow
def test_more_steps_extend_a_finished_run_to_the_weights_of_a_longer_one(tmp_path):
    # defect: re-running a finished run with more --steps was refused as "a different configuration"
    cfg = config_file(tmp_path)
    assert train_only(cfg).exit_code == 0
    r = train_only(cfg, "--steps", 9)
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tiny"
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [0, 3, 6, 9]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 9
    ref = config_file(tmp_path / "ref")
    assert train_only(ref, "--steps", 9).exit_code == 0
    a, b = weights(run, 9), weights(tmp_path / "ref" / "runs" / "tiny", 9)
    assert a and all(torch.equal(a[k], b[k]) for k in b)


def test_a_different_configuration_is_refused_naming_each_key_old_and_new(tmp_path):
    # defect: the refusal did not say which key differed
    cfg = config_file(tmp_path)
    assert train_only(cfg).exit_code == 0
    r = train_only(cfg, "--lr", 0.02, "--batch-size", 5)
    assert r.exit_code == 2
    assert "optimizer.lr: 0.01 → 0.02" in r.output and "train.batch_size: 4 → 5" in r.output
    assert "--fresh" in r.output
    r = train_only(cfg, "--steps", 4)  # shortening a run that trained to step 6
    assert r.exit_code == 2 and "trained to step 6" in r.output and "--steps 6 or more" in r.output


# ------------------------------------------------------------------------------------------------ lock
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    # defect: two runs writing the same run folder at once were not prevented
    run = tmp_path / "runs" / "tiny"
    with run_lock(run):
        with pytest.raises(RunFolderError, match=f"in use by another run \\(kpflow pid {os.getpid()}"):
            with run_lock(run):
                pass
        r = train_only(config_file(tmp_path))
        assert r.exit_code == 2 and "is in use by another run" in r.output
    assert not (run / "checkpoints").exists()  # the refused run wrote nothing


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    # defect (lock, stale case): a lock left by a dead process must not block the folder forever
    run = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
         "f = open(os.path.join(sys.argv[1], '.lock'), 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write('kpflow pid %d' % os.getpid()); f.flush(); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"kpflow pid {holder.pid}"):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert f"pid {holder.pid}" in (run / ".lock").read_text()  # the stale lock file is still there
    r = train_only(config_file(tmp_path))
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    # defect: Ctrl-C exited with status 130 and no message
    cfg = config_file(tmp_path)
    run = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "kpflow", "run", str(cfg), "--steps", "100000", "--checkpoint-every", "3",
           "--no-analyze", "-q", "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    target = run / "checkpoints" / "step_000003.json"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    done = list_checkpoints(run / "checkpoints")[-1].step
    assert f"last complete checkpoint of {run} is step {done} of 100000" in err
    assert "run the same command again to resume" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ config
def test_an_empty_config_file_means_the_printed_defaults(tmp_path):
    # defect: an empty config file started a 1000-step run while --print-defaults said 600 steps
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    printed = invoke("run", "--print-defaults")
    from_empty = invoke("run", empty, "--print-defaults")
    assert printed.exit_code == from_empty.exit_code == 0
    assert from_empty.output == printed.output
    assert yaml.safe_load(printed.output)["train"]["steps"] == 600


# ------------------------------------------------------------------------------------------------ --out
def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    # defect: --out pointing at a file ended in a raw NotADirectoryError traceback
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    r = train_only(config_file(tmp_path), "--out", blocker)
    assert r.exit_code == 2
    assert f"{blocker} is a file, not a folder" in r.output and "--out" in r.output
    assert blocker.read_text() == "x"


def test_a_read_only_out_folder_is_a_clear_error(tmp_path, monkeypatch):
    # defect: a read-only --out ended in a raw PermissionError (simulated: the tests may run as root)
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    cfg = validate_config(TINY, out=str(tmp_path / "ro"))
    with pytest.raises(RunFolderError, match="cannot create the run folder .*: permission denied; choose another"):
        prepare_run_dir(cfg)


@pytest.mark.parametrize("failing", ["tensors", "sidecar"])
def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, failing):
    # defect: a full disk ended in "SafetensorError ... No space left"; nothing may be half-written
    import kpflow.training.checkpoints as ck

    if failing == "tensors":
        def full(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })')
        monkeypatch.setattr(ck, "save_file", full)
    else:
        def full(path, text):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ck, "atomic_write_text", full)
    folder = tmp_path / "checkpoints"
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing checkpoint"):
        save_checkpoint(folder, 3, torch.nn.Linear(2, 2))
    assert sorted(p.name for p in folder.iterdir()) == []
    r = train_only(config_file(tmp_path))
    assert r.exit_code == 2 and "no space left on device" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------ files
def test_checkpoint_tensor_files_get_the_umask_mode(tmp_path):
    # defect: .safetensors files were written 0600 under umask 022 (the sidecars were 0644)
    mask = os.umask(0o022)
    try:
        info = save_checkpoint(tmp_path, 0, torch.nn.Linear(2, 2))
    finally:
        os.umask(mask)
    assert info.tensors.stat().st_mode & 0o777 == 0o644
    assert info.sidecar.stat().st_mode & 0o777 == 0o644


def test_editing_the_sidecar_is_detected(tmp_path):
    # defect: the checksum covered only the tensor file; editing the sidecar's losses was accepted
    model = torch.nn.Linear(2, 2)
    info = save_checkpoint(tmp_path, 4, model, loss=0.5, losses=[0.6, 0.4])
    assert verify_checkpoint(info.sidecar).meta["losses"] == [0.6, 0.4]
    record = json.loads(info.sidecar.read_text())
    record["losses"] = [0.06, 0.04]
    info.sidecar.write_text(json.dumps(record, indent=1))
    with pytest.raises(CorruptCheckpointError, match="modified after it was written"):
        load_checkpoint(info.sidecar, model)
    with pytest.warns(CorruptCheckpointWarning, match="step_000004.json"):
        assert list_checkpoints(tmp_path) == []


# ------------------------------------------------------------------------------------------------ startup
def test_help_does_not_import_torch():
    # defect: `kpflow --help` took seconds on a loaded machine (torch and the studies imported eagerly)
    code = ("import sys\nfrom kpflow.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-500:] + out.stderr[-2000:]
    assert "run " in out.stdout and "report" in out.stdout


def test_write_csv_quotes_values_keeps_columns_and_leaves_no_temporary(tmp_path):
    import csv

    from kpflow.files import write_csv

    path = tmp_path / "sub" / "t.csv"
    write_csv(path, [("a,b", 1.5, 'say "hi"'), ("line\nbreak", 2, "")], ["name", "x", "note"])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["name", "x", "note"], ["a,b", "1.5", 'say "hi"'], ["line\nbreak", "2", ""]]
    write_csv(path, [{"a": 1, "b": 2}, {"c": 3, "a": 4}])  # dict rows: the union of keys, first-seen order
    assert path.read_text() == "a,b,c\n1,2,\n4,,3\n"
    write_csv(path, [{"a": 1, "b": 2, "z": 9}], ["b", "a"])  # given columns: their order, other keys left out
    assert path.read_text() == "b,a\n2,1\n"
    write_csv(path, [(1, 2)])  # no header
    assert path.read_text() == "1,2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.csv"]
