"""The N-bit flip-flop (Sussillo & Barak 2013): remember the sign of the last pulse on each channel."""

from __future__ import annotations

import torch

from .base import Task, TaskBatch, mask_or_ones


class FlipFlop(Task):
    """N-bit flip-flop memory.

    Each input channel carries sparse ±1 pulses (Bernoulli with probability ``pulse_prob`` per step,
    random sign) plus Gaussian noise of standard deviation ``noise``; the target on each channel holds
    the sign of the most recent pulse (0 before the first one). Loss: MSE.
    """

    name = "flipflop"

    def __init__(self, n_bits: int = 3, seq_len: int = 50, pulse_prob: float = 0.1, noise: float = 0.04):
        if int(n_bits) < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits!r}")
        if int(seq_len) < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
        if not 0.0 < float(pulse_prob) <= 1.0:
            raise ValueError(f"pulse_prob must be in (0, 1], got {pulse_prob!r}")
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.n_bits, self.seq_len = int(n_bits), int(seq_len)
        self.pulse_prob, self.noise = float(pulse_prob), float(noise)
        self.input_dim = self.output_dim = self.n_bits

    def _generate(self, batch_size, gen):
        shape = (batch_size, self.seq_len, self.n_bits)
        fire = torch.rand(shape, generator=gen) < self.pulse_prob
        sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        pulses = fire.float() * sign
        targets = torch.zeros(shape)
        state = torch.zeros(batch_size, self.n_bits)
        for t in range(self.seq_len):
            state = torch.where(fire[:, t], sign[:, t], state)
            targets[:, t] = state
        inputs = pulses + self.noise * torch.randn(shape, generator=gen)
        return TaskBatch(inputs=inputs, targets=targets, loss="mse")

    def accuracy(self, outputs, batch):
        """Fraction of scored (step, bit) pairs after a bit's first pulse whose output has the target's sign."""
        held = batch.targets != 0
        mask = mask_or_ones(batch).unsqueeze(-1) * held
        hit = (torch.sign(outputs) == torch.sign(batch.targets)).to(outputs.dtype)
        return (hit * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)
