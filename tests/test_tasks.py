"""Tasks: the targets follow each task's definition, batches are reproducible from a seed, and the
losses and accuracies score what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from kpflow.tasks import (
    ContextIntegration,
    DelayAnti,
    DelayPro,
    FlipFlop,
    MemoryAnti,
    MemoryPro,
    MultiTask,
    StudentTeacher,
    make_task,
    task_loss,
    task_names,
)


@pytest.mark.parametrize("name", [n for n in task_names() if n != "neurogym"])
def test_every_task_is_reproducible_from_its_seed(name):
    task = make_task(name)
    a, b, c = task.sample(6, seed=7), task.sample(6, seed=7), task.sample(6, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == (6, task.seq_len, task.input_dim)
    assert a.targets.shape == (6, task.seq_len, task.output_dim)
    assert torch.isfinite(a.inputs).all() and torch.isfinite(a.targets).all()
    # a perfect prediction scores zero loss and full accuracy
    assert float(task_loss(a.targets, a)) == 0.0
    assert float(task.accuracy(a.targets, a).mean()) == 1.0


def test_flipflop_target_holds_the_last_pulse():
    task = FlipFlop(n_bits=3, seq_len=40, pulse_prob=0.2, noise=0.0)
    batch = task.sample(5, seed=1)
    x, y = batch.inputs, batch.targets
    for b in range(5):
        for k in range(3):
            last = 0.0
            for t in range(40):
                if x[b, t, k] != 0:
                    last = float(x[b, t, k])
                assert y[b, t, k] == last
    assert set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_memory_tasks_follow_their_periods():
    theta = torch.tensor([0.3, 2.0, 4.0])
    for cls, anti, delay in ((MemoryPro, False, False), (MemoryAnti, True, False), (DelayPro, False, True),
                             (DelayAnti, True, True)):
        task = cls(stim=4, mem=5, resp=6, noise=0.0)
        x, y, _ = task._trials(theta, torch.Generator().manual_seed(0))
        go = 9
        assert torch.all(x[:, :go, 0] == 1) and torch.all(x[:, go:, 0] == 0)
        assert torch.allclose(x[:, 0, 1], torch.cos(theta))
        assert torch.all(x[:, 4:, 1:] == 0) != delay  # stimulus off after stim unless Delay
        ang = theta + (math.pi if anti else 0.0)
        assert torch.allclose(y[:, go:, 1], torch.cos(ang)[:, None].expand(3, 6), atol=1e-6)
        assert torch.allclose(y[:, go:, 2], torch.sin(ang)[:, None].expand(3, 6), atol=1e-6)
        assert torch.all(y[:, :go, 1:] == 0) and torch.all(y[:, :go, 0] == 1) and torch.all(y[:, go:, 0] == 0)


def test_multitask_has_balanced_trials_and_a_context_cue():
    task = MultiTask(context=3, stim=2, mem=2, resp=2, noise=0.0)
    batch = task.sample(8, seed=0)
    assert batch.task_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    cue = batch.inputs[:, :3, 3:]
    assert torch.equal(cue, torch.nn.functional.one_hot(batch.task_ids, 4).float()[:, None].expand(8, 3, 4))
    assert torch.all(batch.inputs[:, 3:, 3:] == 0)
    # anti trials answer the opposite direction of the stimulus
    anti = batch.task_ids == 1
    assert torch.allclose(batch.targets[anti, -1, 1], -torch.cos(batch.info["theta"][anti]), atol=1e-6)


def test_context_integration_scores_only_the_decision_period():
    task = ContextIntegration(seq_len=20, decision=5, noise=0.0)
    batch = task.sample(16, seed=3)
    assert torch.all(batch.mask[:, :15] == 0) and torch.all(batch.mask[:, 15:] == 1)
    ctx = batch.info["context"]
    expected = torch.sign(batch.inputs[torch.arange(16), 0, 2 + ctx])
    assert torch.equal(batch.targets[:, -1, 0], expected)
    # errors outside the decision period cost nothing
    out = batch.targets.clone()
    out[:, :15] += 3.0
    assert float(task_loss(out, batch)) == 0.0


def test_student_teacher_targets_are_the_teacher_rnn_outputs():
    task = StudentTeacher(input_dim=5, hidden=7, output_dim=2, input_rank=2, seq_len=9, g_teacher=1.3)
    batch = task.sample(4, seed=2)
    w = task.teacher_weights()
    assert torch.allclose(w["W_base"] @ w["W_base"].T, torch.eye(7), atol=1e-5)
    # inputs live in a rank-2 subspace
    assert torch.linalg.matrix_rank(batch.inputs.reshape(-1, 5)) == 2
    from kpflow.models import VanillaRNN

    teacher = VanillaRNN(5, 7, 2, bias=False)
    with torch.no_grad():
        teacher.cell.W.copy_(w["W"])
        teacher.cell.U.copy_(w["W_in"])
        teacher.readout.weight.copy_(w["W_out"])
        teacher.readout.bias.zero_()
        _, y = teacher(batch.inputs)
    assert torch.allclose(y, batch.targets, atol=1e-5)
    own = StudentTeacher(input_dim=5, hidden=7, output_dim=2, input_rank=2, seq_len=9, teacher=teacher)
    b2 = own.sample(4, seed=2)
    assert torch.allclose(b2.targets, batch.targets, atol=1e-5)


def test_accuracy_detects_wrong_answers():
    task = MemoryPro(stim=3, mem=3, resp=3, noise=0.0)
    batch = task.sample(10, seed=0)
    assert float(task.accuracy(batch.targets, batch).mean()) == 1.0
    wrong = batch.targets.clone()
    wrong[..., 1:] *= -1
    assert float(task.accuracy(wrong, batch).mean()) == 0.0
    ff = FlipFlop(seq_len=30, pulse_prob=0.3)
    b = ff.sample(4, seed=0)
    assert float(ff.accuracy(-b.targets, b).mean()) == 0.0


def test_task_errors_name_the_problem():
    with pytest.raises(ValueError, match="valid tasks"):
        make_task("flipflip")
    with pytest.raises(ValueError, match="valid parameters: n_bits"):
        make_task("flipflop", bits=2)
    with pytest.raises(ValueError, match="pulse_prob"):
        FlipFlop(pulse_prob=0)
    with pytest.raises(ValueError, match="valid: memory_pro"):
        MultiTask(tasks=("memory_pro", "go"))


def test_neurogym_task_when_installed():
    pytest.importorskip("neurogym")
    task = make_task("neurogym", env="PerceptualDecisionMaking-v0", seq_len=30)
    a, b = task.sample(3, seed=5), task.sample(3, seed=5)
    assert task.loss == "ce" and a.targets.dtype == torch.int64
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert a.inputs.shape == (3, 30, task.input_dim) and int(a.targets.max()) < task.output_dim
    logits = torch.nn.functional.one_hot(a.targets, task.output_dim).float() * 20
    assert float(task.accuracy(logits, a).mean()) == 1.0
