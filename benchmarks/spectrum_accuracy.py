"""Top-eigenpair accuracy and cost at the defaults: Lanczos vs randomized subspace iteration.

For each spectrum (n × n dense float64 operator with a prescribed spectrum) and each ``which``, both
methods run at their defaults, interleaved within each round. Recorded per (spectrum, which,
method): the largest relative eigenvalue error against ``torch.linalg.eigvalsh``, whether the
solver reported all pairs converged, the matvecs it spent and the median wall time over rounds.
A run is *honest* when every pair it flags converged is within 1e-6 relative error.

    python benchmarks/spectrum_accuracy.py           # n = 1000, 3 rounds; writes spectrum_accuracy.json
    python benchmarks/spectrum_accuracy.py --quick   # n = 300, 1 round
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import warnings

import torch

from kpflow.estimators import ConvergenceWarning, top_eigenpairs
from kpflow.files import atomic_write_text
from kpflow.operators import DenseOperator

DT = torch.float64


def spectra(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "power_law": torch.arange(1, n + 1, dtype=DT) ** -1.0,
        "gapless": torch.linspace(1e-3, 1, n, dtype=DT),
        "cluster": torch.cat([1 + 1e-4 * torch.arange(8, dtype=DT), 0.9 * torch.rand(n - 8, generator=g, dtype=DT)]),
        "repeated": torch.cat([torch.ones(5, dtype=DT), torch.linspace(1e-3, 0.9, n - 5, dtype=DT)]),
        "indefinite": torch.cat([-2.5 + 0.01 * torch.rand(20, generator=g, dtype=DT),
                                 torch.linspace(-1, 1, n - 20, dtype=DT)]),
    }


def wanted(lam, which, k):
    if which == "largest":
        return lam.sort(descending=True).values[:k]
    if which == "smallest":
        return lam.sort().values[:k]
    return lam[lam.abs().argsort(descending=True)][:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    n, rounds = (300, 1) if args.quick else (1000, 3)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small dense products; the solvers' cost is in matvecs and Python
    rows = []
    for name, lam in spectra(n).items():
        U = torch.linalg.qr(torch.randn(n, n, dtype=DT)).Q
        M = U * lam @ U.T
        A = DenseOperator((M + M.T) / 2, is_self_adjoint=True)
        exact = torch.linalg.eigvalsh(A.matrix)
        for which in ("largest", "smallest", "largest_magnitude"):
            want = wanted(exact, which, args.k)
            times = {"lanczos": [], "randomized": []}
            last = {}
            for r in range(rounds):
                order = ("lanczos", "randomized") if r % 2 == 0 else ("randomized", "lanczos")
                for method in order:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        t0 = time.perf_counter()
                        res = top_eigenpairs(A, args.k, method=method, which=which, seed=r)
                        times[method].append(time.perf_counter() - t0)
                    rel = (res.values - want).abs() / want.abs().clamp(min=1e-300)
                    last[method] = dict(
                        spectrum=name, which=which, method=method, max_rel_error=float(rel.max()),
                        all_converged=res.all_converged, n_converged=int(res.converged.sum()),
                        honest=bool((rel[res.converged] <= 1e-6).all()),
                        warned=any(issubclass(w.category, ConvergenceWarning) for w in caught),
                        matvecs=res.num_matvecs, iterations=res.iterations)
            for method, row in last.items():
                row["median_seconds"] = statistics.median(times[method])
                rows.append(row)
                print(f"{name:11s} {which:18s} {method:10s} err={row['max_rel_error']:.1e} "
                      f"converged={row['n_converged']}/{args.k} matvecs={row['matvecs']:5d} "
                      f"t={row['median_seconds']:.3f}s honest={row['honest']}")
    out = pathlib.Path(__file__).with_suffix(".json")
    atomic_write_text(out, json.dumps({"n": n, "k": args.k, "rounds": rounds, "rows": rows}, indent=1))
    lan = [r for r in rows if r["method"] == "lanczos"]
    ran = [r for r in rows if r["method"] == "randomized"]
    print(f"honest_runs={sum(r['honest'] for r in rows)}/{len(rows)}")
    print(f"lanczos_all_converged={sum(r['all_converged'] for r in lan)}/{len(lan)}")
    print(f"randomized_all_converged={sum(r['all_converged'] for r in ran)}/{len(ran)}")
    print(f"lanczos_max_rel_error_when_converged={max(r['max_rel_error'] for r in lan if r['all_converged']):.2e}")
    print(f"lanczos_median_matvecs={statistics.median(r['matvecs'] for r in lan):.0f}")
    print(f"randomized_median_matvecs={statistics.median(r['matvecs'] for r in ran):.0f}")


if __name__ == "__main__":
    main()
