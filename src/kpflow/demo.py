"""A tiny demonstration of the operator algebra: matrix-free estimates next to exact values."""

from __future__ import annotations

import torch

from kpflow.operators import DenseOperator, gram


def operator_demo(size: int = 400, seed: int = 0) -> dict[str, float]:
    """Build A = J J* with a power-law spectrum and compare Hutchinson estimates with exact values."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    s = torch.arange(1, size + 1, dtype=torch.float64) ** -0.75
    J = DenseOperator(U * s)
    A = gram(J)
    m = 100
    V = torch.randint(0, 2, (m, size), generator=g, dtype=torch.float64) * 2 - 1
    q = (V * A.matmat(V)).sum(1)
    tr_exact = float((s**2).sum())
    fro2_exact = float((s**4).sum())
    out = {
        "trace_exact": tr_exact,
        "trace_hutchinson": float(q.mean()),
        "trace_stderr": float(q.std() / m**0.5),
        "erank_exact": tr_exact**2 / fro2_exact,
    }
    for k, v in out.items():
        print(f"{k}={v:.6g}")
    return out
