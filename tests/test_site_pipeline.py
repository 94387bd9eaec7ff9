"""The training pipeline on the weight-based site models (config ``transformer`` and ``mlp``).

End to end (config → train with checkpoints → analyze every checkpoint → report), and the tracking
metrics of every checkpoint against an independent dense float64 reference: ``J = ∂z/∂θ`` of the
whole model by ``torch.func.jacrev``, ``Θ = J Jᵀ``, ``e = ∂L/∂z`` by autograd of the task loss.
The sizes are chosen so that every summary is taken exactly (dense, at most ``DENSE_MAX`` entries).
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from kpflow.experiments.pipeline import run_pipeline
from kpflow.tasks import task_loss
from kpflow.tracking.analyze import build_from_config
from kpflow.tracking.summaries import DENSE_MAX
from kpflow.training import validate_config
from kpflow.training.checkpoints import list_checkpoints, load_checkpoint
from kpflow.training.config import ConfigError

SEQ = 4
MODELS = {
    "transformer": {"name": "transformer", "hidden": 4, "params": {"n_heads": 2, "n_layers": 1, "d_ff": 6}},
    "mlp": {"name": "mlp", "hidden": 6, "params": {"depth": 2, "nonlinearity": "tanh"}},
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(tmp_path, kind, **train):
    return validate_config({
        "name": kind, "out": str(tmp_path), "seed": 3,
        "task": {"name": "flipflop", "params": {"seq_len": SEQ, "n_bits": 1, "pulse_prob": 0.5}},
        "model": MODELS[kind],
        "optimizer": {"name": "adam", "lr": 0.05},
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, **train},
        "track": {"eval_batch": 1, "probes": 4},
    })


@pytest.fixture(scope="module", params=sorted(MODELS))
def finished_run(request, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp(request.param), request.param)
    run_dir = run_pipeline(cfg, progress=False)
    return cfg, run_dir


def _metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {(int(r["step"]), r["metric"]): (float(r["value"]), r["method"]) for r in rows}


def _dense_reference(model, batch):
    """Θ = J Jᵀ with J = ∂(visible states)/∂θ of the whole model (jacrev, float64), states, e = ∂L/∂z."""
    model = model.double()
    b = batch.to(dtype=torch.float64)
    params = {k: v.detach() for k, v in model.cell_params().items()}
    names = list(params)

    def states(*flat):
        return model.visible_states(dict(zip(names, flat, strict=True)), b.inputs).reshape(-1)

    jac = torch.func.jacrev(states, argnums=tuple(range(len(names))))(*params.values())
    z = model.visible_states(params, b.inputs).detach()
    J = torch.cat([j.reshape(z.numel(), -1) for j in jac], 1)
    zz = z.clone().requires_grad_(True)
    loss = task_loss(model.output(zz), b)
    (e,) = torch.autograd.grad(loss, zz)
    return J @ J.T, z, e.reshape(-1), float(loss.detach())


def _erank(A):
    return float(torch.trace(A)) ** 2 / float((A * A).sum())


def _view(theta, shape, keep):
    """(1ᵀ⊗I) Θ (1⊗I): Θ summed over the axes of [B, T, H] not in ``keep`` on both sides."""
    T4 = theta.reshape(*shape, *shape)
    drop = [i for i in range(3) if i not in keep]
    T4 = T4.sum(dim=drop + [3 + i for i in drop])
    n = math.prod(shape[i] for i in keep)
    return T4.reshape(n, n)


def test_run_writes_metrics_for_every_checkpoint_and_a_report(finished_run):
    cfg, run_dir = finished_run
    steps = [c.step for c in list_checkpoints(run_dir / "checkpoints")]
    assert steps == [0, 2]
    m = _metrics(run_dir)
    for step in steps:
        for name in ("loss", "K_trace", "K_erank", "PPstar_erank", "NTK_trace", "NTK_erank", "NTK_erank_temporal",
                     "misdirection", "kernel_target_alignment", "ntk_init_alignment"):
            value, _ = m[(step, name)]
            assert math.isfinite(value), (step, name)
    assert m[(0, "K_trace")][1] == "exact-kronecker"  # the Kronecker core sees the site model's weights
    html = (run_dir / "report.html").read_text()
    assert "NTK" in html and cfg.model.name in html
    assert list((run_dir / "figures").glob("*.png"))


def test_tracking_metrics_equal_dense_operators(finished_run):
    cfg, run_dir = finished_run
    m = _metrics(run_dir)
    task, model = build_from_config(cfg)
    batch = task.sample(cfg.track.eval_batch, cfg.track.eval_seed)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    thetas = {}
    for ckpt in ckpts:
        load_checkpoint(ckpt, model)
        theta, z, e, loss = _dense_reference(model, batch)
        assert theta.shape[0] <= DENSE_MAX  # every summary below is taken exactly
        thetas[ckpt.step] = theta
        s = ckpt.step
        assert m[(s, "NTK_trace")][1] == m[(s, "NTK_erank_temporal")][1] == "exact-dense"
        assert m[(s, "loss")][0] == pytest.approx(loss, rel=1e-10)
        assert m[(s, "NTK_trace")][0] == pytest.approx(float(torch.trace(theta)), rel=1e-8)
        assert m[(s, "NTK_fro")][0] == pytest.approx(float(theta.norm()), rel=1e-8)
        assert m[(s, "NTK_erank")][0] == pytest.approx(_erank(theta), rel=1e-8)
        for view, keep in (("temporal", (0, 1)), ("spatial", (2,)), ("trial", (0,))):
            assert m[(s, f"NTK_erank_{view}")][0] == pytest.approx(_erank(_view(theta, z.shape, keep)), rel=1e-8)
        kta = float(e @ theta @ e) / (float(theta.norm()) * float(e @ e))
        assert m[(s, "kernel_target_alignment")][0] == pytest.approx(kta, rel=1e-8)
    first, last = thetas[0], thetas[ckpts[-1].step]
    assert not torch.allclose(first, last)  # training moved the NTK: the alignment below is a real check
    cos = float((first * last).sum() / (first.norm() * last.norm()))
    assert m[(ckpts[-1].step, "ntk_init_alignment")][0] == pytest.approx(cos, rel=1e-8)


def test_models_follow_the_task_shapes():
    for kind in MODELS:
        cfg = validate_config({"task": {"name": "flipflop", "params": {"seq_len": 7, "n_bits": 2}},
                               "model": MODELS[kind]})
        task, model = build_from_config(cfg)
        b = task.sample(3, 0)
        _, out = model(b.inputs)
        assert out.shape == b.targets.shape == (3, 7, 2)
        if kind == "mlp":  # an MLP reads the whole trial: a batch of another length is refused, naming it
            with pytest.raises(ValueError, match="seq_len=7"):
                model(task.sample(3, 0).inputs[:, :5])
        else:  # a transformer's positional embedding has exactly the task's rows
            assert model.pos.shape[0] == 7


def test_mlp_reads_the_flattened_trial_and_matches_to_torch():
    from kpflow.models import DeepMLP

    torch.manual_seed(0)
    m = DeepMLP(2, 5, 3, 3, "gelu", seq_len=4, dtype=torch.float64)
    x = torch.randn(6, 4, 2, dtype=torch.float64)
    _, y = m(x)
    torch.testing.assert_close(y, m.to_torch()(x), rtol=1e-12, atol=1e-12)
    # output step s depends on the whole sequence, read as vec(x)
    flat = DeepMLP(8, 5, 3, 12, "gelu", dtype=torch.float64)
    flat.load_state_dict(m.state_dict())
    torch.testing.assert_close(y, flat(x.reshape(6, 8))[1].reshape(6, 4, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "mlp", "params": {"width": 3}}, "the width is model.hidden"),
    ({"name": "mlp", "params": {"seq_len": 3}}, "seq_len is the task's"),
    ({"name": "transformer", "params": {"d_model": 8}}, "d_model is model.hidden"),
    ({"name": "transformer", "params": {"heads": 2}}, "valid parameters: n_heads, n_layers"),
])
def test_unknown_model_parameters_are_refused_at_config_time(model, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"model": model})


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "mlp", "params": {"depth": 0}}, "depth = 0 must be an integer >= 1"),
    ({"name": "mlp", "params": {"nonlinearity": "sigmoid"}}, "choose one of 'relu', 'tanh', 'gelu', 'identity'"),
    ({"name": "transformer", "hidden": 10, "params": {"n_heads": 4}}, "must be divisible by n_heads = 4"),
    ({"name": "transformer", "params": {"causal": "yes"}}, "causal = 'yes' must be true or false"),
    ({"name": "transformer", "params": {"activation": "tanh"}}, "choose one of 'gelu', 'relu'"),
    ({"name": "transformer", "g": 2.0}, "Transformer has no recurrent"),
    ({"name": "mlp", "g": 0.5}, "DeepMLP has no recurrent"),
])
def test_invalid_model_values_are_refused_before_a_run_folder_exists(tmp_path, model, message):
    cfg = validate_config({"out": str(tmp_path), "name": "bad", "model": model, "train": {"steps": 1}})
    with pytest.raises(ValueError, match=message):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "bad").exists()
