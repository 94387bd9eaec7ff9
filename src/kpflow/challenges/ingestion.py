"""Ingestion program: load a participant's code submission and run it on the hidden inputs.

This file is *standalone* (standard library, numpy, and Pillow / scipy for the image / NetCDF
challenges) so it is copied verbatim into a Codabench bundle as ``ingestion_program/ingestion.py``.
Codabench-style call::

    python3 ingestion.py INPUT_DIR OUTPUT_DIR PROGRAM_DIR SUBMISSION_DIR --challenge NAME \
        [--deny PATH ...] [--allow-write PATH ...]

The submission folder holds ``model.py`` defining ``class Model`` with ``load()`` and ``predict(...)``.
The program writes ``OUTPUT_DIR/predictions.csv`` and ``OUTPUT_DIR/status.json``.

Containment inside the process, when ``--deny`` / ``--allow-write`` are given (kpflow's runner gives
them and adds a wall-clock timeout, a memory limit, a fresh sandbox folder and a minimal
environment; on Codabench the container does this job): a Python audit hook (PEP 578) refuses to open or list
anything under a ``--deny`` root (the challenge folder holding the reference labels) and refuses
writes, renames and deletions outside the ``--allow-write`` roots (the output and scratch folders).
Attempts are recorded and make the run fail even if the submission catches the error. The hook sees
file access through Python (``open``, ``os.open``, ``numpy.load``, ...); code in C extensions that
calls the C library directly is not seen, which is why the reference labels are also never copied
into the sandbox and their path is never passed to the submission.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
import time
import traceback

PREDICTIONS_FILE = "predictions.csv"
STATUS_FILE = "status.json"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SubmissionError(RuntimeError):
    """The submission misbehaved (bad output, forbidden access); the message says how."""


# ----------------------------------------------------------------------------- containment
class FileGuard:
    """Audit hook that denies reads under ``deny`` roots and writes outside ``allow_write`` roots."""

    def __init__(self, deny, allow_write):
        self.deny = [os.path.realpath(p) for p in deny]
        self.allow_write = [os.path.realpath(p) for p in allow_write] + ["/dev/null"]
        self.violations: list[str] = []
        self.active = False

    @staticmethod
    def _under(path, roots):
        return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    def _resolve(self, path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        return os.path.realpath(os.fspath(path))

    def _refuse(self, message):
        self.violations.append(message)
        raise PermissionError(f"kpflow sandbox: {message}")

    #: Audit events that start another program, which would run outside this hook.
    SPAWN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
                    "pty.spawn")

    def __call__(self, event, args):
        if not self.active:
            return
        if event in self.SPAWN_EVENTS:
            self._refuse(f"starting another program ({event}) is not allowed in a submission")
        if event == "open":
            path = self._resolve(args[0])
            if path is None:
                return
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if self._under(path, self.deny):
                self._refuse(f"read of forbidden path {path} (the reference data is off limits)")
            if writes and not self._under(path, self.allow_write):
                self._refuse(f"write to {path} outside the output folder")
        elif event in ("os.listdir", "os.scandir"):
            path = self._resolve(args[0] if args and args[0] is not None else ".")
            if path is not None and self._under(path, self.deny):
                self._refuse(f"listing of forbidden folder {path}")
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.truncate",
                       "shutil.rmtree", "os.symlink", "os.link"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            for raw in paths:
                path = self._resolve(raw)
                if path is not None and not self._under(path, self.allow_write):
                    self._refuse(f"{event} on {path} outside the output folder")


# ----------------------------------------------------------------------------- submission
def load_model_class(submission_dir: str):
    path = os.path.join(submission_dir, "model.py")
    if not os.path.isfile(path):
        raise SubmissionError(f"submission has no model.py at its top level (looked in {submission_dir})")
    sys.path.insert(0, submission_dir)
    spec = importlib.util.spec_from_file_location("model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "Model"):
        raise SubmissionError("model.py does not define a class named Model")
    model = module.Model()
    for method in ("load", "predict"):
        if not callable(getattr(model, method, None)):
            raise SubmissionError(f"Model has no {method}() method")
    return model


def _as_float_list(values, expected: int, what: str) -> list[float]:
    try:
        import numpy as np

        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except Exception as err:
        raise SubmissionError(f"{what} returned {type(values).__name__} that is not numeric: {err}") from None
    if arr.size != expected:
        raise SubmissionError(f"{what} returned {arr.size} values; expected {expected}")
    bad = [i for i, x in enumerate(arr.tolist()) if not math.isfinite(x)]
    if bad:
        raise SubmissionError(f"{what} returned non-finite values at positions {bad[:5]}")
    return arr.tolist()


def _write_csv(path, header, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def ingest_gw(model, input_dir, output_dir):
    import numpy as np

    with np.load(os.path.join(input_dir, "data.npz"), allow_pickle=False) as archive:
        data, ids = archive["data"].astype(np.float32), archive["ids"]
    std = data.std(axis=-1, keepdims=True)
    x = np.ascontiguousarray(np.swapaxes(data / np.where(std > 0, std, 1.0), 1, 2))
    scores = _as_float_list(model.predict(x), len(ids), "predict(X)")
    _write_csv(os.path.join(output_dir, PREDICTIONS_FILE), ["id", "score"],
               [(str(i), repr(s)) for i, s in zip(ids.tolist(), scores, strict=True)])
    return len(ids)


def ingest_butterfly(model, input_dir, output_dir):
    from PIL import Image

    folder = os.path.join(input_dir, "images")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    rows = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert("RGB")
            score = _as_float_list(model.predict(image), 1, f"predict(image {name})")[0]
        rows.append((name, repr(score)))
    _write_csv(os.path.join(output_dir, PREDICTIONS_FILE), ["filename", "score"], rows)
    return len(rows)


def _read_sla(path):
    import numpy as np
    from scipy.io import netcdf_file

    with netcdf_file(path, "r", mmap=False, maskandscale=False) as handle:
        var = handle.variables["sla"]
        raw = np.array(var.data)
        sla = raw.astype(np.float32) * np.float32(getattr(var, "scale_factor", 1.0))
        fill = getattr(var, "_FillValue", None)
        if fill is not None:
            sla[raw == fill] = np.nan
        times = np.array(handle.variables["time"].data, dtype=np.float64)
    return sla, times


def ingest_sealevel(model, input_dir, output_dir):
    import datetime as dt

    with open(os.path.join(input_dir, "stations.csv"), newline="") as handle:
        stations = [row["name"] for row in csv.DictReader(handle)]
    folder = os.path.join(input_dir, "maps")
    rows = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".nc")):
        sla, times = _read_sla(os.path.join(folder, name))
        for k in range(sla.shape[0]):
            day = (dt.date(1950, 1, 1) + dt.timedelta(days=float(times[k]))).isoformat()
            flags = _as_float_list(model.predict(sla[k].copy()), len(stations), f"predict(sla of {day})")
            if any(f not in (0.0, 1.0) for f in flags):
                raise SubmissionError(f"predict(sla of {day}) returned {flags}; flags must be 0 or 1")
            rows.append((day, *(int(f) for f in flags)))
    _write_csv(os.path.join(output_dir, PREDICTIONS_FILE), ["date", *stations], rows)
    return len(rows)


INGESTERS = {"gw": ingest_gw, "butterfly": ingest_butterfly, "sealevel": ingest_sealevel}


def _parse(argv):
    args = list(argv)
    options = {"--challenge": [], "--deny": [], "--allow-write": []}
    positional = []
    while args:
        a = args.pop(0)
        if a in options:
            if not args:
                raise SystemExit(f"{a} needs a value")
            options[a].append(args.pop(0))
        else:
            positional.append(a)
    if len(positional) != 4 or len(options["--challenge"]) != 1:
        raise SystemExit("usage: ingestion.py INPUT_DIR OUTPUT_DIR PROGRAM_DIR SUBMISSION_DIR --challenge NAME "
                         "[--deny PATH] [--allow-write PATH]")
    return positional, options["--challenge"][0], options["--deny"], options["--allow-write"]


def main(argv=None) -> int:
    (input_dir, output_dir, _program_dir, submission_dir), challenge, deny, allow = _parse(
        sys.argv[1:] if argv is None else argv)
    if challenge not in INGESTERS:
        raise SystemExit(f"unknown challenge {challenge!r}; valid: {sorted(INGESTERS)}")
    os.makedirs(output_dir, exist_ok=True)
    status_path = os.path.join(output_dir, STATUS_FILE)
    guard = FileGuard(deny, [output_dir, *allow])
    if deny or allow:  # kpflow's sandbox; on Codabench the container isolates the submission instead
        sys.addaudithook(guard)
    sys.dont_write_bytecode = True
    start = time.time()
    status = {"ok": False, "challenge": challenge}
    try:
        guard.active = True
        os.chdir(submission_dir)
        model = load_model_class(submission_dir)
        model.load()
        status["n_predictions"] = INGESTERS[challenge](model, input_dir, output_dir)
        status["ok"] = not guard.violations
        if guard.violations:
            status["error"] = "forbidden file access: " + "; ".join(guard.violations[:3])
    except MemoryError:
        status["error"] = "MemoryError: the submission exceeded its memory limit"
    except SubmissionError as err:
        status["error"] = f"malformed submission: {err}"
    except BaseException as err:  # the submission's own crash, reported with its last frames
        trace = traceback.format_exc(limit=-3)
        prefix = "forbidden file access: " + "; ".join(guard.violations[:3]) + ". " if guard.violations else ""
        status["error"] = f"{prefix}submission crashed: {type(err).__name__}: {err}"
        status["traceback"] = trace[-2000:]
    finally:
        guard.active = False
    status["seconds"] = round(time.time() - start, 3)
    status["violations"] = guard.violations
    tmp = status_path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(status, handle, indent=2)
    os.replace(tmp, status_path)
    return 0 if status["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
