"""The training loop: deterministic from a seed, checkpointed every k steps, resumable.

Determinism: the weights come from ``seed`` and the batch of step ``s`` is drawn from the seed pair
``(seed, s)``, so a run needs no random-generator state to resume — restarting from checkpoint ``s``
reproduces exactly the trajectory of an uninterrupted run (on the same device and library versions).
Checkpoints are written at step 0 (the initialisation), every ``checkpoint_every`` steps and at the end.
A finished run resumed with more ``steps`` continues from its last checkpoint; the new steps draw the same
batches, so its weights equal those of a run asked for the larger number of steps from the start.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kpflow.tasks import Task, TaskBatch, task_loss

from .checkpoints import CheckpointInfo, list_checkpoints, load_checkpoint, save_checkpoint
from .config import OptimizerConfig, RunConfig, TrainConfig
from .optimizers import make_optimizer, needs_closure


def step_seed(seed: int, step: int) -> int:
    """The seed of the training batch at ``step`` (a SeedSequence hash of ``(seed, step)``)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model and optimizer, per-step losses, checkpoints written or found."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    losses: dict[int, float] = field(default_factory=dict)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    resumed_from: int | None = None
    stopped_early: bool = False
    final_step: int = 0


def _resolve(config) -> tuple[TrainConfig, OptimizerConfig | None, dict | None, int]:
    if isinstance(config, RunConfig):
        return config.train, config.optimizer, config.model_dump(mode="json"), config.seed
    if isinstance(config, TrainConfig):
        return config, None, None, 0
    if isinstance(config, dict):
        return TrainConfig.model_validate(config), None, None, 0
    raise TypeError(f"config must be a RunConfig, TrainConfig or dict, got {type(config).__name__}")


def _build_optimizer(optimizer, opt_cfg, model):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        return make_optimizer(optimizer, model)
    if callable(optimizer):
        return optimizer(model)
    if optimizer is None and opt_cfg is not None:
        return make_optimizer(opt_cfg.name, model, lr=opt_cfg.lr, **opt_cfg.params)
    if optimizer is None:
        return make_optimizer("adam", model, lr=1e-3)
    raise TypeError(f"optimizer must be None, a name, a factory(model) or a torch.optim.Optimizer, got {optimizer!r}")


def train(model: torch.nn.Module, task: Task, config: RunConfig | TrainConfig | dict, *,
          optimizer: torch.optim.Optimizer | str | Callable | None = None, seed: int | None = None,
          out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          on_step: Callable[[int, float, torch.nn.Module], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train ``model`` on ``task`` with gradient descent.

    Args:
        config: a ``RunConfig`` (uses its ``train``, ``optimizer`` and ``seed``), a ``TrainConfig`` or a dict.
        optimizer: override the configured optimizer: a registered name, a factory ``f(model)`` or an instance.
        seed: batch seed (default: the RunConfig's seed, else 0).
        out_dir: folder for checkpoints (``<out_dir>/checkpoints``); None keeps nothing on disk.
        resume: continue from the last complete checkpoint in ``out_dir`` (damaged ones are reported and skipped),
            also when that run finished with fewer ``steps`` than asked for now.
        on_step: called as ``on_step(step, loss, model)`` after every optimizer step.
        stop_after: stop (as if interrupted) once this step's checkpoint is written; for tests and time limits.
    """
    train_cfg, opt_cfg, config_record, cfg_seed = _resolve(config)
    seed = cfg_seed if seed is None else int(seed)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    opt = _build_optimizer(optimizer, opt_cfg, model)
    loss_kind = None if train_cfg.loss == "auto" else train_cfg.loss
    ckpt_dir = None if out_dir is None else Path(out_dir) / "checkpoints"
    result = TrainResult(model=model, optimizer=opt)

    def checkpoint(step, window, final=False):
        if ckpt_dir is None:
            return
        mean = float(np.mean(window)) if window else None
        info = save_checkpoint(ckpt_dir, step, model, opt, loss=mean, losses=list(window), seed=seed,
                               config=config_record, final=final, stopped_early=result.stopped_early,
                               time=time.time())
        result.checkpoints.append(info)

    start = 0
    if ckpt_dir is not None and resume:
        found = list_checkpoints(ckpt_dir)
        if found:
            last = found[-1]
            load_checkpoint(last, model, opt)
            start, result.resumed_from = last.step, last.step
            result.checkpoints = list(found)
            for c in found:
                for i, v in enumerate(c.meta.get("losses") or []):
                    result.losses[c.step - len(c.meta["losses"]) + 1 + i] = v
            stopped_early = bool(last.meta.get("stopped_early"))
            if last.meta.get("final") and (stopped_early or last.step >= train_cfg.steps):
                result.stopped_early, result.final_step = stopped_early, last.step
                return result  # finished; a finished run asked for more steps continues from here instead
    if start == 0 and (ckpt_dir is None or not result.checkpoints):
        checkpoint(0, [])

    def compute_loss(batch: TaskBatch):
        _, outputs = model(batch.inputs)
        return task_loss(outputs, batch, loss_kind)

    window: list[float] = []
    bar = _progress(range(start + 1, train_cfg.steps + 1), progress, total=train_cfg.steps, initial=start)
    step = start
    for step in bar:
        batch = task.sample(train_cfg.batch_size, step_seed(seed, step), device=device, dtype=dtype)
        if hasattr(opt, "set_batch"):
            opt.set_batch(batch)
        model.train()

        def closure(batch=batch):
            opt.zero_grad(set_to_none=True)
            loss = compute_loss(batch)
            loss.backward()
            if train_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            return loss

        if needs_closure(opt):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; lower optimizer.lr "
                                     f"(now {opt.param_groups[0].get('lr')}) or set train.grad_clip")
        result.losses[step] = value
        window.append(value)
        if on_step is not None:
            on_step(step, value, model)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        at_end = step == train_cfg.steps
        if step % train_cfg.checkpoint_every == 0 or at_end:
            mean = float(np.mean(window))
            early = train_cfg.early_stop_loss is not None and mean < train_cfg.early_stop_loss
            result.stopped_early = early and not at_end
            checkpoint(step, window, final=at_end or early)
            window = []
            if early:
                break
            if stop_after is not None and step >= stop_after:
                break
    if hasattr(bar, "close"):
        bar.close()
    result.final_step = step
    return result


def _progress(iterable, enabled, total, initial):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        warnings.warn("tqdm is not installed; training without a progress bar", stacklevel=3)
        return iterable
    return tqdm(iterable, total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.5)
