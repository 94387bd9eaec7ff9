"""Tasks: seeded generators of batched trials ``(inputs [B,T,I], targets, mask [B,T])``.

A task is a small object that knows its input/output widths, its sequence length and which loss
fits it, and that draws a batch of trials from an integer seed. Every batch is generated on the CPU
with its own ``torch.Generator`` and then moved to the requested device and dtype, so the same seed
gives the same trials on every machine and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

LOSSES = ("mse", "ce")


@dataclass(frozen=True)
class TaskBatch:
    """One batch of trials.

    Attributes:
        inputs: ``[B, T, I]`` float tensor.
        targets: ``[B, T, O]`` float tensor (MSE tasks) or ``[B, T]`` class indices (cross-entropy tasks).
        mask: ``[B, T]`` float weights of each time step in the loss (1 = scored, 0 = ignored), or None
            when every step counts.
        task_ids: ``[B]`` integer sub-task of each trial for multi-task mixtures, else None.
        loss: ``"mse"`` or ``"ce"``, the loss the targets are meant for.
        info: extra per-trial tensors (e.g. the stimulus angle), for accuracy and plots.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    loss: str = "mse"
    info: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])

    def to(self, device=None, dtype=None) -> TaskBatch:
        """The same batch on ``device`` with floating tensors cast to ``dtype`` (integer targets kept)."""

        def move(x):
            if x is None:
                return None
            if x.is_floating_point():
                return x.to(device=device, dtype=dtype or x.dtype)
            return x.to(device=device)

        return replace(self, inputs=move(self.inputs), targets=move(self.targets), mask=move(self.mask),
                       task_ids=move(self.task_ids), info={k: move(v) for k, v in self.info.items()})

    def subset(self, index: torch.Tensor) -> TaskBatch:
        """The trials selected by ``index`` (boolean or integer, along the batch axis)."""

        def pick(x):
            return None if x is None else x[index]

        return replace(self, inputs=self.inputs[index], targets=self.targets[index], mask=pick(self.mask),
                       task_ids=pick(self.task_ids), info={k: v[index] for k, v in self.info.items()})


class Task:
    """Base class. Subclasses set ``input_dim``, ``output_dim``, ``seq_len``, ``loss`` and implement
    ``_generate(batch_size, generator) -> TaskBatch`` on the CPU in float32."""

    name: str = "task"
    input_dim: int
    output_dim: int
    seq_len: int
    loss: str = "mse"
    #: names of sub-tasks when the task is a mixture (``task_ids`` index into it)
    subtask_names: tuple[str, ...] = ()

    def sample(self, batch_size: int, seed: int = 0, *, device=None, dtype=torch.float32) -> TaskBatch:
        """Draw ``batch_size`` trials, reproducibly from ``seed``."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
        batch = self._generate(int(batch_size), gen)
        return batch.to(device=device, dtype=dtype)

    def _generate(self, batch_size: int, gen: torch.Generator) -> TaskBatch:  # pragma: no cover - abstract
        raise NotImplementedError

    def accuracy(self, outputs: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """Per-trial success ``[B]`` in [0, 1] (default: fraction of scored steps and channels within 0.5
        of the target for MSE tasks; fraction of scored steps with the right class for CE tasks)."""
        mask = mask_or_ones(batch)
        if batch.loss == "ce":
            hit = (outputs.argmax(-1) == batch.targets).to(outputs.dtype)
        else:
            hit = ((outputs - batch.targets).abs() < 0.5).all(-1).to(outputs.dtype)
        return (hit * mask).sum(1) / mask.sum(1).clamp_min(1)

    def describe(self) -> dict:
        """The task's constructor settings, for configs and reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _jsonable(v)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({args})"


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v))


def mask_or_ones(batch: TaskBatch) -> torch.Tensor:
    """The batch's loss mask ``[B, T]`` in the inputs' dtype, or ones (every step scored) without one."""
    if batch.mask is not None:
        return batch.mask.to(batch.inputs.dtype)
    return torch.ones(batch.inputs.shape[:2], dtype=batch.inputs.dtype, device=batch.inputs.device)


def task_loss(outputs: torch.Tensor, batch: TaskBatch, loss: str | None = None) -> torch.Tensor:
    """Masked mean loss: MSE averaged over scored (trial, step) pairs and output channels, or
    cross-entropy averaged over scored (trial, step) pairs."""
    kind = loss or batch.loss
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSSES)}")
    mask = mask_or_ones(batch)
    if kind == "mse":
        if batch.targets.shape != outputs.shape:
            raise ValueError(f"MSE needs targets shaped like the outputs {tuple(outputs.shape)}, got "
                             f"{tuple(batch.targets.shape)} (is this a cross-entropy task? use loss='ce')")
        per_step = ((outputs - batch.targets) ** 2).mean(-1)
    else:
        if batch.targets.shape != outputs.shape[:2] or batch.targets.is_floating_point():
            raise ValueError(f"cross-entropy needs integer class targets of shape {tuple(outputs.shape[:2])}, "
                             f"got {batch.targets.dtype} {tuple(batch.targets.shape)} (use loss='mse')")
        logp = torch.log_softmax(outputs, -1)
        per_step = -logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return (per_step * mask).sum() / mask.sum().clamp_min(1)


def angle_error(outputs_cos_sin: torch.Tensor, target_angle: torch.Tensor) -> torch.Tensor:
    """Absolute angular error in [0, π] between the direction (cos, sin) read out and a target angle."""
    read = torch.atan2(outputs_cos_sin[..., 1], outputs_cos_sin[..., 0])
    diff = torch.remainder(read - target_angle + math.pi, 2 * math.pi) - math.pi
    return diff.abs()
