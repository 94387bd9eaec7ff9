"""The bifurcation channel of the state-space NTK, and its comparison with a normal form.

Near a codimension-one bifurcation of a fixed point ``z̄`` the state splits as
``z = z̄ + α ⊗ v + ε`` with ``v`` the critical eigenvector and ``α`` the centre-manifold coordinate
(Hazelden & Shea-Brown, arXiv 2605.12763). The state Jacobian ``J = dz/dθ = P Jθ`` then has a
dominant part ``(d_μα ⊗ v)(∇_θ μ)ᵀ``: a temporal profile times the critical spatial direction,
amplified as the distance to the bifurcation shrinks.

``bifurcation_channel`` measures this without assuming it. With ``V`` an orthonormal basis of the
critical subspace (``[H, 1]`` for a real eigenvalue, ``[H, 2]`` = span(Re q, Im q) for a complex
pair) it forms ``Y = (I ⊗ Vᵀ) J`` (one reverse-mode product per (trial, time, column of V)), takes
the top ``r`` singular triples ``(σ_k, u_k, w_k)`` of ``Y`` (``r = 1``; ``2`` for Neimark–Sacker/Hopf)
and defines the channel as the orthogonal projection of ``J`` onto ``c_k = (I ⊗ V) u_k``:

    ``J_c = Σ_k c_k c_kᵀ J = Σ_k σ_k c_k w_kᵀ``,  ``Θ_c = J_c J_cᵀ = Σ_k σ_k² c_k c_kᵀ``,
    ``J_r = J − J_c``,  ``Θ_r = J_r J_rᵀ``,

so ``tr Θ = tr Θ_c + tr Θ_r`` exactly; the channel's shares are ``tr Θ_c / tr Θ`` and
``‖Θ_c‖_F / ‖Θ‖_F``. ``u_k`` (shape ``[B, T, r_s]``) is the temporal profile, ``w_k`` the parameter
direction of the channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kpflow.operators import LinearOperator

__all__ = [
    "ChannelDecomposition", "JacobianSummary", "bifurcation_channel", "critical_subspace", "jacobian_summary",
    "NormalFormMatch", "normal_form_match", "effective_rank",
]


def effective_rank(M: torch.Tensor) -> float:
    """``tr(M)² / ‖M‖_F²`` of a PSD matrix (participation ratio)."""
    tr = float(torch.diagonal(M).sum())
    fro2 = float(M.pow(2).sum())
    return tr * tr / fro2 if fro2 > 0 else float("nan")


def critical_subspace(right_vector: torch.Tensor) -> torch.Tensor:
    """Orthonormal real basis ``[H, r_s]`` of a critical eigenvector: ``[H, 1]`` for a real one,
    span(Re q, Im q) ``[H, 2]`` for a complex one."""
    q = torch.as_tensor(right_vector)
    if q.dim() != 1:
        raise ValueError(f"the critical eigenvector must be a vector [H], got shape {tuple(q.shape)}")
    if q.is_complex():
        re, im = q.real, q.imag
        scale = float(q.abs().max())
        if float(im.norm()) <= 1e-10 * max(scale, 1e-300) or float(re.norm()) <= 1e-10 * max(scale, 1e-300):
            v = re if float(re.norm()) >= float(im.norm()) else im
            return (v / v.norm()).unsqueeze(-1)
        Q, _ = torch.linalg.qr(torch.stack([re, im], -1))
        return Q
    return (q / q.norm()).unsqueeze(-1)


# ------------------------------------------------------------------------------ exact summaries
@dataclass
class JacobianSummary:
    """Exact spectral summaries of ``Θ = J Jᵀ`` from every column of ``J = dz/dθ``.

    Attributes:
        fisher: ``F = Jᵀ J`` ``[n_params, n_params]`` (same non-zero spectrum as Θ).
        trace, frobenius: ``tr Θ`` and ``‖Θ‖_F``; ``effective_rank`` = ``tr² / ‖·‖_F²``.
        temporal, spatial: the compressions of Θ keeping (trial, time) ``[BT, BT]`` and hidden
            ``[H, H]`` (``kpflow.operators.view`` definitions), with their effective ranks.
        top_direction, top_value: top eigenvector of ``F`` (dominant parameter direction, the top
            right singular vector of ``J``) and its eigenvalue ``σ₁²``.
    """

    fisher: torch.Tensor
    trace: float
    frobenius: float
    effective_rank: float
    temporal: torch.Tensor
    spatial: torch.Tensor
    temporal_effective_rank: float
    spatial_effective_rank: float
    top_direction: torch.Tensor
    top_value: float


def jacobian_summary(traj, param_names=None, chunk_size: int = 256, max_params: int = 8192,
                     progress: bool = False) -> JacobianSummary:
    """Exact ``tr Θ``, ``‖Θ‖_F``, effective ranks (full, temporal, spatial) and the dominant parameter
    direction of the state-space NTK ``Θ = J Jᵀ`` (``J = kpflow.kernels.state_jacobian``).

    Applies ``J`` to every parameter basis vector (in chunks) and ``Jᵀ`` to the results, so the cost
    is ``4·n_params`` sweeps through time; refuses above ``max_params`` parameters (use the
    randomized estimators in ``kpflow.estimators`` there).
    """
    from kpflow.kernels import state_jacobian

    J = state_jacobian(traj, param_names)
    n = J.shape_in[0]
    if n > max_params:
        raise ValueError(
            f"jacobian_summary builds the {n}x{n} Fisher matrix exactly; {n} parameters exceed max_params="
            f"{max_params}. Restrict param_names, raise max_params, or use kpflow.estimators for randomized estimates."
        )
    B, T, H = traj.shape
    F = torch.zeros(n, n, dtype=traj.dtype, device=traj.device)
    temporal = torch.zeros(B * T, B * T, dtype=traj.dtype, device=traj.device)
    spatial = torch.zeros(H, H, dtype=traj.dtype, device=traj.device)
    starts = range(0, n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="exact sNTK summaries", leave=False)
    for a in starts:
        b = min(a + chunk_size, n)
        E = torch.zeros(b - a, n, dtype=traj.dtype, device=traj.device)
        E[torch.arange(b - a), torch.arange(a, b)] = 1.0
        Jc = J.matmat(E)                      # [k, B, T, H]
        F[:, a:b] = J.rmatmat(Jc).T           # columns of Jᵀ J
        yt = Jc.sum(-1).reshape(b - a, B * T)
        ys = Jc.sum((1, 2))
        temporal += yt.T @ yt
        spatial += ys.T @ ys
    F = 0.5 * (F + F.T)
    tr = float(torch.diagonal(F).sum())
    fro = float(F.norm())
    evals, evecs = torch.linalg.eigh(F)
    return JacobianSummary(F, tr, fro, tr * tr / fro ** 2 if fro > 0 else float("nan"), temporal, spatial,
                           effective_rank(temporal), effective_rank(spatial), evecs[:, -1], float(evals[-1]))


# ------------------------------------------------------------------------------- the channel
@dataclass
class ChannelDecomposition:
    """The bifurcation channel of ``J = dz/dθ`` and of ``Θ = J Jᵀ`` (see module docstring).

    Attributes:
        directions: ``V`` ``[H, r_s]`` orthonormal critical spatial directions.
        singular_values: ``σ_k`` ``[r]``; temporal_profiles: ``u_k`` ``[r, B, T, r_s]`` (unit norm);
        channel_vectors: ``c_k = (I ⊗ V) u_k`` ``[r, B, T, H]``; param_directions: ``w_k`` ``[r, n]``.
        trace, frobenius: ``tr Θ`` and ``‖Θ‖_F`` (exact or estimated, see ``totals``).
        trace_fraction: ``Σσ_k² / tr Θ``; frobenius_fraction: ``‖Θ_c‖_F / ‖Θ‖_F = sqrt(Σσ_k⁴) / ‖Θ‖_F``.
        spatial_fraction: share of ``tr Θ`` in the whole critical subspace, ``‖(I⊗Vᵀ) J‖_F² / tr Θ``
            (≥ trace_fraction).
    """

    directions: torch.Tensor
    singular_values: torch.Tensor
    temporal_profiles: torch.Tensor
    channel_vectors: torch.Tensor
    param_directions: torch.Tensor
    trace: float
    frobenius: float
    trace_fraction: float
    frobenius_fraction: float
    spatial_fraction: float
    totals: str
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.singular_values.shape[0])

    def channel_ntk(self) -> LinearOperator:
        """``Θ_c = Σ_k σ_k² c_k c_kᵀ`` as a (PSD) operator on ``[B, T, H]``."""
        from kpflow.operators import FunctionOperator

        C = self.channel_vectors
        s2 = self.singular_values ** 2
        shape = tuple(C.shape[1:])

        def mm(X):
            coef = torch.einsum("kbth,rbth->kr", X, C) * s2
            return torch.einsum("kr,rbth->kbth", coef, C)

        return FunctionOperator(mm, mm, shape, shape, C.dtype, C.device, batched=True, is_psd=True)

    def projector(self) -> LinearOperator:
        """``Π_c = Σ_k c_k c_kᵀ`` (orthogonal projector onto the channel's state-space vectors)."""
        from kpflow.operators import FunctionOperator

        C = self.channel_vectors
        shape = tuple(C.shape[1:])

        def mm(X):
            return torch.einsum("kr,rbth->kbth", torch.einsum("kbth,rbth->kr", X, C), C)

        return FunctionOperator(mm, mm, shape, shape, C.dtype, C.device, batched=True, is_psd=True)

    def split_jacobian(self, J: LinearOperator) -> tuple[LinearOperator, LinearOperator]:
        """``(J_c, J_r) = (Π_c J, (I − Π_c) J)``."""
        Pc = self.projector()
        return Pc @ J, J - Pc @ J

    def split_ntk(self, theta: LinearOperator) -> tuple[LinearOperator, LinearOperator]:
        """``(Θ_c, Θ_r) = (Π_c Θ Π_c, (I − Π_c) Θ (I − Π_c))``."""
        from kpflow.operators import IdentityOperator

        Pc = self.projector()
        Q = IdentityOperator(Pc.shape_in, Pc.dtype, Pc.device) - Pc
        return Pc @ theta @ Pc, Q @ theta @ Q

    def summary(self) -> dict:
        return {"rank": self.rank, "sigma": [float(s) for s in self.singular_values], "trace": self.trace,
                "frobenius": self.frobenius, "trace_fraction": self.trace_fraction,
                "frobenius_fraction": self.frobenius_fraction, "spatial_fraction": self.spatial_fraction,
                "totals": self.totals, **self.info}


def bifurcation_channel(traj, critical_vector: torch.Tensor, rank: int | None = None, param_names=None,
                        totals: str | JacobianSummary = "exact", chunk_size: int = 256,
                        max_params: int = 8192) -> ChannelDecomposition:
    """Split ``J = dz/dθ`` and ``Θ = P K P*`` of a recorded run into the bifurcation channel and a residual.

    Args:
        traj: a ``kpflow.kernels.Trajectory`` recorded near the bifurcation.
        critical_vector: the critical right eigenvector ``q`` ``[H]`` (complex for a pair) or an
            orthonormal basis ``[H, r_s]``.
        rank: channel rank (default 1 for a real direction, 2 for a complex pair).
        totals: ``"exact"`` (``jacobian_summary``: every column of ``J``), a precomputed
            ``JacobianSummary``, a ``(tr Θ, ‖Θ‖_F)`` pair (e.g. randomized estimates), or
            ``"dense"`` (``Θ.to_dense()`` — small problems only).
    """
    from kpflow.kernels import ntk, state_jacobian

    V = critical_vector if (critical_vector.dim() == 2) else critical_subspace(critical_vector)
    V = V.to(dtype=traj.dtype, device=traj.device)
    B, T, H = traj.shape
    if V.shape[0] != H:
        raise ValueError(f"critical direction has {V.shape[0]} entries but the model's state has H={H}")
    r_s = V.shape[1]
    r = (1 if r_s == 1 else 2) if rank is None else int(rank)
    if not 1 <= r <= B * T * r_s:
        raise ValueError(f"channel rank must be between 1 and B*T*r_s = {B * T * r_s}, got {r}")
    J = state_jacobian(traj, param_names)
    # G = Jᵀ (I ⊗ V): one reverse product per (trial, time, column of V)
    m = B * T * r_s
    G_cols = []
    for a in range(0, m, chunk_size):
        b = min(a + chunk_size, m)
        idx = torch.arange(a, b)
        bt, j = idx // r_s, idx % r_s
        probes = torch.zeros(b - a, B * T, H, dtype=traj.dtype, device=traj.device)
        probes[torch.arange(b - a), bt] = V[:, j].T
        G_cols.append(J.rmatmat(probes.reshape(b - a, B, T, H)))
    G = torch.cat(G_cols, 0).T  # [n_params, m]
    M = G.T @ G                 # (I⊗V)ᵀ Θ (I⊗V), [m, m]
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    evals, evecs = evals.flip(0)[:r].clamp_min(0), evecs.flip(1)[:, :r]
    sig = evals.sqrt()
    U = evecs.T.reshape(r, B, T, r_s)
    C = torch.einsum("rbtj,hj->rbth", U, V)
    W = (G @ evecs) / sig.clamp_min(1e-300)
    spatial_total = float(torch.diagonal(M).sum())
    if isinstance(totals, JacobianSummary):
        tr, fro, how = totals.trace, totals.frobenius, "exact"
    elif isinstance(totals, tuple) and len(totals) == 2:
        tr, fro, how = float(totals[0]), float(totals[1]), "given"
    elif totals == "exact":
        s = jacobian_summary(traj, param_names, chunk_size, max_params)
        tr, fro, how = s.trace, s.frobenius, "exact"
    elif totals == "dense":
        D = ntk(traj, param_names).to_matrix()
        tr, fro, how = float(torch.diagonal(D).sum()), float(D.norm()), "dense"
    else:
        raise ValueError(f"totals must be 'exact', 'dense' or a JacobianSummary, got {totals!r}")
    s2 = evals
    return ChannelDecomposition(
        V, sig, U, C, W.T, tr, fro,
        float(s2.sum()) / tr if tr > 0 else float("nan"),
        math.sqrt(float(s2.pow(2).sum())) / fro if fro > 0 else float("nan"),
        spatial_total / tr if tr > 0 else float("nan"), how)


# --------------------------------------------------------------------------- normal-form match
@dataclass
class NormalFormMatch:
    """How well the sNTK restricted to one parameter direction matches a normal form's prediction.

    ``measured`` = ``(I ⊗ pᴴ)(J w)`` ``[B, T]`` (``[B, T, 2]`` planar for Neimark–Sacker): the
    centre-coordinate sensitivity along ``w``; ``predicted`` = ``d_μα · (∂μ/∂θ · w)`` (+ the ω term for
    Neimark–Sacker) from the normal-form model run on the projected initial state and input drive.
    ``cubic`` is the normal form's cubic coefficient (complex for Neimark–Sacker).
    ``correlation`` = cosine of the two profiles; ``magnitude_ratio`` =
    ``‖measured‖ / ‖predicted‖`` (1 = perfect; the restricted kernels' norms differ by its square).
    """

    kind: str
    mu: float
    cubic: float | complex
    mu_speed: float
    measured: torch.Tensor
    predicted: torch.Tensor
    correlation: float
    magnitude_ratio: float

    def summary(self) -> dict:
        return {"kind": self.kind, "mu": self.mu, "cubic": str(self.cubic), "mu_speed": self.mu_speed,
                "correlation": self.correlation, "magnitude_ratio": self.magnitude_ratio}


def _normal_form_prediction(kind, lam_c, cubic, alpha0, forcing, T, dtype, device):
    """``d_μα`` (and for Neimark–Sacker also ``d_ωα``) of the normal form run on the projected data."""
    from .normal_forms import FlipMap, NeimarkSackerMap, PitchforkMap, mu_sensitivity

    if kind == "neimark-sacker":
        mu, omega = abs(lam_c) - 1.0, abs(math.atan2(lam_c.imag, lam_c.real))
        nf = NeimarkSackerMap(mu, omega, cubic, dtype=dtype, device=device)
        d_mu, traj = mu_sensitivity(nf, alpha0, T, forcing)
        h = 1e-6  # ω is fixed in the model: central difference of the unroll (float64)
        outs = []
        for sgn in (1.0, -1.0):
            m2 = NeimarkSackerMap(mu, omega + sgn * h, cubic, dtype=dtype, device=device)
            with torch.no_grad():
                outs.append(m2.unroll(m2.cell_params(), forcing, alpha0))
        return mu, d_mu, (outs[0] - outs[1]) / (2 * h)
    mu = lam_c.real - 1.0 if kind == "pitchfork" else -lam_c.real - 1.0
    nf = (PitchforkMap if kind == "pitchfork" else FlipMap)(mu, cubic=cubic, dtype=dtype, device=device)
    d_mu, _ = mu_sensitivity(nf, alpha0, T, forcing)
    return mu, d_mu, None


def normal_form_match(traj, fixed_point: torch.Tensor, direction: torch.Tensor, x_bar: torch.Tensor | None = None,
                      param_names=None, eigenvalue: complex | None = None) -> NormalFormMatch:
    """Compare the sNTK restricted to the parameter direction ``w = direction`` (flat, in
    ``state_jacobian`` order) with the prediction of the normal form of the fixed point's critical
    eigenvalue (Hazelden & Shea-Brown): pitchfork for λ ≈ +1, flip for λ ≈ −1, planar Neimark–Sacker
    for a complex pair. The critical eigenvalue is the one of largest modulus, or the one nearest
    ``eigenvalue``.

    Centre coordinate ``α = pᴴ(z − z̄)`` (``p`` the left eigenvector, ``pᴴq = 1``; complex → planar
    ``(Re α, Im α)`` for Neimark–Sacker). The normal form gets ``μ = λ − 1`` (``−λ − 1``, ``|λ| − 1``),
    the network's centre-manifold cubic coefficient (``⅙pᵀ[C(q,q,q) + 3B(q,w)]``; ``½pᴴC(q,q,q̄)``
    for Neimark–Sacker, quadratic corrections omitted there), initial state ``pᴴ(z₀ − z̄)`` and forcing
    ``pᴴ(F(z̄, x_t) − F(z̄, x̄))``. Predicted sensitivity: ``d_μα · (∂μ/∂θ·w)`` (+ ``d_ωα · (∂ω/∂θ·w)``
    for Neimark–Sacker) with ``∂λ/∂θ·w = pᴴ (∂A/∂θ·w) q``.
    """
    from kpflow.kernels import param_jacobian, state_jacobian

    from .bifurcations import bilinear, directional_derivatives
    from .fixedpoints import constant_input_map, eig_with_left

    model, params = traj.model, traj.params
    dtype, device = traj.dtype, traj.device
    fmap = constant_input_map(model, x_bar, params, dtype=dtype, device=device)
    zb = torch.as_tensor(fixed_point, dtype=dtype, device=device).reshape(-1)
    H = zb.shape[0]
    A = fmap.jacobians(zb.unsqueeze(0))[0]
    lam, R, L = eig_with_left(A)
    i = int(torch.argmax(lam.abs())) if eigenvalue is None else int(torch.argmin((lam - complex(eigenvalue)).abs()))
    lam_c = complex(lam[i])
    is_complex = abs(lam_c.imag) > 1e-8 * max(1.0, abs(lam_c))
    kind = "neimark-sacker" if is_complex else ("flip" if lam_c.real < 0 else "pitchfork")
    eye = torch.eye(H, dtype=dtype, device=device)
    if is_complex:
        q, p = R[:, i], L[:, i]                       # pᴴ q = 1 from eig_with_left
        qr, qi = q.real, q.imag
        # C(q,q,q̄) for q = u + iv is C(u,u,u) + C(u,v,v) + i[C(u,u,v) + C(v,v,v)]; the mixed terms come
        # from polarisation, C(u±v) = C(u) ± 3C(u,u,v) + 3C(u,v,v) ± C(v) (C symmetric trilinear).
        def C3(x):
            return directional_derivatives(fmap, zb, x)[1]

        Cu, Cv, Cp, Cm = C3(qr), C3(qi), C3(qr + qi), C3(qr - qi)
        Cuuv, Cuvv = (Cp - Cm - 2 * Cv) / 6.0, (Cp + Cm - 2 * Cu) / 6.0
        Cqqqb = (Cu + Cuvv) + 1j * (Cuuv + Cv)
        cubic = complex(0.5 * torch.vdot(p, Cqqqb.to(p.dtype)))
    else:
        q = R[:, i].real
        q = q / q.norm()
        p = L[:, i].real
        p = p / torch.dot(p, q)
        Bqq, Cqqq = directional_derivatives(fmap, zb, q)
        a = 0.5 * float(torch.dot(p, Bqq))
        rhs = Bqq - 2 * a * q
        w2 = torch.linalg.lstsq((eye - A).unsqueeze(0), rhs.reshape(1, -1, 1)).solution.reshape(-1) \
            if device.type == "cpu" else torch.linalg.pinv(eye - A) @ rhs
        w2 = w2 - torch.dot(p, w2) * q
        cubic = float(torch.dot(p, Cqqq + 3 * bilinear(fmap, zb, q, w2))) / 6.0
        if cubic == 0.0:
            cubic = -1e-12
    # ∂λ/∂θ · w  (eigenvalue perturbation, pᴴq = 1)
    J = state_jacobian(traj, param_names)
    layout = param_jacobian(traj, param_names).layout
    wflat = torch.as_tensor(direction, dtype=dtype, device=device).reshape(-1)
    if wflat.shape[0] != layout.numel:
        raise ValueError(f"direction has {wflat.shape[0]} entries but the parameters {list(layout.names)} have "
                         f"{layout.numel}")
    wdict = {k: v[0] for k, v in layout.unflatten(wflat.unsqueeze(0)).items()}  # batched: works for 0-d params
    primal = {n: params[n] for n in layout.names}

    def Av(sub, v):
        pp = {**params, **sub}
        return torch.func.jvp(lambda y: fmap(y.unsqueeze(0), pp)[0], (zb,), (v,))[1]

    def dA(v):
        return torch.func.jvp(lambda sub: Av(sub, v), (primal,), (wdict,))[1]

    B, T, _ = traj.shape
    Jw = J.apply(wflat)                                   # [B, T, H]
    with torch.no_grad():
        Fbar = fmap(zb.unsqueeze(0))[0]
        drive = model.step(params, zb.expand(B * T, H), traj.inputs.reshape(B * T, -1)).reshape(B, T, H) - Fbar
    if is_complex:
        dlam = complex(torch.vdot(p, (dA(q.real) + 1j * dA(q.imag)).to(p.dtype)))
        mu_speed = (lam_c.conjugate() * dlam).real / abs(lam_c)                  # d|λ|
        om_speed = (dlam / lam_c).imag * (1.0 if lam_c.imag >= 0 else -1.0)      # d arg λ (upper half)
        pc = p.conj() if lam_c.imag >= 0 else p

        def planar(x):  # α = pᴴ x as (Re, Im)
            a_ = torch.einsum("...h,h->...", x.to(pc.dtype), pc)
            return torch.stack([a_.real, a_.imag], -1)

        measured = planar(Jw)
        alpha0, forcing = planar(traj.z0 - zb), planar(drive)
        mu, d_mu, d_om = _normal_form_prediction(kind, lam_c if lam_c.imag >= 0 else lam_c.conjugate(),
                                                 cubic if lam_c.imag >= 0 else cubic.conjugate(),
                                                 alpha0, forcing, T, dtype, device)
        predicted = d_mu * mu_speed + d_om * om_speed
    else:
        dlam = float(torch.dot(p, dA(q)))
        mu_speed = dlam if kind == "pitchfork" else -dlam
        measured = torch.einsum("bth,h->bt", Jw, p)
        alpha0, forcing = ((traj.z0 - zb) @ p).reshape(B, 1), (drive @ p).reshape(B, T, 1)
        mu, d_mu, _ = _normal_form_prediction(kind, lam_c, cubic, alpha0, forcing, T, dtype, device)
        predicted = d_mu[..., 0] * mu_speed
    nm, npred = float(measured.norm()), float(predicted.norm())
    corr = float((measured * predicted).sum()) / (nm * npred) if nm > 0 and npred > 0 else float("nan")
    return NormalFormMatch(kind, mu, cubic, mu_speed, measured, predicted, corr,
                           nm / npred if npred > 0 else float("inf"))
