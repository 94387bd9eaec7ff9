"""The low-rank natural-gradient optimizer's whole state is in ``state_dict``: a run stopped mid-way, written
to a checkpoint (safetensors + JSON sidecar), loaded into a fresh model and optimizer and continued, ends
bit for bit where an uninterrupted run ends — with the same batch every step (the Krylov/Ritz path, which
needs the previous basis, residual and inputs) and with a new minibatch per step (Nyström sketches, which
need the sketch's random stream)."""

from __future__ import annotations

import pytest
import torch

from kpflow.models import VanillaRNN
from kpflow.training.checkpoints import load_checkpoint, save_checkpoint
from kpflow.training.natural_gradient import LowRankNaturalGradient

D = torch.float64
STEPS, STOP = 10, 5


def _batch(step: int, new_batch: bool):
    g = torch.Generator().manual_seed(100 + (step if new_batch else 0))
    return {"inputs": torch.randn(4, 5, 1, dtype=D, generator=g), "targets": torch.randn(4, 5, 2, dtype=D, generator=g)}


def _fresh(update: str, form: str = "auto"):
    torch.manual_seed(0)
    model = VanillaRNN(1, 3, 2, dtype=D)
    opt = LowRankNaturalGradient(model, lr=0.5, rank=2, update=update, jacobian="unrolled", seed=3,
                                 readout_lr=0.05, form=form)
    return model, opt


def _steps(model, opt, first: int, last: int, new_batch: bool) -> list[float]:
    losses = []
    for step in range(first, last):
        opt.set_batch(_batch(step, new_batch))
        losses.append(float(opt.step()))
    return losses


@pytest.mark.parametrize("form", ["state", "parameter"])
@pytest.mark.parametrize("update", ["krylov", "nystrom"])
@pytest.mark.parametrize("new_batch", [False, True], ids=["same-batch", "new-minibatch"])
def test_resume_mid_run_matches_an_uninterrupted_run_bit_for_bit(tmp_path, update, new_batch, form):
    # defect (issue 19): the basis, previous residual, last inputs and the sketch's generator lived outside
    # state_dict, and load_state_dict turned the saved string eig_form into a generator object, so a resumed
    # run re-sketched and drifted from the uninterrupted one
    model, opt = _fresh(update, form)
    whole = _steps(model, opt, 0, STEPS, new_batch)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = _fresh(update, form)
    first = _steps(model, opt, 0, STOP, new_batch)
    save_checkpoint(tmp_path, STOP, model, opt)
    model2, opt2 = _fresh(update, form)
    load_checkpoint(tmp_path / "step_000005.json", model2, opt2)
    assert opt2._st["eig_form"] == opt._st["eig_form"] and isinstance(opt2._st["eig_form"], str)
    second = _steps(model2, opt2, STOP, STEPS, new_batch)

    assert first + second == whole  # the same floats, not just close ones
    for name, value in model2.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_state_dict_round_trip_keeps_every_value_and_type():
    # defect (issue 19): torch.optim's load_state_dict casts every iterable, so the string eig_form came back
    # as a generator object and the basis was judged stale after every resume
    model, opt = _fresh("krylov")
    _steps(model, opt, 0, 3, new_batch=False)
    sd = opt.state_dict()
    st = sd["state"][0]
    for key in ("state_basis", "prev_residual", "last_inputs"):
        assert isinstance(st[key], torch.Tensor), key
    _, opt2 = _fresh("krylov")
    opt2.load_state_dict(sd)
    for key, value in opt._st.items():
        other = opt2._st[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert type(other) is type(value) and other == value, key
