"""The result object every estimator returns: a value with its standard error and its history."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Estimate:
    """A randomized estimate with honest uncertainty.

    Attributes:
        value: the estimate (``float(result)`` gives it).
        stderr: its standard error (0 for exact results; ``nan`` when it cannot be estimated).
        n_probes: operator applications spent (matvecs of the operator, or of the factor for
            one-sided estimators; see ``info['matvec_unit']`` when it is not obvious).
        method: the method that produced it (``trace(method="auto")`` records what it picked).
        seed: the integer seed, or ``None`` when a ``torch.Generator`` was passed.
        running_n: probe counts at which the running estimate was recorded.
        running_value: the estimate using only the first ``running_n[i]`` probes (convergence trace).
        running_stderr: its standard error at the same probe counts.
        info: method-specific extras (e.g. the one-sided ``fro2`` estimate, why ``auto`` chose, ...).
    """

    value: float
    stderr: float
    n_probes: int
    method: str
    seed: int | None = None
    running_n: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    running_value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    running_stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    info: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    @property
    def relative_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` when the value is 0)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def confidence_interval(self, z: float = 1.96) -> tuple[float, float]:
        """Normal-approximation interval ``value ± z·stderr``."""
        return (self.value - z * self.stderr, self.value + z * self.stderr)

    @property
    def exact(self) -> bool:
        """True when the value was computed exactly (zero randomness)."""
        return bool(self.info.get("exact", False))

    def __repr__(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return (f"Estimate({self.value:.6g} ± {self.stderr:.3g}, method={self.method!r}, "
                f"n_probes={self.n_probes}{seed})")

    def summary(self) -> str:
        """One line for logs: value, standard error, relative error, probes, method."""
        rel = self.relative_stderr
        rel_s = f"{100 * rel:.2g}%" if math.isfinite(rel) else "n/a"
        return (f"{self.value:.6g} ± {self.stderr:.3g} ({rel_s}) from {self.n_probes} matvecs "
                f"[{self.method}]")


def exact_estimate(value: float, n_probes: int, method: str, **info) -> Estimate:
    """An exact result: zero standard error, a one-point history."""
    info = {"exact": True, **info}
    return Estimate(
        value=float(value), stderr=0.0, n_probes=int(n_probes), method=method, seed=None,
        running_n=np.array([int(n_probes)], dtype=np.int64), running_value=np.array([float(value)]),
        running_stderr=np.array([0.0]), info=info,
    )
