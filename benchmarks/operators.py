"""Cost of the state-space operators relative to one forward+backward pass of the same model.

Measured side by side in one run (medians over repeats):

* GRU, B=16, T=100, H=256, 3 inputs, float32, 32 probes:
  - ``ntk_probe_over_fwd_bwd``: (time of P K P* on 32 probes) / 32 / (time of one forward+backward
    pass of the model on the same batch); K through the Kronecker core, P/P* by per-step batched JVP/VJP
    (no dense cache). ``ntk_probe_over_fwd_bwd_cached`` is the same with the dense step-Jacobian cache
    (built once; its build time is ``cache_build_over_fwd_bwd``).
  - ``propagator_probe_over_fwd_bwd``: the same ratio for P alone.
  - ``ntk_autodiff_k_probe_over_fwd_bwd``: P K P* with K = Jθ Jθ* by autodiff.
* Vanilla RNN of the same size: ``kron_core_speedup`` = (autodiff K apply) / (Kronecker-core K apply),
  both on 32 probes.
* ``peak_rss_mb``: peak resident memory of the process (and ``peak_cuda_mb`` on CUDA).

Prints the figures, ends with ``key=value`` lines, writes ``operators.json`` beside this script
(``operators_quick.json`` with ``--quick``).
``--quick`` runs a smaller size (B=8, T=20, H=48) in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kpflow.kernels import kronecker_core, parameter_operator, propagator, record
from kpflow.models import GRU, VanillaRNN


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_times(fns: dict, device, repeats: int, baseline: str | None = None) -> dict[str, float]:
    """Median wall time of every function, timed round-robin (``baseline`` again before each other
    function) so that load from other processes affects all of them alike."""
    for fn in fns.values():  # warm-up
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}

    def timed(name):
        t0 = time.perf_counter()
        fns[name]()
        _sync(device)
        times[name].append(time.perf_counter() - t0)

    for r in range(repeats):
        print(f"  timing round {r + 1}/{repeats} of {', '.join(fns)}", flush=True)
        for name in fns:
            if name == baseline:
                continue
            if baseline is not None:
                timed(baseline)
            timed(name)
    return {name: statistics.median(v) for name, v in times.items() if v}


def _fwd_bwd(model, x, z0, y):
    def run():
        model.zero_grad(set_to_none=True)
        states, out = model(x, z0)
        torch.nn.functional.mse_loss(out, y).backward()

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 minute")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; 1 is steadier on a loaded machine)")
    ap.add_argument("--out", default=None, help="JSON path (default: operators.json beside this script, "
                                                 "operators_quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(Path(__file__).with_name("operators_quick.json" if args.quick else "operators.json"))
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.float32
    B, T, H, I, k = (8, 20, 48, 3, 32) if args.quick else (16, 100, 256, 3, 32)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.manual_seed(0)
    print(f"kpflow operator benchmark: B={B} T={T} H={H} I={I} probes={k} float32 on {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)

    results: dict[str, float | int | str] = {}
    x = torch.randn(B, T, I, device=device, dtype=dtype)
    y = torch.randn(B, T, 1, device=device, dtype=dtype)

    # ---------------------------------------------------------------- GRU
    gru = GRU(I, H, 1, dtype=dtype, device=device)
    z0 = torch.zeros(B, H, device=device, dtype=dtype)
    traj = record(gru, x, z0, targets=y)
    Q = torch.randn(k, B, T, H, device=device, dtype=dtype)
    P = propagator(traj, cache=False)
    Theta = P @ parameter_operator(traj, backend="kronecker") @ P.T
    Theta_ad = P @ parameter_operator(traj, backend="autodiff") @ P.T

    traj_c = record(gru, x, z0)
    t0 = time.perf_counter()
    Pc = propagator(traj_c, cache=True)
    Pc.matmat(Q[:1])
    _sync(device)
    t_build = time.perf_counter() - t0
    Theta_c = Pc @ parameter_operator(traj_c, backend="kronecker") @ Pc.T
    med = _median_times({
        "fwd_bwd": _fwd_bwd(gru, x, z0, y),
        "P": lambda: P.matmat(Q),
        "ntk": lambda: Theta.matmat(Q),
        "ntk_ad": lambda: Theta_ad.matmat(Q),
        "ntk_c": lambda: Theta_c.matmat(Q),
        "P_c": lambda: Pc.matmat(Q),
    }, device, repeats, baseline="fwd_bwd")
    t_fb, t_P, t_ntk, t_ntk_ad, t_ntk_c, t_P_c = (med[n] for n in ("fwd_bwd", "P", "ntk", "ntk_ad", "ntk_c", "P_c"))
    print(f"GRU forward+backward (B={B}): {t_fb * 1e3:.1f} ms", flush=True)

    results |= {
        "ntk_probe_over_fwd_bwd": t_ntk / k / t_fb,
        "propagator_probe_over_fwd_bwd": t_P / k / t_fb,
        "ntk_autodiff_k_probe_over_fwd_bwd": t_ntk_ad / k / t_fb,
        "ntk_probe_over_fwd_bwd_cached": t_ntk_c / k / t_fb,
        "propagator_probe_over_fwd_bwd_cached": t_P_c / k / t_fb,
        "cache_build_over_fwd_bwd": t_build / t_fb,
        "gru_fwd_bwd_ms": t_fb * 1e3,
        "gru_ntk_32_probes_ms": t_ntk * 1e3,
        "gru_propagator_32_probes_ms": t_P * 1e3,
    }
    print(f"P K P* on {k} probes: {t_ntk * 1e3:.1f} ms  (per probe / fwd+bwd = "
          f"{results['ntk_probe_over_fwd_bwd']:.3f}; K by autodiff: "
          f"{results['ntk_autodiff_k_probe_over_fwd_bwd']:.3f}; with dense cache: "
          f"{results['ntk_probe_over_fwd_bwd_cached']:.3f})", flush=True)
    print(f"P on {k} probes: {t_P * 1e3:.1f} ms  (per probe / fwd+bwd = "
          f"{results['propagator_probe_over_fwd_bwd']:.3f}; cached: "
          f"{results['propagator_probe_over_fwd_bwd_cached']:.3f}; cache build = "
          f"{results['cache_build_over_fwd_bwd']:.1f} fwd+bwd)", flush=True)

    # ---------------------------------------------------------------- vanilla RNN: Kronecker vs autodiff K
    rnn = VanillaRNN(I, H, 1, dtype=dtype, device=device)
    traj_r = record(rnn, x, z0)
    K_ad = parameter_operator(traj_r, backend="autodiff")
    K_kr = kronecker_core(traj_r).operator()
    med = _median_times({"ad": lambda: K_ad.matmat(Q), "kr": lambda: K_kr.matmat(Q)}, device, repeats)
    t_kad, t_kkr = med["ad"], med["kr"]
    err = float((K_ad.matmat(Q[:2]) - K_kr.matmat(Q[:2])).norm() / K_ad.matmat(Q[:2]).norm())
    t0 = time.perf_counter()
    core = kronecker_core(record(rnn, x, z0))
    tr, fro = core.trace(), core.frobenius_norm()
    t_exact = time.perf_counter() - t0
    results |= {
        "kron_core_speedup": t_kad / t_kkr,
        "rnn_k_autodiff_32_probes_ms": t_kad * 1e3,
        "rnn_k_kronecker_32_probes_ms": t_kkr * 1e3,
        "kron_vs_autodiff_rel_err_float32": err,
        "rnn_exact_trace_fro_s": t_exact,
        "rnn_exact_erank_K": tr * tr / (fro * fro),
    }
    print(f"vanilla RNN K on {k} probes: autodiff {t_kad * 1e3:.1f} ms, Kronecker core {t_kkr * 1e3:.1f} ms "
          f"-> speedup {results['kron_core_speedup']:.2f}x (float32 rel. diff {err:.1e}); exact tr/‖K‖_F/erank "
          f"in {t_exact:.2f} s (erank = {results['rnn_exact_erank_K']:.2f})", flush=True)

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["peak_rss_mb"] = peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20
    if device.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    results |= {"device": str(device), "B": B, "T": T, "H": H, "I": I, "probes": k, "quick": bool(args.quick),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}

    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(f"wrote {out}")
    for key in ("ntk_probe_over_fwd_bwd", "propagator_probe_over_fwd_bwd", "peak_rss_mb", "kron_core_speedup",
                "ntk_probe_over_fwd_bwd_cached", "propagator_probe_over_fwd_bwd_cached",
                "ntk_autodiff_k_probe_over_fwd_bwd"):
        v = results[key]
        print(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
    return results


if __name__ == "__main__":
    main()
