"""The matrix-free linear-operator algebra (knows nothing about models)."""

from . import base
from .base import (
    AdjointOperator,
    BlockDiagonalOperator,
    ComposedOperator,
    DenseOperator,
    FunctionOperator,
    IdentityOperator,
    KroneckerOperator,
    LinearOperator,
    RankOneOperator,
    ReshapedOperator,
    ScaledOperator,
    ShapeError,
    SumOperator,
    ZeroOperator,
    compose,
    gram,
    identity,
    kron,
    symmetric_part,
    to_scipy,
)
from .bridge import as_operator, from_scipy
from .reductions import CompressedOperator, PartialTraceOperator, compression, partial_trace, view

__all__ = [
    "base", "AdjointOperator", "BlockDiagonalOperator", "ComposedOperator", "DenseOperator",
    "FunctionOperator", "IdentityOperator", "KroneckerOperator", "LinearOperator", "RankOneOperator",
    "ReshapedOperator", "ScaledOperator", "ShapeError", "SumOperator", "ZeroOperator", "as_operator",
    "compose", "gram", "identity", "kron", "symmetric_part", "from_scipy", "to_scipy",
    "CompressedOperator", "PartialTraceOperator", "compression", "partial_trace", "view",
]
