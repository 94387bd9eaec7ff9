"""Fair benchmark of kpflow's state-space operators against the user's alternative and the machine's floor.

Model: a GRU (``kpflow.models.GRU``, exactly ``torch.nn.GRUCell``) with H = 256, 3 inputs, B = 16 trials,
T = 100 steps, float32, k = 32 probes in the state space ``[B, T, H]`` (``--quick``: the same H, B and k,
T = 20 and fewer rounds, so the ratios mean the same).

Contenders (all on the same weights, in one process, timed once each in every round in a rotating order;
every ratio is formed per round and the median over rounds is reported):

* ``ntk``: kpflow Θ = P K P* on the k probes, ``ntk(traj).matmat(Q)`` with the public defaults;
  ``P``: ``propagator(traj).matmat(Q)``; ``K``: ``parameter_operator(traj).matmat(Q)``;
  ``onesided``: what ``kpflow.estimators.onesided_statistics(state_jacobian(traj))`` applies per probe —
  ``J w`` (forward) or ``J* v`` (reverse) of ``J = P Jθ``, the side ``choose_side`` picks (``onesided_side``).
* ``torch_func``: the user's alternative, Θ q = J (J* q) for the states of a ``torch.nn.GRU`` holding the
  same weights, as a function of its parameters through ``torch.func.functional_call``: one ``vjp`` (its
  forward is set-up, not timed), ``vmap`` of the pullback over the k probes, then ``vmap`` over the k
  parameter tangents of ``jvp`` — or of the ``linearize``d function; both are timed and the faster is kept
  as the contender (``torch_func_variant_1t``/``_2t``). On CUDA it runs with cuDNN disabled (cuDNN's fused RNN has no
  forward-mode derivative); the fwd+bwd references keep cuDNN. Checked once (untimed) against kpflow's Θ q:
  ``torch_func_rel_diff`` = ‖Θ_kpflow Q − Θ_torch.func Q‖ / ‖Θ_torch.func Q‖.
* ``fwd_bwd_512`` / ``fwd_bwd_B``: ``nn.GRU`` forward + backward (to the parameters) at the probes'
  effective batch B·k (reported divided by k: ``fwd_bwd_512_per_probe_ms``) and at batch B.
* the floor: FLOPs per probe (below) / the machine's measured float32 GEMM peak (``peak_gflops``: best of
  a few repeats over the GEMM shapes the operators use, in the same run and thread setting).

FLOPs per probe (matmuls only; the elementwise gate terms are O(B·T·H), < 2 % here), N = B·T sites,
G = 3 gates, I inputs:

* P (and P*): one ``W_hh``-sized product per step, ``2·B·T·G·H·H`` = 6 N H².
* K = Jθ Jθ*: factored form (``Jθ* y`` is ``Σ_sites δ ⊗ [x, h, 1]``, ``Jθ w`` its transpose), per weight
  ``2·N·G·H·(width)`` each way: ``4·N·G·H·(I + H + 2)`` (the 2 are the two biases). Gram form (N×N site
  Gram precomputed): ``2·N²`` per coefficient column, with r, z sharing coefficients across ih/hh (2H columns)
  and n separate (2H columns): ``8·N²·H``. The floor uses the cheaper of the two (``flops_K_*``).
* Θ = P K P*: P + K + P*. One-sided: Jθ (factored half of K) + P.

Other figures:

* set-up (``setup_first_over_fwd``, ``setup_over_fwd``): in a fresh subprocess (kpflow and torch imported,
  nothing else run): set-up = t(``record`` + ``ntk`` + the first Θ on 1 probe) − t(a later Θ on 1 probe),
  i.e. everything the first application builds except the probe work. "first" is the first trajectory of
  the process (lazy imports, compilation, caches count), "later" a new ``record`` of the same model after
  its weights changed. Both divided by one kpflow forward pass (``model(x, z0)`` under ``no_grad``, median).
  The import of ``kpflow.kernels`` in that process is reported apart (``import_kpflow_s``).
* ``time_exponent_T``: least-squares slope of log(time of Θ on k probes) on log T, T in {25, 50, 100, 200}
  ({10, 20, 40} with ``--quick``), timed in the same rounds.
* memory: each contender in its OWN subprocess (two such subprocesses run side by side): ``ru_maxrss``
  after the contender ran once, minus ``ru_maxrss`` after its set-up (model, record, operators built,
  probes drawn; on CUDA ``max_memory_allocated`` minus ``memory_allocated`` after set-up).
  ``memory_per_step_over_output`` = (least-squares slope over T of Θ's peak increase) / (bytes of the
  probe output per step, k·B·H·4).

Threads: every timing/memory figure is measured at 1 and 2 torch threads, each in its own subprocess
(``torch.set_num_threads`` before anything else); the keys ``..._1t`` and ``..._2t`` hold them and the plain
key the worse of the two (the larger for costs and ratios).

Usage: ``python benchmarks/operators.py [--quick] [--device cpu|cuda] [--threads 1,2] [--rounds R]``.
Prints a progress line per round, ends with ``key=value`` lines and writes ``operators.json`` beside this
script (``operators_quick.json`` with ``--quick``), atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

I_DIM, H_DIM, B_DIM, PROBES = 3, 256, 16, 32
FULL = {"T": 100, "T_list": (25, 50, 100, 200), "rounds": 5}
QUICK = {"T": 20, "T_list": (10, 20, 40), "rounds": 3}
MEMORY = ("ntk", "P", "K", "onesided", "torch_func", "fwd_bwd_512")


# ------------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _slope(xs, ys) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def flops_per_probe(B: int, T: int, H: int, I: int) -> dict[str, float]:
    """Analytic matmul FLOPs of one probe through each operator (see the module docstring)."""
    N, G = B * T, 3
    p = 2.0 * N * G * H * H
    k_fact = 4.0 * N * G * H * (I + H + 2)
    k_gram = 8.0 * N * N * H
    k = min(k_fact, k_gram)
    return {"P": p, "K": k, "K_factored": k_fact, "K_gram": k_gram, "ntk": 2 * p + k, "onesided": p + k_fact / 2}


# ------------------------------------------------------------------------------------------ set-up of contenders
def _setup(device, T: int, only=None, seed: int = 0):
    """Model, data, probes and the callables of the contenders in ``only`` (default: all); nothing timed.

    Each contender is built only when asked for, so that a memory subprocess holds nothing of the others.
    """
    import torch

    from kpflow.models import GRU

    dtype = torch.float32
    g = torch.Generator().manual_seed(seed)
    tgru = torch.nn.GRU(I_DIM, H_DIM, batch_first=True)  # torch's initialisation; kpflow's model copies it
    model = GRU.from_torch(tgru).to(device=device, dtype=dtype)
    tgru = tgru.to(device=device, dtype=dtype)
    x = torch.randn(B_DIM, T, I_DIM, generator=g).to(device, dtype)
    z0 = torch.zeros(B_DIM, H_DIM, device=device, dtype=dtype)
    Q = torch.randn(PROBES, B_DIM, T, H_DIM, generator=g).to(device, dtype)
    env = {"model": model, "x": x, "z0": z0, "Q": Q}
    only = set(only or ("ntk", "P", "K", "onesided", "torch_func_jvp", "torch_func_linearize", "fwd_bwd_512",
                        "fwd_bwd_B"))
    fns = {}

    if only & {"ntk", "P", "K", "onesided"}:
        from kpflow.kernels import ntk, parameter_operator, propagator, record, state_jacobian

        traj = record(model, x, z0)
        if "ntk" in only:
            env["Theta"] = Theta = ntk(traj)
            fns["ntk"] = lambda: Theta.matmat(Q)
        if "P" in only:
            P = propagator(traj)
            fns["P"] = lambda: P.matmat(Q)
        if "K" in only:
            K = parameter_operator(traj)
            fns["K"] = lambda: K.matmat(Q)
        if "onesided" in only:
            from kpflow.estimators.onesided import _side_ops, choose_side

            J = state_jacobian(traj)
            env["side"] = side = choose_side(J)
            apply_1s, shape_1s, _ = _side_ops(J, side)
            Q1 = torch.randn(PROBES, *shape_1s, generator=g).to(device, dtype)
            fns["onesided"] = lambda: apply_1s(Q1)

    if only & {"torch_func_jvp", "torch_func_linearize"}:  # the user's alternative on nn.GRU, same weights
        from torch.func import functional_call, jvp, linearize, vjp, vmap

        params = {n: p.detach() for n, p in tgru.named_parameters()}
        h0 = z0.unsqueeze(0)

        def plain():  # cuDNN's fused RNN has no forward-mode derivative: torch.func runs the native kernels
            return (torch.backends.cudnn.flags(enabled=False) if device.type == "cuda"
                    else contextlib.nullcontext())

        def states(prm):
            return functional_call(tgru, prm, (x, h0))[0]

        with plain():
            _, pullback = vjp(states, params)  # one forward per trajectory: set-up, as kpflow's record

        def tf_jvp(Qs):
            with plain():
                (g_,) = vmap(pullback)(Qs)
                return vmap(lambda t: jvp(states, (params,), (t,))[1])(g_)

        env["tf_jvp"] = tf_jvp
        fns["torch_func_jvp"] = lambda: tf_jvp(Q)
        if "torch_func_linearize" in only:
            with warnings.catch_warnings(), plain():  # make_fx's constant folding warns about its own graph
                warnings.simplefilter("ignore", UserWarning)
                push = linearize(states, params)[1]  # built once per trajectory, like the pullback

            def tf_lin():
                with plain():
                    (g_,) = vmap(pullback)(Q)
                    return vmap(push)(g_)

            fns["torch_func_linearize"] = tf_lin

    def fwd_bwd(batch_x):  # nn.GRU forward + backward to its parameters
        hb = torch.zeros(1, batch_x.shape[0], H_DIM, device=device, dtype=dtype)
        w = torch.randn(batch_x.shape[0], T, H_DIM, generator=g).to(device, dtype)

        def run():
            tgru.zero_grad(set_to_none=True)
            out = tgru(batch_x, hb)[0]
            (out * w).sum().backward()

        return run

    if "fwd_bwd_512" in only:
        fns["fwd_bwd_512"] = fwd_bwd(x.repeat(PROBES, 1, 1))
    if "fwd_bwd_B" in only:
        fns["fwd_bwd_B"] = fwd_bwd(x)
    env["fns"] = fns
    return env


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_peak(device, T: int, repeats: int = 5) -> float:
    """Best float32 GEMM rate (GFLOP/s) over the shapes the operators use."""
    import torch

    N, G, H, B, k = B_DIM * T, 3, H_DIM, B_DIM, PROBES
    shapes = [(B * k, H, G * H), (N, G * H, H + I_DIM + 2), (G * H, N, H), (N, H, G * H * 4)]
    best = 0.0
    for m, kk, n in shapes:
        a = torch.randn(m, kk, device=device)
        b = torch.randn(kk, n, device=device)
        c = a @ b
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            _sync(device)
            best = max(best, 2.0 * m * kk * n / (time.perf_counter() - t0) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ workers
def worker_timing(args) -> dict:
    import torch

    device = torch.device(args.device)
    cfg = QUICK if args.quick else FULL
    T, rounds = cfg["T"], args.rounds or cfg["rounds"]
    env = _setup(device, T)
    fns = env["fns"]

    # correctness check (untimed): kpflow's Θ q vs torch.func's J (J* q)
    Qc = env["Q"][:4]
    a, b = env["Theta"].matmat(Qc), env["tf_jvp"](Qc)
    rel = float((a - b).norm() / b.norm())
    print(f"[{args.threads}t] check: kpflow Θq vs torch.func J(J*q): relative difference {rel:.2e}", flush=True)

    # Θ at other T for the exponent
    from kpflow.kernels import ntk, record

    for Tj in cfg["T_list"]:
        if Tj == T:
            fns[f"ntk_T{Tj}"] = fns["ntk"]
            continue
        xj = torch.randn(B_DIM, Tj, I_DIM, device=device)
        Qj = torch.randn(PROBES, B_DIM, Tj, H_DIM, device=device)
        Th = ntk(record(env["model"], xj, env["z0"]))
        fns[f"ntk_T{Tj}"] = (lambda Th_, Q_: (lambda: Th_.matmat(Q_)))(Th, Qj)
    for fn in fns.values():  # warm-up (first applications build cores and caches)
        fn()
    _sync(device)

    names = [n for n in fns if not (n.startswith("ntk_T") and fns[n] is fns["ntk"])]
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks = []
    for r in range(rounds):
        t_round = time.perf_counter()
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
        peaks.append(_gemm_peak(device, T, repeats=2))
        tf = min(times["torch_func_jvp"][-1], times["torch_func_linearize"][-1])
        print(f"[{args.threads}t] round {r + 1}/{rounds} ({time.perf_counter() - t_round:.1f} s): "
              f"Θ {times['ntk'][-1] * 1e3:.0f} ms, torch.func {tf * 1e3:.0f} ms, "
              f"fwd+bwd@{B_DIM * PROBES} {times['fwd_bwd_512'][-1] * 1e3:.0f} ms on {PROBES} probes", flush=True)
    for Tj in cfg["T_list"]:
        times[f"ntk_T{Tj}"] = times["ntk"] if Tj == T else times[f"ntk_T{Tj}"]

    med = {n: statistics.median(v) for n, v in times.items()}
    variant = "jvp" if med["torch_func_jvp"] <= med["torch_func_linearize"] else "linearize"
    times["torch_func"] = times[f"torch_func_{variant}"]
    med["torch_func"] = med[f"torch_func_{variant}"]
    peak = max(peaks + [_gemm_peak(device, T)])
    fl = flops_per_probe(B_DIM, T, H_DIM, I_DIM)

    def paired(a_, b_, scale=1.0):
        return statistics.median(x / y * scale for x, y in zip(times[a_], times[b_], strict=True))

    res = {
        "ntk_probe_over_torch_func": paired("ntk", "torch_func"),
        "ntk_probe_over_floor": med["ntk"] / PROBES / (fl["ntk"] / (peak * 1e9)),
        "time_exponent_T": _slope([math.log(t) for t in cfg["T_list"]],
                                  [math.log(med[f"ntk_T{t}"]) for t in cfg["T_list"]]),
        "ntk_probe_over_fwd_bwd_512": paired("ntk", "fwd_bwd_512"),
        "ntk_probe_over_fwd_bwd": paired("ntk", "fwd_bwd_B", 1.0 / PROBES),
        "propagator_probe_over_floor": med["P"] / PROBES / (fl["P"] / (peak * 1e9)),
        "K_probe_over_floor": med["K"] / PROBES / (fl["K"] / (peak * 1e9)),
        "onesided_probe_over_floor": med["onesided"] / PROBES / (fl["onesided"] / (peak * 1e9)),
        "propagator_probe_over_fwd_bwd_512": paired("P", "fwd_bwd_512"),
        "K_probe_over_fwd_bwd_512": paired("K", "fwd_bwd_512"),
        "onesided_probe_over_torch_func": paired("onesided", "torch_func"),
        "torch_func_probe_over_floor": med["torch_func"] / PROBES / (fl["ntk"] / (peak * 1e9)),
        "torch_func_linearize_over_jvp": paired("torch_func_linearize", "torch_func_jvp"),
        "peak_gflops": peak,
        "floor_ntk_probe_ms": fl["ntk"] / (peak * 1e9) * 1e3,
        "torch_func_rel_diff": rel,
    }
    for n in ("ntk", "P", "K", "onesided", "torch_func", "torch_func_jvp", "torch_func_linearize",
              "fwd_bwd_512"):
        res[f"{n}_per_probe_ms"] = med[n] / PROBES * 1e3
    res["fwd_bwd_B_ms"] = med["fwd_bwd_B"] * 1e3
    for Tj in cfg["T_list"]:
        res[f"ntk_{PROBES}_probes_T{Tj}_ms"] = med[f"ntk_T{Tj}"] * 1e3
    return {"figures": res, "torch_func_variant": variant, "onesided_side": env["side"],
            "flops_per_probe": fl}


def worker_setup(args) -> dict:
    """Set-up of the first trajectory in this fresh process, then of a later one (module docstring)."""
    import torch

    t0 = time.perf_counter()
    from kpflow.kernels import ntk, record
    from kpflow.models import GRU

    t_import = time.perf_counter() - t0
    device = torch.device(args.device)
    T = (QUICK if args.quick else FULL)["T"]
    torch.manual_seed(0)
    model = GRU(I_DIM, H_DIM, 1, dtype=torch.float32, device=device)
    x = torch.randn(B_DIM, T, I_DIM, device=device)
    z0 = torch.zeros(B_DIM, H_DIM, device=device)
    q = torch.randn(1, B_DIM, T, H_DIM, device=device)

    def one(perturb: bool) -> tuple[float, float]:
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        _sync(device)
        t0 = time.perf_counter()
        Th = ntk(record(model, x, z0))
        Th.matmat(q)
        _sync(device)
        t_first = time.perf_counter() - t0
        later = []
        for _ in range(3):
            t0 = time.perf_counter()
            Th.matmat(q)
            _sync(device)
            later.append(time.perf_counter() - t0)
        return t_first, min(later)

    first, later_probe = one(False)
    seconds = [one(True) for _ in range(3)]
    fwd = []
    with torch.no_grad():
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            model(x, z0)
            _sync(device)
            fwd.append(time.perf_counter() - t0)
    t_fwd = statistics.median(fwd)
    setup_first = first - later_probe
    setup_later = statistics.median(a - b for a, b in seconds)
    return {"figures": {"setup_first_over_fwd": setup_first / t_fwd, "setup_over_fwd": setup_later / t_fwd,
                        "setup_first_s": setup_first, "setup_later_s": setup_later, "kpflow_fwd_B_ms": t_fwd * 1e3,
                        "import_kpflow_s": t_import}}


def worker_memory(args) -> dict:
    """Peak memory increase of one contender (``--contender``) at ``--T``, in this process alone."""
    import torch

    device = torch.device(args.device)
    name = "torch_func_jvp" if args.contender == "torch_func" else args.contender
    fn = _setup(device, args.T, only=[name])["fns"][name]
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    _sync(device)
    if device.type == "cuda":
        inc = torch.cuda.max_memory_allocated(device) - base
    else:
        unit = 1 if sys.platform == "darwin" else 1024
        inc = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * unit
    return {"bytes": inc}


# ------------------------------------------------------------------------------------------ driver
def _run_worker(args, threads: int, *extra) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--worker", *extra, "--threads", str(threads), "--device", args.device,
           "--result", path, *(["--quick"] if args.quick else []),
           *(["--rounds", str(args.rounds)] if args.rounds else [])]
    try:
        subprocess.run(cmd, check=True)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 20, fewer rounds: the whole run in < 3 minutes")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, --quick 3)")
    ap.add_argument("--out", default=None, help="JSON path (default: operators.json beside this script, "
                                                 "operators_quick.json with --quick)")
    ap.add_argument("--worker", default=None, choices=("timing", "setup", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # a subprocess: threads first, then torch
        import torch

        torch.set_num_threads(int(args.threads))
        out = {"timing": worker_timing, "setup": worker_setup, "memory": worker_memory}[args.worker](args)
        _write_json(Path(args.result), out)
        return out

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available (valid here: cpu)")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
        if not thread_counts or min(thread_counts) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated positive integers, got {args.threads!r}") from None
    if args.out is None:
        args.out = str(Path(__file__).with_name("operators_quick.json" if args.quick else "operators.json"))
    cfg = QUICK if args.quick else FULL
    T = cfg["T"]
    t_start, load_start = time.perf_counter(), _loadavg()
    print(f"kpflow operator benchmark: GRU H={H_DIM} I={I_DIM} B={B_DIM} T={T} probes={PROBES} float32 on "
          f"{args.device}, threads {thread_counts} (torch {torch.__version__}); load average {load_start}",
          flush=True)

    per_thread: dict[int, dict] = {}
    meta: dict = {}
    for th in thread_counts:
        fig: dict[str, float] = {}
        print(f"== {th} thread(s): timing (own subprocess)", flush=True)
        tim = _run_worker(args, th, "timing")
        fig |= tim["figures"]
        meta |= {f"torch_func_variant_{th}t": tim["torch_func_variant"], "onesided_side": tim["onesided_side"],
                 "flops_per_probe": tim["flops_per_probe"]}
        print(f"== {th} thread(s): set-up (fresh subprocess)", flush=True)
        fig |= _run_worker(args, th, "setup")["figures"]
        print(f"== {th} thread(s): memory (one subprocess per contender, two at a time)", flush=True)
        jobs = [(c, T) for c in MEMORY] + [("ntk", Tj) for Tj in cfg["T_list"] if Tj != T]
        # peak memory is per process, so two can run side by side (only the timings need a quiet machine)
        with ThreadPoolExecutor(max_workers=2) as pool:
            got = list(pool.map(lambda j, th=th: _run_worker(args, th, "memory", "--contender", j[0], "--T", str(j[1])),
                                jobs))
        mem = {j: r["bytes"] for j, r in zip(jobs, got, strict=True)}
        for c in MEMORY:
            fig[f"{c}_peak_memory_mb"] = mem[(c, T)] / 2**20
        mem_T = [mem[("ntk", Tj)] for Tj in cfg["T_list"]]
        for Tj, m in zip(cfg["T_list"], mem_T, strict=True):
            fig[f"ntk_peak_memory_T{Tj}_mb"] = m / 2**20
        per_step = _slope(list(cfg["T_list"]), mem_T)
        fig["ntk_memory_per_step_mb"] = per_step / 2**20
        fig["memory_per_step_over_output"] = per_step / (PROBES * B_DIM * H_DIM * 4)
        per_thread[th] = fig

    results: dict = {}
    for key in per_thread[thread_counts[0]]:
        vals = [per_thread[th][key] for th in thread_counts]
        for th, v in zip(thread_counts, vals, strict=True):
            results[f"{key}_{th}t"] = v
        # the worse of the thread settings: the smaller GEMM rate; for costs, cost ratios, the exponent,
        # memory and the check's difference, the larger
        results[key] = min(vals) if key == "peak_gflops" else max(vals)
    results |= meta
    results |= {"device": args.device, "device_name": (torch.cuda.get_device_name(args.device)
                                                        if args.device.startswith("cuda") else platform.processor()
                                                        or platform.machine()),
                "threads": thread_counts, "torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "B": B_DIM, "T": T, "H": H_DIM, "I": I_DIM, "probes": PROBES,
                "T_list": list(cfg["T_list"]), "rounds": args.rounds or cfg["rounds"], "quick": bool(args.quick),
                "thread_mode": "one subprocess per thread count (torch.set_num_threads before anything)",
                "load_average_start": load_start, "load_average_end": _loadavg(),
                "wall_s": time.perf_counter() - t_start}
    out = Path(args.out)
    _write_json(out, results)
    print(f"wrote {out} in {results['wall_s']:.0f} s; load average at end {results['load_average_end']}")
    for key, v in results.items():
        if isinstance(v, float):
            print(f"{key}={v:.4g}")
        elif isinstance(v, (int, str)):
            print(f"{key}={v}")
    return results


if __name__ == "__main__":
    main()
