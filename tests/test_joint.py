"""The general joint-state formulation (kpflow.models.sites, kpflow.kernels.joint) against independent
float64 references: torch.func.jacrev of the whole model, autodiff K, dense matrices, autograd gradients,
torch's own layers — and the recurrences as an instance of it (identical to the recurrent operators)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev

from kpflow.kernels import (
    NonFiniteStateError,
    inverse_propagator,
    joint_propagator,
    kronecker_core,
    ntk,
    output_ntk,
    param_jacobian,
    parameter_operator,
    propagator,
    readout_jacobian,
    record,
    state_fisher,
    step_jacobians,
)
from kpflow.kernels.joint import (
    JointPropagator,
    SiteKroneckerCore,
    SiteStateJacobian,
    VisibleSelection,
    site_ntk,
)
from kpflow.models import (
    GRU,
    LSTM,
    DeepMLP,
    LeakyRNN,
    ModuleAdapter,
    RecurrentSites,
    Transformer,
    VanillaRNN,
)
from kpflow.models.sites import SiteModel
from kpflow.operators import view

DT = torch.float64


def _bias_noise(m):
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("bias") or k.endswith(".b"):
                p.normal_(0, 0.3)
    return m


class _Shared(SiteModel):
    """One weight writing several slots: ``a = E x + c``, ``b = W tanh(a) + c``, ``d = W tanh(b)``,
    ``n = g ⊙ tanh(d)``, ``m = g ⊙ tanh(n)`` (``W``, ``c`` and the elementwise ``g`` each write two slots),
    visible ``m``."""

    def __init__(self):
        super().__init__()
        self.E = nn.Parameter(torch.randn(4, 3, dtype=DT) / 2)
        self.W = nn.Parameter(torch.randn(4, 4, dtype=DT) / 2)
        self.c = nn.Parameter(torch.randn(4, dtype=DT) / 3)
        self.g = nn.Parameter(1 + torch.randn(4, dtype=DT) / 3)
        self.readout = nn.Linear(4, 2, dtype=DT)

    def positions(self, inputs):
        return int(inputs.shape[0]), int(inputs.shape[1])

    def run_sites(self, params, inputs, sites):
        a = sites.affine("a", {"E": inputs, "c": None})
        b = sites.affine("b", {"W": torch.tanh(a), "c": None})
        d = sites.affine("d", {"W": torch.tanh(b)})
        n = sites.scale("n", "g", torch.tanh(d))
        sites.state("z", torch.tanh(sites.scale("m", "g", torch.tanh(n))))

    def output(self, states, readout_params=None):
        p = self.readout_params() if readout_params is None else readout_params
        return states @ p["weight"].T + p["bias"]


def _make(name):
    torch.manual_seed(0)
    if name == "shared":
        return _Shared(), torch.randn(2, 3, 3, dtype=DT)
    if name.startswith("mlp"):
        act = name.split("_")[1]
        return _bias_noise(DeepMLP(3, 4, 3, 2, act, dtype=DT)), torch.randn(5, 3, dtype=DT)
    if name == "adapter":
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2)).double()
        return ModuleAdapter(net, visible=("1",), batch_independent=True), torch.randn(4, 3, dtype=DT)
    if name == "adapter_seq":
        class Seq(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 3)

            def forward(self, x):  # tokens mix through a parameter-free average
                h = torch.tanh(self.a(x))
                return self.b(h + h.mean(1, keepdim=True))

        return ModuleAdapter(Seq().double()), torch.randn(2, 3, 2, dtype=DT)
    kw = dict(causal="causal" in name, layer_norm="noln" not in name, norm_first="pre" in name, dtype=DT)
    if "tokens" in name:
        m = Transformer(d_model=4, n_heads=2, n_layers=2, d_ff=4, output_dim=2, max_len=4, vocab_size=5, **kw)
        return _bias_noise(m), torch.randint(0, 5, (2, 3))
    m = Transformer(3, 4, 2, 2, 4, 2, max_len=4, activation="relu" if "relu" in name else "gelu", **kw)
    return _bias_noise(m), torch.randn(2, 3, 3, dtype=DT)


MODELS = ["mlp_relu", "mlp_tanh", "mlp_gelu", "attn_bidir", "attn_causal", "attn_causal_pre", "attn_noln_relu",
          "attn_tokens_causal", "adapter", "adapter_seq", "shared"]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _jacrev_states(model, traj):
    names = traj.param_names

    def f(p):
        return model.visible_states({**traj.params, **p}, traj.inputs)

    jac = jacrev(f)({n: traj.params[n] for n in names})
    return torch.cat([jac[n].reshape(*traj.shape, -1) for n in names], -1).reshape(-1, sum(
        traj.params[n].numel() for n in names))


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    model, x = _make(request.param)
    traj = record(model, x)
    return request.param, model, traj


def test_state_jacobian_matches_jacrev_for_every_path(case):
    name, model, traj = case
    dense = _jacrev_states(model, traj)
    J = param_jacobian(traj)
    paths = ["vmap"] + (["fold"] if model.batch_independent else [])
    for path in paths:
        P = JointPropagator(traj, visible=True, path=path)
        assert P.path == path
        assert _rel((P @ J).to_matrix(), dense) < 1e-10, (name, path)


def test_ntk_equals_dense_jjt(case):
    _, model, traj = case
    dense = _jacrev_states(model, traj)
    for path in ("joint", "parameters"):
        theta = site_ntk(traj, path=path)
        assert theta.is_psd and theta.path == path
        assert _rel(theta.to_matrix(), dense @ dense.T) < 1e-10, path
    assert ntk(traj).path == "parameters"
    assert ntk(traj, backend="kronecker").path == "joint"


def test_kronecker_k_equals_autodiff_k_both_contractions(case):
    _, _, traj = case
    Ja = param_jacobian(traj, backend="autodiff").to_matrix()
    Ka = Ja @ Ja.T
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(3, *traj.joint_shape, generator=gen, dtype=DT)
    Kop = parameter_operator(traj, backend="autodiff")
    assert _rel(Kop.matmat(X).reshape(3, -1), X.reshape(3, -1) @ Ka) < 1e-10
    for contraction in ("gram", "factored", "auto"):
        core = SiteKroneckerCore(traj, contraction=contraction)
        assert _rel(core.operator().to_matrix(), Ka) < 1e-10, contraction
    core = kronecker_core(traj)
    assert abs(core.trace() - float(Ka.trace())) < 1e-10 * float(Ka.trace())
    assert abs(core.frobenius_norm() - float(Ka.norm())) < 1e-10 * float(Ka.norm())
    erank = float(Ka.trace()) ** 2 / float(Ka.norm()) ** 2
    assert abs(core.effective_rank() - erank) < 1e-9 * erank
    assert core.rank_bound() >= int(torch.linalg.matrix_rank(Ka))
    temporal = view(core.operator(), "temporal").to_dense().reshape(traj.shape[0] * traj.shape[1], -1)
    assert _rel(core.temporal_gram(), temporal) < 1e-10


def test_jacobians_autodiff_backend_and_adjoints(case):
    _, _, traj = case
    gen = torch.Generator().manual_seed(1)
    J, Ja = param_jacobian(traj), param_jacobian(traj, backend="autodiff")
    assert _rel(J.to_matrix(), Ja.to_matrix()) < 1e-12
    ops = [J, Ja, SiteStateJacobian(traj), propagator(traj), joint_propagator(traj), inverse_propagator(traj),
           VisibleSelection(traj),
           readout_jacobian(traj), parameter_operator(traj, backend="kronecker"), ntk(traj), output_ntk(traj),
           state_fisher(traj)]
    for op in ops:
        x = torch.randn(op.shape_in, generator=gen, dtype=DT)
        y = torch.randn(op.shape_out, generator=gen, dtype=DT)
        lhs, rhs = float((op.apply(x) * y).sum()), float((x * op.T.apply(y)).sum())
        assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs)), type(op).__name__


def test_propagator_inverts_inverse_propagator(case):
    _, _, traj = case
    gen = torch.Generator().manual_seed(2)
    P, Pinv = joint_propagator(traj), inverse_propagator(traj)
    q = torch.randn(*traj.joint_shape, generator=gen, dtype=DT)
    assert _rel(P.apply(Pinv.apply(q)), q) < 1e-10
    assert _rel(Pinv.apply(P.apply(q)), q) < 1e-10
    assert _rel(P.T.apply(Pinv.T.apply(q)), q) < 1e-10
    # C P is the visible block of P
    assert _rel(propagator(traj).apply(q), VisibleSelection(traj).apply(P.apply(q))) < 1e-12


def _targets(traj):
    gen = torch.Generator().manual_seed(3)
    if traj.outputs.dtype.is_floating_point:
        return torch.randn(traj.outputs.shape, generator=gen, dtype=DT)


@pytest.mark.parametrize("name", ["mlp_tanh", "attn_causal", "attn_bidir", "adapter"])
def test_gradient_identity_and_first_order_sgd_step(name):
    model, x = _make(name)
    traj0 = record(model, x)
    y = _targets(traj0)
    traj = record(model, x, targets=y)
    # gradient identity ∇θ L = Jθ* P* C* e (traj.adjoint = P* C* e)
    names = traj.param_names
    params = {n: traj.params[n].clone().requires_grad_(True) for n in names}
    loss = ((model.output(model.visible_states(params, x), traj.readout) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    mine = param_jacobian(traj).adjoint_dict(traj.adjoint)
    for n, g in zip(names, grads, strict=False):
        assert _rel(mine[n], g) < 1e-10, n
    # one SGD step moves the visible states by −η Θ e to first order (remainder O(η²))
    predicted = -ntk(traj).apply(traj.error)
    errs = []
    for eta in (1e-3, 5e-4):
        new = {n: traj.params[n] - eta * g for n, g in zip(names, grads, strict=False)}
        moved = model.visible_states({**traj.params, **new}, x) - traj.states
        errs.append(_rel(moved, eta * predicted))
    assert errs[0] < 1e-2
    assert 0.35 < errs[1] / errs[0] < 0.65  # halves with η: first order is exact


# ----------------------------------------------------------------------------- recurrences as an instance
RNNS = {
    "rnn": lambda: VanillaRNN(2, 4, 2, gain=1.3, dtype=DT),
    "leaky": lambda: LeakyRNN(2, 4, 2, dt=0.3, form="current", gain=1.5, dtype=DT),
    "gru": lambda: GRU(2, 4, 2, dtype=DT),
    "lstm": lambda: LSTM(2, 3, 2, dtype=DT),
}


@pytest.mark.parametrize("name", sorted(RNNS))
def test_recurrent_operators_are_the_schur_complement_of_the_joint_ones(name):
    torch.manual_seed(0)
    rnn = _bias_noise(RNNS[name]())
    x = torch.randn(3, 5, 2, dtype=DT)
    y = torch.randn(3, 5, 2, dtype=DT)
    rec = record(rnn, x, targets=y)  # the recurrent path: P = (I − A S)⁻¹, K = M (G ⊗ I) M*
    gen = record(RecurrentSites(rnn), x, targets=y)  # the general path on the joint state (a, z)
    assert torch.equal(gen.states, rec.states)
    assert _rel(ntk(gen).to_matrix(), ntk(rec).to_matrix()) < 1e-10
    assert _rel(param_jacobian(gen).T.apply(gen.adjoint), param_jacobian(rec).T.apply(rec.adjoint)) < 1e-10
    # Schur complement: injecting at the state block z gives P_rec; at the slots, P_rec M; K_rec = M K_joint M*
    lay = gen.layout
    z = lay.slots["z"]
    Pj = propagator(gen)  # C P
    E = torch.zeros(*rec.shape, *gen.joint_shape, dtype=DT)
    E[..., z.offset:z.offset + z.width] = 0
    B, T, H = rec.shape
    Ez = torch.zeros(B * T * H, *gen.joint_shape, dtype=DT)
    Ez.view(B, T, H, B, T, -1)[..., z.offset:z.offset + z.width] = torch.eye(B * T * H, dtype=DT).view(
        B, T, H, B, T, H)
    assert _rel(Pj.matmat(Ez).reshape(B * T * H, -1).T, propagator(rec).to_matrix()) < 1e-10
    # M: the slots -> state coupling (the recurrent core's M), read off the recurrent K's factor
    core = kronecker_core(rec)
    slots = [s for s in lay.slots.values() if s.kind == "site"]
    n_q = sum(s.width for s in slots)
    Eq = torch.zeros(n_q * B * T, *gen.joint_shape, dtype=DT)
    cols = []
    i = 0
    for s in slots:
        for b in range(B):
            for t in range(T):
                for r in range(s.width):
                    Eq[i, b, t, s.offset + r] = 1.0
                    Zs = {q.name: torch.zeros(1, B * T, q.width, dtype=DT) for q in slots}
                    Zs[s.name][0, b * T + t, r] = 1.0
                    cols.append(core.M(Zs)[0].reshape(-1))
                    i += 1
    M = torch.stack(cols, 1)  # [B·T·H, n_q·B·T]
    CPEq = Pj.matmat(Eq).reshape(n_q * B * T, -1).T
    assert _rel(CPEq, propagator(rec).to_matrix() @ M) < 1e-10
    Kq = parameter_operator(gen, backend="kronecker").to_matrix()
    sel = Eq.reshape(n_q * B * T, -1)
    Kqq = sel @ Kq @ sel.T
    assert _rel(M @ Kqq @ M.T, parameter_operator(rec, backend="kronecker").to_matrix()) < 1e-10


# ----------------------------------------------------------------------------- torch layouts
@pytest.mark.parametrize("causal,norm_first,bias", [(False, False, True), (True, False, True), (True, True, False),
                                                    (False, True, True)])
def test_transformer_matches_torch_layers(causal, norm_first, bias):
    torch.manual_seed(0)
    m = _bias_noise(Transformer(3, 8, 2, 2, 12, 2, max_len=7, causal=causal, norm_first=norm_first, bias=bias,
                                dtype=DT))
    with torch.no_grad():
        for k, p in m.named_parameters():
            if "norm" in k:
                p.add_(0.2 * torch.randn_like(p))
    ref = m.to_torch()
    assert isinstance(ref.blocks[0], nn.TransformerEncoderLayer)
    ref.eval()
    x = torch.randn(3, 7, 3, dtype=DT)
    with torch.no_grad():
        z, y = m(x)
        assert _rel(y, ref(x)) < 1e-12
        assert _rel(z[..., -8:], ref.encode(x)) < 1e-12
    back = Transformer.from_torch(ref)
    with torch.no_grad():
        assert torch.equal(back(x)[1], y)
    # from a bare list of encoder layers (torch's default: post-LN) and the attention module alone
    layers = [nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, activation="gelu", batch_first=True, dtype=DT)
              for _ in range(2)]
    m2 = Transformer.from_torch(layers, input_dim=3, output_dim=2, max_len=7, causal=causal)
    with torch.no_grad():
        h = m2.embed(x) + m2.pos[:7]
        mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=DT) if causal else None
        for layer in layers:
            layer.eval()
            h = layer(h, src_mask=mask, is_causal=causal)
        assert _rel(m2(x)[0][..., -8:], h) < 1e-12


def test_transformer_attention_matches_multihead_attention():
    torch.manual_seed(0)
    m = _bias_noise(Transformer(3, 8, 4, 1, 6, 1, max_len=5, layer_norm=False, causal=True, dtype=DT))
    x = torch.randn(2, 5, 3, dtype=DT)
    traj = record(m, x)
    lay = traj.layout
    h0 = traj.joint[..., lay.slots["h0"].offset:lay.slots["h0"].offset + 8]
    o = traj.joint[..., lay.slots["block0.o"].offset:lay.slots["block0.o"].offset + 8]
    mha = m.blocks[0].self_attn
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    with torch.no_grad():
        ref, _ = mha(h0, h0, h0, attn_mask=mask, need_weights=False)
    assert _rel(o, ref) < 1e-12


def test_mlp_round_trips_through_torch():
    torch.manual_seed(0)
    m = _bias_noise(DeepMLP(3, 5, 3, 2, "gelu", dtype=DT))
    seq = m.to_torch()
    x = torch.randn(4, 3, dtype=DT)
    with torch.no_grad():
        assert _rel(m(x)[1], seq(x)) < 1e-12
        assert torch.equal(DeepMLP.from_torch(seq)(x)[1], m(x)[1])


# ----------------------------------------------------------------------------- bad input
def test_adapter_refuses_what_it_cannot_see():
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="weight sharing"):
        ModuleAdapter(nn.Sequential(lin, nn.Tanh(), lin))
    with pytest.raises(ValueError, match="no nn.Linear"):
        ModuleAdapter(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match="outside nn.Linear"):
        ModuleAdapter(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="outside nn.Linear"):
        ModuleAdapter(nn.MultiheadAttention(4, 2))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="called twice"):
        record(ModuleAdapter(Twice()), x)
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False))
    with pytest.raises(ValueError, match="in place"):
        record(ModuleAdapter(bn), x)
    bn.eval()
    record(ModuleAdapter(bn), x)  # eval mode: a pure function, accepted
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="dropout in train mode"):
        record(ModuleAdapter(drop), x)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + 0.1 * torch.randn_like(x)

    with pytest.raises(ValueError, match="random"):
        record(ModuleAdapter(Noisy()), x)
    with pytest.raises(TypeError, match="ModuleAdapter"):
        record(nn.Linear(3, 3), x)


def test_bad_transformer_inputs_and_masks_are_named():
    m = Transformer(3, 8, 2, 1, 6, 2, max_len=6, dtype=DT)
    with pytest.raises(ValueError, match="lengths \\[4, 5\\]"):
        record(m, [torch.randn(4, 3, dtype=DT), torch.randn(5, 3, dtype=DT)])
    with pytest.raises(ValueError, match="max_len"):
        record(m, torch.randn(2, 7, 3, dtype=DT))
    with pytest.raises(ValueError, match="\\[B, T, 3\\]"):
        record(m, torch.randn(2, 4, 2, dtype=DT))
    x = torch.randn(2, 4, 3, dtype=DT)
    y = torch.randn(2, 4, 2, dtype=DT)
    with pytest.raises(ValueError, match="mask must have"):
        record(m, x, targets=y, mask=torch.ones(2, 5))
    record(m, x, targets=y, mask=torch.ones(2, 4))  # [B, T] is valid
    with pytest.raises(ValueError, match="z0"):
        record(m, x, torch.zeros(2, 8, dtype=DT))
    with pytest.raises(TypeError, match="time"):
        step_jacobians(record(m, x))
    with torch.no_grad():
        m.blocks[0].linear1.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match="block0.ff1.*t=0.*b=0"):
        record(m, x)
    with pytest.raises(ValueError, match="tokens"):
        record(Transformer(vocab_size=4, d_model=4, n_heads=1, max_len=4), torch.tensor([[0, 5]]))


def test_existing_estimators_and_views_accept_site_models():
    from kpflow.estimators import effective_rank

    model, x = _make("attn_causal")
    traj = record(model, x)
    theta = ntk(traj)
    dense = theta.to_matrix()
    exact = float(dense.trace()) ** 2 / float((dense ** 2).sum())
    est = effective_rank(theta, 200, seed=0)
    assert abs(est.value - exact) < 5 * est.stderr + 1e-9 * exact
    tv = view(theta, "temporal").to_dense()
    assert tv.shape == (2, 3, 2, 3)


class _Sparse(SiteModel):
    """A slot written at some positions only: ``a_t = W z_{t-1} + E x_t`` at even t, ``z_t = tanh(a_t)`` there and
    ``z_t = tanh(E x_t + z_{t-1})`` at odd t (the entries of ``a`` at odd t are never written)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 3, dtype=DT) / 2)
        self.E = nn.Parameter(torch.randn(3, 2, dtype=DT) / 2)
        self.readout = nn.Linear(3, 1, dtype=DT)

    def positions(self, inputs):
        return int(inputs.shape[0]), int(inputs.shape[1])

    def run_sites(self, params, inputs, sites):
        z = torch.zeros(inputs.shape[0], 3, dtype=inputs.dtype)
        for t in range(inputs.shape[1]):
            if t % 2 == 0:
                z = sites.state("z", torch.tanh(sites.affine("a", {"W": z, "E": inputs[:, t]}, at=t)), at=t)
            else:
                z = sites.state("z", torch.tanh(sites.affine("b", {"E": inputs[:, t]}, at=t) + z), at=t)

    def output(self, states, readout_params=None):
        p = self.readout_params() if readout_params is None else readout_params
        return states @ p["weight"].T + p["bias"]


def test_never_written_joint_entries_are_inert_variables():
    # an entry no site writes is a variable with f_i = 0: P and P⁻¹ act on it as the identity, so P P⁻¹ = I on the
    # whole joint state (before: P dropped the injection there, P P⁻¹ q = 0 on those entries)
    torch.manual_seed(0)
    model = _Sparse()
    traj = record(model, torch.randn(2, 5, 2, dtype=DT))
    P, Pinv = joint_propagator(traj), inverse_propagator(traj)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(*traj.joint_shape, generator=gen, dtype=DT)
    for lhs in (P.apply(Pinv.apply(q)), Pinv.apply(P.apply(q)), P.T.apply(Pinv.T.apply(q)),
                Pinv.T.apply(P.T.apply(q))):
        assert _rel(lhs, q) < 1e-12
    a = traj.layout.slots["a"]
    dead = torch.zeros(traj.joint_shape, dtype=DT)
    dead[:, 1::2, a.offset:a.offset + a.width] = q[:, 1::2, a.offset:a.offset + a.width]
    assert _rel(P.apply(dead), dead) < 1e-15 and _rel(P.T.apply(dead), dead) < 1e-15
    # the visible NTK is that of jacrev of the model (dead entries carry no parameter dependence)
    J = _jacrev_states(model, traj)
    Q = torch.randn(3, *traj.shape, generator=gen, dtype=DT)
    want = (J @ (J.T @ Q.reshape(3, -1).T)).T.reshape(Q.shape)
    assert _rel(ntk(traj).matmat(Q), want) < 1e-10
