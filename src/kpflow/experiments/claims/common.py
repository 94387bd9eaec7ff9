"""Helpers shared by the claim studies: sizes, seeded models and short training runs (all through the
library: ``kpflow.training.build_model`` / ``train`` and ``kpflow.kernels.record``)."""

from __future__ import annotations

import copy

import torch


def pick(size: str, quick, full):
    """``quick`` at size ``"quick"``, else ``full``."""
    if size not in ("quick", "full"):
        raise ValueError(f"size must be 'quick' or 'full', got {size!r}")
    return quick if size == "quick" else full


def trained(model_name: str, task, hidden: int, seed: int, steps: int, *, g: float = 1.0, lr: float = 1e-2,
            optimizer: str = "adam", batch_size: int = 32, every: int | None = None, init=None,
            grad_clip: float | None = None, **model_params):
    """Build ``model_name`` from ``seed`` and train it ``steps`` steps on ``task`` (float32, in memory).

    Returns:
        ``(model, snapshots)``: the trained model and float64 copies of it at step 0, every ``every``
        steps and at the end (``{step: model}``; only the end when ``every`` is None). ``init(model)``, if
        given, modifies the freshly built model before training (e.g. plants fixed points).
    """
    from kpflow.training import build_model, make_optimizer, train

    model = build_model(model_name, task.input_dim, hidden, task.output_dim, g=g, seed=seed, **model_params)
    if init is not None:
        init(model)
    snaps = {0: copy.deepcopy(model).double()}

    def on_step(step, loss, m):
        if every is not None and step % every == 0:
            snaps[step] = copy.deepcopy(m).double()

    if steps > 0:
        train(model, task, {"steps": steps, "batch_size": batch_size, "checkpoint_every": max(steps, 1),
                            "grad_clip": grad_clip},
              optimizer=make_optimizer(optimizer, model, lr=lr), seed=seed, progress=False, on_step=on_step)
    snaps[steps] = copy.deepcopy(model).double()
    return model, snaps


def eval_batch(task, n: int, seed: int):
    """A float64 evaluation batch drawn from a seed disjoint from the training batches."""
    return task.sample(n, 10_000 + seed, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
