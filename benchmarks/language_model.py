"""Language-model scale: one-sided NTK estimates of a Pythia-410M-sized Hugging Face model on 2 CPU cores.

Model: ``GPTNeoXForCausalLM`` with Pythia-410M's sizes (24 layers, d_model 1024, 16 heads, MLP 4096,
vocabulary 50304; 405M parameters, 354M of them in θ = the base model), random initial weights from
the config (nothing is downloaded), float32, eager attention, on batch 2 × 128 random token ids
(seeded). ``--quick`` uses Pythia-14M's sizes (6 layers, d_model 128; under 3 minutes). Figures
(the prefix is ``lm410m`` / ``lm14m`` for the model measured):

* ``<prefix>_onesided_probe_over_fwd_bwd``: time of one one-sided probe ``J* v`` of the hidden-state
  NTK (one VJP of the hidden states of every layer through the graph kept from one forward pass,
  ``kpflow.experiments.language_model.hidden_jacobian``) over one forward + backward of the same
  Hugging Face model with its next-token cross-entropy loss on the same batch. Contenders interleaved in
  every round; the figure is the median of the per-round ratios. Target ≤ 1.5.
* ``<prefix>_trace_5pct_minutes``: wall time from recording the batch to a hidden-state NTK trace with
  relative standard error ≤ 5 % (``onesided_statistics(..., rtol=0.05)``, one probe per VJP), in minutes.
  Target ≤ 15 (410M, 2 cores).
* ``<prefix>_peak_rss_gb``: the process's peak resident memory over the causal-model part of the run
  (``ru_maxrss``), model and trajectory included (``peak_rss_gb_with_masked_lm``: after the masked LM).
  Target ≤ 16.
* ``lm_bert_mini_onesided_probe_over_fwd_bwd`` (both runs): the same ratio for a masked LM —
  ``BertForMaskedLM`` with BERT-mini's sizes (4 layers, d_model 256, 4 heads, MLP 1024, vocabulary 30522;
  random weights), batch 2 × 128 tokens, the second sequence padded after 96 tokens (attention mask),
  15 % of the real tokens ``[MASK]`` (seeded); the forward + backward is Hugging Face's with the MLM
  cross-entropy over the ``[MASK]`` positions. Median of interleaved per-round ratios, target ≤ 1.5
  like the causal one.
* ``lm_kron_exact_vs_estimate_rel_diff`` and ``lm_kron_exact_vs_estimate_z``: exact ``tr K`` of the
  parameter operator on the joint state from the Kronecker core (site-variable Grams, no probes) against
  its one-sided estimate ``E‖Jθ* v‖²`` with ``Jθ*`` by autodiff of the forward pass (the frozen-site VJP,
  independent of the Kronecker formula): relative difference, and the difference in units of the
  estimate's standard error (target: within 3).

    python benchmarks/language_model.py            # Pythia-410M sizes (about 15-25 minutes on 2 loaded cores)
    python benchmarks/language_model.py --quick    # Pythia-14M sizes, under 3 minutes

Ends with key=value lines and writes them to language_model.json (language_model_quick.json) beside this
script, with the machine's load average at the start and the end (the machine is shared). Each figure is
written as soon as it is measured, so a run stopped by a timeout keeps what it measured (``complete``
says whether it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from kpflow.estimators import onesided_statistics
from kpflow.experiments.language_model import hidden_jacobian
from kpflow.kernels import kronecker_core, param_jacobian, record
from kpflow.models.hf import HFLanguageModel, build_lm, describe, mask_tokens, masked_inputs, num_parameters

HERE = pathlib.Path(__file__).resolve().parent


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fwd_bwd(hf, ids):
    """One training step's forward + backward (next-token cross-entropy), gradients discarded."""
    hf.zero_grad(set_to_none=True)
    logits = hf(ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    hf.zero_grad(set_to_none=True)


def masked_fwd_bwd(hf, x, labels):
    """One MLM training step's forward + backward (cross-entropy at the [MASK] positions), gradients discarded."""
    hf.zero_grad(set_to_none=True)
    logits = hf(input_ids=x[..., 0], attention_mask=x[..., 1], token_type_ids=x[..., 2]).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
    hf.zero_grad(set_to_none=True)


def interleaved(probe, step, rounds, label):
    """Median over interleaved rounds of (one probe time) / (one fwd+bwd time), and the median times."""
    step()  # warm-up
    ratios, t_probe, t_fb = [], [], []
    for r in range(rounds):
        tb, _ = _t(step)
        tp, _ = _t(lambda r=r: probe(r))
        t_fb.append(tb)
        t_probe.append(tp)
        ratios.append(tp / tb)
        print(f"{label} round {r}: probe {tp:.2f} s, fwd+bwd {tb:.2f} s", flush=True)
    return statistics.median(ratios), statistics.median(t_probe), statistics.median(t_fb)


def masked_lm_ratio(batch: int, tokens: int, rounds: int, gen) -> dict:
    """The masked-LM figure of the module docstring (BERT-mini sizes, one padded sequence, 15 % [MASK])."""
    hf = build_lm("bert-mini", dtype=torch.float32, seed=0)
    model = HFLanguageModel(hf)
    print(describe(model), flush=True)
    ids = torch.randint(1000, model.vocab_size - 1, (batch, tokens), generator=gen)
    attn = torch.ones_like(ids)
    attn[-1, (3 * tokens) // 4:] = 0
    ids[attn == 0] = hf.config.pad_token_id
    x = mask_tokens(masked_inputs(ids, attn), model, 0.15, seed=0)
    labels = torch.where(model.masked_positions(x), ids, torch.full_like(ids, -100))
    J = hidden_jacobian(record(model, x))
    V = torch.randn(rounds + 1, 1, *J.shape_out, generator=gen)
    J.rmatmat(V[-1])  # builds the kept graph
    ratio, tp, tb = interleaved(lambda r: J.rmatmat(V[r]), lambda: masked_fwd_bwd(hf, x, labels), rounds, "bert")
    return {"lm_bert_mini_onesided_probe_over_fwd_bwd": ratio, "bert_mini_probe_seconds_median": tp,
            "bert_mini_fwd_bwd_seconds_median": tb}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Pythia-14M sizes, 3 rounds (under 3 minutes)")
    ap.add_argument("--preset", default=None, help="override the model (kpflow.models.hf.PRESETS)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-probes", type=int, default=400, help="budget cap of the 5 %% trace estimate")
    ap.add_argument("--kron-probes", type=int, default=None, help="probes of the tr K check")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("pythia-14m" if args.quick else "pythia-410m")
    prefix = "lm" + preset.split("-")[-1] if preset.startswith("pythia-") else "lm_" + preset.replace("-", "_")
    rounds = args.rounds or (3 if args.quick else 2)
    kron_probes = args.kron_probes or (30 if args.quick else 12)
    load0 = os.getloadavg()
    name = "language_model_quick.json" if args.quick else "language_model.json"
    if args.preset:
        name = f"language_model_{preset}.json"
    out: dict = {"preset": preset, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
                 "dtype": "float32", "load_avg_start": load0[0], "cpus": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch.__version__, "complete": False}

    def save(**items):
        """Record figures as soon as they are measured (a run stopped by a timeout keeps what it measured)."""
        out[f"{prefix}_peak_rss_gb"] = _rss_gb()
        out.update(items)
        out["load_avg_now"] = os.getloadavg()[0]
        fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, HERE / name)
        for k, v in items.items():
            print(f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}", flush=True)

    t_build, hf = _t(lambda: build_lm(preset, dtype=torch.float32, seed=0))
    model = HFLanguageModel(hf)
    print(describe(model), f"(built in {t_build:.1f} s)", flush=True)
    save(build_seconds=t_build, parameters_theta=num_parameters(model),
         parameters_total=sum(p.numel() for p in hf.parameters()))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (args.batch, args.tokens), generator=gen)

    # --- record + the first probe (which builds the kept VJP graph): the fixed cost of every estimate
    t_record, traj = _t(lambda: record(model, ids))
    J = hidden_jacobian(traj)
    V = torch.randn(rounds + 1, 1, *J.shape_out, generator=gen)
    t_graph, _ = _t(lambda: J.rmatmat(V[-1]))
    save(record_seconds=t_record, first_probe_seconds=t_graph)

    # --- one probe vs one forward+backward, interleaved (J's graph is already kept)
    ratio, tp, tb = interleaved(lambda r: J.rmatmat(V[r]), lambda: fwd_bwd(hf, ids), rounds, prefix)
    save(**{f"{prefix}_onesided_probe_over_fwd_bwd": ratio, "rounds": rounds, "probe_seconds_median": tp,
            "fwd_bwd_seconds_median": tb})

    # --- 5 % trace: record + graph + the probes the stopping rule needs (the graph is the one built above)
    t_probes, stats = _t(lambda: onesided_statistics(J, args.max_probes, side="reverse", seed=0, chunk_size=1,
                                                     rtol=0.05))
    tr = stats.trace
    save(**{f"{prefix}_trace_5pct_minutes": (t_record + t_graph + t_probes) / 60, f"{prefix}_trace_probes":
            tr.num_probes, f"{prefix}_trace_rel_se": tr.stderr / tr.value,
            f"{prefix}_hidden_ntk_erank": float(stats.effective_rank.value)})

    # --- exact tr K (Kronecker core) vs its one-sided autodiff estimate
    t_exact, exact = _t(lambda: kronecker_core(traj).trace())
    Jt = param_jacobian(traj, backend="autodiff")
    # probes in batched VJPs of 5 (the same estimate, fewer passes)
    est = onesided_statistics(Jt, kron_probes, side="reverse", seed=5, chunk_size=min(5, kron_probes)).trace
    save(lm_kron_exact_vs_estimate_rel_diff=abs(est.value - exact) / exact,
         lm_kron_exact_vs_estimate_z=abs(est.value - exact) / est.stderr, lm_kron_exact_seconds=t_exact,
         lm_kron_probes=kron_probes)

    # --- the masked LM (BERT-mini sizes; after the causal figures, so <prefix>_peak_rss_gb stays theirs)
    rss = out[f"{prefix}_peak_rss_gb"]
    save(**masked_lm_ratio(args.batch, args.tokens, 3, gen))
    save(**{f"{prefix}_peak_rss_gb": rss, "peak_rss_gb_with_masked_lm": _rss_gb()})
    save(complete=True, load_avg_end=os.getloadavg()[0])
    print("--- headline")
    for k, v in out.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")

if __name__ == "__main__":
    main()
