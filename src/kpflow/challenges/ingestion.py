"""Ingestion program: load a participant's code submission and run it on the hidden inputs.

This file is *standalone* (standard library, numpy, and Pillow / scipy for the image / NetCDF
challenges) so it is copied verbatim into a Codabench bundle as ``ingestion_program/ingestion.py``.
Codabench-style call::

    python3 ingestion.py INPUT_DIR OUTPUT_DIR PROGRAM_DIR SUBMISSION_DIR --challenge NAME

The submission folder holds ``model.py`` defining ``class Model`` with ``load()`` and ``predict(...)``.
The program writes the challenge's predictions file (``PREDICTIONS_FILES``: ``predictions.txt`` for the
butterflies, as the organisers' ingestion; ``predictions.csv`` for gw and sea level) and
``OUTPUT_DIR/status.json``, in place: kpflow's runner binds exactly these two files writable into its
sandbox.

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

#: The predictions file each ingestion writes (the same names as ``scoring.PREDICTION_FILES[c][0]``).
PREDICTIONS_FILES = {"gw": "predictions.csv", "butterfly": "predictions.txt", "sealevel": "predictions.csv"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
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
    if not callable(getattr(model, "predict", None)):
        raise SubmissionError("Model has no predict() method")
    return model


def start_model(model) -> None:
    """The organisers' life cycles: ``Model()`` then ``load()`` where the class has one (gw, butterfly);
    the sea-level example defines no ``load`` and is used right after ``Model()``."""
    load = getattr(model, "load", None)
    if load is not None:
        if not callable(load):
            raise SubmissionError("Model.load exists but is not a method")
        load()


def _station_flags(output, stations: list[str], what: str) -> list[float]:
    """12 flags from ``output``: a sequence or array of shape (12,) or (1, 12), or a table (e.g. a pandas
    DataFrame) whose columns name the stations, with spaces or underscores ('Atlantic_City')."""
    columns = getattr(output, "columns", None)
    if columns is not None:
        names = [str(c).replace("_", " ") for c in columns]
        missing = [s for s in stations if s not in names]
        if missing:
            raise SubmissionError(f"{what} returned columns {list(columns)[:14]}; missing stations {missing[:4]}")
        import numpy as np

        values = np.asarray(output, dtype=np.float64).reshape(-1, len(names))
        if values.shape[0] != 1:
            raise SubmissionError(f"{what} returned {values.shape[0]} rows; expected 1")
        output = [values[0, names.index(s)] for s in stations]
    return _as_float_list(output, len(stations), what)


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
    _write_csv(os.path.join(output_dir, PREDICTIONS_FILES["gw"]), ["id", "score"],
               [(str(i), repr(s)) for i, s in zip(ids.tolist(), scores, strict=True)])
    return len(ids)


def ingest_butterfly(model, input_dir, output_dir):
    """The organisers' butterfly ingestion: every image file flat in ``input_dir``, in ``os.listdir`` order,
    through ``predict`` as ``PIL.Image.open`` returns it (no conversion, so ``image.filename`` and
    ``image.format`` are set); ``predictions.txt`` with one ``filename,score`` line per image and no header,
    scores rounded to 4 decimals, as their ingestion writes them. Folders and files that are not images
    are skipped, as theirs skips what it cannot open."""
    from PIL import Image

    rows = []
    for name in os.listdir(input_dir):
        path = os.path.join(input_dir, name)
        if not (name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)):
            continue
        with Image.open(path) as image:
            score = _as_float_list(model.predict(image), 1, f"predict(image {name})")[0]
        rows.append(f"{name},{round(score, 4)!r}\n")
    with open(os.path.join(output_dir, PREDICTIONS_FILES["butterfly"]), "w", newline="") as handle:
        handle.writelines(rows)
    return len(rows)


_HDF5_MAGIC, _NETCDF3_MAGIC = b"\x89HDF\r\n\x1a\n", b"CDF"
_TIME_UNITS = {"day": 1.0, "days": 1.0, "hour": 1 / 24, "hours": 1 / 24, "minute": 1 / 1440, "minutes": 1 / 1440,
               "second": 1 / 86400, "seconds": 1 / 86400}


def _days_since_1950(values, units: str):
    """CF time values with ``units`` ('<unit> since <date>[ time]') as days since 1950-01-01."""
    import datetime as dt

    import numpy as np

    try:
        unit, origin = str(units).split(" since ", 1)
        scale = _TIME_UNITS[unit.strip().lower()]
        origin_date = dt.date.fromisoformat(origin.strip()[:10])
    except (ValueError, KeyError):
        raise ValueError(f"time units {units!r} are not '<days|hours|minutes|seconds> since YYYY-MM-DD'") from None
    return np.asarray(values, dtype=np.float64) * scale + (origin_date - dt.date(1950, 1, 1)).days


def _decode(raw, attrs):
    """CF decoding of a packed variable: ``_FillValue``/``missing_value`` → NaN, then ``raw·scale + offset``."""
    import numpy as np

    raw = np.asarray(raw)
    out = raw.astype(np.float64)
    for key in ("_FillValue", "missing_value"):
        if key in attrs:
            out[raw == np.asarray(attrs[key]).reshape(-1)[0]] = np.nan
    if np.ma.isMaskedArray(raw):
        out[np.ma.getmaskarray(raw)] = np.nan
    out = out * float(np.asarray(attrs.get("scale_factor", 1.0)).reshape(-1)[0])
    out = out + float(np.asarray(attrs.get("add_offset", 0.0)).reshape(-1)[0])
    return out.astype(np.float32)


def read_sla(path):
    """(``sla`` (time, lat, lon) float32 metres, NaN where missing; ``time`` in days since 1950-01-01)
    from a NetCDF3 file (scipy) or a NetCDF4/HDF5 file such as the organisers' DUACS maps (h5netcdf,
    ``pip install h5netcdf``), with CF decoding (fill values, ``scale_factor``, ``add_offset``, time units)."""
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic.startswith(_NETCDF3_MAGIC):
        from scipy.io import netcdf_file

        with netcdf_file(path, "r", mmap=False, maskandscale=False) as handle:
            sla = handle.variables["sla"]
            time = handle.variables["time"]
            attrs = {k: v for k, v in sla._attributes.items()}
            units = time._attributes.get("units", b"days since 1950-01-01")
            return _decode(sla.data, attrs), _days_since_1950(time.data, units.decode() if isinstance(
                units, bytes) else units)
    if magic == _HDF5_MAGIC:
        try:
            import h5netcdf
        except ImportError:
            raise ImportError(f"{path} is NetCDF4/HDF5; reading it needs h5netcdf (pip install h5netcdf)") from None
        with h5netcdf.File(path, "r") as handle:
            if "sla" not in handle.variables or "time" not in handle.variables:
                raise ValueError(f"{path} lacks the variables 'sla' and 'time' (it has {sorted(handle.variables)})")
            sla, time = handle.variables["sla"], handle.variables["time"]
            units = time.attrs.get("units", "days since 1950-01-01")
            return _decode(sla[...], dict(sla.attrs)), _days_since_1950(time[...], units.decode() if isinstance(
                units, bytes) else units)
    raise ValueError(f"{path} is neither NetCDF3 nor NetCDF4/HDF5 (it starts with {magic!r})")


def ingest_sealevel(model, input_dir, output_dir):
    import datetime as dt

    with open(os.path.join(input_dir, "stations.csv"), newline="") as handle:
        stations = [row["name"] for row in csv.DictReader(handle)]
    folder = os.path.join(input_dir, "maps")
    rows = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".nc")):
        sla, times = read_sla(os.path.join(folder, name))
        for k in range(sla.shape[0]):
            day = (dt.date(1950, 1, 1) + dt.timedelta(days=float(times[k]))).isoformat()
            what = f"predict(sla of {day})"
            flags = _station_flags(model.predict(sla[k:k + 1].astype("float64")), stations, what)
            if any(f not in (0.0, 1.0) for f in flags):
                raise SubmissionError(f"predict(sla of {day}) returned {flags}; flags must be 0 or 1")
            rows.append((day, *(int(f) for f in flags)))
    _write_csv(os.path.join(output_dir, PREDICTIONS_FILES["sealevel"]), ["date", *stations], rows)
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
        start_model(model)
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
