"""Randomized estimators with error bars for operators too large to form (DESIGN.md §2).

Free functions of operators: each accepts a kpflow ``LinearOperator``, a torch/numpy matrix or a
scipy ``LinearOperator`` (one-sided estimators take a factor J of A = J J*), a probe budget and a
seed, and returns an ``Estimate`` (value, standard error, probes, method, seed, running estimate).
"""

from .probes import BudgetError, NonFiniteError
from .result import Estimate
from .trace import exact_trace, hutchinson_trace, hutchpp_trace, trace, xnystrace, xtrace

__all__ = [
    "BudgetError", "NonFiniteError", "Estimate",
    "exact_trace", "hutchinson_trace", "hutchpp_trace", "trace", "xnystrace", "xtrace",
]
