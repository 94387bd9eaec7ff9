"""The operator algebra against dense float64 counterparts (property-based)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from cases import compare_operator
from hypothesis import given, settings
from hypothesis import strategies as st

from kpflow.operators import (
    DenseOperator,
    FunctionOperator,
    IdentityOperator,
    KroneckerOperator,
    LinearOperator,
    RankOneOperator,
    ShapeError,
    ZeroOperator,
    as_operator,
    compression,
    from_scipy,
    gram,
    kron,
    partial_trace,
    symmetric_part,
    to_scipy,
    view,
)
from kpflow.operators import base as opbase

TOL = 1e-12
dims = st.integers(min_value=1, max_value=4)
shapes = st.lists(dims, min_size=1, max_size=3).map(tuple)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
settings.register_profile("kpflow", max_examples=40, deadline=None)
settings.load_profile("kpflow")


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def dense(shape_in, shape_out, seed):
    M = rand(math.prod(shape_out), math.prod(shape_in), seed=seed)
    return DenseOperator(M, shape_in, shape_out), M


def close(a, b, tol=TOL):
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return float((a - b).abs().max()) <= tol * scale if a.numel() else True


def check_adjoint(A: LinearOperator, seed: int):
    """<A x, y> = <x, A* y> for random x, y, batched over 3 probes."""
    X = rand(3, *A.shape_in, seed=seed)
    Y = rand(3, *A.shape_out, seed=seed + 1)
    lhs = (A.matmat(X) * Y).flatten(1).sum(1)
    rhs = (X * A.rmatmat(Y)).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12 * float(lhs.abs().max() + 1))


@given(shapes, shapes, seeds)
def test_dense_apply_batched_and_adjoint(si, so, seed):
    A, M = dense(si, so, seed)
    X = rand(5, *si, seed=seed + 2)
    Y = A.matmat(X)
    assert Y.shape == (5, *so)
    assert close(Y.reshape(5, -1), X.reshape(5, -1) @ M.T)
    # single apply equals the batched one row by row
    assert close(A.apply(X[2]), Y[2])
    assert close(A.to_matrix(), M)
    check_adjoint(A, seed)


@given(shapes, shapes, shapes, seeds)
def test_composition(s1, s2, s3, seed):
    A, MA = dense(s2, s1, seed)
    B, MB = dense(s3, s2, seed + 7)
    C = A @ B
    assert C.shape_in == s3 and C.shape_out == s1
    compare_operator(C, MA @ MB, seed=seed)
    compare_operator(C.T, (MA @ MB).T, seed=seed)


# scales below 1e-100 (subnormals included) make c·M underflow, where relative comparisons mean nothing
@given(shapes, shapes, seeds, st.floats(-3, 3, allow_nan=False).filter(lambda c: c == 0 or abs(c) > 1e-100))
def test_sum_difference_scale_neg(si, so, seed, c):
    A, MA = dense(si, so, seed)
    B, MB = dense(si, so, seed + 3)
    assert close((A + B).to_matrix(), MA + MB)
    assert close((A - B).to_matrix(), MA - MB)
    assert close((c * A).to_matrix(), c * MA)
    assert close((A * c).to_matrix(), c * MA)
    assert close((-A).to_matrix(), -MA)
    if abs(c) > 1e-3:
        assert close((A / c).to_matrix(), MA / c)
    for op, M in ((A + B, MA + MB), (A - B, MA - MB), (c * A, c * MA)):
        compare_operator(op, M, seed=seed)


@given(shapes, shapes, seeds)
def test_adjoint_involution_and_dense(si, so, seed):
    A, M = dense(si, so, seed)
    assert A.T.T is A
    assert A.T.shape_in == so and A.T.shape_out == si
    assert close(A.T.to_matrix(), M.T)
    check_adjoint(A.T, seed)


@given(shapes, shapes, seeds)
def test_gram_is_psd_and_dense(si, so, seed):
    A, M = dense(si, so, seed)
    G = gram(A)
    assert G.is_psd and G.is_self_adjoint
    compare_operator(G, M @ M.T, seed=seed)
    assert float(torch.linalg.eigvalsh(G.to_matrix()).min()) > -1e-10


@given(shapes, seeds)
def test_symmetric_part(s, seed):
    A, M = dense(s, s, seed)
    S = symmetric_part(A)
    assert S.is_self_adjoint
    compare_operator(S, 0.5 * (M + M.T), seed=seed)


@given(shapes, shapes, shapes, shapes, seeds)
def test_kronecker(ai, ao, bi, bo, seed):
    A, MA = dense(ai, ao, seed)
    B, MB = dense(bi, bo, seed + 11)
    K = kron(A, B)
    assert isinstance(K, KroneckerOperator)
    assert K.shape_in == ai + bi and K.shape_out == ao + bo
    compare_operator(K, torch.kron(MA, MB), seed=seed)


@given(shapes, shapes, seeds)
def test_reshape_view(si, so, seed):
    A, M = dense(si, so, seed)
    R = A.reshape((math.prod(si),), (1, math.prod(so)))
    assert R.shape_in == (math.prod(si),) and R.shape_out == (1, math.prod(so))
    compare_operator(R, M, seed=seed)


@given(shapes, seeds)
def test_identity_zero_rank_one(s, seed):
    n = math.prod(s)
    assert close(IdentityOperator(s).to_matrix(), torch.eye(n, dtype=torch.float64))
    assert close(ZeroOperator(s).to_matrix(), torch.zeros(n, n, dtype=torch.float64))
    y, x = rand(*s, seed=seed), rand(3, seed=seed + 1)
    R = RankOneOperator(y, x)
    assert close(R.to_matrix(), torch.outer(y.reshape(-1), x))
    check_adjoint(R, seed)
    P = RankOneOperator(y, y)
    assert P.is_psd


@given(st.lists(st.integers(1, 3), min_size=2, max_size=3).map(tuple), seeds, st.data())
def test_compression_and_partial_trace(s, seed, data):
    n = math.prod(s)
    M = rand(n, n, seed=seed)
    A = DenseOperator(M, s, s)
    axes = data.draw(st.lists(st.integers(0, len(s) - 1), min_size=1, max_size=len(s) - 1, unique=True))
    axes = tuple(sorted(axes))
    kept = tuple(i for i in range(len(s)) if i not in axes)
    T = M.reshape(*s, *s)
    # compression: sum over every pair of reduced indices
    letters = "abcdefgh"
    out_idx = "".join(letters[i] for i in range(len(s)))
    in_idx = "".join(letters[i + 4] for i in range(len(s)))
    C = compression(A, axes)
    Cd = torch.einsum(f"{out_idx}{in_idx}->" + "".join(out_idx[i] for i in kept) + "".join(in_idx[i] for i in kept), T)
    assert close(C.to_dense(), Cd)
    Cm = compression(A, axes, reduction="mean")
    nred = math.prod(s[i] for i in axes)
    assert close(Cm.to_dense(), Cd / nred)
    # partial trace: reduced indices equal on both sides
    in_pt = "".join(out_idx[i] if i in axes else in_idx[i] for i in range(len(s)))
    Pd = torch.einsum(f"{out_idx}{in_pt}->" + "".join(out_idx[i] for i in kept) + "".join(in_idx[i] for i in kept), T)
    P = partial_trace(A, axes, chunk_size=2)
    assert close(P.to_dense(), Pd)
    assert abs(float(P.to_matrix().trace() - M.trace())) < 1e-10 * (1 + float(M.abs().sum()))
    check_adjoint(C, seed)
    check_adjoint(P, seed)


def test_compression_and_partial_trace_differ_in_general():
    s = (2, 3)
    A = DenseOperator(rand(6, 6, seed=4), s, s)
    assert not torch.allclose(compression(A, 1).to_dense(), partial_trace(A, 1).to_dense())


def test_named_views_on_BTH():
    A = gram(DenseOperator(rand(24, 24, seed=5), (2, 3, 4), (2, 3, 4)))
    assert view(A, "temporal").shape_in == (2, 3)
    assert view(A, "spatial").shape_in == (4,)
    assert view(A, "trial").shape_in == (2,)
    assert view(A, "temporal").is_psd
    with pytest.raises(ValueError, match="valid views"):
        view(A, "space")


def test_flags_carried_through_structured_compositions():
    B, _ = dense((3,), (4,), 1)
    A, _ = dense((5,), (3,), 2)
    K = gram(DenseOperator(rand(3, 3, seed=3)))
    assert (B @ A @ A.T @ B.T).is_psd  # B A A* B*
    assert (B @ K @ B.T).is_psd  # B K B* with K PSD
    assert not (B @ DenseOperator(rand(3, 3, seed=9)) @ B.T).is_self_adjoint
    assert (B @ symmetric_part(DenseOperator(rand(3, 3, seed=9))) @ B.T).is_self_adjoint
    assert not (B @ symmetric_part(DenseOperator(rand(3, 3, seed=9))) @ B.T).is_psd
    assert (K + gram(B.T)).is_psd and not (K - gram(B.T)).is_psd
    assert (2.0 * K).is_psd and not (-1.0 * K).is_psd
    assert kron(K, K).is_psd


@given(shapes, shapes, seeds)
def test_scipy_bridge_both_ways(si, so, seed):
    A, M = dense(si, so, seed)
    L = to_scipy(A)
    assert L.shape == (M.shape[0], M.shape[1])
    x = np.random.default_rng(seed).standard_normal(M.shape[1])
    y = np.random.default_rng(seed + 1).standard_normal(M.shape[0])
    assert np.allclose(L.matvec(x), M.numpy() @ x, rtol=1e-12, atol=1e-12)
    assert np.allclose(L.rmatvec(y), M.numpy().T @ y, rtol=1e-12, atol=1e-12)
    X = np.random.default_rng(seed + 2).standard_normal((M.shape[1], 3))
    assert np.allclose(L.matmat(X), M.numpy() @ X, rtol=1e-12, atol=1e-12)
    back = from_scipy(spla.aslinearoperator(M.numpy()), si, so)
    assert close(back.to_matrix(), M)
    check_adjoint(back, seed)
    assert close(as_operator(M.numpy(), si, so).to_matrix(), M)
    assert close(as_operator(M, si, so).to_matrix(), M)


def test_scipy_eigsh_on_gram():
    A = DenseOperator(rand(30, 30, seed=0))
    G = gram(A)
    vals = spla.eigsh(to_scipy(G), k=3, which="LA", return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(G.to_matrix())[-3:].numpy()
    assert np.allclose(np.sort(vals), ref, rtol=1e-10)


def test_function_operator_vmaps_single_vector_functions():
    W = rand(4, 3, seed=1)
    calls = []

    def mv(x):
        calls.append(x.shape)
        return W @ x

    A = FunctionOperator(mv, lambda y: W.T @ y, (3,), (4,))
    X = rand(7, 3, seed=2)
    assert close(A.matmat(X), X @ W.T)
    assert calls == [(3,)]  # traced once by vmap, not once per probe
    check_adjoint(A, 0)


def test_shape_errors_name_both_shapes():
    A, _ = dense((3,), (4,), 0)
    B, _ = dense((2,), (5,), 1)
    with pytest.raises(ShapeError, match=r"\(3,\).*\(5,\)"):
        A @ B
    with pytest.raises(ShapeError, match=r"\(3,\).*\(4,\).*\(2,\).*\(5,\)"):
        A + B
    with pytest.raises(ShapeError, match=r"\(1, 2, 3\).*shape=\(3,\)"):
        A.matmat(torch.zeros(2, 3, dtype=torch.float64).reshape(1, 2, 3))
    with pytest.raises(ShapeError, match=r"\(6,\)"):
        A.apply(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ShapeError, match="square"):
        compression(A, 0)


def test_to_dense_guard_reports_memory_and_how_to_raise():
    A = IdentityOperator((30, 30))
    with pytest.raises(MemoryError, match=r"900x900 = 810,000 entries.*MiB.*max_elements"):
        A.to_dense(max_elements=1000)
    assert A.to_dense(max_elements=10**6).shape == (30, 30, 30, 30)
    old = opbase.DENSE_LIMIT
    try:
        opbase.DENSE_LIMIT = 10
        with pytest.raises(MemoryError):
            IdentityOperator((4,)).to_dense()
    finally:
        opbase.DENSE_LIMIT = old


def test_as_operator_rejects_unknown_types():
    with pytest.raises(TypeError, match="LinearOperator"):
        as_operator("not an operator")


def test_device_and_dtype_are_carried():
    A = DenseOperator(torch.randn(3, 3, dtype=torch.float32))
    assert A.dtype == torch.float32 and A.device.type == "cpu"
    assert gram(A).dtype == torch.float32
    assert kron(A, A).T.dtype == torch.float32


def test_gram_of_composite_stays_psd():
    P, _ = dense((3,), (3,), 1)
    J, _ = dense((4,), (3,), 2)
    ntk = P @ J @ J.T @ P.T
    assert ntk.is_psd
    assert gram(ntk).is_psd and gram(ntk.T).is_psd
    assert (ntk.T @ ntk).is_psd
    M = ntk.to_matrix()
    assert close(gram(ntk.T).to_matrix(), M.T @ M)


@given(shapes, shapes, st.integers(1, 3), seeds)
def test_block_diagonal(si, so, n, seed):
    from kpflow.operators import BlockDiagonalOperator

    blocks = [dense(si, so, seed + i) for i in range(n)]
    D = BlockDiagonalOperator([b for b, _ in blocks])
    assert D.shape_in == (n, *si) and D.shape_out == (n, *so)
    assert close(D.to_matrix(), torch.block_diag(*[M for _, M in blocks]))
    check_adjoint(D, seed)


def test_combining_mixed_dtypes_or_devices_is_refused():
    A64 = DenseOperator(rand(3, 3, seed=1))
    A32 = DenseOperator(rand(3, 3, seed=2).float())
    Ameta = DenseOperator(torch.empty(3, 3, dtype=torch.float64, device="meta"))
    for build in (lambda a, b: a @ b, lambda a, b: a + b, lambda a, b: a - b, kron,
                  lambda a, b: opbase.BlockDiagonalOperator([a, b])):
        with pytest.raises(TypeError, match=r"torch.float64.*torch.float32.*share one dtype and one device"):
            build(A64, A32)
        with pytest.raises(TypeError, match=r"on cpu .* on meta.*share one dtype and one device"):
            build(A64, Ameta)
    # the same dtype and device still compose, and torch itself agrees that the mixed product is an error
    assert (A64 @ A64).dtype == torch.float64
    with pytest.raises(RuntimeError):
        A64.matrix @ A32.matrix


def test_flags_survive_structurally_equal_factors_built_separately():
    M = rand(4, 3, seed=5)
    K = gram(DenseOperator(rand(3, 3, seed=6)))
    B1, B2 = DenseOperator(M), DenseOperator(M)  # two wrappers of one matrix
    assert B1 is not B2 and B1.same_map(B2)
    chain = B1 @ K @ B2.T
    assert chain.is_psd and chain.is_self_adjoint
    assert close(chain.to_matrix(), M @ K.to_matrix() @ M.T)
    assert (B1 @ B2.T).is_psd and (B2.T @ B1).is_psd
    # identities, shifts and composites built twice are equal maps; different matrices are not
    assert IdentityOperator((3,)).same_map(IdentityOperator((3,)))
    assert (B1 @ K).same_map(B2 @ K) and (2.0 * B1).same_map(2.0 * B2)
    other = DenseOperator(M.clone())
    assert not other.same_map(B1) and not (other @ K @ B1.T).is_self_adjoint
    assert not (B1 @ DenseOperator(rand(3, 3, seed=9)) @ B2.T).is_self_adjoint


def test_one_adjoint_spelling_old_ones_warn():
    A, M = dense((3,), (4,), 7)
    y = rand(4, seed=8)
    assert close(A.T.apply(y), M.T @ y) and close(A.T @ y, M.T @ y)
    assert close(A.rmatmat(y[None])[0], M.T @ y)
    for old in ("adjoint", "H"):
        with pytest.warns(DeprecationWarning, match=rf"LinearOperator\.{old} is deprecated.*use A\.T"):
            assert getattr(A, old) is A.T
    with pytest.warns(DeprecationWarning, match=r"adjoint_apply.*A\.T\.apply\(y\)"):
        assert close(A.adjoint_apply(y), M.T @ y)


def test_options_are_keyword_only_old_positions_warn():
    A = DenseOperator(rand(6, 6, seed=3), (2, 3), (2, 3))
    new = partial_trace(A, 1, reduction="mean", chunk_size=2).to_dense()
    with pytest.warns(DeprecationWarning, match=r"passing reduction, chunk_size to partial_trace\(\) by position"):
        old = partial_trace(A, 1, "mean", 2).to_dense()
    assert torch.equal(old, new)
    with pytest.warns(DeprecationWarning, match="reduction"):
        assert torch.equal(compression(A, 0, "mean").to_dense(), compression(A, 0, reduction="mean").to_dense())
    with pytest.raises(TypeError, match="pass the options by keyword"):
        partial_trace(A, 1, "mean", 2, 3)


def test_base_does_not_import_the_bridge():
    """operators/base no longer imports operators/bridge (the import cycle is gone); bridge imports base."""
    import ast
    import pathlib

    import kpflow.operators.base as base_mod
    import kpflow.operators.bridge as bridge_mod

    def imports(mod):
        tree = ast.parse(pathlib.Path(mod.__file__).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not any(m and m.endswith("bridge") for m in imports(base_mod))
    assert "base" in imports(bridge_mod)
    G = gram(dense((3,), (4,), 1)[0])
    assert close(torch.from_numpy(to_scipy(G).matvec(np.ones(4))), G.apply(torch.ones(4, dtype=torch.float64)))
