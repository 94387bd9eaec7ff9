"""Challenge generators: determinism, formats, and the physics / definitions they claim."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kpflow.challenges import butterfly, get_challenge, gw, list_challenges, make_challenge, sealevel
from kpflow.challenges.common import child_rngs, data_checksums

SMALL = {"gw": 0.01, "butterfly": 0.03, "sealevel": 0.03}


def test_three_challenges_are_listed_and_unknown_names_are_clear():
    assert list_challenges() == ["gw", "butterfly", "sealevel"]
    with pytest.raises(KeyError, match="valid names: gw, butterfly, sealevel"):
        get_challenge("protein")


@pytest.mark.parametrize("name", list(SMALL))
def test_make_is_deterministic_and_seed_dependent(name, tmp_path):
    a = make_challenge(name, tmp_path / "a", seed=7, scale=SMALL[name], hidden_seed=11)
    b = make_challenge(name, tmp_path / "b", seed=7, scale=SMALL[name], hidden_seed=11)
    c = make_challenge(name, tmp_path / "c", seed=8, scale=SMALL[name], hidden_seed=11)
    assert a["checksums"] == b["checksums"]
    assert a["checksums"] == data_checksums(tmp_path / "a")  # manifest matches the files on disk
    train = {k: v for k, v in a["checksums"].items() if k.startswith("train/")}
    assert train != {k: v for k, v in c["checksums"].items() if k.startswith("train/")}
    manifest = json.loads((tmp_path / "a" / "challenge.json").read_text())
    assert manifest["score_keys"] == get_challenge(name).score_keys
    for phase in ("val", "test"):
        assert (tmp_path / "a" / "reference_data" / phase / get_challenge(name).reference_file).is_file()
        assert not list((tmp_path / "a" / "input_data" / phase).rglob("*labels*"))  # no labels in inputs
    assert (tmp_path / "a" / "starting_kit" / "model.py").is_file()
    card = (tmp_path / "a" / "DATASET_CARD.md").read_text()
    assert "License" in card and "arXiv:2503.02112" in card and "Splits" in card
    croissant = json.loads((tmp_path / "a" / "croissant.json").read_text())
    assert croissant["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    for key in ("name", "description", "license", "url", "creator", "datePublished", "citeAs", "version"):
        assert croissant[key], key  # the properties Croissant 1.0 and 1.1 require
    assert {"rai:dataCollection", "rai:dataBiases", "rai:personalSensitiveInformation", "rai:dataUseCases",
            "rai:dataLimitations"} <= set(croissant)
    for item in croissant["distribution"]:
        if item["@type"] == "cr:FileObject":
            assert manifest["checksums"][item["contentUrl"]] == item["sha256"]
    train_files = {p for p in manifest["checksums"] if p.startswith("train/")}
    described = {i["contentUrl"] for i in croissant["distribution"] if i["@type"] == "cr:FileObject"}
    globbed = [i["includes"] for i in croissant["distribution"] if i["@type"] == "cr:FileSet"]
    import fnmatch

    assert all(p in described or any(fnmatch.fnmatch(p, g) for g in globbed) for p in train_files)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_challenge(name, tmp_path / "a", seed=7, scale=SMALL[name])


@pytest.mark.parametrize("name", list(SMALL))
def test_hidden_splits_come_from_a_secret_seed_kept_only_with_the_reference_data(name, tmp_path):
    """The public seed rebuilds the training split exactly, never the hidden inputs or labels."""
    from kpflow.challenges.common import HIDDEN_SEED_FILE

    a = make_challenge(name, tmp_path / "a", seed=7, scale=SMALL[name])
    b = make_challenge(name, tmp_path / "b", seed=7, scale=SMALL[name])  # same public seed, fresh secret
    for prefix, same in (("train/", True), ("input_data/", False), ("reference_data/", False)):
        part_a = {k: v for k, v in a["checksums"].items() if k.startswith(prefix)}
        part_b = {k: v for k, v in b["checksums"].items() if k.startswith(prefix)}
        assert part_a and (part_a == part_b) == same, prefix
    secret = json.loads((tmp_path / "a" / HIDDEN_SEED_FILE).read_text())["hidden_seed"]
    assert int(secret).bit_length() > 64  # 128 random bits (fails with probability 2^-64)
    public = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and "reference_data" not in p.parts]
    for path in public:  # card, manifest, Croissant, inputs, training data, starting kit
        assert secret.encode() not in path.read_bytes(), path
    assert HIDDEN_SEED_FILE not in a["checksums"]
    c = make_challenge(name, tmp_path / "c", seed=7, scale=SMALL[name], hidden_seed=int(secret))
    assert c["checksums"] == a["checksums"]  # the organiser rebuilds everything from the stored secret


@pytest.mark.parametrize("name", list(SMALL))
def test_croissant_record_sets_cover_every_column_and_stream_with_mlcroissant(name, tmp_path):
    mlc = pytest.importorskip("mlcroissant")
    import itertools

    make_challenge(name, tmp_path / name, seed=0, scale=SMALL[name])
    croissant = json.loads((tmp_path / name / "croissant.json").read_text())
    for item in croissant["distribution"]:  # every column of every training table is a field
        if item["@type"] == "cr:FileObject" and item["contentUrl"].endswith(".csv"):
            with open(tmp_path / name / item["contentUrl"], newline="") as handle:
                header = next(csv.reader(handle))
            columns = {f["source"]["extract"]["column"] for r in croissant["recordSet"] for f in r["field"]
                       if f["source"].get("fileObject", {}).get("@id") == item["@id"]}
            assert columns == set(header), item["contentUrl"]
    dataset = mlc.Dataset(jsonld=str(tmp_path / name / "croissant.json"))
    for record_set in croissant["recordSet"]:
        records = list(itertools.islice(dataset.records(record_set["@id"]), 3))
        assert records and len(records[0]) == len(record_set["field"]), record_set["@id"]
    if name == "butterfly":
        image = next(iter(dataset.records("butterfly_images")))["butterfly_images/image"]
        assert image.size == (64, 64)
    if name == "gw":
        first = next(iter(dataset.records("gw_train")))
        assert first["gw_train/file"] == b"background.npz" and first["gw_train/label"] == 0


# ----------------------------------------------------------------------------- gravitational waves
def test_coloured_noise_has_the_analytic_psd():
    """Averaged periodogram / PSD = 1 within 5 standard errors (each bin ~ χ²₂/2, 2M samples)."""
    rng = np.random.default_rng(0)
    m = 400
    noise = gw.coloured_noise(rng, m)
    f = np.fft.rfftfreq(gw.SEGMENT, 1 / gw.SAMPLE_RATE)
    periodogram = (np.abs(np.fft.rfft(noise, axis=-1)) ** 2).mean(axis=(0, 1)) * 2 / (gw.SAMPLE_RATE * gw.SEGMENT)
    band = (f >= 20) & (f <= 1800)
    ratio = periodogram[band] / gw.aligo_psd(f[band])
    assert np.all(np.abs(ratio - 1) < 5 / np.sqrt(2 * m))
    assert np.mean(ratio) == pytest.approx(1.0, abs=3 / np.sqrt(2 * m * band.sum()))


def test_whitened_background_is_band_limited_white_noise():
    rng = np.random.default_rng(1)
    x = gw.windows(rng, "background", 2000).astype(np.float64)
    band_fraction = ((gw.BAND[1] - gw.BAND[0]) / (gw.SAMPLE_RATE / 2))
    # variance of band-limited unit white noise = fraction of the band kept (± a few %)
    assert x.var() == pytest.approx(band_fraction, rel=0.03)
    h1, l1 = x[:, 0].ravel(), x[:, 1].ravel()
    assert abs(np.corrcoef(h1, l1)[0, 1]) < 4 / np.sqrt(h1.size / 10)  # detectors independent


def test_sine_gaussian_has_its_frequency_and_quality():
    t = (np.arange(4096) - 2048) / gw.SAMPLE_RATE
    f, q = np.array([100.0, 300.0]), np.array([30.0, 60.0])
    hp, hc = gw.sine_gaussian_polarisations(np.tile(t, (2, 1)), f, q, np.zeros(2))
    spectrum = np.abs(np.fft.rfft(hp, axis=1))
    freqs = np.fft.rfftfreq(4096, 1 / gw.SAMPLE_RATE)
    assert np.allclose(freqs[spectrum.argmax(1)], f, atol=1.0)
    tau = q / (np.sqrt(2) * np.pi * f)
    envelope = np.hypot(hp, hc)
    k = np.abs(t[None, :] - tau[:, None]).argmin(1)
    assert np.allclose(envelope[[0, 1], k], np.exp(-((t[k] / tau) ** 2)), rtol=1e-12)


def test_bbh_chirps_up_then_rings_down():
    t = np.tile((np.arange(2048) - 1536) / gw.SAMPLE_RATE, (1, 1))
    hp, _ = gw.bbh_polarisations(t, np.array([40.0]), np.array([1.0]), np.array([0.0]), np.array([0.0]))
    hp = hp[0]

    def crossings(lo_ms, hi_ms):
        sel = (t[0] >= lo_ms / 1e3) & (t[0] < hi_ms / 1e3)
        return np.sum(np.diff(np.sign(hp[sel])) != 0) / ((hi_ms - lo_ms) / 1e3)

    assert crossings(-300, -200) < crossings(-60, -30) < crossings(-10, 0)  # frequency increases
    assert np.abs(hp[t[0] > 0.04]).max() < 0.05 * np.abs(hp).max()          # ringdown has decayed


def test_projection_delay_is_within_ten_milliseconds():
    rng = np.random.default_rng(2)

    def pulse(t):
        g = np.exp(-(t / 2e-4) ** 2)
        return g, g

    strain = gw._project(rng, 500, pulse)
    peaks = np.abs(strain).argmax(-1)
    delay = np.abs(peaks[:, 0] - peaks[:, 1]) / gw.SAMPLE_RATE
    assert delay.max() <= 0.010 + 1.5 / gw.SAMPLE_RATE
    assert delay.max() > 0.008  # the range is used


def test_signal_strength_is_the_requested_network_snr():
    rng = np.random.default_rng(3)
    strain = gw.signal_strain(rng, "sglf", 50)
    snr = np.sqrt((gw.whiten(strain) ** 2).sum(axis=(1, 2)))
    assert snr.min() >= gw.SNR_RANGE[0] - 1e-9 and snr.max() <= gw.SNR_RANGE[1] + 1e-9


def test_gw_files_have_the_original_shapes(tmp_path):
    make_challenge("gw", tmp_path / "gw", seed=0, scale=SMALL["gw"])
    with np.load(tmp_path / "gw" / "train" / "background.npz") as archive:
        assert archive["data"].shape[1:] == (2, 200) and archive["data"].dtype == np.float32
    assert np.load(tmp_path / "gw" / "train" / "bbh_for_challenge.npy").shape[1:] == (2, 200)
    original = gw.load_original(tmp_path / "gw" / "train")  # the organisers' public file names
    assert set(original) == {"background", "bbh", "sglf"} and original["sglf"].shape[1:] == (2, 200)
    with np.load(tmp_path / "gw" / "input_data" / "test" / "data.npz") as archive:
        ids, data = archive["ids"], archive["data"]
    with open(tmp_path / "gw" / "reference_data" / "test" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ids.tolist() and len(data) == len(ids)
    assert {r["kind"] for r in rows} <= {"background", "glitch", "bbh", "sglf"}
    x = gw.normalise(data)
    assert x.shape == (len(ids), 200, 2)
    assert np.allclose(x.std(axis=1), 1.0, atol=1e-4)
    loaded = gw.load_original(_original_layout(tmp_path, data))
    assert loaded["bbh"].shape == data.shape


def _original_layout(tmp_path, data):
    folder = tmp_path / "original"
    folder.mkdir()
    np.savez(folder / "background.npz", data=data)
    np.save(folder / "bbh_for_challenge.npy", data)
    np.save(folder / "sglf_for_challenge.npy", data)
    return folder


# ----------------------------------------------------------------------------- butterflies
def test_hybrid_loci_take_each_group_from_a_parent_or_a_blend():
    rng = np.random.default_rng(0)
    p1, p2 = butterfly.SUBSPECIES["hydara"], butterfly.SUBSPECIES["amalfreda"]
    for _ in range(50):
        child = butterfly.hybrid_loci(rng, p1, p2)
        for keys in butterfly.GROUPS.values():
            key = keys[0]
            a, b, c = (np.atleast_1d(v[key]).astype(float) for v in (p1, p2, child))
            if np.allclose(a, b):
                continue
            w = float(np.dot(c - b, a - b) / np.dot(a - b, a - b))
            assert 0.0 <= w <= 1.0 + 1e-12 and np.allclose(c, w * a + (1 - w) * b)
            for k in keys:  # the whole group uses the same weight
                assert np.allclose(child[k], w * p1[k] + (1 - w) * p2[k])


def test_butterfly_splits_follow_the_challenge_design(tmp_path):
    from PIL import Image

    manifest = make_challenge("butterfly", tmp_path / "b", seed=0, scale=SMALL["butterfly"])
    with open(tmp_path / "b" / "train" / "train.csv") as handle:
        train = list(csv.DictReader(handle))
    hybrids = {(r["parent_subspecies_1"], r["parent_subspecies_2"]) for r in train if r["hybrid_stat"] == "1"}
    assert {frozenset(h) for h in hybrids} == {frozenset(butterfly.SIGNAL_PARENTS)}  # one hybrid type only
    with open(tmp_path / "b" / "reference_data" / "test" / "ref.csv") as handle:
        ref = list(csv.DictReader(handle))
    counts = manifest["counts"]["test"]
    for group in ("major", "minor", "mimic"):
        rows = [r for r in ref if r["ssp_indicator"] == group]
        assert sum(r["hybrid_stat"] == "1" for r in rows) == counts[f"{group}_hybrid"]
    assert all(r["filename"].startswith("CAM") and r["filename"].endswith("_d.JPG") for r in ref)
    # the organisers' layout: exactly the listed JPEGs, flat in the input folder
    assert sorted(p.name for p in (tmp_path / "b" / "input_data" / "test").iterdir()) == sorted(
        r["filename"] for r in ref)
    with Image.open(tmp_path / "b" / "input_data" / "test" / ref[0]["filename"]) as image:
        assert image.size == (64, 64) and image.mode == "RGB" and image.format == "JPEG"


# ----------------------------------------------------------------------------- sea level
def test_netcdf_round_trip_keeps_values_to_the_quantisation_step(tmp_path):
    rng = np.random.default_rng(0)
    fields, _, _ = sealevel.sla_fields(rng, 3)
    path = tmp_path / "x.nc"
    path.write_bytes(sealevel.netcdf_bytes(fields, np.array([1.0, 2.0, 3.0])))
    sla, times = sealevel.read_sla(path)
    assert sla.shape == (3, 100, 160) and times.tolist() == [1.0, 2.0, 3.0]
    assert np.array_equal(np.isnan(sla), np.isnan(fields))
    assert np.nanmax(np.abs(sla - fields)) <= sealevel.SCALE_FACTOR / 2 + 1e-7
    mask = sealevel.land_mask()
    assert all(not mask[i, j] for i, j in sealevel.station_cells().values())


def test_sealevel_labels_are_the_station_threshold_rule(tmp_path):
    manifest = make_challenge("sealevel", tmp_path / "s", seed=5, scale=SMALL["sealevel"], hidden_seed=6)
    public, hidden = child_rngs(5, ["field", "gauge"]), child_rngs(6, ["field", "gauge"])
    n = manifest["counts"]["train"]
    total = sum(manifest["counts"].values())
    train, _, state = sealevel.sla_fields(public["field"], n)
    rest, _, _ = sealevel.sla_fields(hidden["field"], total - n, start=n, state=state)
    fields = np.concatenate([train, rest])
    series = np.concatenate([sealevel.station_series(public["gauge"], train),
                             sealevel.station_series(hidden["gauge"], rest)])
    expected = series > series[:n].mean(0) + sealevel.THRESHOLD_SIGMAS * series[:n].std(0)
    with open(tmp_path / "s" / "train" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    got = np.array([[int(r[s]) for s in sealevel.STATIONS] for r in rows])
    assert np.array_equal(got, expected[:n])
    with open(tmp_path / "s" / "reference_data" / "val" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    got = np.array([[int(r[s]) for s in sealevel.STATIONS] for r in rows])
    assert np.array_equal(got, expected[n:n + manifest["counts"]["val"]])
    maps = sorted((tmp_path / "s" / "input_data" / "val" / "maps").glob("*.nc"))
    assert len(maps) == manifest["counts"]["val"]
    sla, _ = sealevel.read_sla(maps[0])
    assert np.nanmax(np.abs(sla[0] - fields[n])) <= sealevel.SCALE_FACTOR / 2 + 1e-7


def test_sealevel_field_continues_across_the_public_hidden_boundary():
    """The hidden years continue the AR(1) state of the last training day (a one-day step, not a
    restart), and the normalisation keeps the state at unit variance."""
    ocean = ~sealevel.land_mask()
    _, a, state = sealevel.sla_fields(np.random.default_rng(0), 60)
    _, b, end = sealevel.sla_fields(np.random.default_rng(1), 60, start=60, state=state)
    _, restart, _ = sealevel.sla_fields(np.random.default_rng(1), 60, start=60)
    step = np.std(b[0][ocean] - a[-1][ocean])
    # one step of x' = 0.9 x + √0.19 ε changes the 6 cm field by 6 cm · √(0.01 + 0.19) ≈ 2.7 cm; a restart
    # from 0 changes it by ≈ √(6² + 2.6²) cm ≈ 6.5 cm
    assert step < 0.045 < np.std(restart[0][ocean] - a[-1][ocean])
    assert 0.6 < np.std(end) < 1.4  # unit stationary variance (one spatially correlated snapshot)


# ----------------------------------------------------------------------------- loaders of the original files
def test_butterfly_loader_reads_the_organisers_csv_layout(tmp_path):
    make_challenge("butterfly", tmp_path / "b", seed=0, scale=SMALL["butterfly"])
    with open(tmp_path / "b" / "train" / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    original = tmp_path / "butterfly_anomaly_train.csv"
    with open(original, "w", newline="") as handle:  # the organisers' column names and order
        writer = csv.writer(handle)
        writer.writerow(["CAMID", "file_url", "hybrid_stat", "split", "zenodo_link", "md5", "subspecies",
                         "parent_subspecies_1", "parent_subspecies_2", "filename"])
        for r in rows:
            status = "hybrid" if r["hybrid_stat"] == "1" else "non-hybrid"
            writer.writerow([r["filename"][:9], "", status, "train", "", "", r["subspecies"],
                             r["parent_subspecies_1"], r["parent_subspecies_2"], r["filename"]])
    records = butterfly.load_original(original, tmp_path / "b" / "train" / "images")
    assert [h for _, h, _ in records] == [int(r["hybrid_stat"]) for r in rows]
    (tmp_path / "b" / "train" / "images" / rows[0]["filename"]).unlink()
    with pytest.raises(FileNotFoundError, match=rows[0]["filename"]):
        butterfly.load_original(original, tmp_path / "b" / "train" / "images")


def test_sealevel_loader_reads_daily_maps_and_station_csvs(tmp_path):
    make_challenge("sealevel", tmp_path / "s", seed=0, scale=SMALL["sealevel"])
    maps = tmp_path / "s" / "input_data" / "val" / "maps"
    with open(tmp_path / "s" / "reference_data" / "val" / "labels.csv") as handle:
        ref = list(csv.DictReader(handle))
    station_files = []
    for name in list(sealevel.STATIONS)[:2]:  # the organisers' per-station files: t, anomaly, ...
        path = tmp_path / f"{name.replace(' ', '_')}_training_data.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["t", "anomaly", "location", "latitude", "longitude"])
            for r in ref:
                writer.writerow([r["date"], r[name], name, *sealevel.STATIONS[name]])
        station_files.append(path)
    dates, sla, labels = sealevel.load_original(maps, station_files)
    assert dates == [r["date"] for r in ref]
    assert sla.shape == (len(ref), 100, 160)
    assert labels[:, 0].tolist() == [int(r["Atlantic City"]) for r in ref]
