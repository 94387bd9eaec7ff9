"""Built-in cells against their defining formulas and against torch's own cells (float64)."""

from __future__ import annotations

import pytest
import torch

from kpflow.models import GRU, LSTM, CellAdapter, LeakyRNN, NeuralODE, VanillaRNN

B, T, H, I, O = 3, 7, 5, 2, 2
DT = torch.float64


def _x(seed=0, width=I):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, width, generator=g, dtype=DT), torch.randn(B, H, generator=g, dtype=DT)


def _randomize_biases(m):
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)


def test_vanilla_rnn_formula():
    torch.manual_seed(0)
    m = VanillaRNN(I, H, O, nonlinearity="tanh", dtype=DT)
    _randomize_biases(m)
    x, h = _x()
    p = m.cell_params()
    z = m.unroll(p, x, h)
    ref, hh = [], h
    for t in range(T):
        hh = torch.tanh(hh @ p["W"].T + x[:, t] @ p["U"].T + p["b"])
        ref.append(hh)
    assert torch.allclose(z, torch.stack(ref, 1), atol=1e-14)
    states, out = m(x, h)
    assert torch.allclose(out, states @ m.readout.weight.T + m.readout.bias, atol=1e-14)


@pytest.mark.parametrize("form", ["current", "rate"])
def test_leaky_rnn_forms(form):
    torch.manual_seed(1)
    m = LeakyRNN(I, H, O, dt=0.2, form=form, nonlinearity="softplus", dtype=DT)
    _randomize_biases(m)
    x, z = _x(1)
    p = m.cell_params()
    phi = torch.nn.functional.softplus
    ref = []
    for t in range(T):
        if form == "current":
            z = z + 0.2 * (-z + phi(z) @ p["W"].T + x[:, t] @ p["U"].T + p["b"])
        else:
            z = z + 0.2 * (-z + phi(z @ p["W"].T + x[:, t] @ p["U"].T + p["b"]))
        ref.append(z)
    assert torch.allclose(m.unroll(p, x, _x(1)[1]), torch.stack(ref, 1), atol=1e-14)
    assert m.is_flow and m.dt == 0.2
    zz = torch.randn(B, H, dtype=DT)
    assert torch.allclose(m.vector_field(p, zz, x[:, 0]) * 0.2 + zz, m.step(p, zz, x[:, 0]), atol=1e-14)


def test_gru_matches_torch():
    torch.manual_seed(3)
    cell = torch.nn.GRUCell(I, H, dtype=DT)
    m = GRU.from_torch(cell, output_dim=O)
    x, h = _x(3)
    states = m.unroll(m.cell_params(), x, h)
    ref, hh = [], h
    for t in range(T):
        hh = cell(x[:, t], hh)
        ref.append(hh)
    assert float((states - torch.stack(ref, 1)).abs().max()) < 1e-12
    layer = torch.nn.GRU(I, H, batch_first=True, dtype=DT)
    m2 = GRU.from_torch(layer)
    out, _ = layer(x, h[None])
    assert float((m2.unroll(m2.cell_params(), x, h) - out).abs().max()) < 1e-12
    back = m2.to_torch()
    assert isinstance(back, torch.nn.GRUCell)
    assert float((back(x[:, 0], h) - m2.step(m2.cell_params(), h, x[:, 0])).abs().max()) < 1e-12


def test_gru_without_bias_matches_torch():
    torch.manual_seed(5)
    cell = torch.nn.GRUCell(I, H, bias=False, dtype=DT)
    m = GRU.from_torch(cell)
    assert set(m.cell_params()) == {"weight_ih", "weight_hh"}
    x, h = _x(5)
    assert float((m.step(m.cell_params(), h, x[:, 0]) - cell(x[:, 0], h)).abs().max()) < 1e-12


def test_lstm_matches_torch():
    torch.manual_seed(4)
    layer = torch.nn.LSTM(I, H, batch_first=True, dtype=DT)
    m = LSTM.from_torch(layer)
    assert m.state_dim == 2 * H and m.hidden_dim == H
    x, h = _x(4)
    c = torch.randn(B, H, dtype=DT)
    out, (hn, cn) = layer(x, (h[None], c[None]))
    states = m.unroll(m.cell_params(), x, torch.cat([h, c], -1))
    assert float((states[..., :H] - out).abs().max()) < 1e-12
    assert float((states[:, -1, H:] - cn[0]).abs().max()) < 1e-12
    cell = m.to_torch()
    h1, c1 = cell(x[:, 0], (h, c))
    assert float((torch.cat([h1, c1], -1) - m.step(m.cell_params(), torch.cat([h, c], -1), x[:, 0])).abs().max()) \
        < 1e-12


def test_neural_ode_rk4_is_fourth_order_taylor_for_linear_fields():
    """With an identity nonlinearity f(z) = A z + c is linear, and one RK4 step is exactly the
    4th-order Taylor polynomial of the flow; Euler with s substeps is (I + dt/s A)^s applied."""
    torch.manual_seed(6)
    m = NeuralODE(I, H, O, width=4, dt=0.3, method="rk4", nonlinearity="identity", dtype=DT)
    _randomize_biases(m)
    p = m.cell_params()
    x, z = _x(6)
    A = p["W2"] @ p["W1"]
    c = x[:, 0] @ (p["W2"] @ p["U1"]).T + p["W2"] @ p["b1"] + p["b2"]
    f = z @ A.T + c
    dt = 0.3
    taylor = z + dt * f + dt**2 / 2 * f @ A.T + dt**3 / 6 * f @ (A @ A).T + dt**4 / 24 * f @ (A @ A @ A).T
    assert torch.allclose(m.step(p, z, x[:, 0]), taylor, atol=1e-13)
    e = NeuralODE(I, H, O, width=4, dt=0.3, method="euler", substeps=3, nonlinearity="identity", dtype=DT)
    e.load_cell_params(p)
    ref = z
    for _ in range(3):
        ref = ref + 0.1 * (ref @ A.T + c)
    assert torch.allclose(e.step(p, z, x[:, 0]), ref, atol=1e-13)


def test_cell_adapter_equals_vanilla_rnn():
    torch.manual_seed(7)
    cell = torch.nn.RNNCell(I, H, dtype=DT)
    m = CellAdapter(cell, output_dim=O)
    assert (m.input_dim, m.state_dim, m.output_dim) == (I, H, O)
    v = VanillaRNN(I, H, O, dtype=DT)
    v.load_cell_params({"W": cell.weight_hh.detach(), "U": cell.weight_ih.detach(),
                        "b": (cell.bias_ih + cell.bias_hh).detach()})
    x, h = _x(7)
    assert torch.allclose(m.unroll(m.cell_params(), x, h), v.unroll(v.cell_params(), x, h), atol=1e-13)


def test_cell_adapter_errors():
    with pytest.raises(ValueError, match="input_dim and state_dim"):
        CellAdapter(torch.nn.Linear(3, 3))
    class TwoStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(I + H, H, dtype=DT)

        def forward(self, x, h):
            new = torch.tanh(self.lin(torch.cat([x, h], -1)))
            return new, new

    m = CellAdapter(TwoStates(), I, H)
    x, h = _x()
    with pytest.raises(TypeError, match="one"):
        m.unroll(m.cell_params(), x, h)
    with pytest.raises(TypeError, match="nn.Module"):
        CellAdapter(lambda x, h: h, I, H)


def test_affine_slots_rebuild_the_step():
    torch.manual_seed(8)
    x, h = _x(8)
    for m in (VanillaRNN(I, H, dtype=DT), LeakyRNN(I, H, form="rate", dtype=DT), GRU(I, H, dtype=DT)):
        p = m.cell_params()
        slots = m.slots(p, h, x[:, 0])
        assert {s: v.shape[1] for s, v in slots.items()} == m.slot_sizes()
        assert torch.equal(m.post(slots, h, x[:, 0]), m.step(p, h, x[:, 0]))


def test_parameter_validation():
    m = GRU(I, H, dtype=DT)
    with pytest.raises(ValueError, match=r"'weight_hh' has shape \(5, 5\) but GRU needs \(15, 5\)"):
        m.load_cell_params({**m.cell_params(), "weight_hh": torch.zeros(H, H, dtype=DT)})
    with pytest.raises(ValueError, match="missing"):
        m.load_cell_params({"weight_hh": torch.zeros(3 * H, H, dtype=DT)})
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        VanillaRNN(I, H, nonlinearity="swishy")
    with pytest.raises(ValueError, match="form must be"):
        LeakyRNN(I, H, form="voltage")
    with pytest.raises(ValueError, match="dt must be positive"):
        LeakyRNN(I, H, dt=0.0)
    with pytest.raises(ValueError, match="method must be"):
        NeuralODE(I, H, method="midpoint")
    with pytest.raises(ValueError, match="proj_size"):
        LSTM.from_torch(torch.nn.LSTM(I, H, proj_size=2))
    with pytest.raises(ValueError, match="inputs have width 3"):
        m(torch.zeros(B, T, 3, dtype=DT))
