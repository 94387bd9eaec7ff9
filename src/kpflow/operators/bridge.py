"""Bridges between kpflow operators and ``scipy.sparse.linalg.LinearOperator``."""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla
import torch

from .base import FunctionOperator, LinearOperator


def to_scipy(A: LinearOperator) -> spla.LinearOperator:
    """View ``A`` as a scipy LinearOperator on flat float64 vectors (for eigsh, svds, cg, ...)."""

    def _to_t(x, shape):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=A.dtype, device=A.device).reshape(shape)

    def _to_np(t):
        return t.detach().to("cpu", torch.float64).numpy()

    def matvec(x):
        return _to_np(A.apply(_to_t(x, A.shape_in))).reshape(-1)

    def rmatvec(y):
        return _to_np(A.adjoint_apply(_to_t(y, A.shape_out))).reshape(-1)

    def matmat(X):
        k = X.shape[1]
        return _to_np(A.matmat(_to_t(X.T, (k, *A.shape_in)))).reshape(k, -1).T

    def rmatmat(Y):
        k = Y.shape[1]
        return _to_np(A.rmatmat(_to_t(Y.T, (k, *A.shape_out)))).reshape(k, -1).T

    return spla.LinearOperator(A.shape, matvec=matvec, rmatvec=rmatvec, matmat=matmat,
                               rmatmat=rmatmat, dtype=np.float64)


def from_scipy(L, shape_in=None, shape_out=None, dtype=torch.float64, device="cpu", **flags) -> LinearOperator:
    """Wrap a scipy LinearOperator (or anything with ``matmat``/``rmatmat``) as a kpflow operator."""
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
