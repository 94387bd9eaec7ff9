"""Follow the operators through training: measure every checkpoint of a run on one fixed evaluation batch
and write the tidy table ``metrics.csv`` (run, step, metric, value, stderr, method).

Per-checkpoint results are cached in ``<run>/analysis/step_XXXXXX.json`` (keyed by the checkpoint's hash
and the tracking settings), so an interrupted analysis resumes and a finished one is free to repeat.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import torch

from kpflow.files import write_csv
from kpflow.tasks import make_task
from kpflow.training.checkpoints import atomic_write_text, list_checkpoints, load_checkpoint
from kpflow.training.config import RunConfig, load_config
from kpflow.training.models import build_model

from .measure import Reference, measure_checkpoint
from .summaries import Stat

COLUMNS = ("run", "step", "metric", "value", "stderr", "method")


def build_from_config(cfg: RunConfig):
    """The task and a freshly initialised model of a run config (float32 unless the config says otherwise);
    models built for a sequence length (transformer, mlp) get the task's ``seq_len``."""
    task = make_task(cfg.task.name, **cfg.task.params)
    model = build_model(cfg.model.name, task.input_dim, cfg.model.hidden, task.output_dim, g=cfg.model.g,
                        seed=cfg.seed, device=cfg.device, dtype=cfg.torch_dtype(),
                        seq_len=getattr(task, "seq_len", None), **cfg.model.params)
    return task, model


def run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a kpflow run folder (no config.yaml); create one with `kpflow run`")
    return load_config(path)


def _selected(checkpoints, every: int):
    if every <= 1 or len(checkpoints) <= 2:
        return list(checkpoints)
    keep = [c for i, c in enumerate(checkpoints) if i % every == 0]
    if keep[-1] is not checkpoints[-1]:
        keep.append(checkpoints[-1])
    return keep


def _cache_key(ckpt, cfg: RunConfig) -> str:
    payload = json.dumps({"sha": ckpt.meta["sha256"], "track": cfg.track.model_dump(mode="json"),
                          "version": 1}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, [{**r, "value": repr(float(r["value"])), "stderr": repr(float(r["stderr"]))} for r in rows],
              COLUMNS)


def read_metrics_csv(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [{**r, "step": int(r["step"]), "value": float(r["value"]), "stderr": float(r["stderr"])}
                for r in csv.DictReader(f)]


def training_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """Per-step training losses recovered from the checkpoint sidecars."""
    out = {}
    for c in list_checkpoints(Path(run_dir) / "checkpoints"):
        losses = c.meta.get("losses") or []
        for i, v in enumerate(losses):
            out[c.step - len(losses) + 1 + i] = float(v)
    return sorted(out.items())


def analyze_run(run_dir: str | Path, *, every: int | None = None, force: bool = False,
                progress: bool = True) -> Path:
    """Measure every (``every``-th) checkpoint of the run in ``run_dir``; returns the path of metrics.csv."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint; train first (`kpflow run`)")
    chosen = _selected(checkpoints, every or cfg.track.every)
    task, model = build_from_config(cfg)
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed, device=cfg.device)
    cache_dir = run_dir / "analysis"
    cache_dir.mkdir(exist_ok=True)
    reference: Reference | None = None
    rows: list[dict] = []
    bar = _progress(chosen, progress)
    for ckpt in bar:
        cache = cache_dir / f"step_{ckpt.step:06d}.json"
        key = _cache_key(ckpt, cfg)
        step_rows = None if force else _read_cache(cache, key)
        is_first = ckpt is chosen[0]
        if step_rows is None:
            load_checkpoint(ckpt, model)
            if not is_first and reference is None:
                raise RuntimeError("internal: the initial NTK reference is missing")
            step_rows, ref = measure_checkpoint(
                model, task, batch, probes=cfg.track.probes, seed=cfg.track.eval_seed,
                param_names=cfg.track.param_names, axes=cfg.track.axes, reference=None if is_first else reference)
            if is_first:
                reference = ref
            atomic_write_text(cache, json.dumps({"key": key, "step": ckpt.step, "rows": step_rows}))
        elif is_first and (force or any(_read_cache(cache_dir / f"step_{c.step:06d}.json", _cache_key(c, cfg))
                                        is None for c in chosen[1:])):
            load_checkpoint(ckpt, model)
            reference = initial_reference(model, batch, cfg, step_rows)
        for r in step_rows:
            rows.append({"run": cfg.name, "step": ckpt.step, **r})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(step=ckpt.step, refresh=False)
    out = run_dir / "metrics.csv"
    write_metrics_csv(out, rows)
    return out


def selected_steps(run_dir: str | Path, every: int | None = None) -> list[int]:
    """Steps of the checkpoints ``analyze_run`` measures (every ``every``-th; the first and last always)."""
    cfg = run_config(run_dir)
    checkpoints = list_checkpoints(Path(run_dir) / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'} holds no complete checkpoint; train first "
                                "(`kpflow run`)")
    return [c.step for c in _selected(checkpoints, every or cfg.track.every)]


def measure_step(run_dir: str | Path, step: int, every: int | None = None, force: bool = False) -> list[dict]:
    """Measure the checkpoint at ``step`` alone and cache its rows (``<run>/analysis/step_XXXXXX.json``), as
    ``analyze_run`` would; a task of a fanned-out analysis (``experiments.distributed.analyze_checkpoints``).

    Every checkpoint after the first selected one is compared with the initial NTK, rebuilt here from the
    first checkpoint and its cached rows, so the first selected step must be measured before the others.

    Returns:
        The checkpoint's rows (metric, value, stderr, method).

    Raises:
        ValueError: ``step`` is not a selected checkpoint. RuntimeError: the first one is not measured yet.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    chosen = _selected(list_checkpoints(run_dir / "checkpoints"), every or cfg.track.every)
    by_step = {c.step: c for c in chosen}
    if step not in by_step:
        raise ValueError(f"step {step} is not a measured checkpoint of {run_dir}; measured steps: "
                         f"{', '.join(map(str, by_step))}")
    ckpt, first = by_step[step], chosen[0]
    cache_dir = run_dir / "analysis"
    cache_dir.mkdir(exist_ok=True)
    cache, key = cache_dir / f"step_{step:06d}.json", _cache_key(ckpt, cfg)
    rows = None if force else _read_cache(cache, key)
    if rows is not None:
        return rows
    task, model = build_from_config(cfg)
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed, device=cfg.device)
    reference = None
    if ckpt is not first:
        first_rows = _read_cache(cache_dir / f"step_{first.step:06d}.json", _cache_key(first, cfg))
        if first_rows is None:
            raise RuntimeError(f"measure the first checkpoint (step {first.step}) before step {step}: later "
                               "checkpoints are compared with its NTK")
        load_checkpoint(first, model)
        reference = initial_reference(model, batch, cfg, first_rows)
    load_checkpoint(ckpt, model)
    rows, _ = measure_checkpoint(model, task, batch, probes=cfg.track.probes, seed=cfg.track.eval_seed,
                                 param_names=cfg.track.param_names, axes=cfg.track.axes, reference=reference)
    atomic_write_text(cache, json.dumps({"key": key, "step": step, "rows": rows}))
    return rows


def _read_cache(path: Path, key: str) -> list[dict] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("rows") if isinstance(data, dict) and data.get("key") == key else None


def initial_reference(model, batch, cfg: RunConfig, rows: list[dict]) -> Reference:
    """The initial NTK operator, rebuilt from the weights, with its cached Frobenius norm."""
    from kpflow.kernels import parameter_operator, propagator, record

    m = copy.deepcopy(model).to(dtype=torch.float64)
    b = batch.to(dtype=torch.float64)
    traj = record(m, b.inputs, targets=b.targets, loss=b.loss, mask=b.mask, param_names=cfg.track.param_names)
    P = propagator(traj)
    ntk = P @ parameter_operator(traj, cfg.track.param_names, backend="auto") @ P.T
    fro = next(r for r in rows if r["metric"] == "NTK_fro")
    return Reference(ntk, Stat(fro["value"], fro["stderr"], fro["method"]))


def _progress(items, enabled):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="analyze", unit="ckpt", dynamic_ncols=True)


__all__ = ["COLUMNS", "analyze_run", "build_from_config", "initial_reference", "measure_step", "read_metrics_csv",
           "run_config", "selected_steps", "training_losses", "write_metrics_csv"]
