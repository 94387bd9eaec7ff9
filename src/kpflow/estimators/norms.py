"""Frobenius norm and effective rank of operators, and effective rank along one axis of a structured shape.

‖A‖_F² = tr(A* A) = E‖A w‖² = E‖A* v‖²;   erank(A) = tr(A)² / ‖A‖_F²  (participation ratio).

``frobenius_norm_sq`` runs either the one-sided estimator on A itself (``hutchinson``: one matvec
per probe, O(1/√m)) or a trace estimator on the Gram operator A*A or AA* of the smaller side
(``hutchpp``/``xtrace``/``xnystrace``: two matvecs per probe, O(1/m) on decaying spectra). Negative
estimates of ‖A‖_F² (possible for some unbiased estimators) are returned unclamped with a warning;
``frobenius_norm`` and ``effective_rank`` then report NaN and say why.
"""

from __future__ import annotations

import math
import warnings

from kpflow.operators import gram, view
from kpflow.operators.reductions import VIEW_AXES, compression

from .onesided import onesided_statistics
from .probes import DEFAULT_CHUNK, check_budget, operator, spawn_seeds, square_operator
from .result import Estimate, History
from .trace import trace

FRO_METHODS = ("auto", "hutchinson", "hutchpp", "xtrace", "xnystrace", "exact")


def _gram_smaller_side(A):
    """A*A (on A's input space) or AA* (on its output space), whichever is smaller; both PSD."""
    return gram(A.T) if A.size_in <= A.size_out else gram(A)


def frobenius_norm_sq(A, num_matvecs: int = 100, *, method: str = "auto", seed=None,
                      chunk_size: int = DEFAULT_CHUNK, rtol: float | None = None, executor=None) -> Estimate:
    """‖A‖_F² = tr(A*A) for any (also non-square) operator.

    ``auto``: exact when the budget covers the smaller side, else XNysTrace on the Gram operator.

    Args:
        A: any operator.
        num_matvecs: budget of applications of A or A* (a Gram probe costs two).
        method: one of ``FRO_METHODS`` (``hutchinson``: one-sided on A; the others: trace of the Gram).
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        rtol: relative standard error to stop at.
        executor: a ``distributed.Client`` (or ordered ``map``) that evaluates the probe blocks.

    Returns:
        The ``Estimate`` (negative estimates are kept, with a warning and ``details['negative']``).

    Raises:
        ValueError: an unknown method.
        BudgetError: a budget below 3 matvecs.
    """
    if method not in FRO_METHODS:
        raise ValueError(f"unknown Frobenius method {method!r}; valid methods: {FRO_METHODS}")
    A = operator(A, "frobenius_norm_sq")
    d = min(A.size_in, A.size_out)
    m = check_budget(num_matvecs, min(3, d), "frobenius_norm_sq")
    reason = None
    if method == "auto":
        if m >= d:
            method, reason = "exact", f"budget {m} >= smaller dimension {d}"
        elif m >= 8:
            method, reason = "xnystrace", "Gram operator is PSD; O(1/m) on decaying spectra"
        else:
            method, reason = "hutchinson", "budget too small for a Gram sketch"
    if method in ("hutchinson", "exact"):
        budget = max(m, d) if method == "exact" else m
        stats = onesided_statistics(A, budget, distribution="gaussian", seed=seed, chunk_size=chunk_size,
                                    executor=executor,
                                    rtol=rtol if method == "hutchinson" else None, max_dense=0)
        est = stats.trace.replaced(method="exact" if stats.trace.exact else "hutchinson")  # tr(A A*) = ‖A‖_F²
    else:
        G = _gram_smaller_side(A)
        g = trace(G, max(m // 2, 2), method=method, seed=seed, chunk_size=chunk_size, rtol=rtol, executor=executor)
        est = g.replaced(num_matvecs=2 * g.num_matvecs, history=g.history.scaled(2),
                      details={**g.details, "gram_matvecs": g.num_matvecs})
    est.details["matvec_unit"] = "applications of A or A*"
    if reason is not None:
        est.reason = reason
    if est.value < 0:
        warnings.warn(f"‖A‖_F² estimate is negative ({est.value:.4g} ± {est.stderr:.3g}); reported unclamped. "
                      "Increase the budget.", RuntimeWarning, stacklevel=2)
        est.details["negative"] = True
    return est


def frobenius_norm(A, num_matvecs: int = 100, **kwargs) -> Estimate:
    """‖A‖_F = sqrt of ``frobenius_norm_sq`` (delta-method standard error); NaN if the square is < 0.

    Args:
        A: any operator.
        num_matvecs: budget of applications of A or A*.
        **kwargs: as for ``frobenius_norm_sq``.

    Returns:
        The ``Estimate`` of ‖A‖_F.
    """
    return sqrt_estimate(frobenius_norm_sq(A, num_matvecs, **kwargs))


def sqrt_estimate(f2: Estimate) -> Estimate:
    """√ of an estimate of a non-negative quantity; NaN (with the reason in ``note``) when it is < 0.

    Args:
        f2: the estimate of the square.

    Returns:
        The ``Estimate`` of the root (delta-method standard error); ``parts['square']`` is ``f2``.
    """
    if f2.value < 0:
        return f2.replaced(value=math.nan, stderr=math.nan, history=History(), parts={"square": f2},
                       note=f"the squared-norm estimate {f2.value:.4g} is negative; no square root taken")
    v = math.sqrt(f2.value)
    se = f2.stderr / (2 * v) if v > 0 else math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = f2.history.value.clip(min=0) ** 0.5  # display only; values < 0 shown as 0 in the history
        run_se = f2.history.stderr / (2 * run)
    return f2.replaced(value=v, stderr=se, history=History(f2.history.num_matvecs, run, run_se),
                   parts={"square": f2})


def ratio_erank(tr: Estimate, fro2: Estimate, method: str | None = None) -> Estimate:
    """Erank = tr² / ‖A‖_F² from two *independent* estimates (delta-method standard error).

    Args:
        tr: the trace estimate.
        fro2: an independent estimate of ‖A‖_F².
        method: the label (default ``"<trace method>+<Frobenius method>"``).

    Returns:
        The ``Estimate`` with ``parts`` ``trace`` and ``frobenius_sq`` (NaN with a warning when ‖A‖_F² ≤ 0).
    """
    n = tr.num_matvecs + fro2.num_matvecs
    method = method or f"{tr.method}+{fro2.method}"
    parts = {"trace": tr, "frobenius_sq": fro2}
    common = dict(num_probes=tr.num_probes + fro2.num_probes, parts=parts, exact=tr.exact and fro2.exact)
    if not fro2.value > 0:
        note = (f"‖A‖_F² estimate is {fro2.value:.4g} ≤ 0; the effective rank is undefined "
                "(reported as NaN, not clamped)")
        warnings.warn(note, RuntimeWarning, stacklevel=3)
        return Estimate(math.nan, math.nan, n, method, tr.seed, note=note, **common)
    r = tr.value**2 / fro2.value
    rel_t = tr.stderr / abs(tr.value) if tr.value != 0 else math.inf
    rel_f = fro2.stderr / fro2.value
    se = 0.0 if common["exact"] else abs(r) * math.sqrt(4 * rel_t**2 + rel_f**2)
    return Estimate(r, se, n, method, tr.seed, **common)


def effective_rank(A, num_matvecs: int = 200, *, method: str = "auto", seed=None,
                   chunk_size: int = DEFAULT_CHUNK, executor=None) -> Estimate:
    """erank(A) = tr(A)² / ‖A‖_F² of a square operator (participation ratio; 1 ≤ erank ≤ rank for PSD A).

    Half the budget goes to tr(A), half to ‖A‖_F² (independent probes); exact when each half covers
    the dimension. For a factor J of A = J J*, ``onesided_effective_rank(J)`` does it in one pass.

    Args:
        A: square operator.
        num_matvecs: budget of applications of A or A*, at least 8 (or 2n).
        method: the trace and Frobenius method (``"auto"`` or one both accept).
        seed: int, None or ``torch.Generator`` (split into two independent streams).
        chunk_size: probes per batched application.
        executor: a ``distributed.Client`` (or ordered ``map``) that evaluates the probe blocks.

    Returns:
        The ``Estimate`` with ``parts`` ``trace`` and ``frobenius_sq``.

    Raises:
        BudgetError: a budget below the minimum.
        ShapeError: A is not square.
    """
    A = square_operator(A, "effective_rank")
    n = A.size_in
    m = check_budget(num_matvecs, min(8, 2 * n), "effective_rank",
                     "Half goes to the trace, half to the Frobenius norm.")
    s_tr, s_fro = spawn_seeds(seed, 2)
    half = m // 2
    if half >= n:
        tr = trace(A, n, method="exact")
        f2 = frobenius_norm_sq(A, n, method="exact", chunk_size=chunk_size)
    else:
        tr = trace(A, half, method=method, seed=s_tr, chunk_size=chunk_size, executor=executor)
        f2 = frobenius_norm_sq(A, m - half, method=method, seed=s_fro, chunk_size=chunk_size, executor=executor)
    return ratio_erank(tr, f2)


def axis_effective_rank(A, axis: str | int | tuple[int, ...], num_matvecs: int = 200, *,
                        reduction: str = "sum", method: str = "auto", seed=None,
                        chunk_size: int = DEFAULT_CHUNK, executor=None) -> Estimate:
    """Erank of the compression of ``A`` onto one axis group: is A low-rank in time, in space, over trials?

    ``axis`` is a named view of a [B, T, H] operator (``'trial'``, ``'time'``, ``'temporal'`` =
    (trial, time), ``'spatial'``/``'hidden'``), or the index / tuple of indices of the axes to *keep*
    for any structured shape. The compression (1ᵀ⊗I) A (1⊗I) sums over the other axes
    (``kpflow.operators.compression``); one of its matvecs costs one matvec of A.

    Args:
        A: square operator on a structured shape.
        axis: a named view or the axes to keep.
        num_matvecs: budget of applications of A.
        reduction: ``"sum"`` or ``"mean"`` over the other axes.
        method: as for ``effective_rank``.
        seed: int, None or ``torch.Generator``.
        chunk_size: probes per batched application.
        executor: a ``distributed.Client`` (or ordered ``map``) that evaluates the probe blocks.

    Returns:
        The ``Estimate`` (``details``: ``axis``, ``compressed_shape``).

    Raises:
        ValueError: an unknown view name.
        ShapeError: A is not square, or axes out of range.
    """
    A = square_operator(A, "axis_effective_rank")
    if isinstance(axis, str):
        if axis not in VIEW_AXES:
            raise ValueError(f"unknown axis view {axis!r}; valid: {sorted(VIEW_AXES)} or a tuple of axes to keep")
        C = view(A, axis, reduction=reduction)
    else:
        keep = (axis,) if isinstance(axis, int) else tuple(axis)
        nd = len(A.shape_in)
        keep = tuple(k % nd for k in keep)
        C = compression(A, tuple(i for i in range(nd) if i not in keep), reduction=reduction)
    est = effective_rank(C, num_matvecs, method=method, seed=seed, chunk_size=chunk_size, executor=executor)
    est.details.update(axis=axis, compressed_shape=C.shape_in)
    return est


def axis_effective_ranks(A, axes=("trial", "time", "spatial"), num_matvecs: int = 200, **kwargs) -> dict:
    """``axis_effective_rank`` for several views at once.

    Args:
        A: square operator on a structured shape.
        axes: the views (or axes to keep), one estimate each.
        num_matvecs: budget of each estimate.
        **kwargs: as for ``axis_effective_rank``.

    Returns:
        ``{view: Estimate}``.
    """
    return {a: axis_effective_rank(A, a, num_matvecs, **kwargs) for a in axes}
