"""Cost of the transformer's state-space NTK and of its exact Kronecker-core statistics.

Model: ``kpflow.models.Transformer`` with 2 blocks, d_model 64, 4 heads, d_ff 128, post-LN, GELU, on
16 sequences of 50 tokens with 8 input features (float32, 2 threads). Two figures:

* ``transformer_ntk_probe_over_fwd_bwd``: time of Θ applied to a batch of k probes over the time of one
  forward + backward pass of the same network in torch's own layers (``TorchTransformer``:
  ``nn.TransformerEncoderLayer``) at the same effective batch (16·k sequences). Both NTK paths are
  timed (``joint``: (C P) K (C P)* with the Kronecker core; ``parameters``: J J* by autodiff in θ); the
  headline is the one ``kpflow.kernels.ntk`` takes (``site_ntk(path="auto")``). Target ≤ 2.
* ``transformer_exact_k_stats_speedup``: time of the exact tr(K), ‖K‖_F and erank from the Kronecker
  core (site-variable Grams, no probes) over the time of estimating all three to 1 % relative error with
  probes (``kpflow.estimators.effective_rank`` and ``trace``/``frobenius_norm`` on the core's K operator,
  the probe budget doubled until every estimate is within 1 % of the exact value). Target ≥ 20.

Contenders are interleaved in every round; each figure is the median over rounds of the per-round ratio.

    python benchmarks/transformer.py           # 7 rounds, k = 8 probes
    python benchmarks/transformer.py --quick   # 2 rounds, k = 4, one K-statistics run, under a minute

Ends with key=value lines and writes them to transformer.json (transformer_quick.json) beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import torch

from kpflow.estimators import effective_rank, frobenius_norm, hutchpp_trace
from kpflow.kernels import kronecker_core, parameter_operator, record
from kpflow.kernels.joint import site_ntk
from kpflow.models import Transformer

HERE = pathlib.Path(__file__).resolve().parent
SIZE = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, tokens=50, sequences=16, inputs=8)


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def build(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = Transformer(SIZE["inputs"], SIZE["d_model"], SIZE["n_heads"], SIZE["n_layers"], SIZE["d_ff"], 1,
                    max_len=SIZE["tokens"], dtype=dtype)
    x = torch.randn(SIZE["sequences"], SIZE["tokens"], SIZE["inputs"], dtype=dtype)
    return m, x


def fwd_bwd(ref, xb):
    ref.zero_grad(set_to_none=True)
    out = ref(xb)
    out.square().sum().backward()


def estimate_to_tolerance(K, exact, tol=1e-2, start=8, limit=4096, seed=0):
    """Smallest doubling budget at which trace (Hutch++), ‖K‖_F and erank are all within ``tol``; returns
    (seconds for that budget's run, budget)."""
    m = start
    while True:
        t0 = time.perf_counter()
        tr = hutchpp_trace(K, m, seed=seed).value
        fro = frobenius_norm(K, m, seed=seed).value
        er = effective_rank(K, m, seed=seed).value
        dt = time.perf_counter() - t0
        errs = [abs(tr - exact["trace"]) / exact["trace"], abs(fro - exact["fro"]) / exact["fro"],
                abs(er - exact["erank"]) / exact["erank"]]
        if max(errs) <= tol or m >= limit:
            return dt, m, max(errs)
        m *= 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 4 probes (under a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--probes", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rounds = args.rounds or (2 if args.quick else 7)
    k = args.probes or (4 if args.quick else 8)
    model, x = build()
    ref = model.to_torch()
    xb = x.repeat(k, 1, 1)
    t_setup, traj = _t(lambda: record(model, x))
    ops = {p: site_ntk(traj, path=p) for p in ("joint", "parameters")}
    auto = site_ntk(traj).path
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(k, *traj.shape, generator=gen)
    for op in ops.values():  # warm-up (builds the kept VJP graphs)
        op.matmat(V)
    fwd_bwd(ref, xb)
    ratios = {p: [] for p in ops}
    times = {p: [] for p in ops} | {"fwd_bwd": []}
    for _ in range(rounds):
        tb, _ = _t(lambda: fwd_bwd(ref, xb))
        times["fwd_bwd"].append(tb)
        for p, op in ops.items():
            tp, _ = _t(lambda op=op: op.matmat(V))
            times[p].append(tp)
            ratios[p].append(tp / tb)
    # exact K statistics vs probes to 1 %
    K = parameter_operator(traj, backend="kronecker")
    speed, budgets, errs = [], [], []
    for r in range(1 if args.quick else max(1, rounds // 2)):
        traj.cache.clear()

        def exact_stats():
            core = kronecker_core(traj)
            tr, fro = core.trace(), core.frobenius_norm()
            return {"trace": tr, "fro": fro, "erank": tr ** 2 / fro ** 2}

        te, exact = _t(exact_stats)
        tp, m, err = estimate_to_tolerance(K, exact, start=32 if args.quick else 8, seed=r)
        speed.append(tp / te)
        budgets.append(m)
        errs.append(err)
    headline = {
        "transformer_ntk_probe_over_fwd_bwd": statistics.median(ratios[auto]),
        "transformer_ntk_probe_over_fwd_bwd_joint": statistics.median(ratios["joint"]),
        "transformer_ntk_probe_over_fwd_bwd_parameters": statistics.median(ratios["parameters"]),
        "transformer_ntk_path": auto,
        "transformer_exact_k_stats_speedup": statistics.median(speed),
        "transformer_probes_for_1pct": int(statistics.median(budgets)),
        "transformer_setup_s": t_setup,
    }
    out = {"headline": headline, "quick": args.quick, "rounds": rounds, "probes": k, "size": SIZE,
           "times_s": times, "ratios": ratios, "k_stats_speedups": speed, "k_stats_budget": budgets,
           "k_stats_worst_error": errs, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.platform(), "device": "cpu"}
    path = HERE / ("transformer_quick.json" if args.quick else "transformer.json")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)
    for key, v in headline.items():
        print(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")


if __name__ == "__main__":
    main()
