"""Student-teacher regression: a teacher RNN generates the targets the student must reproduce."""

from __future__ import annotations

import math

import torch

from .base import Task, TaskBatch, mask_or_ones

SPECTRA = ("orthogonal", "planted")


class StudentTeacher(Task):
    """Targets are the outputs of a fixed teacher RNN driven by low-rank Gaussian inputs.

    Built-in teacher (Hazelden & Shea-Brown): ``h_t = tanh(W_in x_t + g* W_base h_{t-1})``, ``y_t = W_out h_t``
    with ``W_in`` and ``W_out`` Xavier-normal, all drawn from ``teacher_seed``, and ``W_base`` either

    * ``teacher_spectrum="orthogonal"`` (default): a random orthogonal ``Q``. Every eigenvalue has
      modulus 1, so as the gain grows a complex pair usually reaches the unit circle first
      (a Neimark–Sacker bifurcation of the origin) and the sNTK changes gradually;
    * ``teacher_spectrum="planted"``: ``Q diag(1, ρ R) Qᵀ`` with ``R`` a random orthogonal
      ``(H−1)×(H−1)`` matrix and ``ρ = rest_radius`` — one planted real mode (eigenvalue 1,
      eigenvector ``Q e_1``, placed at 45° to the readout so the outputs show it) and the rest on the
      circle of radius ``ρ``, well inside the unit circle.
      At gain ``g`` the real mode sits at ``g`` and the others at ``g ρ``, so a student whose gain
      rises from below 1 crosses +1 along the planted mode first: a pitchfork of the origin.

     Inputs ``x_t = Q z_t / sqrt(r)`` with ``z_t ~ N(0, I_r)`` and ``Q`` a fixed
    orthonormal ``[input_dim, r]`` basis. With ``g_teacher > 1`` the teacher sits past the bifurcation
    at |λ| = 1, so a student started at small gain must cross it. Pass ``teacher=`` (any kpflow
    ``RecurrentModel``) to use your own teacher instead. Loss: MSE.
    """

    name = "student_teacher"

    def __init__(self, input_dim: int = 16, hidden: int = 64, output_dim: int = 1, input_rank: int = 4,
                 seq_len: int = 40, g_teacher: float = 1.2, teacher_seed: int = 0, teacher=None,
                 teacher_spectrum: str = "orthogonal", rest_radius: float = 0.5):
        if not 1 <= int(input_rank) <= int(input_dim):
            raise ValueError(f"input_rank must be between 1 and input_dim={input_dim}, got {input_rank!r}")
        if teacher_spectrum not in SPECTRA:
            raise ValueError(f"teacher_spectrum must be one of {SPECTRA}, got {teacher_spectrum!r}")
        if not 0 <= float(rest_radius) < 1:
            raise ValueError(f"rest_radius must be in [0, 1) (the non-planted modes inside the unit circle), "
                             f"got {rest_radius!r}")
        self.teacher_spectrum, self.rest_radius = teacher_spectrum, float(rest_radius)
        self.input_dim, self.hidden, self.output_dim = int(input_dim), int(hidden), int(output_dim)
        self.input_rank, self.seq_len = int(input_rank), int(seq_len)
        self.g_teacher, self.teacher_seed = float(g_teacher), int(teacher_seed)
        gen = torch.Generator().manual_seed(self.teacher_seed)
        self._basis = torch.linalg.qr(torch.randn(self.input_dim, self.input_rank, generator=gen))[0]
        self._weights = self._draw_weights(gen)
        if teacher is not None:
            for attr in ("input_dim", "output_dim"):
                if getattr(teacher, attr) != getattr(self, attr):
                    raise ValueError(f"teacher.{attr}={getattr(teacher, attr)} does not match the task's "
                                     f"{attr}={getattr(self, attr)}")
        self._teacher = teacher

    def _draw_weights(self, gen):
        H, I, O = self.hidden, self.input_dim, self.output_dim
        W_base = torch.linalg.qr(torch.randn(H, H, generator=gen))[0]
        W_in = torch.randn(H, I, generator=gen) * math.sqrt(2.0 / (H + I))
        W_out = torch.randn(O, H, generator=gen) * math.sqrt(2.0 / (H + O))
        if self.teacher_spectrum == "planted":  # drawn after the others, which stay those of the orthogonal teacher
            W_base = self._planted(W_out, gen)
        return {"W_base": W_base, "W_in": W_in, "W_out": W_out}

    def _planted(self, W_out, gen):
        """``Q diag(1, ρ R) Qᵀ`` whose planted mode ``q = Q e_1`` is at 45° to the readout's leading row
        direction ``u`` (``q = (u + v)/√2`` with ``v`` a random unit vector orthogonal to ``u``), so that the
        mode is visible in the outputs for every seed."""
        H = self.hidden
        if H == 1:
            return torch.ones(1, 1)
        u = torch.linalg.svd(W_out, full_matrices=False)[2][0]
        v = torch.randn(H, generator=gen)
        v = v - (v @ u) * u
        q = (u + v / v.norm()) / math.sqrt(2.0)
        Q = torch.linalg.qr(torch.cat([q[:, None], torch.randn(H, H - 1, generator=gen)], 1))[0]
        Q = Q * torch.sign(Q[:, 0] @ q)  # first column exactly +q (the sign of the rest does not matter)
        core = torch.zeros(H, H)
        core[0, 0] = 1.0
        core[1:, 1:] = self.rest_radius * torch.linalg.qr(torch.randn(H - 1, H - 1, generator=gen))[0]
        return Q @ core @ Q.T

    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The built-in teacher's matrices: ``W_base`` (see ``teacher_spectrum``), ``W = g* W_base``, ``W_in``,
        ``W_out``."""
        w = {k: v.clone() for k, v in self._weights.items()}
        w["W"] = self.g_teacher * w["W_base"]
        return w

    def _generate(self, batch_size, gen):
        z = torch.randn(batch_size, self.seq_len, self.input_rank, generator=gen)
        inputs = z @ self._basis.T / math.sqrt(self.input_rank)
        with torch.no_grad():
            if self._teacher is not None:
                p = next(self._teacher.parameters())
                _, y = self._teacher(inputs.to(device=p.device, dtype=p.dtype))
                targets = y.detach().to("cpu", torch.float32)
            else:
                w = self.teacher_weights()
                h = torch.zeros(batch_size, self.hidden)
                states = []
                for t in range(self.seq_len):
                    h = torch.tanh(inputs[:, t] @ w["W_in"].T + h @ w["W"].T)
                    states.append(h)
                targets = torch.stack(states, 1) @ w["W_out"].T
        return TaskBatch(inputs=inputs, targets=targets, loss="mse")

    def accuracy(self, outputs, batch):
        """Per-trial fraction of target variance explained, clipped to [0, 1]."""
        mask = mask_or_ones(batch).unsqueeze(-1)
        resid = (((outputs - batch.targets) ** 2) * mask).sum((1, 2))
        var = (((batch.targets - batch.targets.mean(1, keepdim=True)) ** 2) * mask).sum((1, 2))
        return (1 - resid / var.clamp_min(1e-12)).clamp(0, 1)
