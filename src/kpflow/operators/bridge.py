"""Bridges into kpflow operators: from scipy LinearOperators, numpy arrays and torch tensors.

The way out (``to_scipy``) lives with the operators in ``base``; this module depends on ``base`` and
not the other way round.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla
import torch

from .base import DenseOperator, FunctionOperator, LinearOperator, to_scipy

__all__ = ["as_operator", "from_scipy", "to_scipy"]


def from_scipy(L, shape_in=None, shape_out=None, dtype=torch.float64, device="cpu", **flags) -> LinearOperator:
    """Wrap a scipy LinearOperator (or anything with ``matmat``/``rmatmat``) as a kpflow operator.

    Args:
        L: the scipy operator (or matrix).
        shape_in: the structured input shape (default ``(n,)``).
        shape_out: the structured output shape (default ``(m,)``).
        dtype: the dtype of the kpflow side.
        device: the device of the kpflow side.
        **flags: ``is_self_adjoint`` / ``is_psd``.

    Returns:
        A ``FunctionOperator`` that runs ``L`` on float64 numpy arrays.
    """
    L = spla.aslinearoperator(L)
    m, n = L.shape
    shape_in = (n,) if shape_in is None else tuple(shape_in)
    shape_out = (m,) if shape_out is None else tuple(shape_out)

    def mm(X):
        k = X.shape[0]
        Y = L.matmat(X.reshape(k, -1).detach().cpu().double().numpy().T)
        return torch.as_tensor(np.asarray(Y).T.copy(), dtype=dtype, device=device).reshape(k, *shape_out)

    def rmm(Y):
        k = Y.shape[0]
        X = L.rmatmat(Y.reshape(k, -1).detach().cpu().double().numpy().T)
        return torch.as_tensor(np.asarray(X).T.copy(), dtype=dtype, device=device).reshape(k, *shape_in)

    return FunctionOperator(mm, rmm, shape_in, shape_out, dtype, device, batched=True, **flags)


def as_operator(A, shape_in=None, shape_out=None, **flags) -> LinearOperator:
    """Wrap a LinearOperator, a dense tensor or numpy array, or a ``scipy.sparse.linalg.LinearOperator``.

    Args:
        A: what to wrap (a kpflow operator is returned as is).
        shape_in: structured input shape for matrices (default: flat).
        shape_out: structured output shape for matrices (default: flat).
        **flags: ``is_self_adjoint`` / ``is_psd`` for wrapped matrices.

    Returns:
        The kpflow ``LinearOperator``.

    Raises:
        TypeError: A is none of these.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A, shape_in, shape_out, **flags)
    if isinstance(A, (spla.LinearOperator, np.ndarray)) or hasattr(A, "matvec"):
        if isinstance(A, np.ndarray):
            return DenseOperator(torch.from_numpy(np.ascontiguousarray(A)), shape_in, shape_out, **flags)
        return from_scipy(A, shape_in, shape_out, **flags)
    raise TypeError(
        f"cannot make an operator from {type(A).__name__}; pass a kpflow LinearOperator, a torch.Tensor, "
        "a numpy array or a scipy.sparse.linalg.LinearOperator"
    )
