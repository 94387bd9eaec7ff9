"""Ingestion program: load a participant's code submission and run it on the hidden inputs.

This file is *standalone* (standard library, numpy, and Pillow / scipy for the image / NetCDF
challenges) so it is copied verbatim into a Codabench bundle as ``ingestion_program/ingestion.py``.
Codabench-style call::

    python3 ingestion.py INPUT_DIR OUTPUT_DIR PROGRAM_DIR SUBMISSION_DIR --challenge NAME

The submission folder holds ``model.py`` defining ``class Model`` with ``load()`` and ``predict(...)``.
The program writes ``OUTPUT_DIR/predictions.csv`` and ``OUTPUT_DIR/status.json`` (in place: kpflow's
runner binds exactly these two files writable into its sandbox).

This program contains no security mechanism: it runs in the same process as the submission, so
everything it writes is as untrusted as the submission itself. The isolation comes from outside —
kpflow's runner starts it inside a bubblewrap sandbox (``kpflow.challenges.isolation``), Codabench
inside its compute worker's container — and the trusted side re-validates the predictions when it
scores them.
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


class SubmissionError(RuntimeError):
    """The submission misbehaved (bad output); the message says how."""


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
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


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
    challenge = None
    if "--challenge" in args:
        i = args.index("--challenge")
        if i + 1 >= len(args):
            raise SystemExit("--challenge needs a value")
        challenge = args[i + 1]
        del args[i:i + 2]
    if len(args) != 4 or challenge is None:
        raise SystemExit("usage: ingestion.py INPUT_DIR OUTPUT_DIR PROGRAM_DIR SUBMISSION_DIR --challenge NAME")
    return args, challenge


def main(argv=None) -> int:
    (input_dir, output_dir, _program_dir, submission_dir), challenge = _parse(sys.argv[1:] if argv is None else argv)
    if challenge not in INGESTERS:
        raise SystemExit(f"unknown challenge {challenge!r}; valid: {sorted(INGESTERS)}")
    os.makedirs(output_dir, exist_ok=True)
    sys.dont_write_bytecode = True
    start = time.time()
    status = {"ok": False, "challenge": challenge}
    try:
        os.chdir(submission_dir)
        model = load_model_class(submission_dir)
        model.load()
        status["n_predictions"] = INGESTERS[challenge](model, input_dir, output_dir)
        status["ok"] = True
    except MemoryError:
        status["error"] = "MemoryError: the submission exceeded its memory limit"
    except SubmissionError as err:
        status["error"] = f"malformed submission: {err}"
    except BaseException as err:  # the submission's own crash, reported with its last frames
        status["error"] = f"submission crashed: {type(err).__name__}: {err}"
        status["traceback"] = traceback.format_exc(limit=-3)[-2000:]
    status["seconds"] = round(time.time() - start, 3)
    with open(os.path.join(output_dir, STATUS_FILE), "w") as handle:
        json.dump(status, handle, indent=2)
    return 0 if status["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
