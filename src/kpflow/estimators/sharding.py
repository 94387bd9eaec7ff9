"""Probe sharding: the probe blocks of a randomized estimate evaluated on the workers of a Dask cluster.

Every randomized estimator runs one sampling loop (``estimators.sampling.sample``): the probes of a round are
cut into blocks of at most ``chunk_size``; block ``[start, start + k)`` is drawn by index from the
``ProbeSource`` (probe i from its own generator seeded by ``(seed, stream, i)``), its contribution is
computed by the integrand's pure ``evaluate`` and the contributions are absorbed *in probe order* on the
caller. So the blocks may be evaluated anywhere, in any order: with the same seed a sharded estimate
absorbs exactly the numbers of the serial one, and equals it up to the floating-point differences of the
operator applied in another process (the tests and ``benchmarks/scale_out.py`` check ≤ 1e-6 relative).

``ShardedExecutor(client)`` is the ordered ``map`` that ``sample`` calls: each round it ships the block
function (which holds the operator) once to every worker (``client.scatter(..., broadcast=True)``), submits
one task per block and gathers the results in block order. Its ``width`` (the workers' threads) lets
``sample`` evaluate the next blocks ahead when ``rtol`` rounds are one block each, so every worker is busy;
the blocks past the serial stopping point are dropped, never absorbed. Every estimator's ``executor=``
argument accepts a ``distributed.Client`` directly (``as_executor`` wraps it), or any object with an ordered
``map`` (e.g. a ``concurrent.futures`` executor). Only the probe indices travel to the workers and only the
per-block results (scalars for Hutchinson/one-sided, ``A Ω`` columns for the sketches) travel back.

The operator must be picklable (cloudpickle: closures are fine). A CUDA operator is unpickled on the
worker's current CUDA device, so give each worker its own GPU (docs/scale_out.md) or keep operators on the CPU.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any


def _is_dask_client(obj) -> bool:
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - dask is a core dependency
        return False
    return isinstance(obj, Client)


def _apply(fn: Callable[..., Any], *args):
    return fn(*args)


class ShardedExecutor:
    """An ordered ``map`` over the workers of a Dask client (``estimators.sampling.Executor``).

    Args:
        client: a ``distributed.Client``.
        retries: times a block is re-run when it *raises* on a worker (a worker that dies is re-run by Dask
            in any case); 0 by default, since an operator that raises raises again.
    """

    def __init__(self, client, *, retries: int = 0):
        if not _is_dask_client(client):
            raise TypeError(f"ShardedExecutor needs a distributed.Client, got {type(client).__name__}")
        self.client, self.retries = client, int(retries)

    @property
    def width(self) -> int:
        """Blocks the cluster evaluates at once (its workers' threads)."""
        return max(1, sum(self.client.nthreads().values()))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list:
        """``[fn(*args) for args in zip(*iterables)]``, one Dask task per item, results in order.

        Args:
            fn: the function of one item (scattered to the workers once).
            *iterables: its arguments, zipped strictly (equal lengths).

        Returns:
            The results in the order of the items; the first failing task's error is raised here.
        """
        from distributed import wait

        items = list(zip(*iterables, strict=True))
        if not items:
            return []
        shared = self.client.scatter(fn, broadcast=True, hash=False)
        try:
            tag = uuid.uuid4().hex[:8]
            futures = [self.client.submit(_apply, shared, *args, key=f"kpflow-probes-{tag}-{i}", retries=self.retries)
                       for i, args in enumerate(items)]
            wait(futures)
            return [f.result() for f in futures]  # in order: a failing block raises as the serial loop would
        finally:
            self.client.cancel([shared])

    def __repr__(self) -> str:
        return f"ShardedExecutor({self.client!r})"


def as_executor(executor):
    """The executor an estimator's ``executor=`` argument stands for.

    ``None`` stays ``None`` (serial); a ``distributed.Client`` becomes a ``ShardedExecutor``; anything else
    must already have an ordered ``map(fn, *iterables)``.

    Args:
        executor: None, a ``distributed.Client``, a ``ShardedExecutor`` or an object with an ordered ``map``.

    Returns:
        None or an object with an ordered ``map``.

    Raises:
        TypeError: for an object with no ``map``.
    """
    if executor is None or isinstance(executor, ShardedExecutor):
        return executor
    if _is_dask_client(executor):
        return ShardedExecutor(executor)
    if not callable(getattr(executor, "map", None)):
        raise TypeError(f"executor must be a distributed.Client or have an ordered map(fn, iterable) (e.g. a "
                        f"concurrent.futures executor), got {type(executor).__name__}")
    return executor


__all__ = ["ShardedExecutor", "as_executor"]
