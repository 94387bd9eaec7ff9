"""The typed result every estimator returns: a value with its standard error, its cost and its history.

Counts have one meaning throughout kpflow: ``num_matvecs`` is the number of applications of the
operator (or factor) the estimator was given — the budget argument of every estimator has the same
name and unit — and ``num_probes`` is the number of random probe vectors drawn (0 for exact results).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, replace
from typing import Any

import numpy as np


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"Estimate.{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=3)


@dataclass(frozen=True, eq=False)
class History:
    """The running estimate as the budget grows (for judging convergence).

    Attributes:
        num_matvecs: matvecs spent at each point (increasing).
        value: the estimate from the first ``num_matvecs[i]`` matvecs.
        stderr: its standard error there (NaN where it cannot be estimated).
    """

    num_matvecs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self):
        n, v, s = (np.asarray(a) for a in (self.num_matvecs, self.value, self.stderr))
        if not n.shape == v.shape == s.shape or n.ndim != 1:
            raise ValueError(f"History arrays must be 1-D of one length, got shapes {n.shape}, {v.shape}, {s.shape}")
        object.__setattr__(self, "num_matvecs", n.astype(np.int64))
        object.__setattr__(self, "value", v.astype(np.float64))
        object.__setattr__(self, "stderr", s.astype(np.float64))

    def __len__(self) -> int:
        return int(self.num_matvecs.size)

    def scaled(self, matvecs_per_unit: int = 1, shift: float = 0.0) -> History:
        """The same history with the matvec axis multiplied and the values shifted.

        Args:
            matvecs_per_unit: matvecs each point of this history's axis stands for.
            shift: constant added to every value (e.g. an exactly known part of the estimate).

        Returns:
            A new ``History``.
        """
        return History(self.num_matvecs * int(matvecs_per_unit), self.value + shift, self.stderr)


@dataclass(eq=False)
class Estimate:
    """A randomized estimate with honest uncertainty.

    Attributes:
        value: the estimate (``float(result)`` gives it).
        stderr: its standard error (0 for exact results; NaN when it cannot be estimated).
        num_matvecs: applications of the operator (or of the factor, for one-sided estimators)
            spent, in the unit of the estimator's ``num_matvecs`` budget.
        method: the method that produced it (``trace(method="auto")`` records what it picked).
        seed: the integer seed, or None when a ``torch.Generator`` was passed.
        num_probes: random probe vectors drawn (0 for exact results).
        history: the running estimate by matvecs spent.
        exact: True when computed exactly (no randomness, ``stderr == 0``).
        stopped_early: True when an ``rtol`` stop ended sampling before the budget was spent.
        distribution: the probe distribution (None for exact results).
        reason: why this method ran (e.g. why ``auto`` chose it, or why the exact path was taken).
        note: a warning about the value (why it is NaN, unclamped, clipped, ...), else ``""``.
        parts: the estimates this one was computed from (e.g. ``trace`` and ``frobenius_sq`` of an
            effective rank), by name.
        details: method-specific numbers and labels (sketch size, shift, side, ...); never estimates.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    seed: int | None = None
    num_probes: int = 0
    history: History = field(default_factory=History)
    exact: bool = False
    stopped_early: bool = False
    distribution: str | None = None
    reason: str = ""
    note: str = ""
    parts: dict[str, Estimate] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    info: InitVar[Mapping[str, Any] | None] = None

    def __post_init__(self, info):
        self.value, self.stderr, self.num_matvecs = float(self.value), float(self.stderr), int(self.num_matvecs)
        if info:  # the untyped extras of the previous release, sorted into the typed fields
            warnings.warn("Estimate(info=...) is deprecated and will be removed in the next release; use the typed "
                          "fields exact, reason, note, distribution, stopped_early, parts and details",
                          DeprecationWarning, stacklevel=3)
            for k, v in info.items():
                if k == "exact":
                    self.exact = bool(v)
                elif k in ("reason", "auto_reason"):
                    self.reason = str(v)
                elif k in ("note", "distribution", "stopped_early"):
                    setattr(self, k, v)
                elif isinstance(v, Estimate):
                    self.parts[k] = v
                else:
                    self.details[k] = v

    def __float__(self) -> float:
        return float(self.value)

    def replaced(self, **changes) -> Estimate:
        """A copy with some fields changed (``details`` and ``parts`` are copied, not shared).

        Args:
            **changes: new values of fields.

        Returns:
            The new ``Estimate``.
        """
        changes.setdefault("details", dict(self.details))
        changes.setdefault("parts", dict(self.parts))
        return replace(self, info=None, **changes)

    @property
    def relative_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` when the value is 0)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def confidence_interval(self, z: float = 1.96) -> tuple[float, float]:
        """Normal-approximation interval ``value ± z·stderr``.

        Args:
            z: the standard-normal quantile (1.96 for 95 %).

        Returns:
            ``(low, high)``.
        """
        return (self.value - z * self.stderr, self.value + z * self.stderr)

    def __repr__(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return (f"Estimate({self.value:.6g} ± {self.stderr:.3g}, method={self.method!r}, "
                f"num_matvecs={self.num_matvecs}{seed})")

    def summary(self) -> str:
        """One line for logs: value, standard error, relative error, matvecs, method.

        Returns:
            The line.
        """
        rel = self.relative_stderr
        rel_s = f"{100 * rel:.2g}%" if math.isfinite(rel) else "n/a"
        return (f"{self.value:.6g} ± {self.stderr:.3g} ({rel_s}) from {self.num_matvecs} matvecs "
                f"[{self.method}]")

    # ------------------------------------------------------------------ deprecated spellings (one release)
    @property
    def n_probes(self) -> int:
        """Deprecated: the matvecs spent; use ``num_matvecs`` (or ``num_probes`` for probe vectors)."""
        _deprecated("n_probes", "num_matvecs (matvecs spent) or num_probes (probe vectors drawn)")
        return self.num_matvecs

    @property
    def running_n(self) -> np.ndarray:
        """Deprecated: use ``history.num_matvecs``."""
        _deprecated("running_n", "history.num_matvecs")
        return self.history.num_matvecs

    @property
    def running_value(self) -> np.ndarray:
        """Deprecated: use ``history.value``."""
        _deprecated("running_value", "history.value")
        return self.history.value

    @property
    def running_stderr(self) -> np.ndarray:
        """Deprecated: use ``history.stderr``."""
        _deprecated("running_stderr", "history.stderr")
        return self.history.stderr

    def _info(self) -> dict[str, Any]:
        """Deprecated: the typed fields as one dict, as the previous release had them."""
        _deprecated("info", "the typed fields exact, reason, note, distribution, stopped_early, parts, details")
        out: dict[str, Any] = {"exact": self.exact, "stopped_early": self.stopped_early}
        if self.distribution is not None:
            out["distribution"] = self.distribution
        if self.reason:
            out["reason"] = out["auto_reason"] = self.reason
        if self.note:
            out["note"] = self.note
        return {**out, **self.details, **self.parts}


# the read side of the deprecated ``info`` (set after the dataclass is made, so it is not taken for the
# default of the ``info`` init argument)
Estimate.info = property(Estimate._info)  # type: ignore[assignment,method-assign]


def exact_estimate(value: float, num_matvecs: int, method: str, *, reason: str = "", **details) -> Estimate:
    """An exact result: zero standard error, a one-point history.

    Args:
        value: the exact value.
        num_matvecs: matvecs it cost.
        method: the method name.
        reason: why the exact path ran.
        **details: method-specific extras.

    Returns:
        The ``Estimate``.
    """
    n = int(num_matvecs)
    return Estimate(float(value), 0.0, n, method, None, 0, History([n], [float(value)], [0.0]), exact=True,
                    reason=reason, details=dict(details))
