"""Exact Kronecker core of the parameter operator K for weight-based cells (DESIGN.md §2).

A weight ``W`` [R, C] that enters the step only as ``a_s += W u_n`` (site variable ``u_n`` at site
n = (b, t); ``u_n = 1`` for a bias) contributes

    ``K_W = M_s (G_W ⊗ I_R) M_s*``,   ``G_W[n, n'] = u_n · u_n'``,   ``M_s = blockdiag_n ∂z_n/∂a_{s,n}``,

and ``K = Σ_W K_W``. Weights sharing a slot share ``M_s``, so ``K = Σ_s M_s (G_s ⊗ I) M_s*`` with
``G_s = Σ_{W→s} G_W = U_s U_sᵀ`` (``U_s`` = the site variables of the slot side by side). Hence:

* a K apply needs no parameter-space autodiff: ``M*``, two matmuls with ``U_s`` (or one with a
  precomputed ``G_s`` when N < 2 C_s), ``M``;
* ``tr K = Σ_s Σ_n G_s[n, n] ‖M_{s,n}‖_F²`` exactly;
* ``‖K‖_F² = Σ_{s,s'} Σ_{n,n'} G_s[n,n'] G_{s'}[n,n'] ⟨M_{s,n}ᵀM_{s',n}, M_{s,n'}ᵀM_{s',n'}⟩`` exactly,
  hence the exact effective rank ``tr(K)² / ‖K‖_F²`` with no probes;
* ``rank K_W ≤ rank(G_W) · R`` (``R`` = rows of W; ``R = H`` for the vanilla and leaky RNN).

``M`` is *unit-structured* for all four built-in cells: output unit j at a site depends only on the
entries j of each gate block of the slots (vanilla/leaky RNN: one block, M diagonal; GRU: gates r, z,
n; LSTM: gates i, f, g, o feeding h and c). The core then stores the per-site, per-unit coefficients
``D_s[n, o, g, j] = ∂z_{n, o·U + j} / ∂a_{s, n, g·U + j}`` (``linearization.post_coefficients``: read off
with one reverse-mode pass per output block and verified with a random cotangent), so ``M``/``M*`` are a
few elementwise products and the exact scalars cost O(N² · gates² · U).
Cells without this structure fall back to JVP/VJP of ``post``.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from kpflow.models.cells import AffineRecurrentModel
from kpflow.models.sites import SiteModel
from kpflow.operators import LinearOperator

from .joint import is_site_trajectory, site_kronecker_core
from .linearization import apply_units, apply_units_adjoint, post_coefficients, repeat_probes, slot_values
from .trajectory import Trajectory, resolve_param_names

#: Columns (probes × units) per contraction of a K apply on the CPU: the site matmuls ``U (Uᵀ Z)`` run
#: ~30% faster in blocks of this width than on all probes at once (GRU H=256, N=1600, MKL), and the
#: intermediates stay that small; other devices take all probes at once.
CPU_COLUMNS = 2048

#: Ceiling on entries of intermediate tensors of the general (non-elementwise) exact Frobenius norm.
FROBENIUS_LIMIT = 2**27


def supports_kronecker(model) -> bool:
    """Whether ``kronecker_core`` applies to ``model``.

    True for models whose weights the library sees as sites: the affine-slot cells (VanillaRNN, LeakyRNN,
    GRU, LSTM) and every site model (DeepMLP, Transformer, ModuleAdapter).

    Args:
        model: any model.

    Returns:
        True when ``model`` is an ``AffineRecurrentModel`` or a ``SiteModel``.
    """
    return isinstance(model, (AffineRecurrentModel, SiteModel))


class KroneckerCore:
    """The Kronecker structure of ``K`` on a recorded trajectory (see module docstring).

    Attributes:
        param_names: the weights included.
        site_variables: ``{param: U_W [N, C_W]}`` (a bias has the column of ones).
        slots: ``{slot: [params]}``; slot_sizes: ``{slot: R_s}``.
    """

    def __init__(self, traj: Trajectory, param_names=None):
        model = traj.model
        if not supports_kronecker(model):
            raise TypeError(
                f"the Kronecker core needs a weight-based cell (VanillaRNN, LeakyRNN, GRU, LSTM); "
                f"{type(model).__name__} is not one. Use kpflow.kernels.parameter_operator(traj) (autodiff)."
            )
        self.traj = traj
        self.param_names = resolve_param_names(model, traj.param_names if param_names is None else param_names)
        B, T, H = traj.shape
        self.N, self.H = B * T, H
        zp, x = traj.sites()
        self._zp, self._x = zp, x
        u = model.site_variables(zp, x)
        ones = torch.ones(self.N, 1, dtype=traj.dtype, device=traj.device)
        self.site_variables: dict[str, torch.Tensor] = {}
        self.slots: dict[str, list[str]] = {}
        for name in self.param_names:
            slot, site = model.affine_terms[name]
            self.site_variables[name] = ones if site is None else u[site].detach()
            self.slots.setdefault(slot, []).append(name)
        all_sizes = model.slot_sizes()
        self.slot_sizes = {s: all_sizes[s] for s in self.slots}
        # every slot's site variables side by side in one [N, ΣC] matrix, the slots' blocks views of it, so that a
        # gate group of adjacent slots (``_gate_groups``) is a view too (no copy of [N, C] at every set-up)
        widths = [sum(self.site_variables[n].shape[1] for n in names) for names in self.slots.values()]
        self._U_all = torch.cat([self.site_variables[n] for names in self.slots.values() for n in names], 1)
        self._columns = {}
        start = 0
        for s, w in zip(self.slots, widths, strict=True):
            self._columns[s] = (start, start + w)
            start += w
        self._U = {s: self._U_all[:, a:b] for s, (a, b) in self._columns.items()}
        self._G: dict = {}
        self._groups = None
        self._D = None
        if int(model.unit_size()) > 0:  # the coefficients of the step linearization (one extraction, shared)
            self._slot_values, D, _ = post_coefficients(traj)
            self._D = {s: D[s] for s in self.slots}
        else:
            self._slot_values = slot_values(traj)
        self.structured = self._D is not None

    # ------------------------------------------------------------------ M and M*
    def _post(self, sub: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.traj.model.post({**self._slot_values, **sub}, self._zp, self._x)

    def _primal(self):
        return {s: self._slot_values[s] for s in self.slots}

    def M(self, Z: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_s M_s Z_s``: the per-site Jacobian of ``post`` with respect to the slots, applied to tangents.

        Uses the stored unit coefficients for unit-structured cells, else one JVP of ``post`` with the k
        probes folded into the site axis.

        Args:
            Z: ``{slot: [k, N, R_s]}`` tangents of every included slot.

        Returns:
            ``[k, N, H]``.
        """
        if self.structured:
            return apply_units(self._D, Z, self.N, self.H)
        # probes folded into the batch axis (forward-mode AD under vmap is slower on CPU)
        k = next(iter(Z.values())).shape[0]
        rep = {s: repeat_probes(v, k) for s, v in self._slot_values.items()}
        zr, xr = repeat_probes(self._zp, k), repeat_probes(self._x, k)

        def f(sub):
            return self.traj.model.post({**rep, **sub}, zr, xr)

        primal = {s: rep[s] for s in self.slots}
        tangent = {s: Z[s].reshape(k * self.N, -1) for s in self.slots}
        return jvp(f, (primal,), (tangent,))[1].reshape(k, self.N, -1)

    def M_adjoint(self, Y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``M_s* Y`` for every included slot (the adjoint of ``M``).

        Args:
            Y: ``[k, N, H]`` state cotangents per site.

        Returns:
            ``{slot: [k, N, R_s]}``.
        """
        if self.structured:
            return apply_units_adjoint(self._D, Y, self.N)
        _, pullback = vjp(self._post, self._primal())
        return vmap(lambda y: pullback(y)[0])(Y)

    # ------------------------------------------------------------------ Jθ through the structure
    def param_jvp(self, V: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Jθ v = M (Σ_W V_W u_W)``: the parameter Jacobian through the structure.

        Args:
            V: ``{W: [k, *shape_W]}`` tangents of every included weight (a bias: ``[k, R_s]``).

        Returns:
            ``[k, N, H]``.
        """
        Z: dict[str, torch.Tensor] = {}
        for name, slot_names in self.slots.items():
            for n in slot_names:
                v, u = V[n], self.site_variables[n]
                term = v.unsqueeze(1).expand(-1, self.N, -1) if v.dim() == 2 else torch.einsum("nc,krc->knr", u, v)
                Z[name] = term if name not in Z else Z[name] + term
        return self.M(Z)

    def param_vjp(self, Y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Jθ* y``: the adjoint of ``param_jvp``.

        Args:
            Y: ``[k, N, H]`` state cotangents per site.

        Returns:
            ``{W: Σ_n (M* y)_n u_nᵀ}`` ``[k, *shape_W]`` (a bias gets ``Σ_n (M* y)_n``).
        """
        Z = self.M_adjoint(Y)
        out = {}
        for slot, names in self.slots.items():
            for n in names:
                p = self.traj.params[n]
                out[n] = Z[slot].sum(1) if p.dim() == 1 else torch.einsum("knr,nc->krc", Z[slot],
                                                                            self.site_variables[n])
        return out

    # ------------------------------------------------------------------ Gram matrices
    def slot_gram(self, slot: str) -> torch.Tensor:
        """The Gram matrix ``G_s = U_s U_sᵀ`` of a slot's site variables (cached).

        Args:
            slot: a slot with at least one included weight (a key of ``slot_sizes``).

        Returns:
            ``[N, N]``, summed over the slot's included weights.
        """
        if slot not in self._G:
            self._G[slot] = self._U[slot] @ self._U[slot].T
        return self._G[slot]

    @property
    def site_grams(self) -> dict[str, torch.Tensor]:
        """``{param: G_W}`` with ``G_W[b, t, b', t'] = u_{b,t} · u_{b',t'}`` ``[B, T, B, T]``."""
        B, T, _ = self.traj.shape
        return {n: (U @ U.T).reshape(B, T, B, T) for n, U in self.site_variables.items()}

    def _apply_gram(self, U: torch.Tensor, Z: torch.Tensor, gram=None) -> torch.Tensor:
        """``(U Uᵀ) Z`` for ``Z`` ``[N, m]``, by the cheaper of the two contractions.

        The Gram form ``G Z`` costs ``N²·m`` multiply-adds, the factored form ``U (Uᵀ Z)`` ``2·N·C·m``;
        the Gram form is taken when ``N < 2C`` (``gram()`` then gives the cached ``G``).

        Returns:
            ``[N, m]``.
        """
        if gram is not None and self.N < 2 * U.shape[1]:
            return gram() @ Z
        return U @ (U.T @ Z)

    def _gate_groups(self):
        """The contractions of a K apply for a unit-structured cell: ``[(D_g [N, O_b, U], U_g [N, C_g], key)]``.

        ``K = Σ_s Σ_g M_{s,g} (G_s ⊗ I) M_{s,g}*`` where ``M_{s,g}`` is the unit-diagonal block of gate g of slot
        s, ``(M_{s,g} z)_{n, o·U+j} = D_s[n, o, g, j] z_{n, j}``. Gate blocks of different slots with identical
        coefficients (the r and z gates of the GRU, fed by both ``ih`` and ``hh``) share ``M``, so they are one
        contraction with the slots' site variables side by side: ``M (G_s + G_s') M* = M ([U_s U_s'] [U_s U_s']ᵀ) M*``.

        Returns:
            One entry per distinct coefficient block, with the concatenated site variables of the slots sharing it
            and a key naming the (slot, gate) blocks it stands for.
        """
        if self._groups is None:
            groups: list[list] = []
            for s, Ds in self._D.items():
                for g in range(Ds.shape[2]):
                    Dg = Ds[:, :, g]
                    for grp in groups:
                        # the first site decides almost every unequal pair before the full comparison
                        if grp[0].shape == Dg.shape and torch.equal(grp[0][:1], Dg[:1]) and torch.equal(grp[0], Dg):
                            grp[1].append(s)
                            grp[2].append((s, g))
                            break
                    else:
                        groups.append([Dg, [s], [(s, g)]])
            self._groups = [(Dg, self._slot_columns(slots), tuple(key)) for Dg, slots, key in groups]
        return self._groups

    def _slot_columns(self, slots: list[str]) -> torch.Tensor:
        """The site variables of ``slots`` side by side: a view of ``_U_all`` when they are adjacent there."""
        spans = [self._columns[s] for s in slots]
        if all(end == start for (_, end), (start, _) in zip(spans[:-1], spans[1:], strict=True)):
            return self._U_all[:, spans[0][0]:spans[-1][1]]
        return torch.cat([self._U[s] for s in slots], 1)

    def _group_gram(self, key, U):
        if key not in self._G:
            self._G[key] = U @ U.T
        return self._G[key]

    def apply(self, Y: torch.Tensor) -> torch.Tensor:
        """``K Y = Σ_s M_s (G_s ⊗ I)(M_s* Y)``: ``K`` applied through the core.

        For unit-structured cells the sum runs over the gate groups of ``_gate_groups``: per group one
        elementwise product for ``M*``, one contraction with the site variables for all probes at once (the
        probes side by side as columns, ``[N, k·U]``: one large matmul) and one fused multiply-add for ``M``;
        the intermediates stay the size of one gate block. Other cells apply ``M``/``M*`` by JVP/VJP of ``post``.

        Args:
            Y: ``[k, B, T, H]``.

        Returns:
            ``K Y``, same shape as ``Y``.
        """
        k = Y.shape[0]
        if not self.structured:
            Z = self.M_adjoint(Y.reshape(k, self.N, self.H))
            Z = {s: self._apply_gram(self._U[s], z.transpose(0, 1).reshape(self.N, -1), lambda s=s: self.slot_gram(s))
                    .reshape(self.N, k, -1).transpose(0, 1) for s, z in Z.items()}
            return self.M(Z).reshape(Y.shape)
        Ob, U = self._D[next(iter(self._D))].shape[1::2]
        Yt = Y.reshape(k, self.N, Ob, U).transpose(0, 1)  # [N, k, O_b, U], a view: sites as rows
        result = Y.new_zeros(k, self.N, Ob, U)  # probe-major, the layout returned: no copy at the end
        out = result.transpose(0, 1)            # [N, k, O_b, U], the view the contractions write
        step = k if Y.device.type != "cpu" else max(1, CPU_COLUMNS // U)
        for p0 in range(0, k, step):
            Yc, oc = Yt[:, p0:p0 + step], out[:, p0:p0 + step]
            for Dg, Ug, key in self._gate_groups():
                Dk = Dg.unsqueeze(1)  # [N, 1, O_b, U]
                z = torch.mul(Dk[:, :, 0], Yc[:, :, 0], out=Yc.new_empty(Yc.shape[:2] + (U,)))  # M_g* Y
                for o in range(1, Ob):
                    z.addcmul_(Dk[:, :, o], Yc[:, :, o])
                w = self._apply_gram(Ug, z.view(self.N, -1), lambda key=key, Ug=Ug: self._group_gram(key, Ug))
                oc.addcmul_(Dk, w.view(z.shape).unsqueeze(2))  # M_g: output (o, j) gets D_g[n, o, j] w[n, j]
                del z, w  # freed before the next group's are allocated: one pair of intermediates at a time
        return result.reshape(Y.shape)

    def operator(self) -> LinearOperator:
        """``K`` as a ``LinearOperator``.

        Returns:
            A PSD ``KroneckerKernel`` on ``[B, T, H]``.
        """
        return KroneckerKernel(self)

    # ------------------------------------------------------------------ exact scalars
    def _site_jacobians(self, slot: str) -> torch.Tensor:
        """Dense per-site ``M_{s,n}`` ``[N, H, R_s]`` (general cells only; guarded)."""
        R = self.slot_sizes[slot]
        n_entries = self.N * self.H * R
        if n_entries > FROBENIUS_LIMIT:
            raise MemoryError(
                f"exact ‖K‖_F for this cell needs per-site Jacobians of {n_entries:,} entries (limit "
                f"{FROBENIUS_LIMIT:,}); use the randomized estimators in kpflow.estimators instead"
            )
        eye = torch.eye(R, dtype=self.traj.dtype, device=self.traj.device)
        basis = eye.unsqueeze(1).expand(R, self.N, R)
        zero = {s: torch.zeros(R, self.N, self.slot_sizes[s], dtype=self.traj.dtype, device=self.traj.device)
                for s in self.slots}
        zero[slot] = basis
        cols = self.M(zero)  # [R, N, H]
        return cols.permute(1, 2, 0)

    def _site_sq_norms(self) -> dict[str, torch.Tensor]:
        """``‖M_{s,n}‖_F²`` for every slot and site: ``{slot: [N]}``."""
        if self.structured:
            return {s: (Ds ** 2).flatten(1).sum(1) for s, Ds in self._D.items()}
        out = {}
        for s, R in self.slot_sizes.items():
            acc = torch.zeros(self.N, dtype=self.traj.dtype, device=self.traj.device)
            chunk = max(1, (2**24) // max(1, self.N * max(self.H, R)))
            for r0 in range(0, R, chunk):
                r1 = min(R, r0 + chunk)
                t = {q: torch.zeros(r1 - r0, self.N, Rq, dtype=self.traj.dtype, device=self.traj.device)
                     for q, Rq in self.slot_sizes.items()}
                idx = torch.arange(r1 - r0, device=self.traj.device)
                t[s][idx, :, r0 + idx] = 1.0
                acc += (self.M(t) ** 2).sum(-1).sum(0)
            out[s] = acc
        return out

    def trace(self) -> float:
        """Exact trace (no probes).

        Returns:
            ``tr K = Σ_s Σ_n ‖u_{s,n}‖² ‖M_{s,n}‖_F²``.
        """
        norms = self._site_sq_norms()
        return float(sum(((self._U[s] ** 2).sum(1) * norms[s]).sum() for s in self.slots))

    def frobenius_norm(self) -> float:
        """Exact Frobenius norm (no probes).

        ``‖K‖_F² = Σ_{s,s'} Σ_{n,m} G_s[n,m] G_s'[n,m] ‖M_{s,n}ᵀ M_{s',m}‖_F²``; O(N² · gates² · U) for
        unit-structured cells, dense per-site Jacobians otherwise.

        Returns:
            ``‖K‖_F``.

        Raises:
            MemoryError: for a cell without unit structure whose per-site Jacobian products exceed
                ``FROBENIUS_LIMIT`` entries (use the randomized estimators instead).
        """
        if self.structured:
            total = torch.zeros((), dtype=self.traj.dtype, device=self.traj.device)
            for s, Ds in self._D.items():
                for s2, Ds2 in self._D.items():
                    # b_n[g, g', j] = Σ_o D_s[n,o,g,j] D_s'[n,o,g',j]: the unit-diagonal blocks of M_sᵀ M_s'
                    b = torch.einsum("nogj,nohj->nghj", Ds, Ds2).reshape(self.N, -1)
                    total = total + (self.slot_gram(s) * self.slot_gram(s2) * (b @ b.T)).sum()
            return float(total.clamp_min(0).sqrt())
        Ms = {s: self._site_jacobians(s) for s in self.slots}
        total = torch.zeros((), dtype=self.traj.dtype, device=self.traj.device)
        for s in self.slots:
            for s2 in self.slots:
                Bn = torch.einsum("nhi,nhj->nij", Ms[s], Ms[s2]).reshape(self.N, -1)
                if Bn.numel() > FROBENIUS_LIMIT:
                    raise MemoryError(f"exact ‖K‖_F needs {Bn.numel():,} entries; use the estimators")
                total = total + (self.slot_gram(s) * self.slot_gram(s2) * (Bn @ Bn.T)).sum()
        return float(total.clamp_min(0).sqrt())

    def effective_rank(self) -> float:
        """Exact participation ratio.

        Returns:
            ``tr(K)² / ‖K‖_F²`` (0 for ``K = 0``).
        """
        fro = self.frobenius_norm()
        return self.trace() ** 2 / fro ** 2 if fro > 0 else 0.0

    def gram_ranks(self, rtol: float | None = None) -> dict[str, int]:
        """Ranks of the per-weight Gram matrices.

        Args:
            rtol: relative tolerance passed to ``torch.linalg.matrix_rank`` (None: its default).

        Returns:
            ``{param: rank(G_W) = rank(U_W)}`` for every included weight.
        """
        return {n: int(torch.linalg.matrix_rank(U, rtol=rtol)) for n, U in self.site_variables.items()}

    def rank_bounds(self, rtol: float | None = None) -> dict[str, int]:
        """Per-weight rank bounds of ``K``.

        Args:
            rtol: relative tolerance of the Gram ranks (see ``gram_ranks``).

        Returns:
            ``{param: min(rank(G_W)·R_W, N·H)}``, an upper bound on ``rank K_W`` (``R_W`` = rows of W,
            = H for RNNs).
        """
        ranks = self.gram_ranks(rtol)
        out = {}
        for n, r in ranks.items():
            R = self.slot_sizes[self.traj.model.affine_terms[n][0]]
            out[n] = min(r * R, self.N * self.H)
        return out

    def rank_bound(self, rtol: float | None = None) -> int:
        """Upper bound on the rank of ``K``.

        Args:
            rtol: relative tolerance of the Gram ranks (see ``gram_ranks``).

        Returns:
            ``min(Σ_W rank(G_W)·R_W, N·H, #parameters)``.
        """
        n_params = sum(self.traj.params[n].numel() for n in self.param_names)
        return min(sum(self.rank_bounds(rtol).values()), self.N * self.H, n_params)


class KroneckerKernel(LinearOperator):
    """``K`` applied through its Kronecker core (PSD)."""

    def __init__(self, core: KroneckerCore):
        super().__init__(core.traj.shape, core.traj.shape, core.traj.dtype, core.traj.device, is_psd=True)
        self.core = core

    def structure(self):
        """``K`` of one trajectory and one parameter subset is one map."""
        return (id(self.core.traj), self.core.param_names)

    def _matmat(self, X):
        return self.core.apply(X)

    def _rmatmat(self, Y):
        return self.core.apply(Y)


def kronecker_core(traj: Trajectory, param_names=None) -> KroneckerCore:
    """The exact Kronecker core of ``K`` (cached on the trajectory).

    Args:
        traj: a recorded trajectory of a weight-based cell or a site model.
        param_names: the weights included (None: the trajectory's own).

    Returns:
        A ``KroneckerCore`` for an affine-slot cell; for a site trajectory the joint-state core
        ``kpflow.kernels.joint.SiteKroneckerCore``.
    """
    if is_site_trajectory(traj):
        return site_kronecker_core(traj, param_names)
    key = ("kronecker_core", resolve_param_names(traj.model, traj.param_names if param_names is None
                                                 else param_names))
    core = traj.cache.get(key)
    if core is None:
        core = traj.cache[key] = KroneckerCore(traj, param_names)
    return core
