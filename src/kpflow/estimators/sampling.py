"""The one sampling-and-stopping loop every randomized estimator runs.

An estimator describes *what* a probe contributes as an ``Integrand``; ``sample`` decides *how many*
probes are drawn, in which blocks, and when to stop:

1. the probes of a round are split into blocks of at most ``chunk_size``; block ``[start, start + k)``
   is drawn from the ``ProbeSource`` by index (each probe has its own generator), so a block can be
   evaluated anywhere, in any order, and gives the same numbers;
2. ``integrand.evaluate(probes, start)`` applies the operator to a block and returns the block's
   contribution (pure: no state is changed; this is the part that an ``executor`` may run elsewhere);
3. ``integrand.absorb(result, start)`` adds the contributions in probe order (on the caller);
4. after each round ``integrand.estimate()`` gives the value and its standard error; sampling stops when
   the budget is spent, when ``rtol`` is met (after ``min_probes``), or when the integrand says it is
   ``finished`` (e.g. XTrace found the exact range of a low-rank operator).

Rounds grow by one block (``schedule="blocks"``: sample-mean estimators, whose estimate is cheap) or
double (``schedule="doubling"``: the sketch-based XTrace/XNysTrace, whose estimate costs O(s³)).

``executor``: a ``distributed.Client`` (its workers evaluate the blocks: ``estimators.sharding``) or anything
with ``map(fn, iterable)`` that returns the results in order (e.g. a ``concurrent.futures.Executor``) runs
the ``evaluate`` calls of a round; the default runs them here. An executor with a ``width`` (parallel slots)
also gets the blocks of the next one-block rounds ahead of time (``_Lookahead``); the result is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .probes import MIN_PROBES_FOR_RTOL, ProbeSource, checked, running_mean
from .sharding import as_executor

SCHEDULES = ("blocks", "doubling")


class Executor(Protocol):
    """What ``sample`` needs of an executor: an ordered ``map``."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterable[Any]:
        """Apply ``fn`` to every item, returning the results in order."""
        ...


class Integrand(Protocol):
    """What an estimator plugs into ``sample``.

    Attributes:
        finished: set to True by ``absorb`` when no further probe can change the estimate.
    """

    finished: bool

    def evaluate(self, probes: torch.Tensor, start: int) -> Any:
        """The contribution of the probes ``start, ..., start + k − 1`` (no side effects)."""
        ...

    def absorb(self, result: Any, start: int) -> None:
        """Add a block's contribution; called in probe order."""
        ...

    def estimate(self) -> tuple[float, float]:
        """The value and standard error from every probe absorbed so far."""
        ...


@dataclass(frozen=True)
class Sampled:
    """What ``sample`` did.

    Attributes:
        num_probes: probes absorbed (from ``start``, so the last index is ``start + num_probes − 1``).
        value, stderr: the integrand's final estimate.
        stopped_early: True when ``rtol`` (or ``finished``) ended sampling before the budget was spent.
    """

    num_probes: int
    value: float
    stderr: float
    stopped_early: bool


def sample(integrand: Integrand, source: ProbeSource, num_probes: int, *, chunk_size: int,
           rtol: float | None = None, schedule: str = "blocks", first_round: int | None = None,
           min_probes: int = MIN_PROBES_FOR_RTOL, start: int = 0, executor: Executor | None = None) -> Sampled:
    """Draw probes block by block into ``integrand`` until the budget, ``rtol`` or the integrand stops it.

    Args:
        integrand: the estimator's per-probe work and statistic (see ``Integrand``).
        source: where the probes come from (indexed, so blocks are reproducible anywhere).
        num_probes: the most probes to draw.
        chunk_size: the most probes evaluated in one block.
        rtol: stop once ``stderr <= rtol · |value|`` (checked after each round, from ``min_probes`` on);
            None spends the whole budget in one round.
        schedule: ``"blocks"`` (each round adds one block) or ``"doubling"`` (each round doubles the probes).
        first_round: probes in the first round when ``rtol`` is set (default ``chunk_size`` for
            ``"blocks"``, ``min_probes`` for ``"doubling"``).
        min_probes: the fewest probes an ``rtol`` stop is trusted on.
        start: index of the first probe in ``source`` (e.g. after the probes a sketch used).
        executor: runs the ``evaluate`` calls of a round (ordered ``map``); None runs them here.

    Returns:
        A ``Sampled`` record.

    Raises:
        ValueError: an unknown schedule or a budget below one probe.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {SCHEDULES}")
    if num_probes < 1:
        raise ValueError(f"sample needs a budget of at least one probe, got num_probes={num_probes}")
    chunk = int(chunk_size)
    if rtol is None:
        target = num_probes
    else:
        first = (chunk if schedule == "blocks" else min_probes) if first_round is None else first_round
        target = min(num_probes, max(1, first))
    done = 0

    def evaluate(block: tuple[int, int]):
        lo, k = block
        return integrand.evaluate(source.block(start + lo, k), start + lo)

    executor = as_executor(executor)
    mapper = map if executor is None else _Lookahead(executor, evaluate, chunk, num_probes,
                                                     rtol is not None and schedule == "blocks").map
    while True:
        blocks = [(lo, min(chunk, target - lo)) for lo in range(done, target, chunk)]
        for (lo, k), result in zip(blocks, mapper(evaluate, blocks), strict=True):
            integrand.absorb(result, start + lo)
            done = lo + k
            if integrand.finished:
                break
        value, stderr = integrand.estimate()
        if integrand.finished or done >= num_probes or rtol is None:
            break
        if done >= min_probes and stderr <= rtol * abs(value):
            break
        target = min(num_probes, done + chunk if schedule == "blocks" else 2 * done)
    return Sampled(done, float(value), float(stderr), done < num_probes)


class _Lookahead:
    """An executor's ordered ``map`` that keeps a parallel executor busy when rounds are one block each.

    With ``rtol`` and ``schedule="blocks"`` every round is the single block ``(done, min(chunk, budget −
    done))``, which would leave all workers but one idle. So each call also evaluates the blocks the next
    rounds would ask for, up to the executor's ``width`` (parallel slots) in all; a later round takes its
    block from those. The loop still absorbs and tests ``rtol`` block by block, so it stops at the block a
    serial run stops at: blocks evaluated past it are dropped, never absorbed (at most ``width − 1`` blocks
    of extra matvecs).
    """

    def __init__(self, executor, fn, chunk: int, budget: int, speculate: bool):
        self.executor, self.fn, self.chunk, self.budget = executor, fn, chunk, budget
        self.width = max(1, int(getattr(executor, "width", 1))) if speculate else 1
        self.ahead: dict[tuple[int, int], Any] = {}

    def map(self, fn, blocks):
        todo = [b for b in blocks if b not in self.ahead]
        if todo and len(todo) < self.width:
            lo = todo[-1][0] + todo[-1][1]
            while len(todo) < self.width and lo < self.budget:
                todo.append((lo, min(self.chunk, self.budget - lo)))
                lo = todo[-1][0] + todo[-1][1]
        if todo:
            self.ahead.update(zip(todo, self.executor.map(fn, todo), strict=True))
        return [self.ahead.pop(b) for b in blocks]


class PerProbe:
    """An integrand whose probes contribute independent samples (Hutchinson, one-sided, alignment).

    ``fn(probes)`` maps a block ``[k, *shape]`` to per-probe samples ``[k]`` (or ``[k, c]`` for ``c``
    paired samples). Without ``statistic`` the estimate is the sample mean with standard error
    ``std/√n``; with it, ``statistic`` receives the columns and returns ``(value, stderr)`` (e.g. a
    jackknife of a ratio).

    Args:
        fn: per-probe samples of a block.
        what: the operator's name, for the message when a sample is NaN/Inf.
        statistic: ``(columns) -> (value, stderr)``, or None for the mean.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], what: str,
                 statistic: Callable[[list[np.ndarray]], tuple[float, float]] | None = None):
        self.fn, self.what, self.statistic = fn, what, statistic
        self.finished = False
        self._blocks: list[torch.Tensor] = []

    def evaluate(self, probes: torch.Tensor, start: int) -> torch.Tensor:
        """Per-probe samples of the block, finite-checked, on the CPU in float64.

        Args:
            probes: the block ``[k, *shape]``.
            start: index of its first probe (for messages).

        Returns:
            ``[k, c]`` samples.

        Raises:
            NonFiniteError: a sample is NaN/Inf (naming the probe).
        """
        s = self.fn(probes)
        flat = checked(s.reshape(s.shape[0], -1).reshape(-1), start, self.what).reshape(s.shape[0], -1)
        return flat.to("cpu", torch.float64)

    def absorb(self, result: torch.Tensor, start: int) -> None:
        """Keep the block's samples.

        Args:
            result: what ``evaluate`` returned.
            start: index of the block's first probe.
        """
        self._blocks.append(result)

    @property
    def samples(self) -> np.ndarray:
        """All samples so far, ``[n, c]``."""
        return torch.cat(self._blocks).numpy()

    def columns(self) -> list[np.ndarray]:
        """The samples as ``c`` arrays of length n.

        Returns:
            The columns.
        """
        s = self.samples
        return [s[:, j] for j in range(s.shape[1])]

    def estimate(self) -> tuple[float, float]:
        """Mean and its standard error, or ``statistic`` of the columns.

        Returns:
            ``(value, stderr)``.
        """
        if self.statistic is not None:
            return self.statistic(self.columns())
        mean, se = running_mean(self.samples[:, 0])
        return float(mean[-1]), float(se[-1])
