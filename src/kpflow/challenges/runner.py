"""Run a code submission against a made challenge: isolated ingestion, separate trusted scoring, leaderboard.

The three steps, as on Codabench:

1. **Ingestion** (untrusted): ``ingestion.py`` and the submission run together inside an OS-level
   sandbox (:mod:`kpflow.challenges.isolation`: bubblewrap namespaces, rlimits, cgroups). The sandbox
   sees the submission's code, the phase's inputs and the Python environment, all read-only, plus a
   size-capped scratch tmpfs; it can write exactly two pre-created files, the challenge's predictions
   file (``ingestion.PREDICTIONS_FILES``) and ``status.json``. No reference data, no challenge folder,
   no other process, no network.
2. **Scoring** (trusted): the parent reads the predictions file without following links and with a
   size cap, copies it into a fresh folder, and runs the scoring program as a separate process, which
   validates ids and values and writes ``scores.json``.
3. **Recording** (trusted): only this parent writes the run folder and the leaderboard (under a lock,
   atomically); entries carry the submission's sha256. Everything the submission produced (status,
   logs) is treated as data: cut, stripped of control characters, never interpreted.

Every failure mode — crash, hang, memory blow-up, runaway log, malformed output — becomes a *failed*
leaderboard entry with a clear message. Where no isolation is available, the runner refuses to run
a submission unless it is declared trusted (``trusted=True``, ``--trusted``), and says so.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from kpflow.challenges import ingestion, isolation, scoring
from kpflow.challenges.common import (
    PHASES,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_challenge_folder,
)

LEADERBOARD = "leaderboard.json"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MEMORY_GB = 8.0
MAX_SUBMISSION_BYTES = 4 * 2 ** 30
MAX_STATUS_BYTES = 1 << 20
SANDBOX_INPUT, SANDBOX_OUTPUT = "/app/input_data", "/app/output"
SANDBOX_PROGRAM, SANDBOX_SUBMISSION = "/app/program", "/app/ingested_program"


# ----------------------------------------------------------------------------- submission files
def _refuse_links(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise ValueError(f"submission contains a symbolic link {path.relative_to(folder)}; "
                                 "a submission must hold plain files and folders only")
            if name in files and not stat.S_ISREG(path.lstat().st_mode):
                raise ValueError(f"submission contains {path.relative_to(folder)}, which is not a regular file")


def submission_digest(folder: Path) -> str:
    """sha256 over the submission's files (relative paths and contents), for identification."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def unpack_submission(submission: Path, into: Path) -> Path:
    """Copy a submission folder, or safely extract a zip, to ``into``; return the folder with model.py.

    Raises:
        FileNotFoundError: ``submission`` is neither a folder nor a zip file.
        ValueError: it holds a symbolic link or special file, a zip member escapes the folder or is a
            link, or it unpacks to more than ``MAX_SUBMISSION_BYTES``.
    """
    submission = Path(submission)
    if submission.is_dir():
        _refuse_links(submission)
        shutil.copytree(submission, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif submission.is_file() and zipfile.is_zipfile(submission):
        into.mkdir(parents=True)
        with zipfile.ZipFile(submission) as archive:
            members = archive.infolist()
            for member in members:
                target = (into / member.filename).resolve()
                if not str(target).startswith(str(into.resolve()) + os.sep) and target != into.resolve():
                    raise ValueError(f"zip member {member.filename!r} escapes the submission folder")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise ValueError(f"zip member {member.filename!r} is a symbolic link; only plain files are allowed")
            total = sum(m.file_size for m in members)
            if total > MAX_SUBMISSION_BYTES:
                raise ValueError(f"the zip unpacks to {total} bytes; the limit is {MAX_SUBMISSION_BYTES}")
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
    """A plain-text table of ranked entries (every cell one line, control characters removed)."""
    one = isolation.clean_text
    header = ["rank", "submission", "phase", "status", *keys]
    rows = []
    for k, e in enumerate(entries, 1):
        scores = e.get("scores") or {}
        cells = [f"{float(scores[key]):.4f}" if key in scores else "-" for key in keys]
        status = "ok" if e.get("status") == "ok" else "FAILED: " + one(str(e.get("error", "")), 70, keep="head")
        rows.append([str(k) if e.get("status") == "ok" else "-", one(str(e.get("submission", "")), 40),
                     one(str(e.get("phase", "")), 10), status, *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])


# ----------------------------------------------------------------------------- running
def _environment(home: str, threads: int, pythonpath: str, path: str) -> dict[str, str]:
    return {"PATH": path, "HOME": home, "TMPDIR": home, "MPLCONFIGDIR": home, "XDG_CACHE_HOME": home,
            "LANG": "C.UTF-8", "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def _check_not_exposed(challenge_dir: Path) -> None:
    """The challenge folder must not lie inside (or contain) a folder the sandbox sees."""
    for mount in [Path("/usr"), *isolation.python_mounts()]:
        if mount == challenge_dir or mount in challenge_dir.parents or challenge_dir in mount.parents:
            raise ValueError(f"the challenge folder {challenge_dir} overlaps {mount}, which the sandbox shows "
                             "read-only to the submission; move the challenge folder elsewhere")


def _signal_hint(code: int) -> str:
    return {-9: " (memory or CPU-time limit exceeded?)", -24: " (CPU-time limit exceeded)",
            -25: " (file-size limit exceeded)"}.get(code, "")


def _ingest(challenge: str, challenge_dir: Path, phase: str, code: Path, output: Path, scratch: Path,
            limits: isolation.Limits, isolated: bool) -> isolation.Outcome:
    """Run the ingestion program on ``code`` — inside the sandbox when ``isolated``."""
    root = str(isolation.kpflow_root())
    if isolated:
        mounts = [isolation.Mount(challenge_dir / "input_data" / phase, SANDBOX_INPUT),
                  isolation.Mount(code, SANDBOX_SUBMISSION),
                  isolation.Mount(Path(ingestion.__file__), f"{SANDBOX_PROGRAM}/ingestion.py"),
                  isolation.Mount(output, SANDBOX_OUTPUT)]
        mounts += [isolation.Mount(output / f, f"{SANDBOX_OUTPUT}/{f}", writable=True)
                   for f in (ingestion.PREDICTIONS_FILES[challenge], ingestion.STATUS_FILE)]
        command = [sys.executable, f"{SANDBOX_PROGRAM}/ingestion.py", SANDBOX_INPUT, SANDBOX_OUTPUT, SANDBOX_PROGRAM,
                   SANDBOX_SUBMISSION, "--challenge", challenge]
        env = _environment(isolation.SCRATCH, limits.threads, root, "/usr/local/bin:/usr/bin:/bin")
        return isolation.run_isolated(command, mounts, env, isolation.SCRATCH, limits)
    command = [sys.executable, ingestion.__file__, str(challenge_dir / "input_data" / phase), str(output),
               str(Path(ingestion.__file__).parent), str(code), "--challenge", challenge]
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = _environment(str(scratch), limits.threads, pythonpath, os.environ.get("PATH", "/usr/bin:/bin"))
    return isolation.run_unisolated(command, env, str(scratch), limits)


def _score(challenge: str, predictions: bytes, reference: Path, work: Path) -> tuple[dict, bytes | None]:
    """Trusted scoring in a separate process: ``scoring.py`` on a copy of the predictions. Returns the
    scores and, for gw, the organisers' binarised ``test.predictions`` the scoring program wrote."""
    res, ref, out = work / "input" / "res", work / "input" / "ref", work / "output"
    res.mkdir(parents=True)
    shutil.copytree(reference, ref)
    atomic_write_bytes(res / ingestion.PREDICTIONS_FILES[challenge], predictions)
    try:
        command = [sys.executable, scoring.__file__, str(work / "input"), str(out), "--challenge", challenge]
        run = subprocess.run(command, capture_output=True, timeout=600, stdin=subprocess.DEVNULL, env={
                                 **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "PYTHONPATH")},
                                 "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        raise scoring.ScoringError("the scoring program timed out after 600 s") from None
    if run.returncode != 0:
        message = isolation.clean_text(run.stderr, 1000, keep="head").removeprefix("scoring failed: ")
        raise scoring.ScoringError(message or f"the scoring program exited with code {run.returncode}")
    scores = json.loads((out / "scores.json").read_text())
    extra = out / scoring.PREDICTION_FILES["gw"][1]
    return {k: float(v) for k, v in scores.items()}, (extra.read_bytes() if challenge == "gw" and extra.is_file()
                                                      else None)


def _isolation_decision(trusted: bool) -> tuple[bool, str | None]:
    """(isolated?, reason isolation is unavailable); raises if unavailable and not trusted."""
    reason = isolation.unavailable_reason()
    if reason is None:
        return True, None
    if not trusted:
        raise isolation.IsolationUnavailable(
            f"refusing to run the submission: no isolation is available ({reason}). Install bubblewrap "
            "(apt-get install bubblewrap) and allow user namespaces, or, only for code you trust, pass "
            "trusted=True (`kpflow challenge run --trusted`) to run it without isolation.")
    return False, reason


def run_submission(challenge_dir: Path, submission: Path, phase: str = "val", name: str | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S, memory_gb: float = DEFAULT_MEMORY_GB,
                   threads: int = 2, record: bool = True, trusted: bool = False,
                   limits: isolation.Limits | None = None) -> dict:
    """Ingest ``submission`` on ``phase`` inputs in an isolated sandbox, score it, record the entry.

    Args:
        challenge_dir: a folder made by ``make_challenge``.
        submission: a folder or zip holding ``model.py`` (``class Model`` with ``load``/``predict``).
        phase: 'val' (Development) or 'test' (Final).
        name: leaderboard name (default: the submission's file name).
        timeout_s, memory_gb, threads: wall-clock limit, memory limit, threads asked of the submission.
        record: write a run folder and a leaderboard entry.
        trusted: where no isolation is available, run the code without it instead of refusing. With
            isolation available the submission is isolated regardless.
        limits: every resource cap at once (overrides ``timeout_s``, ``memory_gb`` and ``threads``).

    Returns:
        The leaderboard entry: ``status`` 'ok' with ``scores``, or 'failed' with ``error``; ``isolation``
        says how the code was run.

    Raises:
        IsolationUnavailable: no isolation here and ``trusted`` is False.
        FileNotFoundError, ValueError: not a challenge folder, a wrong phase, or a challenge folder that the
            sandbox would expose.
    """
    challenge_dir = Path(challenge_dir).resolve()
    manifest = check_challenge_folder(challenge_dir)
    challenge = manifest["name"]
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    limits = limits or isolation.Limits(wall_s=float(timeout_s), memory_bytes=int(memory_gb * 2 ** 30),
                                        threads=int(threads))
    isolated, unavailable = _isolation_decision(trusted)
    if isolated:
        _check_not_exposed(challenge_dir)
    submission = Path(submission)
    label = isolation.clean_text(name or submission.stem, 80)
    entry = {"submission": label, "phase": phase, "challenge": challenge,
             "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "status": "failed", "scores": None,
             "isolation": ("bubblewrap: " + ", ".join(isolation.NAMESPACES) + " namespaces" if isolated else
                           f"NONE: run without isolation because it was declared trusted ({unavailable})")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kpflow-sandbox-") as tmp:
        sandbox = Path(tmp)
        output, scratch = sandbox / "output", sandbox / "scratch"
        output.mkdir()
        scratch.mkdir()
        for f in (ingestion.PREDICTIONS_FILES[challenge], ingestion.STATUS_FILE):
            (output / f).touch()
        try:
            code = unpack_submission(submission, sandbox / "submission")
            entry["submission_sha256"] = submission_digest(code)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            entry["error"] = isolation.clean_text(f"unreadable submission: {err}", 1000)
            return _finish(challenge_dir, entry, start, record)
        outcome = _ingest(challenge, challenge_dir, phase, code, output, scratch, limits, isolated)
        entry["log_tail"] = isolation.clean_text(outcome.stderr, 1500, newlines=True)
        status, predictions = _read_outputs(output, challenge)
        binarised = None
        entry["error"] = _ingestion_error(outcome, status, limits)
        if entry["error"] is None:
            if predictions is None:
                entry["error"] = (f"malformed predictions: {ingestion.PREDICTIONS_FILES[challenge]} is not a readable "
                                  f"regular file of at most {scoring.MAX_FILE_BYTES} bytes")
            else:
                try:
                    entry["scores"], binarised = _score(challenge, predictions,
                                                        challenge_dir / "reference_data" / phase, sandbox / "scoring")
                    entry["status"] = "ok"
                    del entry["error"]
                except scoring.ScoringError as err:
                    entry["error"] = isolation.clean_text(f"malformed predictions: {err}", 1000, keep="head")
        if record:
            entry["run_folder"] = _write_run_folder(challenge_dir, entry, outcome, status, predictions, binarised)
    return _finish(challenge_dir, entry, start, record)


def _read_outputs(output: Path, challenge: str) -> tuple[dict | None, bytes | None]:
    """The status report (a dict, or None) and the predictions bytes (None if unreadable or too large)."""
    try:
        status = json.loads(isolation.read_regular_file(output / ingestion.STATUS_FILE, MAX_STATUS_BYTES))
        status = status if isinstance(status, dict) else None
    except (OSError, ValueError):
        status = None
    try:
        predictions = isolation.read_regular_file(output / ingestion.PREDICTIONS_FILES[challenge],
                                                  scoring.MAX_FILE_BYTES)
    except (OSError, ValueError):
        predictions = None
    return status, predictions


def _ingestion_error(outcome: isolation.Outcome, status: dict | None, limits: isolation.Limits) -> str | None:
    """Why the ingestion failed (one clean line), or None if it reported success and exited cleanly."""
    if outcome.stopped == "time":
        return (f"timed out after {limits.wall_s:g} s (the submission hung or was too slow); every process "
                "of the sandbox was killed")
    if outcome.stopped == "log":
        return (f"wrote more than {limits.log_bytes / 2 ** 20:g} MiB to stdout/stderr (the log limit); the run "
                "was stopped")
    code = outcome.returncode
    if status is None:
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return isolation.clean_text(f"ingestion {how}{_signal_hint(code or 0)} without a status report; "
                                    f"stderr: {isolation.clean_text(outcome.stderr, 300)!r}", 1000)
    if status.get("ok") is not True:
        return isolation.clean_text(str(status.get("error") or "ingestion failed"), 1000, keep="head")
    if code != 0:
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"ingestion reported success but {how}{_signal_hint(code or 0)}"
    return None


def _write_run_folder(challenge_dir: Path, entry: dict, outcome: isolation.Outcome, status: dict | None,
                      predictions: bytes | None, binarised: bytes | None = None) -> str:
    """The parent's record of a run: predictions copy (and, for gw, the organisers' binarised
    ``test.predictions`` made by the trusted scorer), cleaned log tails, status, sandbox facts."""
    runs = challenge_dir / "runs"
    runs.mkdir(exist_ok=True)
    stamp = entry["timestamp"].replace(":", "").replace("+0000", "Z")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", entry["submission"])[:60] or "submission"
    run_dir = Path(tempfile.mkdtemp(dir=runs, prefix=f"{stamp}-{safe}-{entry['phase']}-"))
    if predictions is not None:
        atomic_write_bytes(run_dir / ingestion.PREDICTIONS_FILES[entry["challenge"]], predictions)
    if binarised is not None:
        atomic_write_bytes(run_dir / scoring.PREDICTION_FILES["gw"][1], binarised)
    for name, data in (("stdout.txt", outcome.stdout), ("stderr.txt", outcome.stderr)):
        atomic_write_text(run_dir / name, isolation.clean_text(data, isolation.TAIL_BYTES, newlines=True))
    if status is not None:
        atomic_write_json(run_dir / ingestion.STATUS_FILE,
                          {k: isolation.clean_text(str(v), 4000, newlines=True) for k, v in status.items()})
    atomic_write_json(run_dir / "sandbox.json", {"isolation": entry["isolation"], "limits": outcome.limits,
                                                 "returncode": outcome.returncode, "stopped": outcome.stopped,
                                                 "log_bytes": outcome.log_bytes, "seconds": outcome.seconds})
    return str(run_dir.relative_to(challenge_dir))


def _finish(challenge_dir, entry, start, record):
    entry["seconds"] = round(time.perf_counter() - start, 2)
    if entry["status"] == "ok" and "run_folder" in entry:
        atomic_write_json(challenge_dir / entry["run_folder"] / "scores.json", entry["scores"])
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
        if predictions.is_file():  # a file of an accepted name keeps it; any other is read as the native file
            names = scoring.PREDICTION_FILES[manifest["name"]]
            shutil.copy2(predictions, Path(tmp) / (predictions.name if predictions.name in names else names[0]))
        return scoring.score_folder(manifest["name"], tmp, reference)
