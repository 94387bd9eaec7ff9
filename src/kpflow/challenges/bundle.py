"""Export a made challenge as a Codabench (v2) competition bundle, and check a bundle's structure.

Bundle layout (the Codabench "Iris" example, as used by the HDR challenges)::

    competition.yaml        version 2: pages, tasks (val, test), phases (Development, Final), leaderboard
    pages/*.md              overview, data, evaluation, starting_kit, terms
    ingestion_program/      ingestion.py + metadata.yaml
    scoring_program/        scoring.py + metadata.yaml
    input_data_{val,test}/  unlabelled inputs;  reference_data_{val,test}/  labels
    starting_kit/           sample submission (+ sample_submission.zip)
    test_scoring_program/   all_correct / all_wrong / constant predictions for the val phase
    run.sh                  local emulation: ingestion, then scoring
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from kpflow.challenges import ingestion, scoring
from kpflow.challenges.common import (
    PHASE_NAMES,
    PHASES,
    atomic_write_bytes,
    atomic_write_text,
    check_challenge_folder,
    write_csv,
)
from kpflow.challenges.registry import get_challenge

DOCKER_IMAGE = "ghcr.io/a3d3-institute/hdr-image:latest"
PAGES = ("overview", "data", "evaluation", "starting_kit", "terms")
LOGO = "logo.png"
PHASE_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def logo_png(name: str, size: int = 128) -> bytes:
    """A deterministic PNG logo for challenge ``name`` (a hue from its name over a radial gradient)."""
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    hue = int(hashlib.sha256(name.encode()).hexdigest()[:2], 16) / 255.0
    grid = np.linspace(-1, 1, size)
    r = np.hypot(*np.meshgrid(grid, grid))
    base = np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
    image = (np.clip(1.1 - r, 0, 1)[..., None] * base[None, None, :] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class BundleError(ValueError):
    """A bundle that Codabench would reject; the message lists every problem found."""


# ----------------------------------------------------------------------------- fixtures
def reference_predictions(challenge: str, ref_dir: Path, res_dir: Path, mode: str = "correct") -> Path:
    """Write the challenge's predictions file (``ingestion.PREDICTIONS_FILES``) in ``res_dir``, derived
    from the reference labels, in the format the ingestion program writes (butterfly: header-less
    ``filename,score`` lines).

    ``mode``: 'correct' (the labels themselves), 'wrong' (labels flipped), 'constant' (all 0).
    """
    spec = get_challenge(challenge)
    if mode not in ("correct", "wrong", "constant"):
        raise ValueError(f"mode must be 'correct', 'wrong' or 'constant', got {mode!r}")
    with open(Path(ref_dir) / spec.reference_file, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def value(label):
        label = int(label)
        return {"correct": label, "wrong": 1 - label, "constant": 0}[mode]

    res_dir = Path(res_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    header = None
    if challenge == "gw":
        header, body = ["id", "score"], [(r["id"], value(r["label"])) for r in rows]
    elif challenge == "butterfly":
        body = [(r["filename"], value(r["hybrid_stat"])) for r in rows]
    else:
        stations = [c for c in rows[0] if c != "date"]
        header, body = ["date", *stations], [(r["date"], *(value(r[s]) for s in stations)) for r in rows]
    path = res_dir / ingestion.PREDICTIONS_FILES[challenge]
    write_csv(path, body, header)
    return path


# ----------------------------------------------------------------------------- export
def competition_yaml(spec, manifest: dict) -> dict:
    tasks = [{"index": k, "name": f"{PHASE_NAMES[p]} task", "description": f"{spec.title}: {p} inputs",
              "is_public": False, "input_data": f"input_data_{p}", "reference_data": f"reference_data_{p}",
              "ingestion_program": "ingestion_program", "scoring_program": "scoring_program"}
             for k, p in enumerate(PHASES)]
    phases = [
        {"index": 0, "name": "Development", "description": "Scored on the validation inputs, with feedback.",
         "start": "2025-01-01 00:00:00", "end": "2025-12-31 00:00:00", "max_submissions_per_day": 5,
         "max_submissions": 100, "execution_time_limit": 3600, "starting_kit": "starting_kit", "tasks": [0]},
        {"index": 1, "name": "Final", "description": "Every successful development submission re-run on the test "
         "inputs.", "start": "2026-01-01 00:00:00", "end": "2026-01-31 00:00:00", "max_submissions_per_day": 1,
         "max_submissions": 1, "execution_time_limit": 3600, "auto_migrate_to_this_phase": True,
         "starting_kit": "starting_kit", "tasks": [1]},
    ]
    columns = [{"title": c.title, "key": c.key, "index": k, "sorting": c.sorting, "computation": None,
                "computation_indexes": None} for k, c in enumerate(spec.columns)]
    return {
        "version": 2, "title": spec.title, "description": spec.summary, "image": LOGO,
        "registration_auto_approve": True, "docker_image": DOCKER_IMAGE, "enable_detailed_results": False,
        "terms": "pages/terms.md",
        "pages": [{"title": p.replace("_", " ").title(), "file": f"pages/{p}.md"} for p in PAGES],
        "tasks": tasks, "solutions": [], "phases": phases,
        "leaderboards": [{"index": 0, "title": "Results", "key": "Results", "columns": columns}],
    }


def _pages(spec, card: str) -> dict[str, str]:
    return {
        "overview": f"# {spec.title}\n\n{spec.summary}\n\nStands in for: {spec.original}.\n",
        "data": card,
        "evaluation": f"# Evaluation\n\n{spec.metric_description}\n",
        "starting_kit": (f"# Starting kit\n\nSubmit a zip of a folder holding `model.py` with `class Model` "
                         f"(`load()`, `{spec.predict_signature}`) and any weights.\n\n{spec.input_description}\n\n"
                         "## How your code is run\n\nYour code runs in the competition's container together with the "
                         "ingestion program, which sees only your submission and the phase's unlabelled inputs; "
                         "the labels are given only to the separate scoring program, which validates your "
                         "predictions (ids and values) before scoring them. Anything your code writes besides the "
                         "predictions is discarded. Locally, `kpflow challenge run` runs submissions the same way "
                         "inside a Linux-namespace sandbox (bubblewrap) with time, memory, process and output "
                         "limits.\n"),
        "terms": ("# Terms\n\nData: CC-BY-4.0 (synthetic, generated by kpflow). Code: MIT. Winners release "
                  "training code and models under an OSI licence.\n"),
    }


def export_bundle(challenge_dir: Path, out: Path, make_zip: bool = True) -> Path:
    """Write the Codabench bundle of a made challenge to folder ``out`` (and ``out.zip``); return ``out``."""
    challenge_dir = Path(challenge_dir)
    manifest = check_challenge_folder(challenge_dir)
    spec = get_challenge(manifest["name"])
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, text in _pages(spec, (challenge_dir / "DATASET_CARD.md").read_text()).items():
        atomic_write_text(out / "pages" / f"{name}.md", text)
    program = out / "ingestion_program"
    program.mkdir()
    shutil.copy2(ingestion.__file__, program / "ingestion.py")
    atomic_write_text(program / "metadata.yaml", yaml.safe_dump({
        "command": (f"python3 /app/program/ingestion.py /app/input_data/ /app/output/ /app/program "
                    f"/app/ingested_program --challenge {spec.name}")}))
    scorer = out / "scoring_program"
    scorer.mkdir()
    shutil.copy2(scoring.__file__, scorer / "scoring.py")
    atomic_write_text(scorer / "metadata.yaml", yaml.safe_dump({
        "command": f"python3 /app/program/scoring.py /app/input/ /app/output/ --challenge {spec.name}"}))
    for phase in PHASES:
        shutil.copytree(challenge_dir / "input_data" / phase, out / f"input_data_{phase}")
        shutil.copytree(challenge_dir / "reference_data" / phase, out / f"reference_data_{phase}")
    shutil.copytree(challenge_dir / "starting_kit", out / "starting_kit")
    with zipfile.ZipFile(out / "starting_kit" / "sample_submission.zip", "w") as archive:
        archive.write(out / "starting_kit" / "model.py", "model.py")
    for mode in ("correct", "wrong", "constant"):
        reference_predictions(spec.name, out / "reference_data_val", out / "test_scoring_program" / f"all_{mode}",
                              mode)
    atomic_write_bytes(out / LOGO, logo_png(spec.name))
    for extra in ("croissant.json", "DATASET_CARD.md", "challenge.json"):
        shutil.copy2(challenge_dir / extra, out / extra)
    atomic_write_text(out / "run.sh", _RUN_SH.format(name=spec.name))
    (out / "run.sh").chmod(0o755)
    atomic_write_text(out / "competition.yaml", yaml.safe_dump(competition_yaml(spec, manifest), sort_keys=False))
    if make_zip:
        shutil.make_archive(str(out), "zip", root_dir=out)
    return out


_RUN_SH = """#!/bin/sh
# Local emulation of Codabench: ingestion of a submission folder, then scoring (phase: val).
# NO ISOLATION: the submission runs as you, with your files and network. Only for code you trust
# (e.g. the starting kit); run anything else with `kpflow challenge run`, which isolates it.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
SUB=$(cd "${{1:-$HERE/starting_kit}}" && pwd)
WORK=$(mktemp -d)
mkdir -p "$WORK/input/res" "$WORK/output"
python3 "$HERE/ingestion_program/ingestion.py" "$HERE/input_data_val" "$WORK/input/res" \
    "$HERE/ingestion_program" "$SUB" --challenge {name}
cp -r "$HERE/reference_data_val" "$WORK/input/ref"
python3 "$HERE/scoring_program/scoring.py" "$WORK/input" "$WORK/output" --challenge {name}
cat "$WORK/output/scores.json"
"""


# ----------------------------------------------------------------------------- structural check
def _phase_time(value) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    for fmt in PHASE_TIME_FORMATS:
        try:
            return dt.datetime.strptime(str(value), fmt)
        except ValueError:
            pass
    return None


def check_bundle(bundle: Path, run_scoring: bool = True) -> list[str]:
    """Problems Codabench's v2 unpacker would reject, plus this kit's rules (empty list = valid).

    Codabench v2 rules (its competition-YAML reference and unpacker): ``version: 2``; ``title``; an
    ``image`` (the logo) and a ``terms`` page that exist; pages that exist and are not empty; tasks with
    an ``index`` (unique), a ``name`` and a ``scoring_program``, whose data folders exist; phases with a
    ``name``, a ``start`` and at least one existing task, dates as ``YYYY-MM-DD HH:MM:SS``, an ``end``
    on every phase but the last, each starting after the previous one ends, and no
    ``auto_migrate_to_this_phase`` on the first phase; leaderboards with a ``title``, a ``key`` and
    columns with a ``title``, a unique ``key`` and ``index`` and ``asc``/``desc`` sorting. Kit rules:
    a named ``docker_image`` (the default image lacks the scientific stack); the final phase sets
    ``auto_migrate_to_this_phase`` (so development submissions are re-run on the test data); every
    phase attaches an existing ``starting_kit``; both programs have a ``metadata.yaml`` command; and —
    with ``run_scoring`` — the scoring program, run on the all-correct fixture, writes exactly the
    leaderboard keys.
    """
    bundle = Path(bundle)
    problems: list[str] = []
    path = bundle / "competition.yaml"
    if not path.is_file():
        return [f"missing {path}"]
    try:
        comp = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"competition.yaml is not valid YAML: {err}"]
    if not isinstance(comp, dict):
        return ["competition.yaml must be a mapping"]
    if comp.get("version") != 2:
        problems.append(f"version must be 2 (a Codabench bundle), got {comp.get('version')!r}")
    for key in ("title", "pages", "tasks", "phases", "leaderboards"):
        if key not in comp:
            problems.append(f"competition.yaml lacks '{key}'")
    if "image" not in comp:
        problems.append("An image for this competition could not be found in the yaml (add 'image: logo.png')")
    elif not (bundle / str(comp["image"])).is_file():
        problems.append(f"Unable to find image: {comp['image']}")
    if not comp.get("terms") or not (bundle / str(comp["terms"])).is_file():
        problems.append("A file containing the terms of this competition has not been supplied ('terms')")
    if not comp.get("docker_image"):
        problems.append("no docker_image named; Codabench's default image (codalab/codalab-legacy:py3) lacks "
                        "the scientific stack the programs need")
    for page in comp.get("pages") or []:
        page_path = bundle / str(page.get("file", ""))
        if not page_path.is_file():
            problems.append(f"page {page.get('title')!r} points to missing file {page.get('file')!r}")
        elif not page_path.read_text().strip():
            problems.append(f"page {page.get('file')!r} is empty, it must contain content")
    task_indices = set()
    for task in comp.get("tasks") or []:
        idx = task.get("index")
        if not isinstance(idx, int) or idx in task_indices:
            problems.append(f"task index {idx!r} is missing, not an integer or duplicated")
        task_indices.add(idx)
        if "key" in task:
            continue
        if not task.get("name"):
            problems.append(f"task {idx} lacks a 'name'")
        for folder in ("input_data", "reference_data", "ingestion_program", "scoring_program"):
            if not task.get(folder) or not (bundle / str(task[folder])).exists():
                problems.append(f"task {idx}: {folder} {task.get(folder)!r} is not a folder in the bundle")
    phases = sorted(comp.get("phases") or [], key=lambda p: p.get("index") or 0)
    previous_end = None
    for k, phase in enumerate(phases):
        label = phase.get("name", phase.get("index"))
        for key in ("name", "start", "tasks"):
            if key not in phase:
                problems.append(f"phase {label!r} lacks '{key}'")
        if not phase.get("tasks"):
            problems.append(f"phase {label!r}: Phases must contain at least one task to be valid")
        for t in phase.get("tasks") or []:
            if t not in task_indices:
                problems.append(f"phase {label!r} refers to unknown task {t!r}")
        start, end = _phase_time(phase.get("start")), _phase_time(phase.get("end")) if "end" in phase else None
        if "start" in phase and start is None:
            problems.append(f"phase {label!r}: start {phase['start']!r} is not a 'YYYY-MM-DD HH:MM:SS' date-time")
        if "end" in phase and end is None:
            problems.append(f"phase {label!r}: end {phase['end']!r} is not a 'YYYY-MM-DD HH:MM:SS' date-time")
        if k < len(phases) - 1 and "end" not in phase:
            problems.append(f"Phase: {label} must have an end time because it has a phase after it")
        if previous_end is not None and start is not None and start <= previous_end:
            problems.append(f"phase {label!r} must start after the previous phase has ended")
        previous_end = end
        if k == 0 and phase.get("auto_migrate_to_this_phase"):
            problems.append(f"phase {label!r}: auto_migrate_to_this_phase cannot be set on the first phase")
        if k == len(phases) - 1 and k > 0 and not phase.get("auto_migrate_to_this_phase"):
            problems.append(f"final phase {label!r} lacks 'auto_migrate_to_this_phase: true', so development "
                            "submissions would not be re-run on the test data")
        kit = phase.get("starting_kit")
        if not kit:
            problems.append(f"phase {label!r} attaches no starting_kit")
        elif not (bundle / str(kit)).is_dir():
            problems.append(f"phase {label!r}: starting_kit {kit!r} is not a folder in the bundle")
        limit = phase.get("execution_time_limit")
        if limit is not None and not (isinstance(limit, int) and limit > 0):
            problems.append(f"phase {label!r}: execution_time_limit must be a positive number of seconds")
    column_keys: list[str] = []
    for board in comp.get("leaderboards") or []:
        for key in ("title", "key", "columns"):
            if key not in board:
                problems.append(f"leaderboard {board.get('title')!r} lacks '{key}'")
        indices = [c.get("index") for c in board.get("columns") or []]
        if len(set(indices)) != len(indices) or any(not isinstance(i, int) for i in indices):
            problems.append(f"leaderboard {board.get('title')!r} has missing or duplicated column indices {indices}")
        for column in board.get("columns") or []:
            if column.get("sorting", "desc") not in ("asc", "desc"):
                problems.append(f"column {column.get('key')!r}: sorting must be 'asc' or 'desc'")
            if not column.get("key") or not column.get("title"):
                problems.append(f"column {column!r} lacks a key or a title")
            column_keys.append(column.get("key"))
    if len(set(column_keys)) != len(column_keys):
        problems.append(f"leaderboard column keys are not unique: {column_keys}")
    for folder in ("ingestion_program", "scoring_program"):
        meta = bundle / folder / "metadata.yaml"
        if not meta.is_file() or "command" not in (yaml.safe_load(meta.read_text()) or {}):
            problems.append(f"{folder}/metadata.yaml is missing or has no 'command'")
    if run_scoring and not problems:
        problems += _scoring_keys_match(bundle, comp, set(column_keys))
    return problems


def _scoring_keys_match(bundle: Path, comp: dict, column_keys: set[str]) -> list[str]:
    command = yaml.safe_load((bundle / "scoring_program" / "metadata.yaml").read_text())["command"]
    challenge = command.split("--challenge", 1)[1].split()[0] if "--challenge" in command else None
    task = comp["tasks"][0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(bundle / task["reference_data"], work / "input" / "ref")
        shutil.copytree(bundle / "test_scoring_program" / "all_correct", work / "input" / "res")
        args = [sys.executable, str(bundle / "scoring_program" / "scoring.py"), str(work / "input"),
                str(work / "output")] + (["--challenge", challenge] if challenge else [])
        run = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            return [f"scoring program failed on the all-correct fixture: {run.stderr[-500:]}"]
        import json

        keys = set(json.loads((work / "output" / "scores.json").read_text()))
    if keys != column_keys:
        return [f"scores.json keys {sorted(keys)} differ from leaderboard column keys {sorted(column_keys)}"]
    return []
