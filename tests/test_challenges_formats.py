"""The organisers' file layouts, made here in small, read by the kit's loaders and ingestion program."""

from __future__ import annotations

import csv
import datetime as dt
import os

import numpy as np
import pytest

from kpflow.challenges import butterfly, ingestion, sealevel

FILL = -2147483647
VARIABLES = ("sla", "err_sla", "ugosa", "vgosa", "adt", "ugos", "vgos", "flag_ice", "tpa_correction")


def _duacs_map(path, day: dt.date, sla: np.ndarray):
    """One day in the organisers' NetCDF4 layout: int32 variables packed with scale_factor 1e-4 on
    (time=1, latitude=100, longitude=160), _FillValue on land, time in days since 1950-01-01."""
    h5netcdf = pytest.importorskip("h5netcdf")
    with h5netcdf.File(path, "w") as f:
        f.dimensions = {"time": 1, "latitude": sealevel.N_LAT, "longitude": sealevel.N_LON, "nv": 2}
        t = f.create_variable("time", ("time",), "f8")
        t[:] = [(day - dt.date(1950, 1, 1)).days]
        t.attrs["units"] = "days since 1950-01-01 00:00:00"
        f.create_variable("latitude", ("latitude",), "f4", data=sealevel.LAT.astype(np.float32))
        f.create_variable("longitude", ("longitude",), "f4", data=sealevel.LON.astype(np.float32))
        f.create_variable("lat_bnds", ("latitude", "nv"), "f4",
                          data=np.stack([sealevel.LAT - 0.125, sealevel.LAT + 0.125], 1).astype(np.float32))
        for name in VARIABLES:
            values = sla if name == "sla" else np.zeros_like(sla)
            values = np.asarray(values, dtype=np.float64)
            raw = np.where(np.isfinite(values), np.round(np.nan_to_num(values) / 1e-4), FILL).astype(np.int32)
            v = f.create_variable(name, ("time", "latitude", "longitude"), "i4", data=raw[None],
                                  fillvalue=np.int32(FILL))
            v.attrs["scale_factor"] = 1e-4
            v.attrs["add_offset"] = 0.0
            v.attrs["units"] = "m"


def _field(rng):
    field = rng.normal(0, 0.1, (sealevel.N_LAT, sealevel.N_LON)).astype(np.float32)
    field[sealevel.land_mask()] = np.nan
    return field


def test_netcdf4_maps_in_the_organisers_layout_decode_to_metres(tmp_path):
    rng = np.random.default_rng(0)
    field = _field(rng)
    path = tmp_path / "19930101.nc"
    _duacs_map(path, dt.date(1993, 1, 1), field)
    sla, times = ingestion.read_sla(str(path))
    assert sla.shape == (1, 100, 160) and sla.dtype == np.float32
    assert times.tolist() == [(dt.date(1993, 1, 1) - dt.date(1950, 1, 1)).days]
    assert np.array_equal(np.isnan(sla[0]), np.isnan(field))
    assert np.nanmax(np.abs(sla[0] - field)) <= 0.5e-4 + 1e-7  # half a quantisation step
    same, _ = sealevel.read_sla(path)
    assert np.array_equal(same, sla, equal_nan=True)


def test_time_units_other_than_days_and_bad_files_are_handled(tmp_path):
    assert ingestion._days_since_1950([24.0], "hours since 1950-01-02 00:00:00").tolist() == [2.0]
    with pytest.raises(ValueError, match="time units"):
        ingestion._days_since_1950([1.0], "fortnights since 1950-01-01")
    junk = tmp_path / "junk.nc"
    junk.write_bytes(b"not a netcdf file")
    with pytest.raises(ValueError, match="neither NetCDF3 nor NetCDF4"):
        ingestion.read_sla(str(junk))


def test_make_writes_netcdf4_maps_and_netcdf3_is_still_read(tmp_path):
    """The kit's maps are NetCDF4/HDF5 with int32 ``sla`` packed as the organisers' DUACS maps; a NetCDF3
    file of the same field (scipy) decodes to the same metres."""
    pytest.importorskip("h5netcdf")
    from scipy.io import netcdf_file

    field = _field(np.random.default_rng(5))
    path = tmp_path / "19930102.nc"
    path.write_bytes(sealevel.netcdf_bytes(field[None], np.array([15707.0])))
    assert path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    import h5netcdf

    with h5netcdf.File(path, "r") as f:
        assert f.variables["sla"].dtype == np.int32 and f.variables["sla"].dimensions == ("time", "latitude",
                                                                                            "longitude")
        assert f.variables["sla"].attrs["scale_factor"] == sealevel.SCALE_FACTOR
    sla, times = ingestion.read_sla(str(path))
    assert times.tolist() == [15707.0] and sla.shape == (1, 100, 160)
    assert np.array_equal(np.isnan(sla[0]), np.isnan(field))
    assert np.nanmax(np.abs(sla[0] - field)) <= 0.5e-4 + 1e-7
    assert path.read_bytes() == sealevel.netcdf_bytes(field[None], np.array([15707.0]))  # reproducible
    old = tmp_path / "old.nc"
    with netcdf_file(old, "w", version=2) as handle:
        handle.createDimension("time", 1)
        handle.createDimension("latitude", 100)
        handle.createDimension("longitude", 160)
        t = handle.createVariable("time", "f8", ("time",))
        t[:] = [15707.0]
        t.units = "days since 1950-01-01 00:00:00"
        v = handle.createVariable("sla", "i2", ("time", "latitude", "longitude"))
        v[:] = np.where(np.isfinite(field), np.round(np.nan_to_num(field) / 1e-4), -32768).astype(np.int16)[None]
        v.scale_factor = 1e-4
        v._FillValue = np.int16(-32768)
    same, same_times = ingestion.read_sla(str(old))
    assert same_times.tolist() == [15707.0]
    assert np.array_equal(np.isnan(same), np.isnan(sla))
    assert np.nanmax(np.abs(same - sla)) <= 1e-7  # the same packed integers; the scale attribute's precision


def test_sealevel_loader_keeps_only_days_present_at_every_station_as_the_organisers_do(tmp_path):
    rng = np.random.default_rng(1)
    days = [dt.date(1993, 1, 1) + dt.timedelta(days=k) for k in range(6)]
    maps = tmp_path / "Copernicus_ENA_Satelite_Maps_Training_Data"
    maps.mkdir()
    fields = {}
    for day in days:
        fields[day] = _field(rng)
        _duacs_map(maps / f"{day:%Y%m%d}.nc", day, fields[day])
    labels = tmp_path / "Training_Anomalies_Station_Data"
    labels.mkdir()
    station_days = {"Atlantic_City": days, "Baltimore": days[:2] + days[3:], "Eastport": days[1:]}
    truth = {}
    paths = []
    for station, present in station_days.items():
        path = labels / f"{station}_1993_2013_training_data.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["t", "anomaly", "location", "latitude", "longitude"])
            for day in present:
                flag = int(rng.integers(0, 2))
                truth[(station, day.isoformat())] = flag
                writer.writerow([f"{day.isoformat()} 00:00:00", flag, station, 39.36, -74.42])
        paths.append(path)
    dates, sla, flags = sealevel.load_original(maps, paths)
    common = [d.isoformat() for d in days if d not in (days[0], days[2])]  # Eastport lacks day 0, Baltimore day 2
    assert dates == common
    assert sla.shape == (len(common), 100, 160)
    for row, day in enumerate(common):
        assert np.nanmax(np.abs(sla[row] - fields[dt.date.fromisoformat(day)])) <= 0.5e-4 + 1e-7
        assert flags[row].tolist() == [truth[(s, day)] for s in station_days]
    with pytest.raises(ValueError, match="no day is present"):
        sealevel.load_original(maps, [paths[0], _station_file(tmp_path, "Nowhere", [dt.date(2001, 1, 1)])])


def _station_file(folder, station, present):
    path = folder / f"{station}_training_data.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t", "anomaly"])
        writer.writerows([d.isoformat(), 0] for d in present)
    return path


def test_butterfly_loader_reads_the_cautious_robot_download_layout(tmp_path):
    """``cautious-robot -s hybrid_stat`` stores each image in a subfolder named by its hybrid_stat."""
    from PIL import Image

    rows = [("CAM016049_d.JPG", "hybrid", "lativitta x notabilis"), ("CAM016050_d.JPG", "non-hybrid", "hydara"),
            ("CAM016051_d.JPG", "non-hybrid", "erato")]
    images = tmp_path / "images"
    for name, status, _ in rows:
        (images / status).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(images / status / name, format="JPEG")
    table = tmp_path / "butterfly_anomaly_train.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["CAMID", "file_url", "hybrid_stat", "split", "zenodo_link", "md5", "subspecies",
                         "parent_subspecies_1", "parent_subspecies_2", "filename"])
        for name, status, ssp in rows:
            writer.writerow([name[:9], "", status, "train", "", "", ssp, "", "", name])
    records = butterfly.load_original(table, images)
    assert [(p.split("/")[-2], h) for p, h, _ in records] == [("hybrid", 1), ("non-hybrid", 0), ("non-hybrid", 0)]
    (images / "hybrid" / rows[0][0]).unlink()
    with pytest.raises(FileNotFoundError, match="CAM016049_d.JPG"):
        butterfly.load_original(table, images)


ORGANISER_SEALEVEL = '''
import numpy as np
import pandas as pd

STATIONS = {stations!r}


class Model:
    """The organisers' life cycle: Model() then predict(); no load()."""

    def __init__(self):
        self.days = 0

    def predict(self, X):
        assert X.shape == (1, 100, 160), X.shape
        self.days += 1
        flag = int(np.nanmean(X) >= 0)
        return pd.DataFrame([[flag] * len(STATIONS)], columns=STATIONS)
'''


@pytest.mark.slow
def test_an_organiser_style_sealevel_submission_runs_unchanged(tmp_path):
    """Model() without load(), a (1, 100, 160) input, a one-row DataFrame with 'Atlantic_City'-style
    columns (here in another order than stations.csv): scores as the kit's own mean-SLA rule."""
    pytest.importorskip("pandas")
    from kpflow.challenges import make_challenge
    from kpflow.challenges.runner import run_submission

    folder = tmp_path / "sealevel"
    make_challenge("sealevel", folder, seed=2, scale=0.03, hidden_seed=3)
    names = [s.replace(" ", "_") for s in sealevel.STATIONS][::-1]
    sub = tmp_path / "organiser"
    sub.mkdir()
    (sub / "model.py").write_text(ORGANISER_SEALEVEL.format(stations=names))
    theirs = run_submission(folder, sub, record=False, trusted=True, timeout_s=300)
    ours = run_submission(folder, folder / "starting_kit", record=False, trusted=True, timeout_s=300)
    assert theirs["status"] == "ok", theirs.get("error")
    assert theirs["scores"] == ours["scores"]
    assert set(theirs["scores"]) >= {"Final Grade", "F1-Score", "F1-Score with location"}
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.py").write_text(ORGANISER_SEALEVEL.format(stations=["Nowhere"] * 12))
    failed = run_submission(folder, wrong, record=False, trusted=True, timeout_s=300)
    assert failed["status"] == "failed" and "missing stations" in failed["error"], failed.get("error")


def _gw_folder(tmp_path):
    from kpflow.challenges import make_challenge

    folder = tmp_path / "gw"
    make_challenge("gw", folder, seed=4, scale=0.02, hidden_seed=5)
    with np.load(folder / "input_data" / "val" / "data.npz") as archive:
        data, ids = archive["data"], archive["ids"]
    with open(folder / "reference_data" / "val" / "labels.csv", newline="") as handle:
        label = {r["id"]: int(r["label"]) for r in csv.DictReader(handle)}
    return folder, data, ids, np.array([label[i] for i in ids])


def test_an_organisers_gw_prediction_file_scores_as_on_codabench(tmp_path):
    """Their layout: ref/ligo_bb_50.npz (``data``; ``ids`` = the 0/1 labels) and res/test.predictions, one
    0/1 line per window, cut by their ingestion at the 10th percentile of the signal scores."""
    import json

    from kpflow.challenges import scoring
    from kpflow.challenges.gw import normalise

    folder, data, ids, labels = _gw_folder(tmp_path)
    scores = (normalise(data).astype(np.float64) ** 2).mean(2).max(1)
    work = tmp_path / "codabench"
    (work / "input" / "ref").mkdir(parents=True)
    (work / "input" / "res").mkdir()
    np.savez(work / "input" / "ref" / "ligo_bb_50.npz", data=data, ids=labels)
    binarised = (scores >= np.percentile(scores[labels == 1], 10)).astype(int)  # the organisers' tp_cut
    (work / "input" / "res" / "test.predictions").write_text("\n".join(str(v) for v in binarised))
    assert scoring.main([str(work / "input"), str(work / "output"), "--challenge", "gw"]) == 0
    theirs = json.loads((work / "output" / "scores.json").read_text())
    tn = int(((binarised == 0) & (labels == 0)).sum())
    fp = int(((binarised == 1) & (labels == 0)).sum())
    assert theirs == {"TNR": tn / (tn + fp)}
    # the same windows scored raw through this kit's predictions.csv give the same TNR
    res = tmp_path / "res"
    res.mkdir()
    lines = "".join(f"{i},{float(s)!r}\n" for i, s in zip(ids, scores, strict=True))
    (res / "predictions.csv").write_text("id,score\n" + lines)
    ours = scoring.score_folder("gw", str(res), str(folder / "reference_data" / "val"))
    assert ours["TNR"] == pytest.approx(theirs["TNR"], abs=1e-12)
    # and their binarised file against this kit's labels.csv
    only = tmp_path / "only"
    only.mkdir()
    (only / "test.predictions").write_text("\n".join(str(v) for v in binarised))
    assert scoring.score_folder("gw", str(only), str(folder / "reference_data" / "val")) == theirs
    (only / "test.predictions").write_text("\n".join(["0.5"] * len(binarised)))
    with pytest.raises(scoring.ScoringError, match="flags must be 0 or 1"):
        scoring.score_folder("gw", str(only), str(folder / "reference_data" / "val"))


def test_an_organisers_butterfly_prediction_file_and_reference_score_the_same(tmp_path):
    """Their predictions.txt (no header, 'filename,score', 4 decimals) against their ref_val.csv
    columns scores exactly as this kit's predictions.csv against ref.csv."""
    from kpflow.challenges import make_challenge, scoring

    folder = tmp_path / "butterfly"
    make_challenge("butterfly", folder, seed=1, scale=0.05, hidden_seed=2)
    ref = folder / "reference_data" / "val"
    with open(ref / "ref.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(0)
    scores = {r["filename"]: round(float(rng.random() + 0.5 * int(r["hybrid_stat"])), 4) for r in rows}
    theirs_ref = tmp_path / "ref"
    theirs_ref.mkdir()
    with open(theirs_ref / "ref_val.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["CAMID", "file_url", "hybrid_stat", "X", "subspecies_ref", "filename", "ssp_indicator"])
        for k, r in enumerate(rows):
            writer.writerow([r["filename"][:9], "", r["hybrid_stat"], k, r["subspecies"], r["filename"],
                             r["ssp_indicator"]])
    theirs_res = tmp_path / "theirs"
    theirs_res.mkdir()
    (theirs_res / "predictions.txt").write_text("\n".join(f"{n},{s}" for n, s in reversed(scores.items())))
    ours_res = tmp_path / "ours"
    ours_res.mkdir()
    (ours_res / "predictions.csv").write_text("filename,score\n" + "".join(f"{n},{s}\n" for n, s in scores.items()))
    theirs = scoring.score_folder("butterfly", str(theirs_res), str(theirs_ref))
    assert theirs == scoring.score_folder("butterfly", str(ours_res), str(ref))
    assert theirs["challenge_score"] > 0


def test_butterfly_ingestion_rounds_scores_to_4_decimals_as_the_organisers_do(tmp_path):
    """Scores that separate hybrids only below 1e-4 tie after the organisers' rounding, so the
    thresholds catch no hybrid: challenge_score 0.0, as on Codabench."""
    from kpflow.challenges import make_challenge
    from kpflow.challenges.runner import run_submission

    folder = tmp_path / "butterfly"
    make_challenge("butterfly", folder, seed=1, scale=0.05, hidden_seed=2)
    with open(folder / "reference_data" / "val" / "ref.csv", newline="") as handle:
        hybrid = {r["filename"]: int(r["hybrid_stat"]) for r in csv.DictReader(handle)}
    sub = tmp_path / "tiny"
    sub.mkdir()
    (sub / "model.py").write_text(
        "HYBRID = " + repr(hybrid) + "\n\n"
        "class Model:\n"
        "    def load(self):\n        pass\n\n"
        "    def predict(self, image):\n"
        "        return 0.5 + 1e-6 * HYBRID[image.filename.rsplit('/', 1)[-1]]\n")
    entry = run_submission(folder, sub, record=False, trusted=True, timeout_s=300)
    assert entry["status"] == "ok", entry.get("error")
    assert entry["scores"]["challenge_score"] == 0.0


ORGANISER_BUTTERFLY = '''"""Organiser-style submission (as the Imageomics baselines): weights pickled next to model.py,
loaded in load(); predict(datapoint) gets the PIL image as Image.open returns it, returns a numpy float."""
import os
import pickle

import numpy as np


class Model:
    def __init__(self):
        self.clf = None  # loaded in load()

    def load(self):
        with open(os.path.join(os.path.dirname(__file__), "clf.pkl"), "rb") as f:
            self.clf = pickle.load(f)

    def predict(self, datapoint):
        assert datapoint.format == "JPEG" and datapoint.mode == "RGB", (datapoint.format, datapoint.mode)
        rgb = np.asarray(datapoint, dtype=np.float64) / 255.0
        return np.float64(rgb.reshape(-1, 3).std(0) @ self.clf["w"])
'''


def _colour_score(path, w):
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image, dtype=np.float64) / 255.0
    return float(np.float64(rgb.reshape(-1, 3).std(0) @ w))


@pytest.mark.slow
def test_an_organiser_style_butterfly_submission_runs_unchanged(tmp_path):
    """JPEGs flat in the input folder, Model() + load() + predict(PIL image), read in os.listdir order;
    predictions.txt without a header, 4 decimals; scored as the same file written by hand."""
    import pickle
    import zipfile

    from kpflow.challenges import make_challenge, scoring
    from kpflow.challenges.runner import run_submission

    folder = tmp_path / "butterfly"
    make_challenge("butterfly", folder, seed=1, scale=0.05, hidden_seed=2)
    sub = tmp_path / "organiser"
    sub.mkdir()
    w = np.array([1.0, -0.5, 2.0])
    (sub / "model.py").write_text(ORGANISER_BUTTERFLY)
    (sub / "clf.pkl").write_bytes(pickle.dumps({"w": w}))
    packed = tmp_path / "organiser.zip"  # the files themselves at the top of the zip, as theirs asks
    with zipfile.ZipFile(packed, "w") as archive:
        for name in ("model.py", "clf.pkl"):
            archive.write(sub / name, name)
    entry = run_submission(folder, packed, trusted=True, timeout_s=300)
    assert entry["status"] == "ok", entry.get("error")
    inputs = folder / "input_data" / "val"
    written = (folder / entry["run_folder"] / "predictions.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in written] == os.listdir(inputs)  # their order, no header
    expected = [f"{n},{round(_colour_score(inputs / n, w), 4)!r}" for n in os.listdir(inputs)]
    assert written == expected
    by_hand = tmp_path / "res"
    by_hand.mkdir()
    (by_hand / "predictions.txt").write_text("\n".join(expected))  # theirs ends without a newline
    assert entry["scores"] == scoring.score_folder("butterfly", str(by_hand), str(folder / "reference_data" / "val"))
    assert not (folder / entry["run_folder"] / "predictions.csv").exists()


ORGANISER_GW = '''"""Organiser-style gw submission (as the A3D3 examples): weights next to model.py, read in load();
predict(X) gets (N, 200, 2) and returns a Keras-like (N, 1) array of scores."""
import os

import numpy as np


class Model:
    def __init__(self):
        self.weights = None

    def load(self):
        self.weights = np.load(os.path.join(os.path.dirname(__file__), "weights.npy"))

    def predict(self, X):
        assert X.ndim == 3 and X.shape[1:] == (200, 2), X.shape
        return ((X ** 2) @ self.weights).max(axis=1, keepdims=True)
'''


@pytest.mark.slow
def test_an_organiser_style_gw_submission_runs_unchanged_and_gets_their_binarised_file(tmp_path):
    """Model() + load() + predict((N, 200, 2)) -> (N, 1): runs as on Codabench; the trusted scorer writes
    the organisers' test.predictions (0/1 lines in input order, cut at the 10th percentile of the signal
    scores), which their binarised scoring turns into the same TNR, and the submission never saw a label."""
    from kpflow.challenges import scoring
    from kpflow.challenges.runner import run_submission

    folder, data, ids, labels = _gw_folder(tmp_path)
    with np.load(folder / "input_data" / "val" / "data.npz") as archive:
        assert sorted(archive.files) == ["data", "ids"] and archive["ids"].dtype.kind == "U"  # no labels
    sub = tmp_path / "organiser"
    sub.mkdir()
    (sub / "model.py").write_text(ORGANISER_GW)
    weights = np.array([1.0, 0.7])
    np.save(sub / "weights.npy", weights)
    entry = run_submission(folder, sub, trusted=True, timeout_s=300)
    assert entry["status"] == "ok", entry.get("error")
    from kpflow.challenges.gw import normalise

    scores = ((normalise(data) ** 2) @ weights).max(axis=1)  # the same float32 squares as the submission
    expected = (scores >= np.percentile(scores[labels == 1], 10)).astype(int)  # the organisers' tp_cut
    written = (folder / entry["run_folder"] / "test.predictions").read_text().split()
    assert written == [str(v) for v in expected]
    tn, fp = int(((expected == 0) & (labels == 0)).sum()), int(((expected == 1) & (labels == 0)).sum())
    assert entry["scores"]["TNR"] == pytest.approx(tn / (tn + fp), abs=1e-12)
    assert scoring.score_gw_binarised(str(folder / entry["run_folder"] / "test.predictions"), labels) == {
        "TNR": pytest.approx(entry["scores"]["TNR"], abs=1e-12)}


def test_ingestion_writes_the_file_the_scorer_reads_first():
    """The two standalone programs name each challenge's predictions file alike (the bundle copies them apart)."""
    from kpflow.challenges import scoring

    assert ingestion.PREDICTIONS_FILES == {c: names[0] for c, names in scoring.PREDICTION_FILES.items()}
    assert ingestion.PREDICTIONS_FILES["butterfly"] == "predictions.txt"  # the organisers' name
