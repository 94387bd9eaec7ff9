"""The organisers' file layouts, made here in small, read by the kit's loaders and ingestion program."""

from __future__ import annotations

import csv
import datetime as dt

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
