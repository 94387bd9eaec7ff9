"""Randomized estimators with error bars for operators too large to form (DESIGN.md §2).

Free functions of operators: each accepts a kpflow ``LinearOperator``, a torch/numpy matrix or a
scipy ``LinearOperator`` (one-sided estimators take a factor J of A = J J*), a budget ``num_matvecs``
of applications of that operator and a seed (int or ``torch.Generator``), runs the one sampling
driver (``sample``: probes in blocks of ``chunk_size``, ``rtol`` stops, an optional ``executor``) and
returns a typed ``Estimate``: value, standard error, matvecs and probes spent, method and why, seed
and the running ``History`` (``float(est)`` gives the value). See docs/estimators.md.
"""

from .alignment import CenteringOperator, alignment, centered, centered_alignment, factor_alignment
from .norms import (
    axis_effective_rank,
    axis_effective_ranks,
    effective_rank,
    frobenius_norm,
    frobenius_norm_sq,
)
from .onesided import (
    OneSidedStatistics,
    exact_onesided_trace,
    onesided_effective_rank,
    onesided_frobenius_sq,
    onesided_statistics,
    onesided_trace,
)
from .probes import BudgetError, NonFiniteError
from .result import Estimate, History
from .sampling import PerProbe, Sampled, sample
from .spectrum import (
    ConvergenceWarning,
    EigenResult,
    SpectralDensity,
    modes_for_variance,
    spectral_density,
    top_eigenpairs,
    top_singular_triplets,
)
from .trace import exact_trace, hutchinson_trace, hutchpp_trace, trace, xnystrace, xtrace

__all__ = [
    "BudgetError", "NonFiniteError", "Estimate", "History", "PerProbe", "Sampled", "sample",
    "exact_trace", "hutchinson_trace", "hutchpp_trace", "trace", "xnystrace", "xtrace",
    "OneSidedStatistics", "exact_onesided_trace", "onesided_effective_rank", "onesided_frobenius_sq",
    "onesided_statistics", "onesided_trace",
    "axis_effective_rank", "axis_effective_ranks", "effective_rank", "frobenius_norm", "frobenius_norm_sq",
    "CenteringOperator", "alignment", "centered", "centered_alignment", "factor_alignment",
    "ConvergenceWarning", "EigenResult", "SpectralDensity", "modes_for_variance", "spectral_density", "top_eigenpairs",
    "top_singular_triplets",
]
