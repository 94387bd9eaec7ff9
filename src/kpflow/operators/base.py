"""Matrix-free linear operators on structured tensors.

An operator ``A`` maps tensors of shape ``shape_in`` to tensors of shape ``shape_out``. Subclasses
implement only the *batched* product ``_matmat`` (input ``[k, *shape_in]`` -> ``[k, *shape_out]``)
and the batched adjoint product ``_rmatmat`` (``[k, *shape_out]`` -> ``[k, *shape_in]``); the base
class supplies shape checks, single-vector application, composition, sums, scaling, adjoints and
dense materialisation. The inner product is the Euclidean one on flattened tensors,
``<x, y> = sum(x * y)``, so ``A.T`` is the usual transpose of the flattened matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kpflow.deprecation import warn_deprecated

Shape = tuple[int, ...]

#: Default ceiling on the number of entries ``to_dense`` may allocate (16M entries = 128 MB in float64).
DENSE_LIMIT = 2**24


class ShapeError(ValueError):
    """Raised when operator or tensor shapes do not fit together."""


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _as_shape(shape) -> Shape:
    if isinstance(shape, int):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _ident(op: LinearOperator):
    """``op``'s structure, or its identity when it has none (safe: composites keep their parts alive)."""
    key = op.structure()
    return ("object", id(op)) if key is None else (type(op).__name__, key)


def check_compatible(ops: Sequence[LinearOperator], what: str) -> None:
    """Refuse to combine operators of different dtypes or devices (as torch refuses ``float32 @ float64``).

    Args:
        ops: the operators to combine.
        what: the operation, for the message (e.g. ``"compose"``).

    Raises:
        TypeError: the operators do not share one dtype and one device.
    """
    first = ops[0]
    for op in ops[1:]:
        if op.dtype != first.dtype or op.device != first.device:
            raise TypeError(
                f"cannot {what} {first!r} on {first.device} with {op!r} on {op.device}: operators must share "
                f"one dtype and one device. Build them from tensors of one dtype and device (e.g. record the "
                f"trajectory in {first.dtype}, or DenseOperator(M.to({first.dtype}, '{first.device}')))"
            )


class LinearOperator:
    """A linear map between tensor spaces, applied without forming its matrix.

    Attributes:
        shape_in: shape of one input tensor.
        shape_out: shape of one output tensor.
        dtype, device: of the tensors the operator consumes and produces.
        is_self_adjoint: known to satisfy ``A* = A`` (requires ``shape_in == shape_out``).
        is_psd: known to be self-adjoint positive semi-definite.

    Subclasses override ``_matmat`` and ``_rmatmat``; both receive a leading probe dimension.
    """

    def __init__(
        self,
        shape_in,
        shape_out,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        *,
        is_self_adjoint: bool = False,
        is_psd: bool = False,
    ):
        self.shape_in: Shape = _as_shape(shape_in)
        self.shape_out: Shape = _as_shape(shape_out)
        self.dtype = dtype
        self.device = torch.device(device)
        if (is_self_adjoint or is_psd) and self.shape_in != self.shape_out:
            raise ShapeError(
                f"a self-adjoint operator must be square, got shape_in={self.shape_in} "
                f"and shape_out={self.shape_out}"
            )
        self.is_psd = bool(is_psd)
        self.is_self_adjoint = bool(is_self_adjoint or is_psd)
        self._adjoint: LinearOperator | None = None

    # ------------------------------------------------------------------ hooks
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        if self.is_self_adjoint:
            return self._matmat(Y)
        raise NotImplementedError(f"{type(self).__name__} does not implement its adjoint")

    def structure(self) -> tuple | None:
        """A hashable description of the linear map, or None when only the object itself is known to be it.

        Two operators whose ``structure()`` is equal (and not None) represent the same linear map even
        when they were built separately, e.g. two ``propagator(traj)`` of one trajectory. Composition
        uses it to recognise ``B C B*`` chains (and so keep the self-adjoint/PSD flags). Subclasses that
        are determined by their arguments override it; the default keeps identity semantics.

        Returns:
            A tuple that is equal for operators representing the same map, or None.
        """
        return None

    def same_map(self, other: LinearOperator) -> bool:
        """True when ``other`` is known to represent the same linear map (identity or equal ``structure``).

        Args:
            other: another operator.

        Returns:
            Whether the two are known to be equal (False means *not known*, not *different*).
        """
        if self is other:
            return True
        key = self.structure()
        return key is not None and type(self) is type(other) and key == other.structure()

    # ------------------------------------------------------------- properties
    @property
    def size_in(self) -> int:
        """Number of scalar entries of one input tensor."""
        return _numel(self.shape_in)

    @property
    def size_out(self) -> int:
        """Number of scalar entries of one output tensor."""
        return _numel(self.shape_out)

    @property
    def is_square(self) -> bool:
        """``shape_in == shape_out``."""
        return self.shape_in == self.shape_out

    @property
    def shape(self) -> tuple[int, int]:
        """The (rows, columns) of the flattened matrix, as scipy reports it."""
        return (self.size_out, self.size_in)

    def __repr__(self) -> str:
        flags = [f for f, on in (("self-adjoint", self.is_self_adjoint), ("psd", self.is_psd)) if on]
        extra = f", {'/'.join(flags)}" if flags else ""
        return f"{type(self).__name__}({self.shape_in} -> {self.shape_out}, {self.dtype}{extra})"

    # -------------------------------------------------------------- applying
    def _check(self, X: torch.Tensor, shape: Shape, what: str, batched: bool) -> torch.Tensor:
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.{what} expects a torch.Tensor, got {type(X).__name__}")
        got = tuple(X.shape[1:]) if batched else tuple(X.shape)
        if got != shape:
            lead = "[k, *shape]" if batched else "shape"
            raise ShapeError(
                f"{type(self).__name__}.{what}: tensor of shape {tuple(X.shape)} does not fit the operator; "
                f"expected {lead} with shape={shape}"
            )
        return X

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """Apply to a batch of probes.

        Args:
            X: ``[k, *shape_in]``.

        Returns:
            ``[k, *shape_out]``.

        Raises:
            ShapeError: X does not have shape ``[k, *shape_in]``.
            TypeError: X is not a tensor.
        """
        self._check(X, self.shape_in, "matmat", batched=True)
        return self._matmat(X)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """The adjoint applied to a batch (scipy's name; ``A.rmatmat(Y)`` is ``A.T.matmat(Y)``).

        Args:
            Y: ``[k, *shape_out]``.

        Returns:
            ``[k, *shape_in]``.

        Raises:
            ShapeError: Y does not have shape ``[k, *shape_out]``.
            TypeError: Y is not a tensor.
        """
        self._check(Y, self.shape_out, "rmatmat", batched=True)
        return self._rmatmat(Y)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for one tensor of shape ``shape_in``; a leading probe axis is also accepted.

        Args:
            x: ``shape_in`` or ``[k, *shape_in]``.

        Returns:
            ``A x`` of shape ``shape_out`` (or ``[k, *shape_out]``).

        Raises:
            ShapeError: x fits neither shape.
        """
        if tuple(x.shape) == self.shape_in:
            return self._matmat(x.unsqueeze(0)).squeeze(0)
        return self.matmat(x)

    def adjoint_apply(self, y: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``A* y``; write ``A.T.apply(y)`` (or ``A.T @ y``)."""
        warn_deprecated("LinearOperator.adjoint_apply(y)", "A.T.apply(y) or A.T @ y")
        return self.T.apply(y)

    __call__ = apply

    def matvec_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Flat-vector convenience.

        Args:
            x: ``[size_in]`` or ``[k, size_in]``.

        Returns:
            ``[size_out]`` or ``[k, size_out]``.
        """
        if x.dim() == 1:
            return self.apply(x.reshape(self.shape_in)).reshape(-1)
        return self.matmat(x.reshape(-1, *self.shape_in)).reshape(x.shape[0], -1)

    # --------------------------------------------------------------- algebra
    @property
    def T(self) -> LinearOperator:
        """The adjoint operator ``A*`` (cached, so ``A.T.T is A``)."""
        if self._adjoint is None:
            self._adjoint = AdjointOperator(self)
        return self._adjoint

    @property
    def adjoint(self) -> LinearOperator:
        """Deprecated spelling of ``A.T``."""
        warn_deprecated("LinearOperator.adjoint", "A.T")
        return self.T

    @property
    def H(self) -> LinearOperator:
        """Deprecated spelling of ``A.T`` (the operators are real: the adjoint is the transpose)."""
        warn_deprecated("LinearOperator.H", "A.T")
        return self.T

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return compose(self, other)
        if isinstance(other, torch.Tensor):
            return self.apply(other)
        return NotImplemented

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            return SumOperator([self, other])
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            return SumOperator([self, ScaledOperator(other, -1.0)])
        return NotImplemented

    def __neg__(self):
        return ScaledOperator(self, -1.0)

    def __mul__(self, scalar):
        if isinstance(scalar, (int, float)) or (isinstance(scalar, torch.Tensor) and scalar.dim() == 0):
            return ScaledOperator(self, float(scalar))
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return ScaledOperator(self, 1.0 / float(scalar))

    # ------------------------------------------------------------ dense view
    def to_dense(self, max_elements: int | None = None) -> torch.Tensor:
        """The matrix of the operator, shape ``[*shape_out, *shape_in]``.

        Built by applying the operator to the identity in chunks.

        Args:
            max_elements: the most entries it may allocate (default ``kpflow.operators.base.DENSE_LIMIT``).

        Returns:
            The dense tensor ``[*shape_out, *shape_in]``.

        Raises:
            MemoryError: the matrix would have more than ``max_elements`` entries (the message says how
                much memory it would take).
        """
        limit = DENSE_LIMIT if max_elements is None else int(max_elements)
        n = self.size_out * self.size_in
        if n > limit:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            raise MemoryError(
                f"to_dense() of {self!r} would allocate {self.size_out}x{self.size_in} = {n:,} entries "
                f"({n * itemsize / 2**20:,.1f} MiB in {self.dtype}); the limit is {limit:,} entries. "
                "Pass max_elements=... or raise kpflow.operators.base.DENSE_LIMIT if you really mean it."
            )
        cols = []
        chunk = max(1, min(self.size_in, limit // max(1, self.size_out), 4096))
        for start in range(0, self.size_in, chunk):
            stop = min(start + chunk, self.size_in)
            E = torch.zeros(stop - start, self.size_in, dtype=self.dtype, device=self.device)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append(self._matmat(E.reshape(-1, *self.shape_in)).reshape(stop - start, -1))
        M = torch.cat(cols, 0).T  # [size_out, size_in]
        return M.reshape(*self.shape_out, *self.shape_in)

    def to_matrix(self, max_elements: int | None = None) -> torch.Tensor:
        """``to_dense`` flattened to ``[size_out, size_in]``.

        Args:
            max_elements: as for ``to_dense``.

        Returns:
            The matrix.

        Raises:
            MemoryError: as for ``to_dense``.
        """
        return self.to_dense(max_elements).reshape(self.size_out, self.size_in)

    # ------------------------------------------------------------- utilities
    def reshape(self, shape_in=None, shape_out=None) -> LinearOperator:
        """View with new input/output shapes of the same sizes (see ``ReshapedOperator``).

        Args:
            shape_in: the new input shape (default: unchanged).
            shape_out: the new output shape (default: unchanged).

        Returns:
            The ``ReshapedOperator``.

        Raises:
            ShapeError: the sizes differ.
        """
        return ReshapedOperator(self, shape_in or self.shape_in, shape_out or self.shape_out)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 numpy vectors (see ``to_scipy``).

        Returns:
            The scipy view.
        """
        return to_scipy(self)


# ---------------------------------------------------------------------------------------------
# Concrete operators
# ---------------------------------------------------------------------------------------------


class AdjointOperator(LinearOperator):
    """``A*``: swaps the batched product and its adjoint. ``A.T.T is A``."""

    def __init__(self, base: LinearOperator):
        super().__init__(
            base.shape_out,
            base.shape_in,
            base.dtype,
            base.device,
            is_self_adjoint=base.is_self_adjoint,
            is_psd=base.is_psd,
        )
        self.base = base
        self._adjoint = base

    def structure(self):
        """``("adjoint", base)``: the adjoints of two equal maps are equal."""
        return ("adjoint", _ident(self.base))

    def _matmat(self, X):
        return self.base._rmatmat(X)

    def _rmatmat(self, Y):
        return self.base._matmat(Y)


class FunctionOperator(LinearOperator):
    """An operator from plain functions.

    ``matvec(x)`` maps one ``shape_in`` tensor to ``shape_out``; ``rmatvec`` is its adjoint.
    With ``batched=False`` (default) the functions act on single tensors and are vectorised over
    probes with ``torch.func.vmap``; with ``batched=True`` they already take a leading probe axis.
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        rmatvec: Callable[[torch.Tensor], torch.Tensor] | None,
        shape_in,
        shape_out,
        dtype=torch.float64,
        device="cpu",
        *,
        batched: bool = False,
        is_self_adjoint: bool = False,
        is_psd: bool = False,
    ):
        super().__init__(
            shape_in, shape_out, dtype, device, is_self_adjoint=is_self_adjoint, is_psd=is_psd
        )
        self._mv = matvec if batched else torch.func.vmap(matvec)
        self._rmv = None if rmatvec is None else (rmatvec if batched else torch.func.vmap(rmatvec))

    def _matmat(self, X):
        return self._mv(X)

    def _rmatmat(self, Y):
        if self._rmv is None:
            if self.is_self_adjoint:
                return self._mv(Y)
            raise NotImplementedError("this FunctionOperator was built without rmatvec")
        return self._rmv(Y)


class DenseOperator(LinearOperator):
    """Wraps an explicit matrix ``M`` of shape ``[*shape_out, *shape_in]`` (or 2-D with given shapes)."""

    def __init__(self, M: torch.Tensor, shape_in=None, shape_out=None, *, is_self_adjoint=None,
                 is_psd: bool = False):
        if shape_in is None and shape_out is None:
            if M.dim() != 2:
                raise ShapeError(
                    f"DenseOperator needs shape_in/shape_out for a {M.dim()}-D tensor of shape {tuple(M.shape)}"
                )
            shape_out, shape_in = (M.shape[0],), (M.shape[1],)
        elif shape_in is None or shape_out is None:
            raise ShapeError("give both shape_in and shape_out, or neither")
        shape_in, shape_out = _as_shape(shape_in), _as_shape(shape_out)
        if M.numel() != _numel(shape_in) * _numel(shape_out):
            raise ShapeError(
                f"matrix of shape {tuple(M.shape)} has {M.numel()} entries, but shape_out={shape_out} "
                f"x shape_in={shape_in} needs {_numel(shape_in) * _numel(shape_out)}"
            )
        self.matrix = M.reshape(_numel(shape_out), _numel(shape_in))
        if is_self_adjoint is None:
            is_self_adjoint = bool(is_psd)
        super().__init__(shape_in, shape_out, M.dtype, M.device, is_self_adjoint=is_self_adjoint,
                         is_psd=is_psd)

    def structure(self):
        """Wrappers of one matrix (the same tensor storage, offset, shape and strides) are the same map."""
        M = self.matrix
        return (M.data_ptr(), M.storage_offset(), tuple(M.shape), M.stride(), M.dtype, M.device,
                self.shape_in, self.shape_out) if M.device.type != "meta" else None

    def _matmat(self, X):
        k = X.shape[0]
        return (X.reshape(k, -1) @ self.matrix.T).reshape(k, *self.shape_out)

    def _rmatmat(self, Y):
        k = Y.shape[0]
        return (Y.reshape(k, -1) @ self.matrix).reshape(k, *self.shape_in)

    def to_dense(self, max_elements=None):
        """The wrapped matrix itself (no copy), shape ``[*shape_out, *shape_in]``."""
        return self.matrix.reshape(*self.shape_out, *self.shape_in)


class IdentityOperator(LinearOperator):
    """``I`` on tensors of a given shape."""

    def __init__(self, shape, dtype=torch.float64, device="cpu"):
        super().__init__(shape, shape, dtype, device, is_psd=True)

    def structure(self):
        """Identities of one shape, dtype and device are the same map."""
        return (self.shape_in, self.dtype, self.device)

    def _matmat(self, X):
        return X

    def _rmatmat(self, Y):
        return Y


class ZeroOperator(LinearOperator):
    """The zero map ``shape_in -> shape_out``."""

    def __init__(self, shape_in, shape_out=None, dtype=torch.float64, device="cpu"):
        shape_out = shape_in if shape_out is None else shape_out
        sq = _as_shape(shape_in) == _as_shape(shape_out)
        super().__init__(shape_in, shape_out, dtype, device, is_psd=sq)

    def structure(self):
        """Zero maps of one shape, dtype and device are the same map."""
        return (self.shape_in, self.shape_out, self.dtype, self.device)

    def _matmat(self, X):
        return X.new_zeros(X.shape[0], *self.shape_out)

    def _rmatmat(self, Y):
        return Y.new_zeros(Y.shape[0], *self.shape_in)


class RankOneOperator(LinearOperator):
    """The rank-one map ``|y><x|``: ``v -> <x, v> y``. PSD when ``x is y``."""

    def __init__(self, y: torch.Tensor, x: torch.Tensor):
        same = x is y
        super().__init__(tuple(x.shape), tuple(y.shape), y.dtype, y.device, is_psd=same)
        self.y, self.x = y, x

    def _matmat(self, X):
        c = X.reshape(X.shape[0], -1) @ self.x.reshape(-1)
        return c.reshape(-1, *([1] * len(self.shape_out))) * self.y

    def _rmatmat(self, Y):
        c = Y.reshape(Y.shape[0], -1) @ self.y.reshape(-1)
        return c.reshape(-1, *([1] * len(self.shape_in))) * self.x


class ScaledOperator(LinearOperator):
    """``c A`` for a real scalar ``c``; PSD is kept when ``c >= 0``."""

    def __init__(self, base: LinearOperator, scale: float):
        super().__init__(
            base.shape_in, base.shape_out, base.dtype, base.device,
            is_self_adjoint=base.is_self_adjoint, is_psd=base.is_psd and scale >= 0,
        )
        self.base, self.scale = base, float(scale)

    def structure(self):
        """``(scale, base)``."""
        return (self.scale, _ident(self.base))

    def _matmat(self, X):
        return self.scale * self.base._matmat(X)

    def _rmatmat(self, Y):
        return self.scale * self.base._rmatmat(Y)


class SumOperator(LinearOperator):
    """``A_1 + ... + A_n``; self-adjoint/PSD when every term is."""

    def __init__(self, terms: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumOperator) else [t])
        first = flat[0]
        for t in flat[1:]:
            if t.shape_in != first.shape_in or t.shape_out != first.shape_out:
                raise ShapeError(
                    f"cannot add operators of different shapes: {first.shape_in} -> {first.shape_out} "
                    f"and {t.shape_in} -> {t.shape_out}"
                )
        check_compatible(flat, "add")
        super().__init__(
            first.shape_in, first.shape_out, first.dtype, first.device,
            is_self_adjoint=all(t.is_self_adjoint for t in flat), is_psd=all(t.is_psd for t in flat),
        )
        self.terms = flat

    def structure(self):
        """The terms, in order."""
        return tuple(_ident(t) for t in self.terms)

    def _matmat(self, X):
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def _rmatmat(self, Y):
        out = self.terms[0]._rmatmat(Y)
        for t in self.terms[1:]:
            out = out + t._rmatmat(Y)
        return out


def _is_adjoint_pair(a: LinearOperator, b: LinearOperator) -> bool:
    """True when ``b`` is known to be ``a*`` (by identity or by structure, see ``LinearOperator.structure``)."""
    return b.same_map(a.T) or a.same_map(b.T) or (a.same_map(b) and a.is_self_adjoint)


class ComposedOperator(LinearOperator):
    """``A_1 A_2 ... A_n`` (applied right to left).

    Self-adjointness and positivity are inferred from the structure: a chain ``B_1..B_m C B_m*..B_1*``
    is self-adjoint when the middle ``C`` is, and PSD when ``C`` is PSD or absent (``B B*``).
    """

    def __init__(self, factors: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, ComposedOperator) else [f])
        for left, right in zip(flat[:-1], flat[1:], strict=True):
            if left.shape_in != right.shape_out:
                raise ShapeError(
                    f"cannot compose: left operator takes {left.shape_in} but right operator produces "
                    f"{right.shape_out} ({left!r} @ {right!r})"
                )
        check_compatible(flat, "compose")
        # structure is judged both on the factors as given (e.g. X X* for a composite X) and flattened
        sa, psd = _chain_flags(list(factors))
        sa2, psd2 = _chain_flags(flat)
        sa, psd = sa or sa2, psd or psd2
        super().__init__(flat[-1].shape_in, flat[0].shape_out, flat[0].dtype, flat[0].device,
                         is_self_adjoint=sa, is_psd=psd)
        self.factors = flat

    def structure(self):
        """The factors, in order."""
        return tuple(_ident(f) for f in self.factors)

    def _matmat(self, X):
        for f in reversed(self.factors):
            X = f._matmat(X)
        return X

    def _rmatmat(self, Y):
        for f in self.factors:
            Y = f._rmatmat(Y)
        return Y


def _chain_flags(chain: Sequence[LinearOperator]) -> tuple[bool, bool]:
    n = len(chain)
    if chain[0].shape_out != chain[-1].shape_in:
        return False, False
    for i in range(n // 2):
        if not _is_adjoint_pair(chain[i], chain[n - 1 - i]):
            return False, False
    if n % 2 == 0:
        return True, True
    mid = chain[n // 2]
    return mid.is_self_adjoint, mid.is_psd


def compose(*ops: LinearOperator) -> LinearOperator:
    """``ops[0] @ ops[1] @ ...`` as one lazy operator.

    Args:
        *ops: the factors, applied right to left.

    Returns:
        The ``ComposedOperator`` (self-adjoint/PSD when its structure says so).

    Raises:
        ShapeError: neighbouring shapes do not fit.
        TypeError: the factors differ in dtype or device.
    """
    return ComposedOperator(ops)


def gram(A: LinearOperator) -> LinearOperator:
    """The Gram operator ``A A*`` (PSD).

    Args:
        A: any operator.

    Returns:
        ``A @ A.T``, flagged PSD.
    """
    return ComposedOperator([A, A.T])


def symmetric_part(A: LinearOperator) -> LinearOperator:
    """``(A + A*) / 2``.

    Args:
        A: a square operator.

    Returns:
        The self-adjoint part (``A`` itself when it is already self-adjoint).

    Raises:
        ShapeError: A is not square.
    """
    if not A.is_square:
        raise ShapeError(f"symmetric part needs a square operator, got {A.shape_in} -> {A.shape_out}")
    if A.is_self_adjoint:
        return A
    S = ScaledOperator(SumOperator([A, A.T]), 0.5)
    S.is_self_adjoint = True
    return S


class ReshapedOperator(LinearOperator):
    """The same matrix viewed with other input/output tensor shapes of equal sizes."""

    def __init__(self, base: LinearOperator, shape_in, shape_out):
        shape_in, shape_out = _as_shape(shape_in), _as_shape(shape_out)
        if _numel(shape_in) != base.size_in or _numel(shape_out) != base.size_out:
            raise ShapeError(
                f"cannot view operator {base.shape_in} -> {base.shape_out} as {shape_in} -> {shape_out}: "
                "sizes differ"
            )
        same = shape_in == shape_out and base.shape_in == base.shape_out
        super().__init__(shape_in, shape_out, base.dtype, base.device,
                         is_self_adjoint=base.is_self_adjoint and same, is_psd=base.is_psd and same)
        self.base = base

    def structure(self):
        """``(shape_in, shape_out, base)``."""
        return (self.shape_in, self.shape_out, _ident(self.base))

    def _matmat(self, X):
        k = X.shape[0]
        return self.base._matmat(X.reshape(k, *self.base.shape_in)).reshape(k, *self.shape_out)

    def _rmatmat(self, Y):
        k = Y.shape[0]
        return self.base._rmatmat(Y.reshape(k, *self.base.shape_out)).reshape(k, *self.shape_in)


class KroneckerOperator(LinearOperator):
    """``A ⊗ B`` on tensors of shape ``A.shape_in + B.shape_in``.

    ``(A⊗B) X`` applies B to the trailing axes and A to the leading axes, i.e.
    ``(A⊗B)[(i,j),(k,l)] = A[i,k] B[j,l]``.
    """

    def __init__(self, A: LinearOperator, B: LinearOperator):
        check_compatible([A, B], "take the Kronecker product of")
        super().__init__(
            A.shape_in + B.shape_in, A.shape_out + B.shape_out, A.dtype, A.device,
            is_self_adjoint=A.is_self_adjoint and B.is_self_adjoint,
            is_psd=(A.is_psd and B.is_psd),
        )
        self.A, self.B = A, B

    def structure(self):
        """``(A, B)``."""
        return (_ident(self.A), _ident(self.B))

    @staticmethod
    def _apply(A_mm, B_mm, X, a_in, b_in, a_out, b_out):
        k = X.shape[0]
        na_in = _numel(a_in)
        nb_out = _numel(b_out)
        Y = B_mm(X.reshape(k * na_in, *b_in))  # [k*na_in, *b_out]
        Y = Y.reshape(k, na_in, nb_out).transpose(1, 2).reshape(k * nb_out, *a_in)
        Z = A_mm(Y)  # [k*nb_out, *a_out]
        Z = Z.reshape(k, nb_out, -1).transpose(1, 2)
        return Z.reshape(k, *a_out, *b_out)

    def _matmat(self, X):
        A, B = self.A, self.B
        return self._apply(A._matmat, B._matmat, X, A.shape_in, B.shape_in, A.shape_out, B.shape_out)

    def _rmatmat(self, Y):
        A, B = self.A, self.B
        return self._apply(A._rmatmat, B._rmatmat, Y, A.shape_out, B.shape_out, A.shape_in, B.shape_in)


def kron(A: LinearOperator, B: LinearOperator) -> LinearOperator:
    """Kronecker (tensor) product ``A ⊗ B``.

    Args:
        A: the factor on the leading axes.
        B: the factor on the trailing axes.

    Returns:
        The ``KroneckerOperator``.

    Raises:
        TypeError: A and B differ in dtype or device.
    """
    return KroneckerOperator(A, B)


class BlockDiagonalOperator(LinearOperator):
    """``diag(A_1, ..., A_n)`` acting on a stack along a new leading axis of the structured tensor.

    Input shape ``(n, *shape_in)``; every block has the same shapes, dtype and device.
    """

    def __init__(self, blocks: Sequence[LinearOperator]):
        b0 = blocks[0]
        for b in blocks[1:]:
            if b.shape_in != b0.shape_in or b.shape_out != b0.shape_out:
                raise ShapeError(f"blocks must share shapes: {b0.shape_in}->{b0.shape_out} vs "
                                 f"{b.shape_in}->{b.shape_out}")
        check_compatible(blocks, "stack into a block diagonal")
        n = len(blocks)
        super().__init__((n, *b0.shape_in), (n, *b0.shape_out), b0.dtype, b0.device,
                         is_self_adjoint=all(b.is_self_adjoint for b in blocks),
                         is_psd=all(b.is_psd for b in blocks))
        self.blocks = list(blocks)

    def structure(self):
        """The blocks, in order."""
        return tuple(_ident(b) for b in self.blocks)

    def _matmat(self, X):
        return torch.stack([b._matmat(X[:, i]) for i, b in enumerate(self.blocks)], 1)

    def _rmatmat(self, Y):
        return torch.stack([b._rmatmat(Y[:, i]) for i, b in enumerate(self.blocks)], 1)


def identity(shape, dtype=torch.float64, device="cpu") -> IdentityOperator:
    """``I`` on tensors of ``shape``.

    Args:
        shape: the tensor shape.
        dtype: the dtype.
        device: the device.

    Returns:
        The ``IdentityOperator``.
    """
    return IdentityOperator(shape, dtype, device)


def to_scipy(A: LinearOperator):
    """View ``A`` as a scipy LinearOperator on flat float64 vectors (for eigsh, svds, cg, ...).

    Args:
        A: the operator.

    Returns:
        A ``scipy.sparse.linalg.LinearOperator`` whose products run ``A`` (converting to and from
        ``A``'s dtype and device).
    """
    import numpy as np
    import scipy.sparse.linalg as spla

    def _to_t(x, shape):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=A.dtype, device=A.device).reshape(shape)

    def _to_np(t):
        return t.detach().to("cpu", torch.float64).numpy()

    def matvec(x):
        return _to_np(A.apply(_to_t(x, A.shape_in))).reshape(-1)

    def rmatvec(y):
        return _to_np(A.T.apply(_to_t(y, A.shape_out))).reshape(-1)

    def matmat(X):
        k = X.shape[1]
        return _to_np(A.matmat(_to_t(X.T, (k, *A.shape_in)))).reshape(k, -1).T

    def rmatmat(Y):
        k = Y.shape[1]
        return _to_np(A.rmatmat(_to_t(Y.T, (k, *A.shape_out)))).reshape(k, -1).T

    return spla.LinearOperator(A.shape, matvec=matvec, rmatvec=rmatvec, matmat=matmat,
                               rmatmat=rmatmat, dtype=np.float64)
