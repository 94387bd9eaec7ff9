"""``record`` takes a snapshot (recurrent and site models alike), and refuses inputs it cannot linearise around."""

from __future__ import annotations

import pytest
import torch

from kpflow.kernels import RecordedRun, SiteTrajectory, ntk, param_jacobian, propagator, record
from kpflow.models import GRU, DeepMLP, Transformer, VanillaRNN

DT = torch.float64


def _data(model, B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, model.input_dim, generator=g, dtype=DT)
    y = torch.randn(B, T, model.output_dim, generator=g, dtype=DT)
    return x, y


@pytest.mark.parametrize("cls", [VanillaRNN, GRU])
def test_trajectory_is_a_snapshot_of_the_parameters(cls):
    """An in-place optimizer step after ``record`` changes neither the trajectory nor its operators: the NTK
    built after the step equals the NTK of the model as it was (a deep copy recorded before the step)."""
    torch.manual_seed(0)
    model = cls(2, 4, 2, dtype=DT)
    x, y = _data(model)
    twin = cls(2, 4, 2, dtype=DT)
    twin.load_state_dict(model.state_dict())  # the pre-step model, kept apart
    traj = record(model, x, targets=y)
    before = ntk(traj).to_matrix().clone()
    adjoint_before = traj.adjoint.clone()

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _, out = model(x)
    ((out - y) ** 2).mean().backward()
    opt.step()  # in place: the live parameters change
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                            twin.state_dict().values(), strict=True))
    assert moved > 1e-3

    after = ntk(traj).to_matrix()  # built after the step, from the same trajectory
    reference = ntk(record(twin, x, targets=y)).to_matrix()
    assert torch.equal(after, before)
    assert torch.allclose(after, reference, rtol=1e-12, atol=1e-12 * float(reference.abs().max()))
    assert torch.equal(traj.adjoint, adjoint_before)
    assert torch.allclose(propagator(traj).T.apply(traj.error), adjoint_before, rtol=1e-12, atol=1e-13)
    # the readout used by the trajectory is the snapshot, not the trained one
    for k, v in traj.readout_params().items():
        assert torch.equal(v, twin.readout_params()[k].detach())
    # a fresh recording does see the step
    fresh = ntk(record(model, x, targets=y)).to_matrix()
    assert float((fresh - before).norm() / before.norm()) > 1e-3


def test_params_override_is_copied_too():
    torch.manual_seed(0)
    model = VanillaRNN(2, 4, 1, dtype=DT)
    x, _ = _data(model)
    W = model.cell_params()["W"].detach().clone()
    traj = record(model, x, params={"W": W})
    J0 = param_jacobian(traj).to_matrix().clone()
    W.mul_(3.0)  # the caller mutates the tensor it handed over
    assert torch.equal(param_jacobian(traj).to_matrix(), J0)


def test_record_refuses_an_empty_batch():
    model = VanillaRNN(2, 4, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"empty batch .*B >= 1"):
        record(model, torch.zeros(0, 5, 2, dtype=DT))


def test_record_refuses_a_readout_of_another_dtype():
    model = VanillaRNN(2, 4, 1, dtype=DT)
    model.readout.float()  # cell float64, readout float32
    x = torch.zeros(3, 5, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"readout parameters \['bias', 'weight'\] are torch.float32.*"
                                         r"cell's are torch.float64"):
        record(model, x, targets=torch.zeros(3, 5, 1, dtype=DT))


def test_separately_built_propagators_keep_the_ntk_psd_and_the_trace_method():
    """``propagator(traj) @ K @ propagator(traj).T`` (two propagator objects) is PSD like ``ntk(traj)``, so
    ``trace(method="auto")`` runs the same method on the same probes and gives the same number."""
    from kpflow.estimators import trace
    from kpflow.kernels import parameter_operator

    torch.manual_seed(0)
    model = GRU(2, 4, 2, dtype=DT)
    x, _ = _data(model)
    traj = record(model, x)
    K = parameter_operator(traj)
    two = propagator(traj) @ K @ propagator(traj).T
    assert two.is_psd and ntk(traj).is_psd
    a, b = trace(two, 20, seed=3), trace(ntk(traj), 20, seed=3)
    assert a.method == b.method == "xnystrace"
    assert abs(a.value - b.value) <= 1e-10 * abs(b.value)
    # propagators of two different recordings are different maps: no PSD claim
    other = record(model, x + 1.0)
    assert not (propagator(traj) @ K @ propagator(other).T).is_self_adjoint


def test_backend_is_the_one_name_for_autodiff_or_kronecker_and_old_spellings_warn():
    """``backend=`` selects autodiff or the Kronecker structure in every kernel constructor (same default, same
    keyword-only position); ``method=`` and the old positional order still work for one release."""
    from kpflow.kernels import parameter_operator
    from kpflow.kernels.state_space import BACKENDS
    from kpflow.models import NeuralODE

    torch.manual_seed(0)
    model = GRU(2, 4, 2, dtype=DT)
    x, _ = _data(model)
    traj = record(model, x)
    ref = parameter_operator(traj, backend="autodiff").to_matrix()
    for backend in BACKENDS:
        K = parameter_operator(traj, backend=backend).to_matrix()
        assert torch.allclose(K, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max())), backend
        J = param_jacobian(traj, backend=backend)
        assert J.backend == backend
        assert torch.allclose(J.to_matrix(), param_jacobian(traj, backend="autodiff").to_matrix(), rtol=1e-12,
                              atol=1e-13)
    with pytest.warns(DeprecationWarning, match=r"parameter_operator\(method=...\) is deprecated.*backend="):
        assert torch.equal(parameter_operator(traj, method="autodiff").to_matrix(), ref)
    with pytest.warns(DeprecationWarning, match=r"passing chunk_size, backend to param_jacobian\(\) by position"):
        J_old = param_jacobian(traj, None, 4, "autodiff")
    assert J_old.backend == "autodiff" and J_old.chunk_size == 4
    with pytest.raises(TypeError, match="got both method= .* and backend="):
        parameter_operator(traj, method="autodiff", backend="auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        param_jacobian(traj, backend="jax")
    node = NeuralODE(2, 3, 1, width=4, dtype=DT)
    with pytest.raises(ValueError, match="backend='kronecker' needs a weight-based cell"):
        param_jacobian(record(node, x), backend="kronecker")


def _recurrent(dtype=DT):
    torch.manual_seed(0)
    return GRU(2, 4, 2, dtype=dtype), torch.randn(3, 5, 2, dtype=dtype)


def _mlp(dtype=DT):
    torch.manual_seed(0)
    return DeepMLP(3, 4, 3, 2, "tanh", dtype=dtype), torch.randn(5, 3, dtype=dtype)


def _transformer(dtype=DT):
    torch.manual_seed(0)
    return Transformer(3, 4, 2, 2, 4, 2, max_len=4, causal=True, dtype=dtype), torch.randn(2, 3, 3, dtype=dtype)


MAKERS = {"gru": _recurrent, "mlp": _mlp, "transformer": _transformer}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_every_recording_speaks_one_vocabulary(name, dtype):
    """``Trajectory`` and ``SiteTrajectory`` are both ``RecordedRun``s: shape/dtype/device of the visible
    states, the operators in that dtype, and a readout and parameters that are copies, not the live tensors."""
    model, x = MAKERS[name](dtype)
    traj = record(model, x)
    assert isinstance(traj, RecordedRun)
    assert isinstance(traj, SiteTrajectory) == (name != "gru")
    assert traj.shape == tuple(traj.states.shape) and len(traj.shape) == 3
    assert traj.dtype == traj.states.dtype == dtype and traj.device == traj.states.device == x.device
    K = ntk(traj)
    assert (K.dtype, K.device, K.shape_in) == (traj.dtype, traj.device, traj.shape)
    rp, live = traj.readout_params(), model.readout_params()
    assert rp is not traj.readout and sorted(rp) == sorted(live) == ["bias", "weight"]
    for k, v in rp.items():
        assert torch.equal(v, live[k].detach()) and v.data_ptr() != live[k].data_ptr() and not v.requires_grad
    for k, v in traj.params.items():
        assert v.data_ptr() != model.cell_params()[k].data_ptr()


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_training_in_place_after_record_changes_no_operator(name):
    """The snapshot rule for both kinds of recording: after an in-place SGD step on every parameter, the NTK,
    the adjoint and the readout of the old recording are bit for bit what they were, and equal a recording of
    the pre-step model (a twin); a fresh recording sees the step."""
    model, x = MAKERS[name]()
    twin, _ = MAKERS[name]()
    twin.load_state_dict(model.state_dict())
    y = torch.randn_like(record(model, x).outputs)
    traj = record(model, x, targets=y)
    before, adjoint_before = ntk(traj).to_matrix().clone(), traj.adjoint.clone()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sum((p * p + p).sum() for p in model.parameters()).backward()
    opt.step()  # in place, on the cell and the readout: every entry moves (gradient 2p + 1)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))

    after = ntk(traj).to_matrix()
    assert torch.equal(after, before) and torch.equal(traj.adjoint, adjoint_before)
    reference = record(twin, x, targets=y)
    assert torch.allclose(after, ntk(reference).to_matrix(), rtol=1e-12, atol=1e-12 * float(before.abs().max()))
    assert torch.allclose(traj.adjoint, reference.adjoint, rtol=1e-12, atol=1e-13)
    for k, v in traj.readout_params().items():
        assert torch.equal(v, twin.readout_params()[k].detach())
    fresh = ntk(record(model, x, targets=y)).to_matrix()
    assert float((fresh - before).norm() / before.norm()) > 1e-3


def test_the_finiteness_check_sees_every_nonfinite_state_and_no_overflowing_sum():
    from kpflow.kernels.trajectory import _first_nonfinite

    big = torch.full((2, 3, 4), 3e38)  # finite entries whose sum over the state overflows float32
    assert _first_nonfinite(big) is None
    for b, t, h, v in ((1, 2, 3, float("nan")), (0, 1, 0, float("inf")), (1, 0, 2, -float("inf"))):
        s = torch.randn(2, 3, 4)
        s[b, t, h] = v
        assert _first_nonfinite(s) == (b, t)


def test_prev_states_follow_the_states_they_are_built_from():
    torch.manual_seed(0)
    m = GRU(2, 3, 1)
    traj = record(m, torch.randn(2, 4, 2))
    first = traj.prev_states
    assert traj.prev_states is first  # built once
    assert torch.equal(first[:, 1:], traj.states[:, :-1]) and torch.equal(first[:, 0], traj.z0)
    traj.states = traj.states * 2
    assert torch.equal(traj.prev_states[:, 1:], traj.states[:, :-1])
