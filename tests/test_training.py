"""Trainer, checkpoints and config: determinism, resume, corruption handling, validation messages."""

from __future__ import annotations

import json

import pytest
import torch

from kpflow.tasks import make_task, task_loss
from kpflow.training import (
    OPTIMIZERS,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    build_model,
    list_checkpoints,
    load_checkpoint,
    load_config,
    make_optimizer,
    register_optimizer,
    train,
    validate_config,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**train):
    return validate_config({"name": "tiny", "task": {"name": "flipflop", "params": {"seq_len": 12}},
                            "model": {"name": "gru", "hidden": 8},
                            "train": {"steps": 12, "batch_size": 8, "checkpoint_every": 4, **train}})


def tiny_model(cfg, task):
    return build_model(cfg.model.name, task.input_dim, cfg.model.hidden, task.output_dim, g=cfg.model.g,
                       seed=cfg.seed)


def run(cfg, out, **kw):
    task = make_task(cfg.task.name, **cfg.task.params)
    model = tiny_model(cfg, task)
    return train(model, task, cfg, out_dir=out, progress=False, **kw)


def test_training_reduces_loss_and_is_deterministic(tmp_path):
    cfg = tiny_config(steps=40)
    a, b = run(cfg, None), run(cfg, None)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    first = sum(a.losses[s] for s in range(1, 6)) / 5
    last = sum(a.losses[s] for s in range(36, 41)) / 5
    assert last < first


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config()
    full = run(cfg, tmp_path / "full")
    part = run(cfg, tmp_path / "resumed", stop_after=8)
    assert [c.step for c in part.checkpoints] == [0, 4, 8]
    resumed = run(cfg, tmp_path / "resumed")
    assert resumed.resumed_from == 8
    steps = [c.step for c in list_checkpoints(tmp_path / "resumed" / "checkpoints")]
    assert steps == [0, 4, 8, 12]  # nothing lost, nothing duplicated
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.losses == pytest.approx(full.losses)
    # a finished run is not trained further when re-run
    again = run(cfg, tmp_path / "resumed")
    assert again.resumed_from == 12 and again.final_step == 12


def test_corrupted_checkpoint_is_named_skipped_and_never_loaded(tmp_path):
    cfg = tiny_config()
    run(cfg, tmp_path, stop_after=8)
    bad = tmp_path / "checkpoints" / "step_000008.safetensors"
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.warns(CorruptCheckpointWarning, match="step_000008.safetensors"):
        found = list_checkpoints(tmp_path / "checkpoints")
    assert [c.step for c in found] == [0, 4]
    task = make_task(cfg.task.name, **cfg.task.params)
    model = tiny_model(cfg, task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="step_000008.safetensors"):
        load_checkpoint(bad, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # training resumes from the last good checkpoint and rewrites the damaged one
    with pytest.warns(CorruptCheckpointWarning):
        res = run(cfg, tmp_path)
    assert res.resumed_from == 4
    assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [0, 4, 8, 12]


def test_truncated_sidecar_is_reported(tmp_path):
    cfg = tiny_config()
    run(cfg, tmp_path, stop_after=4)
    side = tmp_path / "checkpoints" / "step_000004.json"
    side.write_text(side.read_text()[:20])
    with pytest.warns(CorruptCheckpointWarning, match="step_000004.json"):
        assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [0]


def test_checkpoint_sidecar_records_config_step_loss_seed(tmp_path):
    cfg = tiny_config()
    run(cfg, tmp_path)
    meta = json.loads((tmp_path / "checkpoints" / "step_000008.json").read_text())
    assert meta["step"] == 8 and meta["seed"] == 0 and len(meta["losses"]) == 4
    assert meta["loss"] == pytest.approx(sum(meta["losses"]) / 4)
    assert meta["config"]["model"]["name"] == "gru"


def test_early_stop(tmp_path):
    cfg = tiny_config(steps=40, early_stop_loss=10.0)
    res = run(cfg, tmp_path)
    assert res.stopped_early and res.final_step == 4
    assert list_checkpoints(tmp_path / "checkpoints")[-1].meta["final"] is True


def test_g_scales_the_recurrent_weight():
    base = build_model("gru", 3, 8, 3, g=1.0, seed=3)
    scaled = build_model("gru", 3, 8, 3, g=2.5, seed=3)
    assert torch.allclose(scaled.cell.weight_hh, 2.5 * base.cell.weight_hh)
    assert torch.equal(scaled.cell.weight_ih, base.cell.weight_ih)
    rnn0, rnn1 = build_model("rnn", 3, 8, 3, g=0.0, seed=1), build_model("rnn", 3, 8, 3, seed=1)
    assert torch.count_nonzero(rnn0.cell.W) == 0 and torch.equal(rnn0.cell.U, rnn1.cell.U)


@pytest.mark.parametrize("cls, kw, expected", [
    ("VanillaRNN", {}, ["cell.W"]), ("LeakyRNN", {"form": "current"}, ["cell.W"]),
    ("LeakyRNN", {"form": "rate"}, ["cell.W"]), ("GRU", {}, ["cell.weight_hh"]), ("LSTM", {}, ["cell.weight_hh"]),
])
def test_recurrent_weights_are_read_off_the_declared_state_sites(cls, kw, expected):
    """The affine cells name their recurrent weights through ``affine_terms`` and ``state_sites``."""
    import kpflow.models as models
    from kpflow.training import recurrent_weight_names

    model = getattr(models, cls)(2, 3, **kw)
    assert recurrent_weight_names(model) == expected
    assert all(model.affine_terms[n[len("cell."):]][1] in model.state_sites for n in expected)


def test_any_torch_optimizer_and_registered_ones(tmp_path):
    cfg = tiny_config(steps=3)
    for name in ("sgd", "rmsprop", "adamw", "lbfgs"):
        assert run(cfg, None, optimizer=name).final_step == 3
    calls = []

    class Counting(torch.optim.SGD):
        def set_batch(self, batch):
            calls.append(batch.batch_size)

    register_optimizer("counting-sgd", lambda model, lr=0.1: Counting(model.parameters(), lr=lr))
    try:
        cfg2 = validate_config({**tiny_config(steps=3).model_dump(), "optimizer": {"name": "counting-sgd", "lr": 0.1}})
        run(cfg2, None)
    finally:
        OPTIMIZERS.pop("counting-sgd")
    assert calls == [8, 8, 8]


def test_cross_entropy_loss_matches_torch():
    out = torch.randn(2, 5, 4)
    tgt = torch.randint(0, 4, (2, 5))
    mask = torch.ones(2, 5)
    mask[:, :2] = 0
    from kpflow.tasks import TaskBatch

    batch = TaskBatch(inputs=torch.zeros(2, 5, 1), targets=tgt, mask=mask, loss="ce")
    ref = torch.nn.functional.cross_entropy(out[:, 2:].reshape(-1, 4), tgt[:, 2:].reshape(-1))
    assert torch.allclose(task_loss(out, batch), ref)


@pytest.mark.parametrize("bad, key, fragment", [
    ({"task": {"name": "flip"}}, "task.name = 'flip'", "valid tasks: context_integration"),
    ({"model": {"name": "transformerx"}}, "model.name = 'transformerx'", "valid models: gru"),
    ({"optimizer": {"name": "adamm"}}, "optimizer.name = 'adamm'", "valid optimizers: adadelta"),
    ({"train": {"steps": -3}}, "train.steps = -3", "greater than or equal to 0"),
    ({"train": {"loss": "l1"}}, "train.loss = 'l1'", "'auto', 'mse' or 'ce'"),
    ({"task": {"params": {"bits": 3}}}, "task.params", "valid parameters: n_bits"),
    ({"optimizer": {"params": {"momentum": 0.9}}}, "optimizer.params", "valid options: betas"),
    ({"trian": {}}, "trian", "unknown key"),
])
def test_invalid_config_names_key_value_and_allowed(bad, key, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config(bad)
    assert key in str(err.value) and fragment in str(err.value)


def test_unknown_names_in_python_api_list_valid_ones():
    with pytest.raises(ValueError, match="valid optimizers: .*sgd"):
        make_optimizer("sgdd", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="valid tasks: .*flipflop"):
        make_task("flip_flop")
    with pytest.raises(ValueError, match="valid models: .*gru"):
        build_model("grux", 1, 2, 1)


def test_yaml_and_toml_configs_round_trip(tmp_path):
    from kpflow.training import dump_config

    cfg = tiny_config()
    for fmt in ("yaml", "toml"):
        p = tmp_path / f"c.{fmt}"
        p.write_text(dump_config(cfg, fmt))
        assert load_config(p) == cfg
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: zero\n")
    with pytest.raises(ConfigError, match="train.batch_size = 'zero'"):
        load_config(tmp_path / "bad.yaml")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from kpflow.training.checkpoints import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.txt", "x")
        assert (tmp_path / "report.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
