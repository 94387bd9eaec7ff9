"""Random probes, chunked operator application and the small statistics shared by the estimators.

Probes are reproducible: an integer seed draws them on the CPU (so the same seed gives the same
probes on every device) and moves them to the operator's device; a ``torch.Generator`` draws them on
the generator's own device. They are produced and applied ``chunk_size`` at a time, so memory stays
bounded by ``chunk_size`` tensors of the operator's input and output shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kpflow.operators import DenseOperator, LinearOperator, ShapeError, as_operator

#: Probe distributions with ``E[v vᵀ] = I``.
DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")

#: Default number of probes applied in one batched operator call.
DEFAULT_CHUNK = 64

#: Minimum number of probes before an ``rtol`` stop is trusted.
MIN_PROBES_FOR_RTOL = 10


class NonFiniteError(ArithmeticError):
    """An operator returned NaN or Inf for a probe."""


class BudgetError(ValueError):
    """The probe budget is too small for the requested method."""


def operator(A, what: str = "operator") -> LinearOperator:
    """Accept a kpflow operator, a torch/numpy matrix or a scipy LinearOperator.

    An integer (or boolean) *matrix* is cast to float64 with a warning, as scipy's solvers cast integer
    input: the probes are real-valued, and applying them at integer precision would truncate them (an
    integer operator used to give biased traces silently). A matrix-free operator that declares an
    integer dtype cannot be cast from outside and is refused.

    Args:
        A: the operator or matrix.
        what: the estimator's name, for messages.

    Returns:
        A kpflow ``LinearOperator`` of a floating (or complex) dtype.

    Raises:
        TypeError: ``A`` is not an operator or matrix, or is a matrix-free operator of an integer dtype.
    """
    try:
        op = as_operator(A)
    except (TypeError, ShapeError) as exc:
        raise TypeError(f"{what}: {exc}") from None
    if op.dtype.is_floating_point or op.dtype.is_complex:
        return op
    if isinstance(op, DenseOperator):
        warnings.warn(f"{what}: the matrix has dtype {op.dtype}; it is cast to float64 for the estimate (exact for "
                      "integers below 2**53). Pass a floating-point matrix to avoid this warning.",
                      UserWarning, stacklevel=3)
        return DenseOperator(op.matrix.to(torch.float64), op.shape_in, op.shape_out,
                             is_self_adjoint=op.is_self_adjoint, is_psd=op.is_psd)
    raise TypeError(f"{what}: {op!r} has the integer dtype {op.dtype}, but randomized estimators apply real-valued "
                    "probes (Gaussian, sphere) that an integer operator would truncate; build the operator with a "
                    "floating dtype (e.g. float64)")


def square_operator(A, what: str) -> LinearOperator:
    """``operator(A)`` that also insists on ``shape_in == shape_out``."""
    A = operator(A, what)
    if not A.is_square:
        raise ShapeError(
            f"{what} needs a square operator (shape_in == shape_out), got {A.shape_in} -> {A.shape_out}. "
            "For a factor J of A = J J* use kpflow.estimators.onesided_trace(J) (or trace(gram(J)))."
        )
    return A


class ProbeSource:
    """Draws probe batches of one shape from a seed or a ``torch.Generator``.

    Probe ``i`` of a stream is drawn from its own generator seeded by ``(seed, stream, i)``, so the
    probes do not depend on how they are requested: the same seed gives the same estimate whatever
    ``chunk_size`` or ``rtol`` round structure is used. ``draw`` (the estimator's distribution) and
    ``gaussian`` (sketch matrices) are separate streams. A ``torch.Generator`` is consumed once, for
    the base seed, and its device is used for drawing.
    """

    def __init__(self, seed, shape, dtype: torch.dtype, device, distribution: str = "rademacher"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown probe distribution {distribution!r}; valid: {DISTRIBUTIONS}")
        if isinstance(seed, torch.Generator):
            self.draw_device = seed.device
            self.seed = None
            self._base = int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device).item())
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int, None or a torch.Generator, got {type(seed).__name__}")
            self.seed = int(seed)
            self.draw_device = torch.device("cpu")
            self._base = self.seed
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.distribution = distribution
        self.dim = math.prod(self.shape)
        self._count = {"draw": 0, "gaussian": 0}

    def _generator(self, stream: str, i: int) -> torch.Generator:
        key = np.random.SeedSequence([self._base % 2**63, 0 if stream == "draw" else 1, i])
        return torch.Generator(device=self.draw_device).manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))

    def _take(self, stream: str, k: int, distribution: str) -> torch.Tensor:
        start = self._count[stream]
        self._count[stream] = start + k
        return self._rows(stream, start, k, distribution)

    def block(self, start: int, k: int) -> torch.Tensor:
        """Probes ``start, ..., start + k − 1`` of the estimator's stream, shape ``[k, *shape]``.

        Stateless: any block can be drawn in any order or on another worker, and gives the same
        probes as drawing them in sequence (each probe has its own generator).

        Args:
            start: index of the first probe.
            k: number of probes.

        Returns:
            The probes, on the operator's device.
        """
        return self._rows("draw", int(start), int(k), self.distribution)

    def _rows(self, stream: str, start: int, k: int, distribution: str) -> torch.Tensor:
        real = self.dtype if self.dtype.is_floating_point else torch.float64
        rows = []
        for i in range(start, start + k):
            g = self._generator(stream, i)
            if distribution == "rademacher":
                v = torch.randint(0, 2, (self.dim,), generator=g, device=self.draw_device).to(real) * 2 - 1
            else:
                v = torch.randn(self.dim, generator=g, device=self.draw_device, dtype=real)
                if distribution == "sphere":
                    v = v * (math.sqrt(self.dim) / v.norm())
            rows.append(v)
        V = torch.stack(rows) if rows else torch.empty(0, self.dim, dtype=real, device=self.draw_device)
        return V.to(self.device).reshape(k, *self.shape)

    def draw(self, k: int) -> torch.Tensor:
        """The next ``k`` probes, shape ``[k, *shape]``, with ``E[v vᵀ] = I``."""
        return self._take("draw", k, self.distribution)

    def gaussian(self, k: int) -> torch.Tensor:
        """The next ``k`` standard Gaussian probes regardless of ``distribution`` (for sketches)."""
        return self._take("gaussian", k, "gaussian")


def check_finite(Y: torch.Tensor, first_probe: int, what: str) -> torch.Tensor:
    """Raise ``NonFiniteError`` naming the first probe whose output contains NaN/Inf."""
    bad = ~torch.isfinite(Y.reshape(Y.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0].item())
        raise NonFiniteError(
            f"{what} returned non-finite values (NaN/Inf) for probe #{first_probe + i} (0-based, counting "
            f"all probes of this estimate). Check the operator (overflowing dynamics? a division by zero?) "
            "before estimating from it."
        )
    return Y


def apply_chunked(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, chunk_size: int,
                  what: str, first_probe: int = 0) -> torch.Tensor:
    """``fn`` on ``X`` (leading probe axis) ``chunk_size`` probes at a time, checking finiteness."""
    chunk_size = check_chunk(chunk_size)
    outs = []
    for start in range(0, X.shape[0], chunk_size):
        Y = fn(X[start:start + chunk_size])
        outs.append(check_finite(Y, first_probe + start, what))
    return torch.cat(outs, 0)


def check_chunk(chunk_size) -> int:
    """Validate a chunk size.

    Args:
        chunk_size: probes per batched application.

    Returns:
        It, as an int.

    Raises:
        ValueError: not a positive integer.
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def check_budget(m, minimum: int, method: str, hint: str = "") -> int:
    """Validate an integer probe budget ``m >= minimum``."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"{method}: the probe budget must be an integer, got {m!r}")
    if m < minimum:
        raise BudgetError(f"{method} needs at least {minimum} matvecs, got num_matvecs={m}. {hint}".strip())
    return int(m)


def renamed_budget(num_matvecs, num_probes, matvecs_per_probe: int, what: str) -> int:
    """The budget in matvecs, accepting the deprecated ``num_probes=`` (one release) with a warning.

    Args:
        num_matvecs: the budget as given (in applications of the operator or factor).
        num_probes: the deprecated budget in probes, or None.
        matvecs_per_probe: matvecs one probe costs in this estimator.
        what: the estimator's name, for the message.

    Returns:
        The budget in matvecs.
    """
    if num_probes is None:
        return num_matvecs
    m = int(num_probes) * matvecs_per_probe
    warnings.warn(f"{what}(num_probes=...) is deprecated and will be removed in the next release; the budget of every "
                  f"estimator is num_matvecs (here {matvecs_per_probe} per probe): pass num_matvecs={m}",
                  DeprecationWarning, stacklevel=3)
    return m


def check_rtol(rtol) -> float | None:
    """Validate a relative standard error to stop at.

    Args:
        rtol: a positive float, or None (no early stop).

    Returns:
        It as a float, or None.

    Raises:
        ValueError: not positive.
    """
    if rtol is None:
        return None
    rtol = float(rtol)
    if not rtol > 0:
        raise ValueError(f"rtol must be a positive relative standard error (e.g. 0.01), got {rtol}")
    return rtol


def basis_chunks(shape, dtype, device, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The standard basis of tensors of ``shape``, ``chunk_size`` at a time: (start, E[k, *shape])."""
    n = math.prod(shape)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        E = torch.zeros(stop - start, n, dtype=dtype, device=device)
        E[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1
        yield start, E.reshape(stop - start, *shape)


def flat_dot(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Per-probe inner products ``<X_i, Y_i>``, accumulated in float64: ``[k, ...] x [k, ...] -> [k]``."""
    k = X.shape[0]
    return torch.sum(X.reshape(k, -1) * Y.reshape(k, -1).to(X.dtype), 1, dtype=torch.float64)


def flat_sqnorm(X: torch.Tensor) -> torch.Tensor:
    """Per-probe squared norms, accumulated in float64."""
    return torch.linalg.vector_norm(X.reshape(X.shape[0], -1), dim=1, dtype=torch.float64) ** 2


def checked(samples: torch.Tensor, first_probe: int, what: str) -> torch.Tensor:
    """``check_finite`` on per-probe scalars (NaN/Inf anywhere in an output reaches its scalar)."""
    return check_finite(samples.reshape(-1, 1), first_probe, what).reshape(-1)


def running_mean(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running mean and its standard error (``std/sqrt(n)``, nan for n = 1) of a sample sequence."""
    s = np.asarray(samples, dtype=np.float64)
    n = np.arange(1, s.size + 1)
    mean = np.cumsum(s) / n
    # Welford-free but stable enough: variance from centred cumulative sums
    sq = np.cumsum((s - mean[-1]) ** 2) / n - (mean - mean[-1]) ** 2
    var = np.where(n > 1, np.maximum(sq, 0.0) * n / np.maximum(n - 1, 1), np.nan)
    return mean, np.sqrt(var / n)


def jackknife(samples, statistic: Callable[..., np.ndarray], bias_correct: bool = False) -> tuple[float, float]:
    """Full-sample statistic and its delete-one jackknife standard error.

    With ``bias_correct`` the value is the jackknife bias-corrected ``m·θ̂ − (m−1)·mean(θ̂₍ᵢ₎)``, which
    removes the O(1/m) bias of nonlinear statistics such as the ratio tr²/‖A‖_F² (Quenouille 1956).

    ``samples`` is one array or a list of arrays of equal length (paired samples). ``statistic``
    receives the per-array *means* over the kept samples followed by the number of kept samples,
    and must work elementwise on numpy arrays (it is called once on all leave-one-out means).

    Args:
        samples: one array, or a list of paired arrays of equal length.
        statistic: ``(*means, n) -> value``, elementwise on numpy arrays.
        bias_correct: return the jackknife bias-corrected value instead of the plain one.

    Returns:
        ``(value, stderr)`` (stderr NaN below three samples).
    """
    arrays = [np.asarray(samples, dtype=np.float64)] if isinstance(samples, np.ndarray) else [
        np.asarray(a, dtype=np.float64) for a in samples]
    m = arrays[0].size
    sums = [a.sum() for a in arrays]
    full = float(statistic(*[s / m for s in sums], m))
    if m < 3:
        return full, math.nan
    kept = [(s - a) / (m - 1) for s, a in zip(sums, arrays, strict=True)]
    loo = np.asarray(statistic(*kept, m - 1), dtype=np.float64)
    se = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    if bias_correct:
        full = m * full - (m - 1) * float(loo.mean())
    return full, se


def running_statistic(samples, statistic: Callable[..., np.ndarray]) -> np.ndarray:
    """``statistic`` of the means of the first n paired samples, for every n (vectorised cumsums)."""
    arrays = [np.asarray(samples, dtype=np.float64)] if isinstance(samples, np.ndarray) else [
        np.asarray(a, dtype=np.float64) for a in samples]
    n = np.arange(1, arrays[0].size + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(statistic(*[np.cumsum(a) / n for a in arrays], n), dtype=np.float64)


def spawn_seeds(seed, k: int) -> list:
    """``k`` independent seeds from one: ints via numpy's SeedSequence, or the same (stateful) generator."""
    if isinstance(seed, torch.Generator):
        return [seed] * k
    if seed is None:
        return [None] * k
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(int(seed)).spawn(k)]
