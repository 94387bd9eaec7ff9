"""Angle-memory tasks (Yang et al. 2019 family): Memory-Pro / Memory-Anti / Delay-Pro / Delay-Anti and
their multi-task mixture with a context cue.

Inputs ``[fixation, A cos θ, A sin θ]``; outputs ``[fixation, cos θ', sin θ']``. A trial has a stimulus
period, a memory period and a response period. The fixation input is 1 until the response period
starts (the go cue is its removal); the target fixation output is 1 before the response and 0 during it,
and the target direction θ' (θ for *Pro*, θ + π for *Anti*) is asked for only during the response.
*Memory* tasks show the stimulus during the stimulus period only; *Delay* tasks keep it on throughout.
"""

from __future__ import annotations

import math

import torch

from .base import Task, TaskBatch, angle_error


def _check_period(name, value):
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive number of steps, got {value!r}")
    return int(value)


def _response_correct(outputs: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    last = outputs[:, -1]
    ok = angle_error(last[:, 1:3], batch.info["target_angle"]) < math.pi / 10
    ok = ok & (last[:, 1:3].norm(dim=-1) > 0.5) & (last[:, 0] < 0.5)
    return ok.to(outputs.dtype)


class AngleMemory(Task):
    """One angle-memory task; ``anti`` flips the response, ``delay`` keeps the stimulus on."""

    name = "angle_memory"

    def __init__(self, stim: int = 15, mem: int = 15, resp: int = 15, anti: bool = False, delay: bool = False,
                 noise: float = 0.05, amplitude: float = 1.0):
        self.stim, self.mem, self.resp = (_check_period(n, v) for n, v in (("stim", stim), ("mem", mem),
                                                                           ("resp", resp)))
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.anti, self.delay, self.noise, self.amplitude = bool(anti), bool(delay), float(noise), float(amplitude)
        self.seq_len = self.stim + self.mem + self.resp
        self.input_dim, self.output_dim = 3, 3

    def _trials(self, theta: torch.Tensor, gen: torch.Generator):
        """Noise-free inputs and targets ``[B, T, 3]`` for stimulus angles ``theta [B]``."""
        B, T = theta.shape[0], self.seq_len
        go = self.stim + self.mem
        inputs, targets = torch.zeros(B, T, 3), torch.zeros(B, T, 3)
        inputs[:, :go, 0] = 1.0
        on = slice(0, T) if self.delay else slice(0, self.stim)
        inputs[:, on, 1] = self.amplitude * torch.cos(theta)[:, None]
        inputs[:, on, 2] = self.amplitude * torch.sin(theta)[:, None]
        target_angle = theta + math.pi if self.anti else theta
        targets[:, :go, 0] = 1.0
        targets[:, go:, 1] = torch.cos(target_angle)[:, None]
        targets[:, go:, 2] = torch.sin(target_angle)[:, None]
        inputs = inputs + self.noise * torch.randn(inputs.shape, generator=gen)
        return inputs, targets, torch.remainder(target_angle, 2 * math.pi)

    def _generate(self, batch_size, gen):
        theta = 2 * math.pi * torch.rand(batch_size, generator=gen)
        inputs, targets, target_angle = self._trials(theta, gen)
        return TaskBatch(inputs=inputs, targets=targets, loss="mse",
                         info={"theta": theta, "target_angle": target_angle})

    def accuracy(self, outputs, batch):
        """1 when the direction read out at the last step is within π/10 of the target angle, with a
        response of length > 0.5 and the fixation output released (< 0.5)."""
        return _response_correct(outputs, batch)


class MemoryPro(AngleMemory):
    name = "memory_pro"

    def __init__(self, stim: int = 15, mem: int = 15, resp: int = 15, noise: float = 0.05):
        super().__init__(stim, mem, resp, anti=False, delay=False, noise=noise)


class MemoryAnti(AngleMemory):
    name = "memory_anti"

    def __init__(self, stim: int = 15, mem: int = 15, resp: int = 15, noise: float = 0.05):
        super().__init__(stim, mem, resp, anti=True, delay=False, noise=noise)


class DelayPro(AngleMemory):
    name = "delay_pro"

    def __init__(self, stim: int = 15, mem: int = 15, resp: int = 15, noise: float = 0.05):
        super().__init__(stim, mem, resp, anti=False, delay=True, noise=noise)


class DelayAnti(AngleMemory):
    name = "delay_anti"

    def __init__(self, stim: int = 15, mem: int = 15, resp: int = 15, noise: float = 0.05):
        super().__init__(stim, mem, resp, anti=True, delay=True, noise=noise)


MIXABLE = {"memory_pro": MemoryPro, "memory_anti": MemoryAnti, "delay_pro": DelayPro, "delay_anti": DelayAnti}


class MultiTask(Task):
    """A mixture of angle-memory tasks preceded by a context period with a one-hot task cue.

    Inputs ``[fixation, A cos θ, A sin θ, cue_1 .. cue_n]`` (cue on during the ``context`` steps, or
    throughout with ``cue_throughout``); outputs as for one task (fixation held during the context).
    Trial ``b`` belongs to sub-task ``b mod n`` so every batch is balanced; ``task_ids`` records it.
    """

    name = "multitask"

    def __init__(self, tasks: tuple[str, ...] | list[str] = ("memory_pro", "memory_anti", "delay_pro", "delay_anti"),
                 context: int = 10, stim: int = 15, mem: int = 15, resp: int = 15, noise: float = 0.05,
                 cue_throughout: bool = False):
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in MIXABLE]
        if not tasks or unknown:
            raise ValueError(f"multitask: unknown sub-task(s) {unknown or tasks!r}; valid: {', '.join(MIXABLE)}")
        self.tasks, self.context = tasks, _check_period("context", context)
        self.cue_throughout = bool(cue_throughout)
        self._members = [MIXABLE[t](stim, mem, resp, noise) for t in tasks]
        self.stim, self.mem, self.resp, self.noise = int(stim), int(mem), int(resp), float(noise)
        self.subtask_names = tasks
        self.seq_len = self.context + self._members[0].seq_len
        self.input_dim, self.output_dim = 3 + len(tasks), 3

    def _generate(self, batch_size, gen):
        n, C, T = len(self.tasks), self.context, self.seq_len
        task_ids = torch.arange(batch_size) % n
        theta = 2 * math.pi * torch.rand(batch_size, generator=gen)
        inputs, targets = torch.zeros(batch_size, T, 3 + n), torch.zeros(batch_size, T, 3)
        target_angle = torch.zeros(batch_size)
        for i, member in enumerate(self._members):
            sel = task_ids == i
            x, y, ang = member._trials(theta[sel], gen)
            inputs[sel, C:, :3] = x
            targets[sel, C:] = y
            target_angle[sel] = ang
        inputs[:, :C, 0] = 1.0
        targets[:, :C, 0] = 1.0
        cue_steps = slice(0, T) if self.cue_throughout else slice(0, C)
        cue = torch.nn.functional.one_hot(task_ids, n).float()
        inputs[:, cue_steps, 3:] = cue[:, None, :]
        inputs[:, :C] += self.noise * torch.randn(batch_size, C, 3 + n, generator=gen)
        return TaskBatch(inputs=inputs, targets=targets, task_ids=task_ids, loss="mse",
                         info={"theta": theta, "target_angle": target_angle})

    def accuracy(self, outputs, batch):
        return _response_correct(outputs, batch)
