"""Context-dependent integration (Mante, Sussillo, Shenoy & Newsome 2013)."""

from __future__ import annotations

import torch

from .base import Task, TaskBatch


class ContextIntegration(Task):
    """Integrate one of two noisy evidence streams, chosen by a context cue, and report its sign.

    Inputs ``[cue_motion, cue_color, motion, color]``: the cue is one-hot for the whole trial; each
    stream is a constant coherence (drawn from ``±coherences``) plus Gaussian noise ``noise``.
    Output: one channel whose target is the sign of the cued stream's coherence. Only the last
    ``decision`` steps are scored (the mask is 0 before), so the network may integrate freely.
    """

    name = "context_integration"

    def __init__(self, seq_len: int = 40, decision: int = 10,
                 coherences: tuple[float, ...] | list[float] = (0.1, 0.2, 0.4), noise: float = 0.5):
        if not 1 <= int(decision) <= int(seq_len):
            raise ValueError(f"decision must be between 1 and seq_len={seq_len}, got {decision!r}")
        coherences = tuple(float(c) for c in coherences)
        if not coherences or any(c <= 0 for c in coherences):
            raise ValueError(f"coherences must be positive numbers, got {coherences!r}")
        self.seq_len, self.decision, self.coherences, self.noise = int(seq_len), int(decision), coherences, float(noise)
        self.input_dim, self.output_dim = 4, 1

    def _generate(self, batch_size, gen):
        B, T = batch_size, self.seq_len
        levels = torch.tensor(self.coherences)
        coh = levels[torch.randint(0, len(levels), (B, 2), generator=gen)]
        coh = coh * (torch.randint(0, 2, (B, 2), generator=gen).float() * 2 - 1)
        context = torch.randint(0, 2, (B,), generator=gen)
        inputs = torch.zeros(B, T, 4)
        inputs[:, :, :2] = torch.nn.functional.one_hot(context, 2).float()[:, None, :]
        inputs[:, :, 2:] = coh[:, None, :] + self.noise * torch.randn(B, T, 2, generator=gen)
        answer = torch.sign(coh[torch.arange(B), context])
        targets = answer[:, None, None].expand(B, T, 1).clone()
        mask = torch.zeros(B, T)
        mask[:, T - self.decision:] = 1.0
        return TaskBatch(inputs=inputs, targets=targets, mask=mask, loss="mse",
                         info={"context": context, "coherence": coh, "answer": answer})

    def accuracy(self, outputs, batch):
        """1 when the sign of the output at the last step matches the cued stream's sign."""
        return (torch.sign(outputs[:, -1, 0]) == batch.info["answer"]).to(outputs.dtype)
