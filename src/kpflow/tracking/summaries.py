"""Scalar summaries of PSD operators with standard errors, delegated to ``kpflow.estimators``.

This module only *chooses* estimators (exact when the operator is small, randomized otherwise) and
packs their results as ``Stat(value, stderr, method)``; the estimation itself lives in
``kpflow.estimators``. Where a dedicated estimator (``frobenius_norm``, ``effective_rank``,
``alignment``) is not available, the quantity is composed from trace estimates of operator products
with the textbook identities ``‖A‖_F² = tr(A A*)``, ``erank = tr(A)²/‖A‖_F²``,
``cos(A, B) = tr(A* B)/(‖A‖_F ‖B‖_F)``, and first-order (delta-method) error propagation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kpflow import estimators as est
from kpflow.operators import LinearOperator, gram

#: operators with at most this many input entries are summarised exactly from their dense matrix
DENSE_MAX = 128


@dataclass(frozen=True)
class Stat:
    value: float
    stderr: float
    method: str

    @classmethod
    def of(cls, e) -> Stat:
        return cls(float(e.value), float(e.stderr), str(e.method))


def _dense_psd_stats(A: LinearOperator) -> dict[str, Stat]:
    M = A.to_matrix().to(torch.float64)
    M = 0.5 * (M + M.T)
    tr = float(torch.trace(M))
    fro = float(torch.linalg.matrix_norm(M))
    er = tr**2 / fro**2 if fro > 0 else 0.0
    return {"trace": Stat(tr, 0.0, "exact-dense"), "fro": Stat(fro, 0.0, "exact-dense"),
            "erank": Stat(er, 0.0, "exact-dense")}


def _trace(A: LinearOperator, probes: int, seed: int) -> Stat:
    return Stat.of(est.trace(A, num_matvecs=probes, seed=seed))


def psd_stats(A: LinearOperator, probes: int, seed: int) -> dict[str, Stat]:
    """Trace, Frobenius norm and effective rank ``tr(A)²/‖A‖_F²`` of a PSD operator, each with its
    standard error. Exact for small operators (``size_in <= DENSE_MAX``)."""
    if A.size_in <= DENSE_MAX:
        return _dense_psd_stats(A)
    if hasattr(est, "effective_rank") and hasattr(est, "frobenius_norm"):
        tr = Stat.of(est.trace(A, num_matvecs=probes, seed=seed))
        fro = Stat.of(est.frobenius_norm(A, num_matvecs=probes, seed=seed))
        er = Stat.of(est.effective_rank(A, num_matvecs=probes, seed=seed))
        return {"trace": tr, "fro": fro, "erank": er}
    tr = _trace(A, probes, seed)
    fro2 = _trace(gram(A), probes, seed + 1)
    fro = math.sqrt(max(fro2.value, 0.0))
    fro_se = fro2.stderr / (2 * fro) if fro > 0 else math.nan
    er = tr.value**2 / fro2.value if fro2.value > 0 else 0.0
    rel = math.hypot(2 * tr.stderr / abs(tr.value) if tr.value else 0.0,
                     fro2.stderr / fro2.value if fro2.value else 0.0)
    return {"trace": tr, "fro": Stat(fro, fro_se, f"sqrt tr(AA*) [{fro2.method}]"),
            "erank": Stat(er, er * rel, f"tr²/tr(AA*) [{tr.method}]")}


def alignment_stat(A: LinearOperator, B: LinearOperator, probes: int, seed: int,
                   fro_a: Stat | None = None, fro_b: Stat | None = None) -> Stat:
    """``cos(A, B) = tr(A* B) / (‖A‖_F ‖B‖_F)`` with its standard error."""
    if hasattr(est, "alignment"):
        return Stat.of(est.alignment(A, B, num_matvecs=probes, seed=seed))
    if A.size_in <= DENSE_MAX:
        MA, MB = A.to_matrix(), B.to_matrix()
        val = float((MA * MB).sum() / (torch.linalg.matrix_norm(MA) * torch.linalg.matrix_norm(MB)))
        return Stat(val, 0.0, "exact-dense")
    cross = _trace(A.T @ B, probes, seed + 2)
    fa = fro_a or psd_stats(A, probes, seed)["fro"]
    fb = fro_b or psd_stats(B, probes, seed)["fro"]
    if fa.value == 0 or fb.value == 0:
        return Stat(math.nan, math.nan, "undefined (zero operator)")
    val = cross.value / (fa.value * fb.value)
    rel = math.sqrt(sum(r**2 for r in (cross.stderr / abs(cross.value) if cross.value else 0.0,
                                       fa.stderr / fa.value, fb.stderr / fb.value)))
    return Stat(val, abs(val) * rel, f"tr(A*B)/(|A||B|) [{cross.method}]")
