"""Run a code submission against a made challenge: sandbox, ingestion subprocess, scoring, leaderboard.

Every failure mode of a submission — crash, hang, memory blow-up, forbidden file access, malformed
output — becomes a *failed* leaderboard entry with a clear message; the leaderboard file itself is
only ever replaced atomically, under a lock.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from kpflow.challenges import ingestion, scoring
from kpflow.challenges.common import PHASES, atomic_write_json, check_challenge_folder

LEADERBOARD = "leaderboard.json"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MEMORY_GB = 8.0


# ----------------------------------------------------------------------------- submission files
def submission_digest(folder: Path) -> str:
    """sha256 over the submission's files (relative paths and contents), for identification."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def unpack_submission(submission: Path, into: Path) -> Path:
    """Copy a submission folder, or safely extract a zip, to ``into``; return the folder with model.py."""
    submission = Path(submission)
    if submission.is_dir():
        shutil.copytree(submission, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif submission.is_file() and zipfile.is_zipfile(submission):
        into.mkdir(parents=True)
        with zipfile.ZipFile(submission) as archive:
            for member in archive.namelist():
                target = (into / member).resolve()
                if not str(target).startswith(str(into.resolve()) + os.sep) and target != into.resolve():
                    raise ValueError(f"zip member {member!r} escapes the submission folder")
            archive.extractall(into)
    else:
        raise FileNotFoundError(f"submission {submission} is neither a folder nor a zip file")
    if not (into / "model.py").is_file():  # tolerate a zip of a folder: one top-level dir holding model.py
        inner = [p for p in into.iterdir() if p.is_dir() and (p / "model.py").is_file()]
        if len(inner) == 1:
            return inner[0]
    return into


# ----------------------------------------------------------------------------- leaderboard
@contextmanager
def _locked(path: Path):
    lock = open(str(path) + ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def read_leaderboard(challenge_dir: Path) -> list[dict]:
    path = Path(challenge_dir) / LEADERBOARD
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a list of entries; it may have been edited by hand")
    return entries


def record_entry(challenge_dir: Path, entry: dict) -> None:
    """Append ``entry`` to the leaderboard (lock, read, append, atomic replace)."""
    path = Path(challenge_dir) / LEADERBOARD
    with _locked(path):
        entries = read_leaderboard(challenge_dir)
        entries.append(entry)
        atomic_write_json(path, entries)


def ranked(entries: list[dict], primary: str, phase: str | None = None) -> list[dict]:
    """Entries of ``phase`` (all if None): successful ones by ``primary`` descending, failed ones last."""
    chosen = [e for e in entries if phase is None or e.get("phase") == phase]
    ok = sorted((e for e in chosen if e.get("status") == "ok"), key=lambda e: -e["scores"][primary])
    return ok + [e for e in chosen if e.get("status") != "ok"]


def format_leaderboard(entries: list[dict], keys: list[str]) -> str:
    """A plain-text table of ranked entries."""
    header = ["rank", "submission", "phase", "status", *keys]
    rows = []
    for k, e in enumerate(entries, 1):
        scores = e.get("scores") or {}
        cells = [f"{scores[key]:.4f}" if key in scores else "-" for key in keys]
        rows.append([str(k) if e.get("status") == "ok" else "-", e["submission"], e["phase"],
                     e["status"] if e["status"] == "ok" else "FAILED: " + e.get("error", "")[:70], *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])


# ----------------------------------------------------------------------------- running
def _limits(memory_bytes: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def _environment(scratch: Path, threads: int) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
    return {**keep, "HOME": str(scratch), "TMPDIR": str(scratch), "MPLCONFIGDIR": str(scratch),
            "XDG_CACHE_HOME": str(scratch), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def run_submission(challenge_dir: Path, submission: Path, phase: str = "val", name: str | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S, memory_gb: float = DEFAULT_MEMORY_GB,
                   threads: int = 2, record: bool = True) -> dict:
    """Ingest ``submission`` on ``phase`` inputs in a sandboxed subprocess, score it, record the entry.

    Returns the leaderboard entry: ``status`` 'ok' with ``scores``, or 'failed' with ``error``.
    """
    challenge_dir = Path(challenge_dir).resolve()
    manifest = check_challenge_folder(challenge_dir)
    challenge = manifest["name"]
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    submission = Path(submission)
    entry = {"submission": name or submission.stem, "phase": phase, "challenge": challenge,
             "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "status": "failed", "scores": None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kpflow-sandbox-") as tmp:
        sandbox = Path(tmp)
        inputs, output, scratch = sandbox / "input", sandbox / "output", sandbox / "scratch"
        shutil.copytree(challenge_dir / "input_data" / phase, inputs)
        output.mkdir()
        scratch.mkdir()
        try:
            code = unpack_submission(submission, sandbox / "submission")
            entry["submission_sha256"] = submission_digest(code)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            entry["error"] = f"unreadable submission: {err}"
            return _finish(challenge_dir, entry, start, record)
        command = [sys.executable, ingestion.__file__, str(inputs), str(output), str(Path(ingestion.__file__).parent),
                   str(code), "--challenge", challenge, "--deny", str(challenge_dir), "--allow-write", str(scratch)]
        stdout, stderr = sandbox / "stdout.txt", sandbox / "stderr.txt"
        with open(stdout, "w") as out_handle, open(stderr, "w") as err_handle:
            process = subprocess.Popen(command, cwd=str(scratch), env=_environment(scratch, threads),
                                       stdout=out_handle, stderr=err_handle, stdin=subprocess.DEVNULL,
                                       preexec_fn=_limits(int(memory_gb * 2 ** 30)), start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
        entry["log_tail"] = _tail(stderr, 1500)
        status_path = output / ingestion.STATUS_FILE
        status = json.loads(status_path.read_text()) if status_path.is_file() else None
        if returncode is None:
            entry["error"] = f"timed out after {timeout_s:g} s (the submission hung or was too slow)"
        elif status is None:
            how = (f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}")
            hint = " (memory limit exceeded?)" if returncode in (-9, 137) else ""
            entry["error"] = f"ingestion {how}{hint} without a status report; stderr: {_tail(stderr, 300)!r}"
        elif not status.get("ok"):
            entry["error"] = status.get("error", "ingestion failed")
        else:
            try:
                entry["scores"] = scoring.score_folder(challenge, str(output),
                                                       str(challenge_dir / "reference_data" / phase))
                entry["status"] = "ok"
            except scoring.ScoringError as err:
                entry["error"] = f"malformed predictions: {err}"
        if record:
            (challenge_dir / "runs").mkdir(exist_ok=True)
            stamp = entry["timestamp"].replace(":", "").replace("+0000", "Z")
            prefix = f"{stamp}-{entry['submission']}-{phase}-"
            run_dir = Path(tempfile.mkdtemp(dir=challenge_dir / "runs", prefix=prefix))
            for f in (output / ingestion.PREDICTIONS_FILE, stdout, stderr, status_path):
                if f.is_file():
                    shutil.copy2(f, run_dir / f.name)
            entry["run_folder"] = str(run_dir.relative_to(challenge_dir))
    return _finish(challenge_dir, entry, start, record)


def _finish(challenge_dir, entry, start, record):
    entry["seconds"] = round(time.perf_counter() - start, 2)
    if entry["status"] == "ok" and "run_folder" in entry:
        scoring.write_json_atomic(str(challenge_dir / entry["run_folder"] / "scores.json"), entry["scores"])
    if record:
        record_entry(challenge_dir, entry)
    return entry


def score_predictions(challenge_dir: Path, predictions: Path, phase: str = "val") -> dict:
    """Score a predictions file directly (no ingestion) against ``phase``'s reference labels."""
    challenge_dir = Path(challenge_dir)
    manifest = check_challenge_folder(challenge_dir)
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    predictions = Path(predictions)
    reference = str(challenge_dir / "reference_data" / phase)
    if predictions.is_dir():
        return scoring.score_folder(manifest["name"], str(predictions), reference)
    with tempfile.TemporaryDirectory(prefix="kpflow-score-") as tmp:
        if predictions.is_file():
            shutil.copy2(predictions, Path(tmp) / scoring.PREDICTIONS_FILE)
        return scoring.score_folder(manifest["name"], tmp, reference)
