"""The fast paths of the built-in cells against their torch.func references, in float64, on random shapes.

* ``K`` through the Kronecker core (gate groups, both contractions ``G Z`` and ``U (Uᵀ Z)``, probes in
  column blocks) against ``Jθ Jθ*`` with ``Jθ`` from ``torch.func.jacrev`` of the step at every site, and
  against ``parameter_operator(backend="autodiff")``.
* ``P``/``P*`` on the coefficient path against ``path="jvp"`` and against the jacrev Jacobian of the unroll.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev

from kpflow.kernels import kronecker, kronecker_core, ntk, parameter_operator, propagator, record
from kpflow.models import GRU, LSTM, LeakyRNN, VanillaRNN

DT = torch.float64
CELLS = ("rnn", "leaky_current", "leaky_rate", "gru", "lstm")


def _model(name: str, I: int, H: int, seed: int):
    torch.manual_seed(seed)
    kw = dict(dtype=DT)
    m = {"rnn": lambda: VanillaRNN(I, H, 2, gain=1.3, **kw),
         "leaky_current": lambda: LeakyRNN(I, H, 2, dt=0.3, form="current", gain=1.5, **kw),
         "leaky_rate": lambda: LeakyRNN(I, H, 2, dt=0.3, form="rate", gain=1.5, **kw),
         "gru": lambda: GRU(I, H, 2, **kw),
         "lstm": lambda: LSTM(I, H, 2, **kw)}[name]()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("b") or "bias" in k:
                p.normal_(0, 0.3)
    return m


def _traj(name, B, T, I, H, seed):
    m = _model(name, I, H, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(B, T, I, generator=g, dtype=DT)
    z0 = 0.5 * torch.randn(B, m.state_dim, generator=g, dtype=DT)
    return m, record(m, x, z0)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _site_jacobian(traj, names):
    """``Jθ`` ``[N·H, n_params]`` by jacrev of the step at all sites (previous states held fixed)."""
    zp, x = traj.sites()
    p = traj.params
    sizes = [p[n].numel() for n in names]

    def f(theta):
        parts = {n: t.reshape(p[n].shape) for n, t in zip(names, theta.split(sizes), strict=True)}
        return traj.model.step({**p, **parts}, zp, x).reshape(-1)

    return jacrev(f)(torch.cat([p[n].reshape(-1) for n in names]))


def _shapes(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, I = (int(torch.randint(1, 4, (), generator=g)), int(torch.randint(2, 7, (), generator=g)),
               int(torch.randint(1, 4, (), generator=g)))
    H = int(torch.randint(2, 7, (), generator=g))
    return B, T, I, H


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kronecker_apply_matches_jacrev_and_autodiff(name, seed, monkeypatch):
    B, T, I, H = _shapes(seed)
    # the two contractions: the Gram form needs N = B·T < 2·C, C = H + 1 for the recurrent slot
    monkeypatch.setattr(kronecker, "CPU_COLUMNS", 2 * H)  # U = H: 5 probes in blocks of 2, 2, 1
    for BT in ((B, T), (1, 2)):
        m, traj = _traj(name, *BT, I, H, seed)
        names = list(traj.param_names)
        subsets = [names, [n for n in names if n.startswith("W") or n == "weight_hh"]]
        for sub in subsets:
            core = kronecker_core(traj, sub)
            assert core.structured
            J = _site_jacobian(traj, sub)
            Kref = J @ J.T
            Kk = core.operator().to_matrix()
            assert _rel(Kk, Kref) < 1e-12, (name, BT, sub)
            assert _rel(Kk, parameter_operator(traj, sub, backend="autodiff").to_matrix()) < 1e-12
            # probes: the batched apply equals the matrix (and the adjoint, K being symmetric)
            Y = torch.randn(5, *traj.shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
            got = core.apply(Y).reshape(5, -1)
            assert _rel(got, Y.reshape(5, -1) @ Kref.T) < 1e-12
    if name == "gru":  # the r and z gates of ih and hh share their coefficients: 4 contractions, not 6
        assert len(kronecker_core(traj)._gate_groups()) == 4
        assert len(kronecker_core(traj, ["weight_hh"])._gate_groups()) == 3


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("seed", [0, 3])
def test_coefficient_propagator_matches_jvp_and_jacrev(name, seed):
    B, T, I, H = _shapes(seed)
    m, traj = _traj(name, B, T, I, H, seed)
    n = traj.states.numel()
    Pc, Pj = propagator(traj, path="coefficients"), propagator(traj, path="jvp")
    Q = torch.randn(4, *traj.shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
    assert _rel(Pc.matmat(Q), Pj.matmat(Q)) < 1e-12
    assert _rel(Pc.T.matmat(Q), Pj.T.matmat(Q)) < 1e-12
    assert Pc.last_path == "coefficients" and Pj.last_path == "jvp"
    # the reference: P = dz/dq of the unroll with an additive perturbation q_t of every step
    x, z0 = traj.inputs, traj.z0

    def unroll_q(q):
        z, out = z0, []
        for t in range(T):
            z = m.step(traj.params, z, x[:, t]) + q[:, t]
            out.append(z)
        return torch.stack(out, 1).reshape(-1)

    Pref = jacrev(unroll_q)(torch.zeros(traj.shape, dtype=DT))
    assert _rel(Pc.to_matrix(), Pref.reshape(n, n)) < 1e-12
    assert _rel(Pc.T.to_matrix(), Pref.reshape(n, n).T) < 1e-12
    # Θ with the public defaults equals P Jθ Jθ* P*
    J = _site_jacobian(traj, list(traj.param_names))
    Pm = Pref.reshape(n, n)
    ref = Pm @ J @ J.T @ Pm.T
    assert _rel(ntk(traj).to_matrix(), ref) < 1e-11


def test_default_path_needs_no_torch_func_warm_up():
    """record + Θ with the public defaults on the built-in cells use no torch.func transform and no
    grad_outputs tensor: their first use imports torch._dynamo / sympy (~1.5 s), 50x one forward pass."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from kpflow.kernels import ntk, record\n"
        "from kpflow.models import GRU, LSTM, LeakyRNN, VanillaRNN\n"
        "for m in (GRU(2, 4), LSTM(2, 3), VanillaRNN(2, 4), LeakyRNN(2, 4)):\n"
        "    traj = record(m, torch.randn(2, 3, 2), targets=torch.randn(2, 3, 1))\n"
        "    ntk(traj).matmat(torch.randn(2, *traj.shape))\n"
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_gru_closed_form_coefficients_equal_the_reverse_mode_extraction():
    # the GRU's elementwise ∂h'/∂(ih, hh), ∂h'/∂h against one reverse-mode pass per output block (float64)
    from kpflow.kernels.linearization import unit_coefficients

    torch.manual_seed(3)
    model = GRU(4, 7, 2, dtype=torch.float64)
    zp, x = torch.randn(30, 7, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    slots = {k: v.detach() for k, v in model.slots(dict(model.cell_params()), zp, x).items()}
    D, E = model.post_unit_coefficients(slots, zp, x)
    def fn(d, rows):
        return model.post({s: d[s] for s in slots}, d["z"], x if rows is None else x[rows])

    ref = unit_coefficients(fn, {**slots, "z": zp}, {"ih": 21, "hh": 21, "z": 7}, 30, 7, 7)
    for s in ("ih", "hh"):
        assert torch.allclose(D[s], ref[s], rtol=1e-12, atol=1e-14)
    assert torch.allclose(E, ref["z"], rtol=1e-12, atol=1e-14)


def test_a_gru_subclass_with_another_post_is_refused_not_wrong():
    # the closed form is checked on every trajectory: a subclass that changes post but keeps the formulas fails
    class Mixing(GRU):
        def post(self, slots, z_prev, x):
            return super().post(slots, z_prev, x).roll(1, dims=-1)

    torch.manual_seed(0)
    model = Mixing(3, 5, 1, dtype=torch.float64)
    traj = record(model, torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit"):
        propagator(traj, path="coefficients").matmat(torch.randn(1, 2, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", CELLS)
def test_recorded_slots_are_the_unrolls_own(name):
    # record keeps the slots its steps computed: the states are unroll's bit for bit, the slots model.slots at the
    # sites, and operators built on them equal those built on slots recomputed over all sites at once
    from kpflow.kernels.linearization import slot_values

    m, traj = _traj(name, 3, 5, 2, 4, seed=7)
    assert torch.equal(traj.states, m.unroll(traj.params, traj.inputs, traj.z0))
    zp, x = traj.sites()
    again = m.slots(traj.params, zp, x)
    assert set(slot_values(traj)) == set(again)
    for s, v in slot_values(traj).items():
        assert v.shape == again[s].shape and torch.allclose(v, again[s], rtol=1e-14, atol=1e-15)
    fresh = record(m, traj.inputs, traj.z0)
    fresh.cache.pop("slots")  # as a trajectory made without the unroll's slots
    Q = torch.randn(3, *traj.shape, dtype=DT)
    assert _rel(ntk(traj).matmat(Q), ntk(fresh).matmat(Q)) < 1e-13


def test_a_cell_that_overrides_step_gets_its_slots_recomputed():
    # unroll_slots cannot know the slots of a step it did not write: such a cell records no slots, and the
    # operators read them off its own slots() (the result is that of its step, not of AffineRecurrentModel's)
    from kpflow.kernels.linearization import slot_values

    class Clipped(GRU):
        def step(self, params, z_prev, x_t):
            return super().step(params, z_prev, x_t)

    torch.manual_seed(1)
    m = Clipped(2, 4, 1, dtype=DT)
    x = torch.randn(2, 3, 2, dtype=DT)
    states, slots = m.unroll_slots(dict(m.cell_params()), x)
    assert slots is None and torch.equal(states, m.unroll(dict(m.cell_params()), x))
    traj = record(m, x)
    assert "slots" not in traj.cache
    zp, xs = traj.sites()
    assert all(torch.equal(v, m.slots(traj.params, zp, xs)[s]) for s, v in slot_values(traj).items())


def test_gate_groups_use_the_slots_site_variables_side_by_side():
    # the GRU's r and z gates share their coefficients across ih and hh: one contraction with [U_ih, U_hh]
    _, traj = _traj("gru", 2, 4, 3, 5, seed=2)
    core = kronecker_core(traj)
    groups = core._gate_groups()
    assert sorted(key for _, _, key in groups) == [(("hh", 2),), (("ih", 0), ("hh", 0)), (("ih", 1), ("hh", 1)),
                                                   (("ih", 2),)]
    for _, U, key in groups:
        want = torch.cat([core._U[s] for s, _ in key], 1)
        assert torch.equal(U, want)
    assert torch.equal(core._slot_columns(["hh", "ih"]), torch.cat([core._U["hh"], core._U["ih"]], 1))
