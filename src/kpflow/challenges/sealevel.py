"""Sea-level anomaly challenge: daily gridded sea-level-anomaly maps, 12 coastal stations to flag.

Stand-in for the iHARP challenge (Copernicus DUACS L4 altimetry, 0.25°, cropped to 100 lat x 160
lon over the US East Coast / North Atlantic; tide-gauge anomaly labels at 12 stations).

The SLA field (metres) on ocean cells is the sum of

* a spatially correlated random field, AR(1) in time (ρ = 0.9), Gaussian-smoothed white noise
  (σ = 6 cells), standard deviation about 6 cm;
* a seasonal cycle ``A(lat) sin(2π (doy − 80) / 365.25)`` with A from 4 to 10 cm;
* a trend of 1 cm / year (exaggerated from the real ~3 mm / year so that it matters in 5 years);
* coastal surge events (about one every 12 days): Gaussian blobs of radius 1.5-4° centred near the
  coast, peak 0.15-0.6 m, lasting 1-4 days with a decaying profile.

Each station's "tide gauge" series is the field at its nearest ocean cell plus local gauge noise
(σ = 4 cm, not visible in the maps); a (station, day) is anomalous when that series exceeds the
station's mean + 2 standard deviations over the training years.

Files: the maps are NetCDF4/HDF5 as the organisers' (written with h5netcdf). ``train/sla_train.nc`` (``sla``
(time, latitude, longitude), int32 with ``scale_factor`` 1e-4 m and ``_FillValue`` over land, ``time``
in days since 1950-01-01, ``latitude``, ``longitude``), ``train/labels.csv``
(``date`` + one 0/1 column per station), ``train/stations.csv``; hidden ``input_data/<phase>/maps/
YYYYMMDD.nc`` (one file per day, as the original) and ``input_data/<phase>/stations.csv``; labels in
``reference_data/<phase>/labels.csv``.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kpflow.challenges.common import (
    ChallengeSpec,
    ScoreColumn,
    atomic_write_bytes,
    child_rngs,
    scaled,
    write_csv,
)

N_LAT, N_LON = 100, 160
LAT = 25.125 + 0.25 * np.arange(N_LAT)
LON = -84.875 + 0.25 * np.arange(N_LON)
STATIONS = {  # name: (lat, lon)
    "Atlantic City": (39.36, -74.42), "Baltimore": (39.27, -76.58), "Eastport": (44.90, -66.98),
    "Fort Pulaski": (32.03, -80.90), "Lewes": (38.78, -75.12), "New London": (41.36, -72.09),
    "Newport": (41.50, -71.33), "Portland": (43.66, -70.25), "Sandy Hook": (40.47, -74.01),
    "Sewells Point": (36.95, -76.33), "The Battery": (40.70, -74.01), "Washington": (38.87, -77.02),
}
COAST = np.array([(25.0, -80.3), (30.0, -81.3), (32.0, -80.9), (35.2, -75.6), (37.0, -76.0), (39.0, -74.7),
                  (40.5, -74.0), (41.2, -71.6), (42.0, -70.1), (43.6, -70.3), (44.8, -67.0), (45.5, -64.5),
                  (47.0, -64.0), (50.0, -58.0)])
START = dt.date(1993, 1, 1)
EPOCH = dt.date(1950, 1, 1)
DEFAULT_DAYS = {"train": 1095, "val": 365, "test": 365}
SCALE_FACTOR, FILL = 1e-4, -2147483647  # as the organisers' DUACS maps (int32)
THRESHOLD_SIGMAS = 2.0


def land_mask() -> np.ndarray:
    """``(N_LAT, N_LON)`` True on land: west of a piecewise-linear East-Coast line."""
    coast_lon = np.interp(LAT, COAST[:, 0], COAST[:, 1])
    return LON[None, :] < coast_lon[:, None]


def station_cells(mask: np.ndarray | None = None) -> dict[str, tuple[int, int]]:
    """Nearest ocean grid cell (i_lat, j_lon) of each station."""
    mask = land_mask() if mask is None else mask
    ii, jj = np.nonzero(~mask)
    out = {}
    for name, (lat, lon) in STATIONS.items():
        k = np.argmin((LAT[ii] - lat) ** 2 + ((LON[jj] - lon) * np.cos(np.deg2rad(lat))) ** 2)
        out[name] = (int(ii[k]), int(jj[k]))
    return out


def sla_fields(rng: np.random.Generator, days: int, start: int = 0,
               state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(days, N_LAT, N_LON)`` float32 SLA (metres, NaN on land), its surge-free part, and the final
    AR(1) state, for days ``start, ..., start + days - 1`` after ``START``; pass the returned state as
    ``state`` to continue the same series."""
    from scipy.ndimage import gaussian_filter

    mask = land_mask()
    rho, sigma_cells = 0.9, 6.0
    norm = np.sqrt(4 * np.pi) * sigma_cells  # white noise smoothed by a 2-D Gaussian of σ cells has std 1/(√(4π) σ)
    field = np.empty((days, N_LAT, N_LON), np.float32)
    state = np.zeros((N_LAT, N_LON)) if state is None else np.array(state, dtype=np.float64)
    for lo in range(0, days, 256):
        m = min(256, days - lo)
        noise = gaussian_filter(rng.standard_normal((m, N_LAT, N_LON)), sigma=(0, sigma_cells, sigma_cells),
                                mode="reflect")
        for k in range(m):
            state = rho * state + np.sqrt(1 - rho ** 2) * noise[k] * norm
            field[lo + k] = 0.06 * state
    t = start + np.arange(days)
    doy = np.array([(START + dt.timedelta(days=int(d))).timetuple().tm_yday for d in t])
    amplitude = 0.04 + 0.06 * (LAT - LAT[0]) / (LAT[-1] - LAT[0])
    seasonal = np.sin(2 * np.pi * (doy - 80) / 365.25)[:, None, None] * amplitude[None, :, None]
    trend = (0.01 * t / 365.25)[:, None, None]
    smooth = field + seasonal + trend
    surge = np.zeros_like(field)
    coast_lat = rng.uniform(LAT[0] + 5, LAT[-1] - 5, size=int(days / 12) + 1)
    starts = np.sort(rng.choice(days, size=coast_lat.size, replace=coast_lat.size > days))
    for lat0, day0 in zip(coast_lat, starts, strict=True):
        lon0 = np.interp(lat0, COAST[:, 0], COAST[:, 1]) + rng.uniform(0.0, 1.5)
        radius, peak, length = rng.uniform(1.5, 4.0), rng.uniform(0.15, 0.6), int(rng.integers(1, 5))
        blob = np.exp(-(((LAT[:, None] - lat0) ** 2 + ((LON[None, :] - lon0) * np.cos(np.deg2rad(lat0))) ** 2)
                        / (2 * radius ** 2)))
        for k in range(length):
            if day0 + k < days:
                surge[day0 + k] += peak * np.exp(-k / 1.5) * blob
    out = (smooth + surge).astype(np.float32)
    out[:, mask] = np.nan
    smooth = smooth.astype(np.float32)
    smooth[:, mask] = np.nan
    return out, smooth, state


def station_series(rng, fields: np.ndarray) -> np.ndarray:
    """``(days, 12)`` 'tide gauge' series: field at the station cell + gauge noise (σ = 4 cm)."""
    cells = station_cells()
    series = np.stack([fields[:, i, j] for i, j in cells.values()], axis=1)
    return series + rng.normal(0, 0.04, series.shape)


def netcdf_bytes(sla: np.ndarray, days_since_epoch: np.ndarray) -> bytes:
    """NetCDF4/HDF5 bytes in the layout of the organisers' DUACS maps: ``sla`` (time, latitude, longitude)
    int32 packed as ``round(sla / SCALE_FACTOR)`` with ``_FillValue`` ``FILL`` on land, ``time`` in days
    since 1950-01-01, ``latitude``/``longitude`` coordinates. Written with h5netcdf (bit-for-bit
    reproducible: no creation times are stored).

    Raises:
        ImportError: h5netcdf is not installed (``pip install 'kpflow[challenges]'``).
    """
    try:
        import h5netcdf
    except ImportError:
        raise ImportError("writing the sea-level maps (NetCDF4, as the organisers' DUACS maps) needs h5netcdf: "
                          "pip install 'kpflow[challenges]' (or pip install h5netcdf)") from None
    raw = np.clip(np.round(np.nan_to_num(np.asarray(sla, dtype=np.float64)) / SCALE_FACTOR), -2 ** 31 + 2, 2 ** 31 - 1)
    raw[~np.isfinite(sla)] = FILL
    buffer = io.BytesIO()
    with h5netcdf.File(buffer, "w") as handle:
        handle.attrs["title"] = "kpflow synthetic sea level anomaly (stand-in for DUACS DT2021 L4)"
        handle.attrs["Conventions"] = "CF-1.6"
        handle.dimensions = {"time": sla.shape[0], "latitude": N_LAT, "longitude": N_LON}
        t = handle.create_variable("time", ("time",), "f8", data=np.asarray(days_since_epoch, dtype=np.float64))
        t.attrs["units"] = "days since 1950-01-01 00:00:00"
        t.attrs["standard_name"] = "time"
        la = handle.create_variable("latitude", ("latitude",), "f4", data=LAT.astype(np.float32))
        la.attrs["units"] = "degrees_north"
        lo = handle.create_variable("longitude", ("longitude",), "f4", data=LON.astype(np.float32))
        lo.attrs["units"] = "degrees_east"
        v = handle.create_variable("sla", ("time", "latitude", "longitude"), "i4", data=raw.astype(np.int32),
                                   fillvalue=np.int32(FILL))
        v.attrs["scale_factor"] = SCALE_FACTOR
        v.attrs["add_offset"] = 0.0
        v.attrs["units"] = "m"
        v.attrs["long_name"] = "Sea level anomaly"
    return buffer.getvalue()


def read_sla(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(``sla`` (time, lat, lon) float32 metres with NaN on land, ``time`` days since 1950-01-01), from
    NetCDF4/HDF5 maps (this kit's and the organisers') or NetCDF3 files (see ``ingestion.read_sla``)."""
    from kpflow.challenges.ingestion import read_sla as read

    return read(str(path))


def generate(out: Path, seed: int, hidden_seed: int, scale: float) -> dict:
    """Write the sea-level challenge under ``out`` (see module docstring).

    The public ``seed`` draws the training years; the hidden val/test years continue the same AR(1)
    field from its last training state with noise, surges and gauge noise drawn from ``hidden_seed``,
    which is kept with the reference data.
    """
    out = Path(out)
    public, hidden = child_rngs(seed, ["field", "gauge"]), child_rngs(hidden_seed, ["field", "gauge"])
    days = {k: scaled(v, scale, minimum=30) for k, v in DEFAULT_DAYS.items()}
    total = sum(days.values())
    train_fields, _, state = sla_fields(public["field"], days["train"])
    hidden_fields, _, _ = sla_fields(hidden["field"], total - days["train"], start=days["train"], state=state)
    fields = np.concatenate([train_fields, hidden_fields])
    series = np.concatenate([station_series(public["gauge"], train_fields),
                             station_series(hidden["gauge"], hidden_fields)])
    n_train = days["train"]
    threshold = series[:n_train].mean(0) + THRESHOLD_SIGMAS * series[:n_train].std(0)
    labels = (series > threshold).astype(int)
    dates = [START + dt.timedelta(days=int(d)) for d in range(total)]
    since = np.array([(d - EPOCH).days for d in dates], dtype=np.float64)
    names = list(STATIONS)
    cells = station_cells()
    station_rows = [(n, STATIONS[n][0], STATIONS[n][1], *cells[n]) for n in names]
    header = ["name", "latitude", "longitude", "i_lat", "j_lon"]
    write_csv(out / "train" / "stations.csv", station_rows, header)
    atomic_write_bytes(out / "train" / "sla_train.nc", netcdf_bytes(fields[:n_train], since[:n_train]))
    write_csv(out / "train" / "labels.csv", [(dates[d].isoformat(), *labels[d]) for d in range(n_train)],
              ["date", *names])
    splits = {"train": f"{n_train} days from {dates[0]}; anomaly rate {labels[:n_train].mean():.3f}"}
    lo = n_train
    for phase in ("val", "test"):
        hi = lo + days[phase]
        for d in tqdm(range(lo, hi), desc=f"write {phase} maps", disable=None, leave=False):
            atomic_write_bytes(out / "input_data" / phase / "maps" / f"{dates[d]:%Y%m%d}.nc",
                               netcdf_bytes(fields[d:d + 1], since[d:d + 1]))
        write_csv(out / "input_data" / phase / "stations.csv", station_rows, header)
        write_csv(out / "reference_data" / phase / "labels.csv",
                  [(dates[d].isoformat(), *labels[d]) for d in range(lo, hi)], ["date", *names])
        splits[phase] = f"{hi - lo} days from {dates[lo]}; anomaly rate {labels[lo:hi].mean():.3f}"
        lo = hi
    return {"splits": splits, "counts": days, "shapes": {"map": [N_LAT, N_LON], "stations": len(names)},
            "thresholds_m": dict(zip(names, np.round(threshold, 4).tolist(), strict=True))}


def load_original(maps_folder: Path, station_csvs: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read the organisers' daily maps and station label files into (dates, maps, labels).

    ``maps_folder`` holds one NetCDF file per day (NetCDF4/HDF5 like the organisers' DUACS maps and
    this kit's, or NetCDF3); each ``<Station>_..._training_data.csv`` has columns ``t, anomaly, ...`` and
    its own set of days. As the organisers do, only days present at *every* station (and in the maps)
    are kept, in date order, so the rows of ``maps`` (days, lat, lon) and ``labels`` (days, stations)
    align; nothing is filled in.

    Raises:
        FileNotFoundError: no ``.nc`` files, or a station file is missing.
        ValueError: a station file lacks the ``t`` or ``anomaly`` column, or no day is common to all.
    """
    import csv

    maps_folder = Path(maps_folder)
    files = sorted(maps_folder.glob("*.nc"))
    if not files:
        raise FileNotFoundError(f"no .nc files in {maps_folder}")
    by_day: dict[str, np.ndarray] = {}
    for f in files:
        sla, times = read_sla(f)
        for k, t in enumerate(times):
            by_day[(EPOCH + dt.timedelta(days=float(t))).isoformat()] = sla[k]
    stations = []
    for path in station_csvs:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"t", "anomaly"} <= set(reader.fieldnames or []):
                raise ValueError(f"{path} must have columns 't' and 'anomaly'; its header is {reader.fieldnames}")
            stations.append({row["t"].strip()[:10]: int(float(row["anomaly"])) for row in reader})
    common = sorted(set(by_day).intersection(*stations))
    if not common:
        raise ValueError(f"no day is present in the maps of {maps_folder} and in every station file")
    labels = np.array([[station[d] for station in stations] for d in common], dtype=int)
    return common, np.stack([by_day[d] for d in common]), labels


SPEC = ChallengeSpec(
    name="sealevel",
    title="Detecting sea-level anomalies at coastal stations",
    summary=("Daily 100x160 sea-level-anomaly maps of the North Atlantic (NetCDF, variable `sla`). For each "
             "day, flag which of 12 US East-Coast tide-gauge stations record anomalously high sea level."),
    domain="polar / climate science (iHARP institute)",
    original="NSF HDR iHARP challenge 'Detecting Sea Level Rise Anomalies' (Codabench 3223)",
    license="CC-BY-4.0",
    citation="arXiv:2503.02112",
    columns=(ScoreColumn("Final Grade", "0.3 F1(day) + 0.7 mean station F1"),
             ScoreColumn("F1-Score", "F1 of 'any station anomalous'"),
             ScoreColumn("F1-Score with location", "Mean per-station F1"),
             ScoreColumn("precision_day", "Precision (day)"),
             ScoreColumn("recall_day", "Recall (day)")),
    reference_file="labels.csv",
    input_description=("`input_data/<phase>/maps/YYYYMMDD.nc` (NetCDF4/HDF5 as the organisers' DUACS "
                       "maps: `sla` int32 with `scale_factor`, `_FillValue` on land; NetCDF3 is read too) and "
                       "`stations.csv`. The ingestion program "
                       "creates `Model()` (calling `load()` only if the class has one), reads the days in "
                       "sorted order and calls `Model.predict(sla_day)` with a (1, 100, 160) float64 array in "
                       "metres (NaN on land), as the organisers' ingestion does; it returns 12 flags in the "
                       "order of `stations.csv`, as a sequence, a (1, 12) array or a one-row table whose "
                       "columns name the stations ('Atlantic_City' or 'Atlantic City')."),
    predict_signature="predict(sla_day: np.ndarray[1, 100, 160]) -> 12 flags (0/1)",
    metric_description=("`Final Grade` = 0.3 x F1 of 'any station anomalous that day' + 0.7 x the mean over "
                        "stations of the per-station F1 (the organisers' scoring)."),
    generation=__doc__.split("\n\n", 2)[2].split("Files:", 1)[0].strip(),
    real_data_note=("Real data: `kpflow.challenges.sealevel.load_original(maps, station_csvs)` reads the "
                    "organisers' per-day NetCDF maps and station label CSVs into the same arrays."),
    keywords=("sea level", "altimetry", "anomaly detection", "NetCDF", "climate"),
    generate=generate,
)
