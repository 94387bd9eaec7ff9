"""Language-model statistics (``kpflow lm stats``): NTK trace, Frobenius norm, effective rank and alignment of a
Hugging Face causal or masked LM on a text, each with its standard error, from one-sided probes.

For token windows ``ids [B, T]`` of the text and θ the base model's parameters (``kpflow.models.hf``):

* hidden-state NTK ``Θ = J J*``, ``J = ∂h/∂θ`` with ``h`` the hidden states of every layer
  ``[B, T, (L + 1) D]``: ``tr Θ = E‖J* v‖²``, ``‖Θ‖_F² = Var(‖J* v‖²)/2`` for Gaussian ``v`` — one VJP per
  probe through the kept graph of one forward pass (Hazelden 2025, one-sided estimators; DESIGN.md §2);
* logit NTK ``S C Θ C* S`` with ``C = ∂logits/∂h`` (LM head fixed) and ``S`` the selection of the logit
  positions (``positions``: all positions, or a masked LM's ``[MASK]`` positions): the same with ``S C J``;
* alignment ``cos(Θ_attn, Θ_mlp) = tr(Θ_attn Θ_mlp)/(‖Θ_attn‖_F ‖Θ_mlp‖_F)`` of the NTKs of the attention
  and of the MLP parameters, from VJPs only (``factor_alignment``: how much the two parameter groups move
  the hidden states in the same directions);
* exact ``tr K``, ``‖K‖_F``, ``erank K`` of the parameter operator ``K = Jθ Jθ*`` on the joint state from its
  Kronecker core (no probes).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kpflow.deprecation import keyword_only
from kpflow.estimators import Estimate, factor_alignment, onesided_statistics
from kpflow.estimators.norms import sqrt_estimate
from kpflow.estimators.result import exact_estimate
from kpflow.kernels import kronecker_core, readout_jacobian, record
from kpflow.kernels.joint import SiteStateJacobian
from kpflow.models.hf import HFLanguageModel, param_subset
from kpflow.operators import FunctionOperator, LinearOperator

#: glob patterns of the attention and MLP parameters per family (for the alignment)
GROUPS = {
    "gpt2": ("*.attn.*", "*.mlp.*"),
    "gpt_neox": ("*.attention.*", "*.mlp.*"),
    "llama": ("*.self_attn.*", "*.mlp.*"),
    "bert": ("*.attention.*", ("*.intermediate.*", "*[0-9].output.*")),
    "roberta": ("*.attention.*", ("*.intermediate.*", "*[0-9].output.*")),
}

#: the logit positions of ``logit_jacobian``
POSITIONS = ("auto", "all", "masked")


class _Progress(LinearOperator):
    """``J`` itself, advancing a progress bar by the number of probes of every application."""

    def __init__(self, J: LinearOperator, bar):
        super().__init__(J.shape_in, J.shape_out, J.dtype, J.device)
        self.J, self.bar = J, bar

    def _matmat(self, X):
        out = self.J.matmat(X)
        self.bar.update(X.shape[0])
        return out

    def _rmatmat(self, Y):
        out = self.J.rmatmat(Y)
        self.bar.update(Y.shape[0])
        return out


def hidden_jacobian(traj, param_names=None) -> LinearOperator:
    """``J = ∂h/∂θ`` (parameters -> hidden states ``[B, T, (L+1) D]``): ``J w`` a JVP, ``J* v`` a VJP (graph kept)."""
    return SiteStateJacobian(traj, param_names)


def logit_jacobian(traj, param_names=None, positions: str = "auto") -> LinearOperator:
    """``S C J = ∂logits/∂θ`` with the LM head fixed (parameters -> ``[B, T, V]``), on the chosen positions.

    ``S`` zeroes the logits outside the chosen positions, so ``(S C J)(S C J)*`` is the logit NTK over them
    (its trace, ‖·‖_F and effective rank are those of the NTK restricted to those positions).

    Args:
        traj: a recorded trajectory of an ``HFLanguageModel``.
        param_names: θ (None: the trajectory's).
        positions: ``"all"`` (every real position), ``"masked"`` (a masked LM's ``[MASK]`` positions,
            ``HFLanguageModel.masked_positions``) or ``"auto"`` (masked for a masked LM, all for a causal one).

    Returns:
        The operator.

    Raises:
        ValueError: an unknown ``positions``, ``"masked"`` for a causal LM or for inputs without a ``[MASK]``.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    CJ = readout_jacobian(traj) @ SiteStateJacobian(traj, param_names)
    model = traj.model
    if positions == "all" or (positions == "auto" and not model.masked):
        return CJ
    sel = model.masked_positions(traj.inputs)
    if not bool(sel.any()):
        raise ValueError(f"the inputs have no [MASK] token (id {model.mask_token_id}); mask some with "
                         "kpflow.models.hf.mask_tokens or use positions='all'")
    s = sel.to(CJ.dtype).unsqueeze(-1)
    S = FunctionOperator(lambda y: y * s, None, CJ.shape_out, CJ.shape_out, CJ.dtype, CJ.device, batched=True,
                         is_self_adjoint=True, is_psd=True)
    return S @ CJ


def describe_estimate(e: Estimate) -> str:
    """``value ± stderr (n probes)`` or ``value (exact)``."""
    if e.num_probes == 0 or e.stderr == 0:
        return f"{e.value:.6g} (exact)"
    return f"{e.value:.6g} ± {e.stderr:.3g} ({e.num_probes} probes)"


@keyword_only(renamed={"num_probes": "num_matvecs"})
def lm_statistics(model: HFLanguageModel, ids: torch.Tensor, *, num_matvecs: int = 30, seed: int = 0,
                  chunk_size: int = 1, param_names=None, alignment: bool = True, logits: bool = True,
                  exact_k: bool = True, progress: bool = True, positions: str = "auto") -> dict[str, Estimate]:
    """The statistics of the module docstring for one batch of token windows.

    Args:
        model: the adapted language model.
        ids: token ids ``[B, T]``.
        num_matvecs: the probe budget of each one-sided estimate, in matvecs of J or J* (one per probe);
            the alignment gets 4× as many. ``num_probes=`` is the deprecated spelling.
        seed: of the probes.
        chunk_size: probes per batched VJP (each holds one parameter-sized gradient: the memory knob).
        param_names: θ (None: every base-model parameter); see ``kpflow.models.hf.param_subset``.
        alignment, logits, exact_k: include those parts.
        progress: show a progress bar over the probes.
        positions: the logit positions of the logit NTK (see ``logit_jacobian``).

    Returns:
        ``{name: Estimate}`` with names ``hidden_trace``, ``hidden_fro``, ``hidden_erank``, ``logit_trace``,
        ``logit_fro``, ``logit_erank``, ``attn_mlp_alignment``, ``k_trace``, ``k_fro``, ``k_erank``.

    Raises:
        ValueError: bad token ids (see ``HFLanguageModel.check_inputs``), fewer than 3 probes.
    """
    if num_matvecs < 3:
        raise ValueError(f"num_matvecs must be >= 3 (the Frobenius norm's standard error needs them), "
                         f"got {num_matvecs}")
    traj = record(model, ids, param_names=param_names)
    total = num_matvecs * (1 + int(logits)) + 4 * num_matvecs * int(alignment)
    out: dict[str, Estimate] = {}
    with tqdm(total=total, desc="probes", unit="probe", disable=not progress, leave=False) as bar:
        s = onesided_statistics(_Progress(hidden_jacobian(traj), bar), num_matvecs, side="reverse", seed=seed,
                                chunk_size=chunk_size)
        out["hidden_trace"], out["hidden_erank"] = s.trace, s.effective_rank
        out["hidden_fro"] = sqrt_estimate(s.frobenius_sq)
        if logits:
            s = onesided_statistics(_Progress(logit_jacobian(traj, positions=positions), bar), num_matvecs,
                                    side="reverse", seed=seed + 1, chunk_size=chunk_size)
            out["logit_trace"], out["logit_erank"] = s.trace, s.effective_rank
            out["logit_fro"] = sqrt_estimate(s.frobenius_sq)
        if alignment:
            attn, mlp = GROUPS[model.family]
            names = set(traj.param_names)
            ga = tuple(n for n in param_subset(model, attn) if n in names)
            gm = tuple(n for n in param_subset(model, mlp) if n in names)
            if ga and gm:
                a = factor_alignment(_Progress(hidden_jacobian(traj, ga), bar), _Progress(hidden_jacobian(traj, gm),
                                     bar), 4 * num_matvecs, seed=seed + 2, chunk_size=chunk_size)
                out["attn_mlp_alignment"] = a
    if exact_k:
        core = kronecker_core(traj)
        for key, value in (("k_trace", core.trace()), ("k_fro", core.frobenius_norm()),
                           ("k_erank", core.effective_rank())):
            out[key] = exact_estimate(value, 0, "kronecker-core", reason="exact from the site variables")
    return out
