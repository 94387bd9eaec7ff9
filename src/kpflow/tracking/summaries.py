"""Scalar summaries of PSD operators with standard errors, delegated to ``kpflow.estimators``.

This module only *chooses*: small operators (``size_in <= DENSE_MAX``) are materialised and summarised
exactly; larger ones go to ``kpflow.estimators.effective_rank`` (whose independent trace and ‖A‖_F²
estimates also give the trace and the Frobenius norm) and ``kpflow.estimators.alignment``. Results are
packed as ``Stat(value, stderr, method)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from kpflow import estimators as est
from kpflow.estimators.norms import sqrt_estimate
from kpflow.operators import LinearOperator

#: operators with at most this many input entries are summarised exactly from their dense matrix
DENSE_MAX = 64


@dataclass(frozen=True)
class Stat:
    value: float
    stderr: float
    method: str

    @classmethod
    def of(cls, e) -> Stat:
        return cls(float(e.value), float(e.stderr), str(e.method))


class _KnownPSD(LinearOperator):
    """A leaf view of an operator known to be PSD (e.g. ``P K P*``), so that products the estimators form
    from it (``A* A``) keep the PSD flag; the matvec is the wrapped operator's."""

    def __init__(self, base: LinearOperator):
        super().__init__(base.shape_in, base.shape_out, base.dtype, base.device, is_psd=True)
        self.base = base

    def _matmat(self, X):
        return self.base.matmat(X)

    def _rmatmat(self, Y):
        return self.base.matmat(Y)


def known_psd(A: LinearOperator) -> LinearOperator:
    """``A`` as a leaf operator flagged PSD (``A`` must be PSD: a Gram ``J J*`` or ``P K P*`` with K PSD)."""
    if not A.is_psd:
        raise ValueError(f"{A!r} is not flagged positive semi-definite")
    return A if type(A) is _KnownPSD else _KnownPSD(A)


def _dense_psd_stats(A: LinearOperator) -> dict[str, Stat]:
    M = A.to_matrix().to(torch.float64)
    M = 0.5 * (M + M.T)
    tr = float(torch.trace(M))
    fro = float(torch.linalg.matrix_norm(M))
    er = tr**2 / fro**2 if fro > 0 else math.nan
    return {"trace": Stat(tr, 0.0, "exact-dense"), "fro": Stat(fro, 0.0, "exact-dense"),
            "erank": Stat(er, 0.0, "exact-dense")}


def psd_stats(A: LinearOperator, probes: int, seed: int) -> dict[str, Stat]:
    """Trace, Frobenius norm and effective rank ``tr(A)²/‖A‖_F²`` of a PSD operator, each with its
    standard error: exact for small operators, else ``estimators.effective_rank`` with ``probes``
    probes for the trace and ``probes`` Gram probes (2 matvecs each) for ‖A‖_F²."""
    if A.size_in <= DENSE_MAX:
        return _dense_psd_stats(A)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a negative ‖A‖_F² estimate is reported as NaN
        er = est.effective_rank(known_psd(A), num_matvecs=3 * probes, seed=seed)
    tr, fro2 = er.parts["trace"], er.parts["frobenius_sq"]
    fro = sqrt_estimate(fro2)
    return {"trace": Stat.of(tr), "fro": Stat(fro.value, fro.stderr, f"sqrt ‖A‖_F² [{fro2.method}]"),
            "erank": Stat(er.value, er.stderr, f"tr²/‖A‖_F² [{er.method}]")}


def alignment_stat(A: LinearOperator, B: LinearOperator, probes: int, seed: int) -> Stat:
    """``cos(A, B) = tr(A* B) / (‖A‖_F ‖B‖_F)`` with its standard error (exact for small operators)."""
    if A.size_in <= DENSE_MAX:
        MA, MB = A.to_matrix(), B.to_matrix()
        val = float((MA * MB).sum() / (torch.linalg.matrix_norm(MA) * torch.linalg.matrix_norm(MB)))
        return Stat(val, 0.0, "exact-dense")
    return Stat.of(est.alignment(A, B, num_matvecs=2 * probes, seed=seed))
