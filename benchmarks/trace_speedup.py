"""Speed-accuracy study of NTK trace estimators (Hazelden 2025, "Fast NTK ... via trace estimation", §3.4).

Two models, as in the paper:
* GRU: ``nn.GRU(10, 64)`` on input (50, 15, 10) in torch's sequence-first layout -> state (50, 15, 64),
  n = 48,000 states, 14,592 parameters;
* MLP: Linear(100, 64), 14 x [ReLU, Linear(64, 64)], ReLU on a batch of 50 -> n = 3,200, 64,704 parameters.

J = d(state)/dθ is applied with torch.func (jvp for J w, vjp for J* v) on a *probe-batched* copy of the
model (each probe carries its own view of θ, so a chunk of probes is one batched forward pass), and
NTK = J J*. For each estimator (Hutchinson, Hutch++, XTrace, XNysTrace on the NTK; one-sided forward
and reverse on J) we record relative error against the exact trace versus wall time, and the speed-up
at 1 % and 0.1 % error: time(exact) / time-to-tolerance. The paper interpolates each rerun's curve
and takes the best method per rerun; with few reruns that rewards lucky early dips, so here each
method's curve is the median over reruns (time and error per budget), the tolerance must be reached
*and kept* for all larger budgets, the crossing is interpolated linearly in log-log, and the best
method is reported.

Two exact baselines, both measured in this run:
* "direct" (the paper's): the NTK applied to every basis vector. For the GRU this is 48,000 NTK
  matvecs, so it is timed on a measured subset of basis vectors and extrapolated linearly (said in the
  output);
* "cheapest exact": Σ‖J eᵢ‖² or Σ‖J* eᵢ‖² over the basis of the smaller side, chunked (it also gives
  the reference trace). Timed once when it takes over 30 s, else the median of three; the direct
  subset is the median of three timings.

    python benchmarks/trace_speedup.py            # full study (~10 min on 2 cores)
    python benchmarks/trace_speedup.py --quick    # reduced sizes, < 1 minute

Ends with key=value lines and writes them to trace_speedup.json (trace_speedup_quick.json with
--quick) and the figure trace_speedup.png (trace_speedup_quick.png) beside this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import torch
from torch.func import jvp, vjp
from tqdm import tqdm

from kpflow.estimators import (
    exact_onesided_trace,
    hutchinson_trace,
    hutchpp_trace,
    onesided_statistics,
    xnystrace,
    xtrace,
)
from kpflow.operators import FunctionOperator

HERE = pathlib.Path(__file__).resolve().parent
TOLERANCES = {"1pct": 1e-2, "0.1pct": 1e-3}
PAPER = {"gru_1pct": 1.3e4, "mlp_1pct": 90.0}


# ------------------------------------------------------------------------------------------ models
def _split(theta_k: torch.Tensor, shapes):
    """[k, p] -> list of [k, *shape] views."""
    sizes = [math.prod(s) for s in shapes]
    return [t.reshape(theta_k.shape[0], *s) for t, s in zip(torch.split(theta_k, sizes, dim=1), shapes,
                                                            strict=True)]


def gru_problem(T=50, B=15, I=10, H=64, dtype=torch.float32, seed=0):
    """nn.GRU(I, H) on (T, B, I) sequence-first. J = dz/dθ = P Jθ is kpflow's state Jacobian of the same
    GRU (``GRU.from_torch``; kpflow stores trials first, so its states are the (B, T, H) transpose of
    torch's (T, B, H) output: the same 48,000 numbers, and the same trace). Returns J and a check."""
    from kpflow.kernels import record, state_jacobian
    from kpflow.models import GRU

    torch.manual_seed(seed)
    gru = torch.nn.GRU(I, H).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    traj = record(GRU.from_torch(gru), x.transpose(0, 1).contiguous())
    with torch.no_grad():
        err = float((traj.states.transpose(0, 1) - gru(x)[0]).abs().max())
    return state_jacobian(traj), err


def mlp_problem(batch=50, d_in=100, width=64, hidden_layers=14, dtype=torch.float32, seed=0):
    """Linear(d_in, width), hidden_layers x [ReLU, Linear(width, width)], ReLU, on a Gaussian batch;
    J = d(outputs)/dθ by torch.func on a probe-batched copy (each probe its own view of θ)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(d_in, width)]
    for _ in range(hidden_layers):
        layers += [torch.nn.ReLU(), torch.nn.Linear(width, width)]
    net = torch.nn.Sequential(*layers, torch.nn.ReLU()).to(dtype)
    x = torch.randn(batch, d_in, dtype=dtype)
    shapes = [tuple(p.shape) for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(theta_k):  # [k, p] -> [k, batch, width]
        ps = _split(theta_k, shapes)
        h = x.expand(theta_k.shape[0], *x.shape)
        for i in range(0, len(ps), 2):
            h = torch.relu(torch.einsum("kbi,koi->kbo", h, ps[i]) + ps[i + 1][:, None])
        return h

    with torch.no_grad():
        err = float((outputs(theta[None])[0] - net(x)).abs().max())
    return jacobian_operator(theta, outputs, (batch, width)), err


def jacobian_operator(theta, fn, out_shape):
    """J = d fn / dθ as a batched FunctionOperator: J w by jvp, J* v by vjp, one batched pass per chunk."""
    p = theta.numel()

    def jw(W):
        return jvp(fn, (theta.expand(W.shape[0], p).contiguous(),), (W,))[1]

    def jtv(V):
        _, pull = vjp(fn, theta.expand(V.shape[0], p).contiguous())
        return pull(V)[0]

    return FunctionOperator(jw, jtv, (p,), out_shape, theta.dtype, theta.device, batched=True)


# ------------------------------------------------------------------------------------------ timing
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def time_direct(NTK, chunk, n_basis):
    """Seconds for the NTK on ``n_basis`` basis vectors (batched like the paper's vmapped Direct)."""
    n = NTK.size_in
    done, total = 0, 0.0
    while done < n_basis:
        k = min(chunk, n_basis - done)
        E = torch.zeros(k, n, dtype=NTK.dtype, device=NTK.device)
        E[torch.arange(k), torch.arange(done, done + k)] = 1
        _, dt = _timed(lambda E=E, k=k: NTK.matmat(E.reshape(k, *NTK.shape_in)))
        total += dt
        done += k
    return total


def estimator_suite(J, NTK, chunk):
    """name -> callable(m, seed) -> Estimate; every one counts m probes (NTK matvecs or J/J* products)."""
    return {
        "hutchinson": lambda m, s: hutchinson_trace(NTK, m, seed=s, chunk_size=chunk),
        "hutch++": lambda m, s: hutchpp_trace(NTK, max(m, 3), seed=s, chunk_size=chunk),
        "xtrace": lambda m, s: xtrace(NTK, max(m, 4), seed=s, chunk_size=chunk, history_points=1),
        # J J* is PSD by construction (the operator algebra does not infer it through a composed J)
        "xnystrace": lambda m, s: xnystrace(NTK, m, seed=s, chunk_size=chunk, history_points=1, assume_psd=True),
        "onesided-forward": lambda m, s: onesided_statistics(J, m, side="forward", seed=s, chunk_size=chunk).trace,
        "onesided-reverse": lambda m, s: onesided_statistics(J, m, side="reverse", seed=s, chunk_size=chunk).trace,
    }


def time_to_tolerance(times, errors, tol):
    """Time at which an error-vs-time curve (sorted by budget) gets below ``tol`` *and stays there*:
    linear interpolation in log-log between the last point above and the first point of the final run
    of points at or below ``tol`` (a lucky early dip does not count). NaN if the last point is above."""
    if not errors or errors[-1] > tol:
        return math.nan
    i = len(errors) - 1
    while i > 0 and errors[i - 1] <= tol:
        i -= 1
    if i == 0 or errors[i] <= 0:
        return times[i]
    t0, e0, t1, e1 = times[i - 1], errors[i - 1], times[i], errors[i]
    w = (math.log(e0) - math.log(tol)) / (math.log(e0) - math.log(e1))
    return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))


def median_curve(records, meth):
    """Median time and median relative error over reruns at each budget of one method."""
    ms = sorted({x["m"] for x in records if x["method"] == meth})
    rows = [[x for x in records if x["method"] == meth and x["m"] == m] for m in ms]
    return ms, [float(np.median([x["time"] for x in r])) for r in rows], \
        [float(np.median([x["rel_err"] for x in r])) for r in rows]


def study(name, J, budgets, reruns, chunk, direct_basis, seed0=0):
    NTK = J @ J.T
    n, p = J.size_out, J.size_in
    side = "forward" if p <= n else "reverse"
    print(f"\n== {name}: state n = {n:,}, parameters = {p:,}; cheapest exact side: {side}")
    J.matmat(torch.zeros(2, *J.shape_in, dtype=J.dtype))  # warm-up
    exact, t_cheap = _timed(lambda: exact_onesided_trace(J, side=side, chunk_size=chunk, max_matvecs=10**6,
                                                          progress=True))
    if t_cheap < 30:  # cheap enough to repeat: median of three against load spikes on shared machines
        t_cheap = float(np.median([t_cheap] + [_timed(lambda: exact_onesided_trace(
            J, side=side, chunk_size=chunk, max_matvecs=10**6))[1] for _ in range(2)]))
    tr = exact.value
    print(f"exact trace (Σ‖J{'' if side == 'forward' else '*'} e_i‖² over {min(n, p):,} basis vectors): "
          f"{tr:.8g} in {t_cheap:.2f} s")
    nb = min(n, direct_basis)
    t_sub = float(np.median([time_direct(NTK, chunk, nb) for _ in range(3)]))
    t_direct = t_sub * n / nb
    how = ("measured" if nb == n else f"extrapolated linearly from {nb:,} of {n:,} basis vectors ({t_sub:.2f} s)")
    how += ", median of 3 timings"
    print(f"direct (NTK on every basis vector): {t_direct:.2f} s, {how}")
    suite = estimator_suite(J, NTK, chunk)
    records = []
    jobs = [(r, meth, m) for r in range(reruns) for meth in suite for m in budgets[meth]]
    for r, meth, m in tqdm(jobs, desc=f"{name} estimators", leave=False):
        seed = seed0 + 1000 * r + m
        est, dt = _timed(lambda meth=meth, m=m, seed=seed: suite[meth](m, seed))
        records.append({"rerun": r, "method": meth, "m": m, "time": dt, "value": est.value,
                        "stderr": est.stderr, "rel_err": abs(est.value - tr) / abs(tr)})
    speed = {}
    for key, tol in TOLERANCES.items():
        best, who = math.nan, None
        for meth in suite:
            _, t, e = median_curve(records, meth)
            tt = time_to_tolerance(t, e, tol)
            if math.isfinite(tt) and not (best <= tt):
                best, who = tt, meth
        speed[key] = {"time_to_tol": best, "vs_direct": t_direct / best, "vs_cheapest_exact": t_cheap / best,
                      "best_method": who}
    return {"n": n, "params": p, "exact_trace": tr, "time_cheapest_exact": t_cheap, "cheapest_side": side,
            "time_direct": t_direct, "direct_basis_measured": nb, "records": records, "speedup": speed}


def print_table(name, res):
    print(f"\n{name}: median over reruns (relative error of the trace, seconds)")
    print(f"{'method':18s} {'m':>6s} {'time [s]':>10s} {'rel. error':>11s} {'rel. stderr':>11s}")
    meths = list(dict.fromkeys(x["method"] for x in res["records"]))
    for meth in meths:
        for m in sorted({x["m"] for x in res["records"] if x["method"] == meth}):
            rows = [x for x in res["records"] if x["method"] == meth and x["m"] == m]
            t = np.median([x["time"] for x in rows])
            e = np.median([x["rel_err"] for x in rows])
            s = np.median([x["stderr"] / res["exact_trace"] for x in rows])
            print(f"{meth:18s} {m:6d} {t:10.3f} {e:11.2e} {s:11.2e}")
    for key, sp in res["speedup"].items():
        print(f"speed-up at {TOLERANCES[key]:.0e}: {sp['vs_direct']:.3g}x vs direct, "
              f"{sp['vs_cheapest_exact']:.3g}x vs cheapest exact (time-to-tolerance {sp['time_to_tol']:.3g} s, "
              f"best method: {sp['best_method']}; nan = not reached within the budget grid)")


def plot(results, path, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items(), strict=True):
        meths = list(dict.fromkeys(x["method"] for x in res["records"]))
        for meth in meths:
            _, t, e = median_curve(res["records"], meth)
            ax.loglog(t, np.maximum(e, 1e-16), "o-", label=meth, ms=3)
        for tol in TOLERANCES.values():
            ax.axhline(tol, color="grey", lw=0.6, ls=":")
        ax.axvline(res["time_cheapest_exact"], color="k", ls="--", lw=0.8, label="cheapest exact")
        ax.axvline(res["time_direct"], color="r", ls="--", lw=0.8, label="direct (NTK on basis)")
        ax.set_xlabel("wall time [s]")
        ax.set_ylabel("relative error of tr(NTK)")
        ax.set_title(f"{name.upper()}: n={res['n']:,}, params={res['params']:,}" + (" (quick)" if quick else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def atomic_json(obj, path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes and budgets (< 1 minute)")
    ap.add_argument("--reruns", type=int, default=None, help="reruns per estimator and budget")
    ap.add_argument("--chunk", type=int, default=256, help="probes per batched pass")
    ap.add_argument("--direct-basis", type=int, default=None, help="basis vectors timed for the direct baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="model dtype (estimator statistics are accumulated in float64 either way)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    reruns = args.reruns or 2
    dt = getattr(torch, args.dtype)
    ntk_methods = ("hutchinson", "hutch++", "xtrace", "xnystrace")
    onesided = ("onesided-forward", "onesided-reverse")
    if quick:
        problems = {"gru": gru_problem(T=10, B=5, I=10, H=16, dtype=dt),
                    "mlp": mlp_problem(batch=10, hidden_layers=4, dtype=dt)}
        grids = {name: dict.fromkeys(ntk_methods + onesided, [6, 24, 96, 384]) for name in problems}
        direct_basis = args.direct_basis or 64
    else:
        problems = {"gru": gru_problem(dtype=dt), "mlp": mlp_problem(dtype=dt)}
        # The GRU NTK spectrum is flat (erank ~ 10³): 0.1 % needs ~2,000 probes, affordable only for the
        # one-sided estimators (one AD pass per probe); the NTK-based ones stop at 192 to keep the run short.
        grids = {
            "gru": {**dict.fromkeys(ntk_methods, [6, 12, 24, 48, 96, 192]),
                    **dict.fromkeys(onesided, [6, 12, 24, 48, 96, 192, 384, 768, 1536, 3072])},
            "mlp": dict.fromkeys(ntk_methods + onesided, [6, 12, 24, 48, 96, 192, 384, 768]),
        }
        direct_basis = args.direct_basis or 512
    print(f"kpflow trace speed-up study ({'quick, reduced sizes' if quick else 'full'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; reruns={reruns}")
    results = {}
    for name, (J, err) in problems.items():
        print(f"{name}: the Jacobian's model reproduces the torch module's output to {err:.1e}")
        results[name] = study(name, J, grids[name], reruns, args.chunk, direct_basis)
    for name, res in results.items():
        print_table(name, res)
    headline = {}
    for name, res in results.items():
        for key, sp in res["speedup"].items():
            headline[f"{name}_speedup_{key}"] = sp["vs_direct"]
            headline[f"{name}_speedup_{key}_vs_cheapest_exact"] = sp["vs_cheapest_exact"]
    suffix = "_quick" if quick else ""
    json_path, png_path = HERE / f"trace_speedup{suffix}.json", HERE / f"trace_speedup{suffix}.png"
    plot(results, png_path, quick)
    atomic_json({"headline": headline, "quick": quick, "reruns": reruns, "paper": PAPER,
                 "notes": {name: {"direct_basis_measured": r["direct_basis_measured"], "n": r["n"]}
                           for name, r in results.items()},
                 "results": results}, json_path)
    print(f"\nwrote {json_path.name} and {png_path.name}; paper reports ~{PAPER['gru_1pct']:.2g}x (GRU) and "
          f"~{PAPER['mlp_1pct']:.0f}x (MLP) at 1 % vs direct")
    for k, v in headline.items():
        print(f"{k}={v:.4g}")
    return headline


if __name__ == "__main__":
    main()
