"""Plan, run and resume the claim studies: one independent task per (claim, seed), one JSON file each.

``tasks = plan(claims, seeds, quick)`` lists the work; ``run_task(task, out)`` measures one piece and
writes ``<out>/tasks/<claim>/<size>/seed_<k>.json`` atomically (skipping it when the file is already
there, so an interrupted ``reproduce`` resumes); ``evaluate`` turns the finished files of a claim
into its :class:`~kpflow.experiments.claims.registry.Verdict`. Both are plain functions of plain data;
``run_plan`` maps ``run_task`` over ``plan(...)`` with ``experiments.distributed.map_tasks`` (Dask).
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kpflow.files import atomic_write_text

from .registry import SIZES, Verdict, claim_ids, get_claim

#: bump when a measurement's meaning changes; finished files of another version are re-measured
RESULT_VERSION = 1


@dataclass(frozen=True)
class ClaimTask:
    """One (claim, seed, size) measurement."""

    claim: str
    seed: int
    size: str

    def path(self, out: str | Path) -> Path:
        return Path(out) / "tasks" / self.claim / self.size / f"seed_{self.seed}.json"


def plan(claims: Sequence[str] | None = None, seeds: int | Sequence[int] | None = None,
         quick: bool = False) -> list[ClaimTask]:
    """The tasks of a reproduction run.

    Args:
        claims: claim ids (None: all registered, in the issue's order).
        seeds: a number n (seeds 0..n-1), explicit seeds, or None (each claim's default count at that size).
        quick: the reduced size of every study.

    Returns:
        ``ClaimTask`` list, claim-major.

    Raises:
        ValueError: for an unknown claim id or a non-positive seed count.
    """
    ids = claim_ids() if claims is None else list(claims)
    size = "quick" if quick else "full"
    if isinstance(seeds, int) and seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    tasks = []
    for cid in ids:
        claim = get_claim(cid)
        if seeds is None:
            chosen = range(claim.quick_seeds if quick else claim.seeds)
        elif isinstance(seeds, int):
            chosen = range(seeds)
        else:
            chosen = [int(s) for s in seeds]
        tasks += [ClaimTask(cid, int(s), size) for s in chosen]
    return tasks


def load_result(task: ClaimTask, out: str | Path) -> dict | None:
    """The finished measurement of ``task`` under ``out`` (None if absent, unreadable or stale)."""
    path = task.path(out)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("version") != RESULT_VERSION or rec.get("task") != asdict(task):
        return None
    return rec


def run_task(task: ClaimTask, out: str | Path) -> dict:
    """Measure ``task`` (or load its finished result) and write it atomically under ``out``.

    Returns:
        The record ``{"task", "version", "seconds", "measurement"}``.

    Raises:
        ValueError: for an unknown size; whatever the claim's ``measure`` raises.
    """
    if task.size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {task.size!r}")
    done = load_result(task, out)
    if done is not None:
        return done
    claim = get_claim(task.claim)
    t0 = time.perf_counter()
    measurement = claim.measure(task.seed, task.size)
    rec = {"task": asdict(task), "version": RESULT_VERSION, "seconds": time.perf_counter() - t0,
           "measurement": measurement}
    atomic_write_text(task.path(out), json.dumps(rec, indent=1, default=float))
    return rec


def _run_safely(task: ClaimTask, out: str) -> tuple[ClaimTask, dict | None, str | None]:
    try:
        import torch

        torch.set_num_threads(1)
        return task, run_task(task, out), None
    except Exception:  # one failing piece must not stop the others; it is reported and retried next time
        return task, None, traceback.format_exc()


def evaluate(claim_id: str, records: Sequence[dict]) -> Verdict:
    """The claim's verdict from its finished records."""
    return get_claim(claim_id).verdict([r["measurement"] for r in records])


def run_plan(tasks: Sequence[ClaimTask], out: str | Path, *, jobs: int | None = None, scheduler: str | None = None,
             workers: int | None = None, cluster_config: str | Path | None = None, progress: bool = True):
    """Run every task (skipping finished ones), each a task of ``experiments.distributed.map_tasks``:
    ``scheduler`` ``local`` (worker processes, the default with more than one core), ``tcp://host:port``,
    ``slurm`` or ``serial``; ``workers`` worker processes. ``jobs=N`` is short for ``scheduler="local",
    workers=N`` (``jobs=1``: serial). Returns ``(records, errors)`` keyed by claim id (``errors[id]`` holds the
    traceback of each failed task)."""
    from kpflow.experiments.distributed import map_tasks

    if jobs is not None and scheduler is None:
        scheduler, workers = ("serial", None) if jobs <= 1 else ("local", jobs)
    out = str(out)
    records: dict[str, list[dict]] = {t.claim: [] for t in tasks}
    errors: dict[str, list[str]] = {t.claim: [] for t in tasks}
    results, failures, _ = map_tasks(_run_safely, [(t, out) for t in tasks],
                                     [f"{t.claim}-{t.size}-seed{t.seed}" for t in tasks], scheduler=scheduler,
                                     workers=workers, cluster_config=cluster_config, progress=progress,
                                     desc="claims", unit="task")
    for t in tasks:
        key = f"{t.claim}-{t.size}-seed{t.seed}"
        task, rec, err = results.get(key, (t, None, failures.get(key)))
        if rec is not None:
            records[t.claim].append(rec)
        else:
            errors[t.claim].append(err)
    for recs in records.values():
        recs.sort(key=lambda r: r["task"]["seed"])
    return records, errors


def claim_line(claim_id: str, v: Verdict) -> str:
    """``claim=<id> verdict=<...> effect=<value> se=<value>``."""
    def num(x):
        return "nan" if not math.isfinite(x) else f"{x:.4g}"

    return f"claim={claim_id} verdict={v.verdict} effect={num(v.effect)} se={num(v.se)}"


def reproduce(claims: Sequence[str] | None = None, seeds: int | Sequence[int] | None = None, *, quick: bool = False,
              out: str | Path = "runs/claims", jobs: int | None = None, scheduler: str | None = None,
              workers: int | None = None, cluster_config: str | Path | None = None, progress: bool = True,
              report: bool = True) -> dict:
    """Run (or resume) the claim studies, evaluate every verdict and write ``<out>/claims.json`` and
    ``<out>/report.html``. ``jobs``/``scheduler``/``workers``/``cluster_config``: where the tasks run
    (``run_plan``).

    Returns:
        ``{claim_id: {"verdict": Verdict, "records": [...], "errors": [...]}}`` in the issue's order.
    """
    out = Path(out)
    tasks = plan(claims, seeds, quick)
    t0 = time.perf_counter()
    records, errors = run_plan(tasks, out, jobs=jobs, scheduler=scheduler, workers=workers,
                               cluster_config=cluster_config, progress=progress)
    results = {}
    for cid in dict.fromkeys(t.claim for t in tasks):
        try:
            v = evaluate(cid, records[cid]) if records[cid] else None
        except Exception:
            errors[cid].append(traceback.format_exc())
            v = None
        if v is None:
            v = Verdict("inconclusive", math.nan, math.nan, 0, math.nan, "above", "no finished measurement")
        results[cid] = {"verdict": v, "records": records[cid], "errors": errors[cid]}
    wall = time.perf_counter() - t0
    summary = {"size": "quick" if quick else "full", "wall_seconds": wall,
               "claims": {cid: {"verdict": r["verdict"].summary(), "errors": r["errors"],
                                "seeds": [rec["task"]["seed"] for rec in r["records"]],
                                "seconds": [rec["seconds"] for rec in r["records"]]}
                          for cid, r in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.json", json.dumps(summary, indent=1, default=float))
    if report:
        from .report import write_claims_report

        write_claims_report(out / "report.html", results, size=summary["size"], wall_seconds=wall)
    return results
