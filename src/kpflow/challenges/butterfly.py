"""Butterfly hybrid challenge: procedurally drawn wing patterns, hybrids as mixtures of two parents.

Stand-in for the Imageomics *Heliconius* hybrid-detection challenge. Each subspecies is a set of
pattern loci — forewing band (colour, position, width, angle), hindwing bar, hindwing rays, basal
"dennis" patch, forewing spots — plus wing shape. A hybrid takes each locus from one parent, the
other, or a blend of both (a faint, intermediate pattern), as F1/F2 hybrids of colour-pattern loci do.

* Species A (*H. erato* stand-in): 8 subspecies. Training sees non-hybrids of all 8 and only the
  **signal hybrid** lativitta x notabilis.
* Validation/test add **non-signal hybrids** of pairs never seen in training (hydara x petiverana,
  hydara x amalfreda, chestertonii x venus, hydara x erato), and a **mimic species** B
  (*H. melpomene* stand-in: malleti and plesseni mimic lativitta and notabilis, with a different wing
  shape and slightly shifted hues) with its own hybrids.

Images are 64 x 64 RGB JPEGs (``CAMxxxxxx_d.JPG``, as the organisers') with random pose, lighting and
pixel noise: ``train/images/`` for training; the hidden inputs flat in ``input_data/<phase>/``, as the
organisers' (their ingestion reads every file there in ``os.listdir`` order). ``train/train.csv``
has ``filename, hybrid_stat, species, subspecies, parent_subspecies_1, parent_subspecies_2``;
``reference_data/<phase>/ref.csv`` has ``filename, hybrid_stat, ssp_indicator (major|minor|mimic),
subspecies``.
"""

from __future__ import annotations

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

SIZE = 64
RED, YELLOW, WHITE, ORANGE = (0.82, 0.10, 0.08), (0.96, 0.84, 0.18), (0.95, 0.95, 0.90), (0.96, 0.52, 0.10)
BASE, BACKGROUND = (0.07, 0.06, 0.05), (0.86, 0.86, 0.83)
GROUPS = {
    "band": ("band", "band_colour", "band_pos", "band_width", "band_angle"),
    "bar": ("bar", "bar_colour", "bar_pos", "bar_width"),
    "rays": ("rays", "rays_colour", "n_rays"),
    "dennis": ("dennis", "dennis_colour"),
    "spots": ("spots", "spots_colour"),
    "shape": ("fw_aspect", "hw_size", "hue_shift"),
}


def _ssp(band=0.0, band_colour=RED, band_pos=0.0, band_width=0.45, band_angle=60.0, bar=0.0,
         bar_colour=YELLOW, bar_pos=0.0, bar_width=0.35, rays=0.0, rays_colour=RED, n_rays=7.0,
         dennis=0.0, dennis_colour=RED, spots=0.0, spots_colour=WHITE, fw_aspect=1.0, hw_size=1.0,
         hue_shift=0.0):
    return {k: (np.array(v, float) if isinstance(v, tuple) else float(v)) for k, v in locals().items()}


SUBSPECIES = {
    # Species A
    "lativitta": _ssp(band=1, band_colour=YELLOW, band_pos=-0.1, band_width=0.4, bar=0, rays=1, dennis=1),
    "notabilis": _ssp(band=1, band_colour=RED, band_pos=0.15, band_width=0.5, band_angle=75, spots=1),
    "hydara": _ssp(band=1, band_colour=RED, band_pos=0.0, band_width=0.65, band_angle=55),
    "petiverana": _ssp(band=1, band_colour=RED, band_pos=0.0, band_width=0.6, band_angle=55, bar=1),
    "amalfreda": _ssp(band=0.0, rays=1, n_rays=9, dennis=1, spots=1, spots_colour=YELLOW),
    "venus": _ssp(band=1, band_colour=RED, band_pos=0.25, band_width=0.35, band_angle=80, bar=1,
                  bar_width=0.2),
    "chestertonii": _ssp(band=0.0, spots=1, spots_colour=WHITE, bar=0.6, bar_colour=WHITE, bar_pos=0.3,
                         bar_width=0.15),
    "erato": _ssp(band=1, band_colour=RED, band_pos=-0.2, band_width=0.45, band_angle=45, bar=1,
                  bar_colour=YELLOW, bar_pos=-0.2),
}
SPECIES_A = list(SUBSPECIES)
SIGNAL_PARENTS = ("lativitta", "notabilis")
NON_SIGNAL_PAIRS = [("hydara", "petiverana"), ("hydara", "amalfreda"), ("chestertonii", "venus"),
                    ("hydara", "erato")]
MIMICS = {"malleti": "lativitta", "plesseni": "notabilis"}
for _mimic, _model in MIMICS.items():  # Species B: same pattern, other wing shape, shifted hue
    SUBSPECIES[_mimic] = {**SUBSPECIES[_model], "fw_aspect": 1.18, "hw_size": 0.88, "hue_shift": 0.06,
                          "band_pos": SUBSPECIES[_model]["band_pos"] + 0.08}

DEFAULT_COUNTS = {
    "train": {"nonhybrid": 950, "signal_hybrid": 50},
    "val": {"major_nonhybrid": 120, "major_hybrid": 90, "minor_nonhybrid": 110, "minor_hybrid": 24,
            "mimic_nonhybrid": 110, "mimic_hybrid": 40},
    "test": {"major_nonhybrid": 120, "major_hybrid": 90, "minor_nonhybrid": 110, "minor_hybrid": 24,
             "mimic_nonhybrid": 110, "mimic_hybrid": 40},
}


def hybrid_loci(rng: np.random.Generator, parent_1: dict, parent_2: dict) -> dict:
    """Each locus group from parent 1, parent 2, or a blend w·p1 + (1−w)·p2, w ~ U(0.3, 0.7)."""
    out = {}
    for keys in GROUPS.values():
        choice = rng.integers(0, 3)
        w = 1.0 if choice == 0 else 0.0 if choice == 1 else rng.uniform(0.3, 0.7)
        for k in keys:
            out[k] = w * parent_1[k] + (1 - w) * parent_2[k]
    return out


def _jitter(rng, loci: dict) -> dict:
    """Individual variation of a genotype's pattern."""
    out = dict(loci)
    out["band_pos"] = loci["band_pos"] + rng.normal(0, 0.05)
    out["band_width"] = loci["band_width"] * rng.uniform(0.9, 1.1)
    out["band_angle"] = loci["band_angle"] + rng.normal(0, 4)
    out["bar_pos"] = loci["bar_pos"] + rng.normal(0, 0.05)
    for k in ("band_colour", "bar_colour", "rays_colour", "dennis_colour", "spots_colour"):
        out[k] = np.clip(loci[k] + rng.normal(0, 0.03, 3), 0, 1)
    return out


def _ellipse_coords(u, v, centre, axes, angle_deg):
    a = np.deg2rad(angle_deg)
    du, dv = u - centre[0], v - centre[1]
    return ((du * np.cos(a) + dv * np.sin(a)) / axes[0], (-du * np.sin(a) + dv * np.cos(a)) / axes[1])


def _soft(distance, sharpness=18.0):
    """Anti-aliased indicator of ``distance < 0``."""
    return 1.0 / (1.0 + np.exp(np.clip(sharpness * distance, -50, 50)))


def render(rng: np.random.Generator, loci: dict) -> np.ndarray:
    """A ``(SIZE, SIZE, 3)`` uint8 dorsal image of one specimen with pattern ``loci``."""
    loci = _jitter(rng, loci)
    angle, zoom = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(0.9, 1.05)
    shift = rng.uniform(-0.05, 0.05, 2)
    grid = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    u = (np.cos(angle) * x + np.sin(angle) * y) / zoom - shift[0]
    v = (-np.sin(angle) * x + np.cos(angle) * y) / zoom - shift[1]
    u = np.abs(u)  # bilateral symmetry
    fa, fb = _ellipse_coords(u, v, (0.42, -0.22), (0.48 * loci["fw_aspect"], 0.27), -28)
    ha, hb = _ellipse_coords(u, v, (0.30, 0.30), (0.30 * loci["hw_size"], 0.25 * loci["hw_size"]), 25)
    ba, bb = _ellipse_coords(u, v, (0.0, 0.02), (0.05, 0.45), 0)
    fore = _soft(np.hypot(fa, fb) - 1, 10)
    hind = _soft(np.hypot(ha, hb) - 1, 10)
    body = _soft(np.hypot(ba, bb) - 1, 10)
    image = np.broadcast_to(np.array(BACKGROUND), (SIZE, SIZE, 3)).copy()

    def paint(mask, colour):
        nonlocal image
        image = image * (1 - mask[..., None]) + mask[..., None] * np.asarray(colour)

    wing = np.clip(fore + hind, 0, 1)
    paint(wing, BASE)
    t = np.deg2rad(loci["band_angle"])
    band_d = np.abs(fa * np.cos(t) + fb * np.sin(t) - loci["band_pos"]) - loci["band_width"] / 2
    paint(fore * _soft(band_d, 14) * _soft(np.hypot(fa, fb) - 0.85, 10) * loci["band"], loci["band_colour"])
    paint(fore * _soft(fa + 0.45, 12) * _soft(np.abs(fb) - 0.55, 12) * loci["dennis"], loci["dennis_colour"])
    spots = sum(_soft(np.hypot(fa - sa, fb - sb) - 0.13, 20) for sa, sb in ((0.62, -0.35), (0.72, 0.05),
                                                                            (0.55, 0.42)))
    paint(fore * np.clip(spots, 0, 1) * loci["spots"], loci["spots_colour"])
    paint(hind * _soft(np.abs(hb - loci["bar_pos"]) - loci["bar_width"] / 2, 14) * loci["bar"], loci["bar_colour"])
    ray_angle = np.arctan2(hb, ha + 1.0)
    n = max(loci["n_rays"], 1.0)
    rays = _soft(np.abs(np.sin(ray_angle * n)) - 0.3, 10) * _soft(0.35 - np.hypot(ha + 1.0, hb), 10)
    paint(hind * rays * loci["rays"], loci["rays_colour"])
    paint(body, BASE)
    hsv_shift = loci["hue_shift"]
    if hsv_shift:
        image = np.clip(image + hsv_shift * np.array([0.4, 0.1, -0.5]) * wing[..., None], 0, 1)
    image = image * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    """JPEG bytes of an RGB uint8 image (Pillow, quality 95, no chroma subsampling), as the organisers'
    ``CAMxxxxxx_d.JPG`` photographs."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _specimens(rng, kind: str, n: int):
    """(loci, row) for ``n`` specimens of ``kind``; row = species, subspecies, parent_1, parent_2."""
    out = []
    for _ in range(n):
        if kind in ("major_nonhybrid", "minor_nonhybrid", "nonhybrid", "mimic_nonhybrid"):
            pool = {"major_nonhybrid": list(SIGNAL_PARENTS),
                    "minor_nonhybrid": [s for s in SPECIES_A if s not in SIGNAL_PARENTS],
                    "nonhybrid": SPECIES_A, "mimic_nonhybrid": list(MIMICS)}[kind]
            ssp = pool[rng.integers(len(pool))]
            out.append((SUBSPECIES[ssp], ("B" if ssp in MIMICS else "A", ssp, ssp, ssp)))
            continue
        if kind in ("signal_hybrid", "major_hybrid"):
            p1, p2 = SIGNAL_PARENTS
        elif kind == "minor_hybrid":
            p1, p2 = NON_SIGNAL_PAIRS[rng.integers(len(NON_SIGNAL_PAIRS))]
        elif kind == "mimic_hybrid":
            p1, p2 = list(MIMICS)
        else:
            raise ValueError(f"unknown specimen kind {kind!r}")
        if rng.random() < 0.5:
            p1, p2 = p2, p1
        loci = hybrid_loci(rng, SUBSPECIES[p1], SUBSPECIES[p2])
        out.append((loci, ("B" if p1 in MIMICS else "A", f"{p1} x {p2}", p1, p2)))
    return out


def generate(out: Path, seed: int, hidden_seed: int, scale: float) -> dict:
    """Write the butterfly challenge under ``out`` (see module docstring).

    The public ``seed`` draws the training split (images and file names); the hidden val/test splits
    come from ``hidden_seed``, kept with the reference data. Hidden file names never repeat training names.
    """
    out = Path(out)
    public, hidden = child_rngs(seed, ["names", "train"]), child_rngs(hidden_seed, ["names", "val", "test"])
    rngs = {"train": public["train"], "val": hidden["val"], "test": hidden["test"]}
    counts = {s: {k: scaled(v, scale, minimum=6) for k, v in c.items()} for s, c in DEFAULT_COUNTS.items()}
    total = sum(sum(c.values()) for c in counts.values())
    n_train = sum(counts["train"].values())
    train_ids = public["names"].choice(900000, size=n_train, replace=False)
    hidden_ids = hidden["names"].choice(np.setdiff1d(np.arange(900000), train_ids), size=total - n_train,
                                        replace=False)
    names = [f"CAM{n:06d}_d.JPG" for n in np.r_[train_ids, hidden_ids] + 10000]
    cursor = 0
    splits = {}
    bar = tqdm(total=total, desc="draw butterflies", disable=None, leave=False)
    for split in ("train", "val", "test"):
        rng = rngs[split]
        rows = []
        for kind, n in counts[split].items():
            for loci, (species, ssp, p1, p2) in _specimens(rng, kind, n):
                hybrid = int(p1 != p2)
                group = kind.split("_")[0] if split != "train" else ""
                rows.append((render(rng, loci), species, ssp, p1, p2, hybrid, group))
                bar.update()
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        split_names = names[cursor:cursor + len(rows)]
        cursor += len(rows)
        folder = out / "train" / "images" if split == "train" else out / "input_data" / split  # theirs: flat
        for name, row in zip(split_names, rows, strict=True):
            atomic_write_bytes(folder / name, _jpeg_bytes(row[0]))
        if split == "train":
            write_csv(out / "train" / "train.csv",
                      [(nm, r[5], r[1], r[2], r[3], r[4]) for nm, r in zip(split_names, rows, strict=True)],
                      ["filename", "hybrid_stat", "species", "subspecies", "parent_subspecies_1",
                       "parent_subspecies_2"])
        else:
            write_csv(out / "reference_data" / split / "ref.csv",
                      [(nm, r[5], r[6], r[2]) for nm, r in zip(split_names, rows, strict=True)],
                      ["filename", "hybrid_stat", "ssp_indicator", "subspecies"])
        splits[split] = f"{len(rows)} images (" + ", ".join(f"{k} {v}" for k, v in counts[split].items()) + ")"
    bar.close()
    return {"splits": splits, "counts": counts, "shapes": {"image": [SIZE, SIZE, 3]}}


def load_original(csv_path: Path, image_folder: Path) -> list[tuple[str, int, str]]:
    """Read an organisers' CSV (``filename``, ``hybrid_stat``, ``subspecies``; e.g.
    ``butterfly_anomaly_train.csv``) with downloaded images into (path, hybrid, subspecies).

    Images are found flat in ``image_folder`` or in the documented download layout of
    ``cautious-robot -s hybrid_stat``: one subfolder per ``hybrid_stat`` value (``hybrid/``,
    ``non-hybrid/``).

    Raises:
        ValueError: the CSV lacks a required column.
        FileNotFoundError: a listed image is in neither place.
    """
    import csv

    csv_path, image_folder = Path(csv_path), Path(image_folder)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    need = {"filename", "hybrid_stat", "subspecies"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{csv_path} must have columns {sorted(need)}")
    out = []
    for row in rows:
        status = str(row["hybrid_stat"]).strip()
        candidates = [image_folder / row["filename"], image_folder / status / row["filename"]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"image {row['filename']} listed in {csv_path} is missing; looked for "
                                    f"{', '.join(str(p) for p in candidates)}")
        hybrid = 1 if status.lower() in ("1", "hybrid") else 0
        out.append((str(path), hybrid, row["subspecies"]))
    return out


SPEC = ChallengeSpec(
    name="butterfly",
    title="Butterfly hybrid detection",
    summary=("64x64 images of butterflies whose wing colour patterns are drawn from parent subspecies; "
             "hybrids mix two parents' pattern loci. Training sees one hybrid type only; evaluation adds "
             "unseen hybrid types and a mimic species. Find the hybrids."),
    domain="genomics / evolutionary biology (Imageomics institute)",
    original="NSF HDR Imageomics challenge 'Butterfly Hybrid Detection' (Codabench 3764)",
    license="CC-BY-4.0",
    citation="arXiv:2503.02112",
    columns=(ScoreColumn("challenge_score", "Harmonic mean of the three hybrid recalls"),
             ScoreColumn("A_score_major_recall", "Signal-hybrid recall (Species A)"),
             ScoreColumn("A_score_minor_recall", "Non-signal-hybrid recall (Species A)"),
             ScoreColumn("mimic_recall", "Mimic-hybrid recall"),
             ScoreColumn("A_PRC_AUC", "PR-AUC Species A"),
             ScoreColumn("A_PRC_AUC_major", "PR-AUC signal lineage"),
             ScoreColumn("A_PRC_AUC_minor", "PR-AUC non-signal lineages"),
             ScoreColumn("mimic_PRC_AUC", "PR-AUC mimic")),
    reference_file="ref.csv",
    input_description=("`input_data/<phase>/CAMxxxxxx_d.JPG` (64x64 RGB JPEGs flat in the input folder, as the "
                       "organisers'). The ingestion program creates `Model()`, calls `load()`, opens each image "
                       "with `PIL.Image.open` in `os.listdir` order and calls `Model.predict(image)` on it "
                       "unconverted, as the organisers' ingestion does; it returns one float (higher = more "
                       "likely a hybrid), written to `predictions.txt` as `filename,score` lines without a "
                       "header, rounded to 4 decimals, as the organisers' ingestion writes them."),
    predict_signature="predict(image: PIL.Image.Image) -> float",
    metric_description=("For Species A and the mimic set separately, the threshold is the lowest score keeping "
                        "recall of non-hybrids >= 0.95 (score > threshold = hybrid). `challenge_score` is the "
                        "harmonic mean of the recalls of signal hybrids, non-signal hybrids and mimic hybrids "
                        "(the organisers' score_combined); PR-AUCs alongside."),
    generation=__doc__.split("\n\n", 1)[1].split("Images are", 1)[0].strip(),
    real_data_note=("Real data: `kpflow.challenges.butterfly.load_original(csv, images)` reads the "
                    "organisers' CSV (e.g. `butterfly_anomaly_train.csv`) with images downloaded beforehand "
                    "(e.g. with cautious-robot) into (path, hybrid, subspecies) records."),
    keywords=("butterflies", "hybrids", "anomaly detection", "images", "Heliconius"),
    generate=generate,
)
