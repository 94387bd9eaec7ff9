"""Reductions of operators on structured tensors along some of their axes.

Two different things are called "reducing an operator along an axis"; kpflow names them apart:

* ``compression(A, axes)`` = ``(1ᵀ⊗I) A (1⊗I)``: broadcast the input along ``axes`` (copy it to every
  index), apply ``A``, then sum (or average) the output along ``axes``. Entry-wise it is
  ``C[i, j] = Σ_{r, s} A[(i, r), (j, s)]`` — all cross terms between reduced indices are kept.
  This is the papers' "averaged view" (``PartialTrace`` in the KPFlow code), e.g. the *temporal*
  view of an NTK on ``[B, T, H]`` sums over the hidden axis, the *spatial* view over trials and time.
  Cost: one application of ``A`` per application.
* ``partial_trace(A, axes)`` = ``Tr_axes(A)``: ``C[i, j] = Σ_r A[(i, r), (j, r)]`` — only the
  diagonal of the reduced indices. This is the textbook partial trace; ``tr(Tr_R(A)) = tr(A)``.
  Cost: ``prod(reduced sizes)`` applications of ``A`` per application (done in batched chunks).

They coincide (up to scale) only when ``A`` is a Kronecker product whose reduced factor is diagonal
in the all-ones direction; for general operators they differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kpflow.deprecation import keyword_only

from .base import LinearOperator, ShapeError


def _normalise_axes(axes, ndim: int) -> tuple[int, ...]:
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for a structured shape with {ndim} axes")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"repeated axes in {tuple(axes)}")
    if len(out) == ndim:
        raise ShapeError(f"reducing over all {ndim} axes leaves nothing; keep at least one axis")
    return tuple(sorted(out))


class CompressedOperator(LinearOperator):
    """``(1ᵀ⊗I) A (1⊗I)`` over ``axes``.

    With ``reduction='mean'`` divided by the number of reduced entries. Self-adjoint/PSD whenever ``A`` is.
    """

    def __init__(self, base: LinearOperator, axes: Sequence[int] | int, reduction: str = "sum"):
        if not base.is_square:
            raise ShapeError(f"compression needs a square operator, got {base.shape_in} -> {base.shape_out}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        full = base.shape_in
        self.axes = _normalise_axes(axes, len(full))
        self.kept = tuple(i for i in range(len(full)) if i not in self.axes)
        kept_shape = tuple(full[i] for i in self.kept)
        super().__init__(kept_shape, kept_shape, base.dtype, base.device,
                         is_self_adjoint=base.is_self_adjoint, is_psd=base.is_psd)
        self.base, self.reduction = base, reduction
        n_red = math.prod(full[i] for i in self.axes)
        self.scale = 1.0 if reduction == "sum" else 1.0 / n_red

    def _run(self, mm, X):
        k = X.shape[0]
        full = self.base.shape_in
        view = [k] + [full[i] if i in self.kept else 1 for i in range(len(full))]
        Xf = X.reshape(view).expand(k, *full)
        Y = mm(Xf)
        Y = Y.sum(dim=tuple(a + 1 for a in self.axes))
        return Y * self.scale if self.scale != 1.0 else Y

    def _matmat(self, X):
        return self._run(self.base._matmat, X)

    def _rmatmat(self, Y):
        return self._run(self.base._rmatmat, Y)


class PartialTraceOperator(LinearOperator):
    """The partial trace ``Tr_axes(A)``: ``C[i, j] = Σ_r A[(i, r), (j, r)]``.

    ``reduction='mean'`` divides by the number of reduced entries. Costs ``prod(reduced sizes)``
    applications of ``A``, run in chunks of ``chunk_size`` basis vectors.
    """

    def __init__(self, base: LinearOperator, axes: Sequence[int] | int, reduction: str = "sum",
                 chunk_size: int = 64):
        if not base.is_square:
            raise ShapeError(f"partial trace needs a square operator, got {base.shape_in} -> {base.shape_out}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        full = base.shape_in
        self.axes = _normalise_axes(axes, len(full))
        self.kept = tuple(i for i in range(len(full)) if i not in self.axes)
        kept_shape = tuple(full[i] for i in self.kept)
        super().__init__(kept_shape, kept_shape, base.dtype, base.device,
                         is_self_adjoint=base.is_self_adjoint, is_psd=base.is_psd)
        self.base, self.reduction, self.chunk_size = base, reduction, int(chunk_size)
        self.red_shape = tuple(full[i] for i in self.axes)
        self.n_red = math.prod(self.red_shape)
        self.scale = 1.0 if reduction == "sum" else 1.0 / self.n_red
        # permutation taking the full layout to (kept..., reduced...)
        self._perm = self.kept + self.axes
        self._inv = tuple(sorted(range(len(full)), key=lambda i: self._perm[i]))

    def _run(self, mm, X):
        k = X.shape[0]
        full = self.base.shape_in
        kept_shape = self.shape_in
        nk = math.prod(kept_shape)
        out = X.new_zeros(k, nk)
        Xflat = X.reshape(k, nk)
        for start in range(0, self.n_red, self.chunk_size):
            stop = min(start + self.chunk_size, self.n_red)
            c = stop - start
            # inputs x ⊗ e_r in (kept, reduced) layout: [k, c, nk, n_red]
            E = X.new_zeros(k, c, nk, self.n_red)
            r = torch.arange(start, stop, device=X.device)
            E[:, torch.arange(c, device=X.device), :, r] = Xflat.unsqueeze(0).expand(c, k, nk)
            Xin = E.reshape(k * c, *kept_shape, *self.red_shape).permute(0, *(i + 1 for i in self._inv))
            Y = mm(Xin.reshape(k * c, *full))
            Y = Y.permute(0, *(i + 1 for i in self._perm)).reshape(k, c, nk, self.n_red)
            out = out + Y[:, torch.arange(c, device=X.device), :, r].sum(0)
        out = out.reshape(k, *kept_shape)
        return out * self.scale if self.scale != 1.0 else out

    def _matmat(self, X):
        return self._run(self.base._matmat, X)

    def _rmatmat(self, Y):
        return self._run(self.base._rmatmat, Y)


@keyword_only(["reduction"])
def compression(A: LinearOperator, axes, *, reduction: str = "sum") -> CompressedOperator:
    """``(1ᵀ⊗I) A (1⊗I)`` over ``axes``: broadcast in, apply, sum (or mean) out. See module docs.

    Args:
        A: square operator on a structured shape.
        axes: the axes to reduce (an index or a tuple).
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        The ``CompressedOperator`` on the kept axes (self-adjoint/PSD when A is).

    Raises:
        ShapeError: A is not square, or the axes are out of range, repeated or all of them.
        ValueError: an unknown reduction.
    """
    return CompressedOperator(A, axes, reduction)


@keyword_only(["reduction", "chunk_size"])
def partial_trace(A: LinearOperator, axes, *, reduction: str = "sum", chunk_size: int = 64) -> PartialTraceOperator:
    """Textbook partial trace ``Tr_axes(A)``, matrix-free. See module docs for how it differs from ``compression``.

    Args:
        A: square operator on a structured shape.
        axes: the axes to trace out.
        reduction: ``"sum"`` or ``"mean"``.
        chunk_size: basis vectors of the reduced axes applied per call.

    Returns:
        The ``PartialTraceOperator`` on the kept axes.

    Raises:
        ShapeError: A is not square, or the axes are out of range, repeated or all of them.
        ValueError: an unknown reduction.
    """
    return PartialTraceOperator(A, axes, reduction, chunk_size)


#: Named views of an operator on ``[B, T, H]`` tensors: the axes each view *keeps*.
VIEW_AXES = {"trial": (0,), "temporal": (0, 1), "time": (1,), "spatial": (2,), "hidden": (2,)}


@keyword_only(["reduction"])
def view(A: LinearOperator, name: str, *, reduction: str = "sum") -> CompressedOperator:
    """Compression of an operator on ``[B, T, H]`` keeping the axes of a named view.

    ``temporal`` keeps (trial, time) — the papers' ``partial_avg(-1)``; ``spatial``/``hidden`` keeps
    the hidden axis — ``partial_avg((0, 1))``; ``trial`` keeps trials; ``time`` keeps time only.

    Args:
        A: square operator on ``[B, T, H]`` tensors.
        name: one of ``VIEW_AXES``.
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        The ``CompressedOperator``.

    Raises:
        ValueError: an unknown view.
        ShapeError: A is not on 3-axis tensors.
    """
    if name not in VIEW_AXES:
        raise ValueError(f"unknown view {name!r}; valid views: {sorted(VIEW_AXES)}")
    if len(A.shape_in) != 3:
        raise ShapeError(f"named views need an operator on [B, T, H] tensors, got shape_in={A.shape_in}")
    keep = VIEW_AXES[name]
    return compression(A, tuple(i for i in range(3) if i not in keep), reduction=reduction)
