"""What every challenge shares: its spec, folder layout, checksums, dataset card and Croissant metadata.

A made challenge folder looks like::

    DIR/
      challenge.json          manifest: name, seed, scale, per-file sha256, counts, shapes
      DATASET_CARD.md         description, license, citation, splits, shapes, how it was made
      croissant.json          Croissant 1.1 JSON-LD (validated with mlcroissant when installed)
      train/                  public training data (with labels)
      input_data/{val,test}/  unlabelled inputs the ingestion program feeds to a submission
      reference_data/{val,test}/  the labels (never shown to a submission)
      reference_data/SECRET_hidden_seed.json  the secret seed of the hidden splits
      starting_kit/           a sample submission (model.py) and a README
      leaderboard.json        written by ``kpflow challenge run``
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kpflow.files import atomic_write_bytes, atomic_write_text, sha256_file, write_csv  # noqa: F401 (re-exported)

PHASES = ("val", "test")
PHASE_NAMES = {"val": "Development", "test": "Final"}
DATA_ROOTS = ("train", "input_data", "reference_data")
HIDDEN_SEED_FILE = "reference_data/SECRET_hidden_seed.json"  # the secret that draws the hidden splits


@dataclass(frozen=True)
class ScoreColumn:
    key: str
    title: str
    sorting: str = "desc"


@dataclass(frozen=True)
class ChallengeSpec:
    """Static description of one challenge; ``generate(out, seed, hidden_seed, scale)`` writes its data
    (public training split from ``seed``, hidden val/test splits from ``hidden_seed``)."""

    name: str
    title: str
    summary: str
    domain: str
    original: str
    license: str
    citation: str
    columns: tuple[ScoreColumn, ...]
    reference_file: str
    input_description: str
    predict_signature: str
    metric_description: str
    generation: str
    generate: Callable[[Path, int, int, float], dict]
    real_data_note: str = ""
    keywords: tuple[str, ...] = field(default_factory=tuple)

    @property
    def primary(self) -> str:
        return self.columns[0].key

    @property
    def score_keys(self) -> list[str]:
        return [c.key for c in self.columns]


CITATION = ("Campolongo, Chou, Govorkova et al., Building Machine Learning Challenges for Anomaly Detection "
            "in Science, arXiv:2503.02112 (2025)")


# ----------------------------------------------------------------------------- small utilities
def child_rngs(seed: int, names: list[str]) -> dict[str, np.random.Generator]:
    """Independent generators per split, derived from one seed (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.Generator(np.random.PCG64(c)) for n, c in zip(names, children, strict=True)}


def scaled(count: int, scale: float, minimum: int = 4) -> int:
    """``count`` multiplied by ``scale``, at least ``minimum``."""
    if not (scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(int(minimum), int(round(count * scale)))


def atomic_write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def data_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under the data roots (but the hidden seed), keyed by path relative to ``folder``."""
    folder = Path(folder)
    out = {}
    for root in DATA_ROOTS:
        for path in sorted((folder / root).rglob("*")):
            if path.is_file() and path.relative_to(folder).as_posix() != HIDDEN_SEED_FILE:
                out[path.relative_to(folder).as_posix()] = sha256_file(path)
    return out


def check_challenge_folder(folder: Path, name: str | None = None) -> dict:
    """The manifest of a made challenge folder, or a clear error saying what is missing."""
    folder = Path(folder)
    manifest_path = folder / "challenge.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a made challenge folder (no challenge.json); "
            f"create it with `kpflow challenge make {name or 'NAME'} --out {folder}`")
    manifest = json.loads(manifest_path.read_text())
    if name is not None and manifest.get("name") != name:
        raise ValueError(f"{folder} holds challenge {manifest.get('name')!r}, not {name!r}")
    return manifest


# ----------------------------------------------------------------------------- card and Croissant
def dataset_card(spec: ChallengeSpec, manifest: dict) -> str:
    """Markdown dataset card: description, license, citation, splits, shapes, provenance."""
    splits = "\n".join(f"| {split} | {info} |" for split, info in manifest["splits"].items())
    files = "\n".join(f"| `{p}` | `{h[:16]}…` |" for p, h in list(manifest["checksums"].items())[:40])
    more = len(manifest["checksums"]) - 40
    columns = "\n".join(f"| `{c.key}` | {c.title} | {c.sorting} |" for c in spec.columns)
    return f"""# {spec.title} — dataset card

{spec.summary}

- **Domain:** {spec.domain}
- **Stands in for:** {spec.original}
- **License:** {spec.license} (synthetic data generated by kpflow; no third-party data included)
- **Cite:** {CITATION}; and kpflow (this generator).
- **Generator:** `kpflow challenge make {spec.name} --seed {manifest['seed']} --scale {manifest['scale']}`
  (the public seed and scale give the same training files; the hidden val/test splits are drawn from a
  secret seed made at `make` time and kept with the reference data, so they cannot be rebuilt from
  the public seed; checksums of every file are listed in `challenge.json`).

## Splits

| split | contents |
|---|---|
{splits}

## Inputs and submissions

{spec.input_description}

A submission is a folder or zip with `model.py` defining `class Model` with `load()` and
`{spec.predict_signature}`. It runs in an operating-system sandbox (Linux namespaces through bubblewrap,
with time, CPU, memory, file-size, process and log limits) that holds only its code, the phase's
inputs and the Python environment: never `reference_data/`, the network or other processes. It may
write only its predictions and status files.

## Metric

{spec.metric_description}

| key in scores.json | title | sorting |
|---|---|---|
{columns}

## How it was made

{spec.generation}

{spec.real_data_note}

## Files (sha256)

| file | sha256 |
|---|---|
{files}
{f'| … and {more} more in challenge.json | |' if more > 0 else ''}
"""


def _column_type(values: list[str]) -> str:
    """The Croissant data type of a CSV column: sc:Integer, sc:Float, sc:Date or sc:Text."""
    import datetime as dt

    def all_parse(cast) -> bool:
        try:
            for v in values:
                cast(v)
            return bool(values)
        except ValueError:
            return False

    if all_parse(int):
        return "sc:Integer"
    if all_parse(float):
        return "sc:Float"
    if all_parse(lambda v: dt.date.fromisoformat(v) if len(v) == 10 else int("x")):
        return "sc:Date"
    return "sc:Text"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _table_record_set(record_id: str, file_id: str, path: Path, description: str) -> dict:
    """A record set with one field per column of the CSV file ``path`` (types read from the values)."""
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    fields = [{"@type": "cr:Field", "@id": f"{record_id}/{_slug(c)}", "name": _slug(c),
               "description": f"column '{c}' of {file_id}", "dataType": _column_type([r[k] for r in body]),
               "source": {"fileObject": {"@id": file_id}, "extract": {"column": c}}}
              for k, c in enumerate(header)]
    return {"@type": "cr:RecordSet", "@id": record_id, "name": record_id, "description": description,
            "field": fields}


def _rai(spec: ChallengeSpec) -> dict:
    """Responsible-AI fields (Croissant RAI vocabulary) of a synthetic stand-in dataset."""
    return {
        "rai:dataCollection": ("Synthetic: every record is drawn by kpflow's documented generator from a seed "
                               f"(see the description and DATASET_CARD.md); nothing was collected. {spec.generation}"),
        "rai:dataCollectionType": ["Simulation"],
        "rai:dataAnnotationProtocol": ["Labels are known by construction: the generator records which class "
                                       "(normal or anomalous kind) produced each item."],
        "rai:annotationsPerItem": "1 (generated, not annotated by people)",
        "rai:dataBiases": [f"A simplified stand-in for {spec.original}: the generator's assumptions (listed in "
                           "the description) decide what is normal and anomalous, so methods tuned on it may "
                           "not transfer to the real data."],
        "rai:dataLimitations": ["Synthetic; use the real data (see the loaders in kpflow.challenges) for "
                                "scientific conclusions.",
                                "Only the public training split is described here; the hidden val/test splits "
                                "come from a secret seed kept with the reference data."],
        "rai:dataUseCases": ["Testing anomaly detectors, challenge pipelines and code submissions offline.",
                             "Teaching the FAIR challenge scheme of arXiv:2503.02112."],
        "rai:dataSocialImpact": "Low: synthetic physical or biological signals, no people represented.",
        "rai:personalSensitiveInformation": ["None: no record describes a person."],
        "rai:dataReleaseMaintenancePlan": ("Regenerated on demand by `kpflow challenge make`; versioned with the "
                                           "kpflow package that generates it."),
    }


def croissant_metadata(spec: ChallengeSpec, manifest: dict, folder: Path, train_table: str) -> dict:
    """Croissant 1.1 JSON-LD of a challenge folder's training data.

    Every training file is a ``cr:FileObject`` (with its sha256), every image folder a ``cr:FileSet``;
    each training CSV is a record set with one field per column (``<name>_train`` for
    ``train_table``), each image folder a record set of (file name, image). Carries the required
    ``name``, ``description``, ``license``, ``url``, ``creator``, ``datePublished``, ``citeAs``,
    ``version`` and the responsible-AI (``rai:``) fields.
    """
    import datetime as dt

    folder = Path(folder)
    context = {
        "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
        "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
        "dct": "http://purl.org/dc/terms/", "citeAs": "cr:citeAs", "column": "cr:column",
        "conformsTo": "dct:conformsTo", "data": {"@id": "cr:data", "@type": "@json"},
        "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "examples": {"@id": "cr:examples",
                                                                           "@type": "@json"},
        "extract": "cr:extract", "field": "cr:field", "fileObject": "cr:fileObject",
        "fileProperty": "cr:fileProperty", "fileSet": "cr:fileSet", "format": "cr:format",
        "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath",
        "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
        "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
        "repeated": "cr:repeated", "replace": "cr:replace", "separator": "cr:separator",
        "samplingRate": "cr:samplingRate", "equivalentProperty": "cr:equivalentProperty",
        "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform",
        "sdVersion": "cr:sdVersion", "containedIn": "cr:containedIn",
    }
    distribution, record_sets, image_folders = [], [], {}
    for path, digest in manifest["checksums"].items():
        if not path.startswith("train/"):
            continue
        if path.count("/") > 1:
            image_folders.setdefault(path.rsplit("/", 1)[0], set()).add(path.rsplit(".", 1)[-1])
            continue
        distribution.append({"@type": "cr:FileObject", "@id": path, "name": path, "contentUrl": path,
                             "encodingFormat": _encoding(path), "sha256": digest})
        if path.endswith(".csv"):
            name = Path(path).name
            record_id = f"{spec.name}_train" if name == train_table else f"{spec.name}_{_slug(Path(path).stem)}"
            record_sets.append(_table_record_set(record_id, path, folder / path, f"The rows of {path}."))
    for sub, suffixes in sorted(image_folders.items()):
        file_set = f"{sub}/"
        suffix = sorted(suffixes)[0]
        distribution.append({"@type": "cr:FileSet", "@id": file_set, "name": file_set,
                             "encodingFormat": _encoding(f"x.{suffix}"), "includes": f"{sub}/*.{suffix}"})
        record_id = f"{spec.name}_{_slug(sub.split('/', 1)[1])}"
        record_sets.append({"@type": "cr:RecordSet", "@id": record_id, "name": record_id,
                            "description": f"The images in {sub}/, by file name.", "field": [
                                {"@type": "cr:Field", "@id": f"{record_id}/filename", "name": "filename",
                                 "dataType": "sc:Text", "source": {"fileSet": {"@id": file_set},
                                                                   "extract": {"fileProperty": "filename"}}},
                                {"@type": "cr:Field", "@id": f"{record_id}/image", "name": "image",
                                 "dataType": "sc:ImageObject", "source": {"fileSet": {"@id": file_set},
                                                                          "extract": {"fileProperty": "content"}}}]})
    record_sets.sort(key=lambda r: r["@id"] != f"{spec.name}_train")
    return {
        "@context": context,
        "@type": "sc:Dataset",
        "name": f"kpflow-{spec.name}",
        "description": spec.summary,
        "conformsTo": "http://mlcommons.org/croissant/1.1",
        "license": "https://creativecommons.org/licenses/by/4.0/",
        "url": "https://github.com/kpflow/kpflow",
        "creator": {"@type": "sc:Organization", "name": "kpflow", "url": "https://github.com/kpflow/kpflow"},
        "datePublished": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "citeAs": CITATION,
        "version": "1.0.0",
        "keywords": list(spec.keywords),
        "isLiveDataset": False,
        **_rai(spec),
        "distribution": distribution,
        "recordSet": record_sets,
    }


def _encoding(path: str) -> str:
    suffix = path.rsplit(".", 1)[-1].lower()
    return {"csv": "text/csv", "npz": "application/x-npz", "npy": "application/x-npy",
            "nc": "application/x-netcdf", "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
            "json": "application/json"}.get(
        suffix, "application/octet-stream")


def validate_croissant(path: Path) -> str:
    """Validate with mlcroissant when installed; returns 'valid', or 'skipped (...)'."""
    try:
        import mlcroissant  # noqa: F401
    except ImportError:
        return "skipped (mlcroissant not installed; pip install 'kpflow[challenges]')"
    import mlcroissant as mlc

    mlc.Dataset(jsonld=str(path))  # raises on an invalid description
    return "valid"
