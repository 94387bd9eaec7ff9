"""The three challenges by name, and ``make_challenge``: data + card + Croissant + manifest + starting kit."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

from kpflow.challenges import butterfly, gw, sealevel
from kpflow.challenges.common import (
    HIDDEN_SEED_FILE,
    PHASES,
    ChallengeSpec,
    atomic_write_json,
    atomic_write_text,
    croissant_metadata,
    data_checksums,
    dataset_card,
    validate_croissant,
)

CHALLENGES: dict[str, ChallengeSpec] = {s.name: s for s in (gw.SPEC, butterfly.SPEC, sealevel.SPEC)}
STARTING_KITS = Path(__file__).parent / "starting_kit"
TRAIN_TABLES = {"gw": "windows.csv", "butterfly": "train.csv", "sealevel": "labels.csv"}  # record set <name>_train


def list_challenges() -> list[str]:
    """Names of the available challenges."""
    return list(CHALLENGES)


def get_challenge(name: str) -> ChallengeSpec:
    """The spec of challenge ``name`` (clear error listing valid names otherwise)."""
    if name not in CHALLENGES:
        raise KeyError(f"unknown challenge {name!r}; valid names: {', '.join(CHALLENGES)}")
    return CHALLENGES[name]


def make_challenge(name: str, out: Path, seed: int = 0, scale: float = 1.0, overwrite: bool = False,
                   hidden_seed: int | None = None) -> dict:
    """Generate challenge ``name`` into folder ``out`` and return its manifest.

    The public ``seed`` determines the training split; the hidden val/test splits come from
    ``hidden_seed``, by default 128 fresh bits from :mod:`secrets`, written only to
    ``out/reference_data/SECRET_hidden_seed.json`` (beside the labels, never in the manifest, card or
    inputs), so the public seed and the package cannot rebuild the hidden data. Deterministic: the same
    ``seed``, ``hidden_seed`` and ``scale`` give byte-identical data files (their sha256 are in
    ``out/challenge.json``). The folder is built beside ``out`` and renamed into place, so an
    interrupted make leaves no half-made challenge.

    Raises:
        KeyError: unknown ``name`` (the message lists the valid names).
        FileExistsError: ``out`` exists, is not empty, and ``overwrite`` is False.
        ValueError: ``scale`` is not positive or ``hidden_seed`` is negative.
    """
    spec = get_challenge(name)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    if hidden_seed is None:
        hidden_seed = secrets.randbits(128)
    if int(hidden_seed) < 0:
        raise ValueError(f"hidden_seed must be a non-negative integer, got {hidden_seed}")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building."))
    try:
        info = spec.generate(build, int(seed), int(hidden_seed), float(scale))
        manifest = {
            "name": spec.name, "title": spec.title, "seed": int(seed), "scale": float(scale),
            "hidden_seed_file": HIDDEN_SEED_FILE,
            "phases": list(PHASES), "score_keys": spec.score_keys, "primary": spec.primary,
            "reference_file": spec.reference_file, **info,
            "checksums": data_checksums(build),
        }
        atomic_write_json(build / HIDDEN_SEED_FILE, {
            "hidden_seed": str(int(hidden_seed)),
            "note": "Secret: draws the hidden val/test splits. Keep it with the reference data, never with the "
                    "inputs; `make_challenge(..., seed, hidden_seed=int(this))` rebuilds every file."})
        atomic_write_text(build / "DATASET_CARD.md", dataset_card(spec, manifest))
        croissant_path = build / "croissant.json"
        atomic_write_json(croissant_path, croissant_metadata(spec, manifest, build, TRAIN_TABLES[spec.name]))
        manifest["croissant"] = validate_croissant(croissant_path)
        kit = build / "starting_kit"
        shutil.copytree(STARTING_KITS / spec.name, kit, ignore=shutil.ignore_patterns("__pycache__"))
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_json(build / "challenge.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return manifest
