"""Scale-out on Dask: an 8-run sweep on 2 worker processes against the same sweep serially, resume of a
killed sweep, and a probe-sharded estimate against the serial one.

1. ``sweep_speedup_2_workers``: the 8 runs (g ∈ {0.5, 1, 2, 4} × seeds {0, 1}, a small GRU on flip-flop:
   train with checkpoints, measure every checkpoint, write each run's report) through
   ``experiments.distributed.run_tasks``, contenders interleaved in every round, each into a fresh folder:
     * ``serial_1thread``: all runs in this process, torch with 1 thread (``kpflow sweep --scheduler serial``,
       the CLI's default ``--threads 1``);
     * ``serial_2threads``: the same with 2 torch threads, i.e. the serial sweep allowed both cores;
     * ``dask_2workers``: a ``LocalCluster`` of 2 single-threaded worker processes (``--scheduler local
       --workers 2``), one run per worker at a time.
   Fair comparison: both sides may use the same 2 cores. The serial side gets them either as 2 intra-op
   threads or not at all, and we compare with the *better* of the two in each round (criterion fixed here,
   before any data); with 1 thread per run on both sides the work per run is identical and only the
   parallelism across runs differs. The cluster is started (and its workers warmed up by one untimed run,
   as the serial side is) before the rounds; its start time is reported as ``cluster_start_s``. The sweep
   report (``sweep.csv`` + figures) is not timed: it is the same serial step after either.
   Headline: median over rounds of (best serial time / Dask time) for the same round.
2. ``resume_rerun_runs``: ``kpflow sweep`` on 2 local workers in a subprocess, killed (SIGKILL to its whole
   process group, workers included) as soon as half its runs have written ``done.json``; then the same
   command again to completion. Counted from the files, not from kpflow's own report: a finished run is
   "re-run" if any file in its folder changed (mtime or size) or appeared. Must be 0.
3. ``sharded_estimate_rel_diff``: largest relative difference between the estimates (Hutchinson, one-sided,
   XNysTrace) of a GRU's NTK with ``executor=client`` (probe blocks on the 2 workers) and without, same seed.

The machine may be shared: a loaded machine makes the speed-up pessimistic (both workers compete with other
jobs, the serial side less so), and the output says how loaded it was (load average).

    python benchmarks/scale_out.py            # 3 rounds
    python benchmarks/scale_out.py --quick    # 1 round, < 2 minutes on 2 quiet cores

Ends with key=value lines and writes them to scale_out.json (scale_out_quick.json with --quick) beside this
script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from kpflow.experiments.distributed import local_cluster, run_tasks
from kpflow.experiments.pipeline import study_task, sweep_configs
from kpflow.files import atomic_write_text
from kpflow.training import validate_config

HERE = Path(__file__).resolve().parent
GS, SEEDS = (0.5, 1.0, 2.0, 4.0), (0, 1)


def study(out: Path, steps: int) -> dict:
    return {"name": "bench", "seed": 0, "out": str(out),
            "task": {"name": "flipflop", "params": {"n_bits": 2, "seq_len": 20, "pulse_prob": 0.2}},
            "model": {"name": "gru", "hidden": 16},
            "optimizer": {"name": "adam", "lr": 0.01},
            "train": {"steps": steps, "batch_size": 16, "checkpoint_every": steps // 2},
            "track": {"eval_batch": 4, "probes": 8, "axes": False}}


def sweep_tasks(root: Path, name: str, steps: int):
    cfgs = sweep_configs(validate_config(study(root / name, steps)), GS, SEEDS)
    return [study_task(c) for c in cfgs]


def timed_sweep(tasks, **kw) -> float:
    t0 = time.perf_counter()
    rep = run_tasks(tasks, progress=False, **kw)
    dt = time.perf_counter() - t0
    assert len(rep.ran) == len(tasks), rep
    return dt


def speedup(root: Path, rounds: int, steps: int) -> dict:
    from distributed import Client

    t0 = time.perf_counter()
    cluster = local_cluster(2)
    client = Client(cluster)
    client.wait_for_workers(2)
    start_s = time.perf_counter() - t0
    try:
        # warm-up, untimed: one run on each worker and one here (imports, first-call overheads)
        warm = sweep_tasks(root, "warm", steps)
        timed_sweep(warm[:2], client=client)
        timed_sweep(warm[2:3], scheduler="serial", threads=1)
        contenders = {
            "serial_1thread": lambda name: timed_sweep(sweep_tasks(root, name, steps), scheduler="serial", threads=1),
            "serial_2threads": lambda name: timed_sweep(sweep_tasks(root, name, steps), scheduler="serial",
                                                        threads=2),
            "dask_2workers": lambda name: timed_sweep(sweep_tasks(root, name, steps), client=client, threads=1),
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        order = list(contenders)
        for r in range(rounds):
            for name in order[r % 3:] + order[:r % 3]:  # rotate who goes first
                times[name].append(contenders[name](f"r{r}_{name}"))
                print(f"round {r}: {name} {times[name][-1]:.2f} s", flush=True)
    finally:
        client.close()
        cluster.close()
        torch.set_num_threads(1)
    serial_best = np.minimum(times["serial_1thread"], times["serial_2threads"])
    ratio = serial_best / np.array(times["dask_2workers"])
    return {"sweep_speedup_2_workers": float(np.median(ratio)),
            "sweep_speedup_vs_serial_1thread": float(np.median(np.array(times["serial_1thread"])
                                                               / times["dask_2workers"])),
            "sweep_serial_1thread_s": float(np.median(times["serial_1thread"])),
            "sweep_serial_2threads_s": float(np.median(times["serial_2threads"])),
            "sweep_dask_2workers_s": float(np.median(times["dask_2workers"])),
            "sweep_runs": len(GS) * len(SEEDS), "sweep_rounds": rounds, "cluster_start_s": start_s}


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*") if p.is_file()}


def resume(root: Path, steps: int) -> dict:
    cfg = root / "resume.yaml"
    cfg.write_text(yaml.safe_dump(study(root / "resume", steps)))
    cmd = [sys.executable, "-m", "kpflow", "sweep", str(cfg), "--gs", ",".join(f"{g:g}" for g in GS), "--seeds",
           ",".join(map(str, SEEDS)), "--scheduler", "local", "--workers", "2", "-q"]
    sweep_dir = root / "resume" / "bench_sweep"
    n = len(GS) * len(SEEDS)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while len(list(sweep_dir.glob("*/done.json"))) < n // 2:
            if proc.poll() is not None:
                raise RuntimeError(f"the sweep ended (rc={proc.returncode}) before half its runs were done")
            if time.time() > deadline:
                raise RuntimeError("the sweep did not finish half its runs in 10 minutes")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler and its worker processes
        proc.wait()
    finished = {p.parent.name: _snapshot(p.parent) for p in sweep_dir.glob("*/done.json")}
    started = [p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name not in finished and p.name != "figures"]
    t0 = time.perf_counter()
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    if rerun.returncode != 0:
        raise RuntimeError(f"the resumed sweep failed:\n{rerun.stderr[-3000:]}")
    rerun_s = time.perf_counter() - t0
    rerun_runs = sum(_snapshot(sweep_dir / k) != snap for k, snap in finished.items())
    return {"resume_rerun_runs": rerun_runs, "resume_finished_at_kill": len(finished),
            "resume_started_unfinished_at_kill": len(started),
            "resume_completed_after": len(list(sweep_dir.glob("*/done.json"))), "resume_rerun_s": rerun_s}


def sharded(probes: int) -> dict:
    """Estimates of a GRU NTK (float64) with ``executor=client`` (2 workers) and without; same seeds."""
    from distributed import Client

    from kpflow import estimators as E
    from kpflow.kernels import parameter_operator, propagator, record
    from kpflow.models import GRU

    torch.manual_seed(0)
    gru = GRU(3, 32, 1, dtype=torch.float64)
    x = torch.randn(4, 20, 3, dtype=torch.float64)
    traj = record(gru, x, torch.zeros(4, 32, dtype=torch.float64))
    P = propagator(traj)
    ntk = P @ parameter_operator(traj) @ P.T
    runs = {
        "hutchinson": lambda ex: E.hutchinson_trace(ntk, probes, seed=1, chunk_size=8, executor=ex),
        "hutchinson_rtol": lambda ex: E.hutchinson_trace(ntk, 4 * probes, seed=1, chunk_size=8, rtol=0.02,
                                                         executor=ex),
        "xnystrace": lambda ex: E.xnystrace(ntk, probes, seed=1, chunk_size=8, executor=ex),
        "onesided": lambda ex: E.onesided_statistics(P, probes, seed=1, chunk_size=8, executor=ex).effective_rank,
    }
    out, diffs = {}, []
    with local_cluster(2) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        for name, fn in runs.items():
            a, b = fn(None), fn(client)
            diffs.append(abs(a.value - b.value) / abs(a.value))
            assert a.num_probes == b.num_probes, (name, a, b)
            out[f"sharded_{name}_value"] = b.value
            print(f"sharded {name}: serial {a.value:.10g}, sharded {b.value:.10g} ({b.num_probes} probes)", flush=True)
    return {"sharded_estimate_rel_diff": float(max(diffs)), **out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, < 2 minutes")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default: scale_out[_quick].json beside this script)")
    args = ap.parse_args(argv)
    out = Path(args.out or HERE / ("scale_out_quick.json" if args.quick else "scale_out.json"))
    rounds = args.rounds or (1 if args.quick else 3)
    steps = 20 if args.quick else 40
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    print(f"kpflow scale-out benchmark: {len(GS) * len(SEEDS)}-run sweep, {rounds} round(s), {os.cpu_count()} cores, "
          f"load average {load0:.2f}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="kpflow_scale_out_") as tmp:
        root = Path(tmp)
        results |= speedup(root, rounds, steps)
        results |= resume(root, steps)
    results |= sharded(32 if args.quick else 96)
    results |= {"load_average_start": load0, "load_average_end": os.getloadavg()[0], "cores": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version(), "quick": bool(args.quick)}
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    for k, v in results.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return results


if __name__ == "__main__":
    main()
