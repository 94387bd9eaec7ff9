"""Continuation of fixed points: location accuracy on the normal forms, and cost against one Newton solve.

Two figures, measured in one run:

* ``normal_form_location_max_err``: the worst ``|μ*|`` over the special points located by
  ``kpflow.dynamics.continue_fixed_points`` on the classical normal forms, whose bifurcation is at
  ``μ = 0`` exactly: saddle-node, transcritical, pitchfork (both signs of the cubic), flip (both
  signs), Neimark–Sacker (both signs) as maps, and a Hopf point of an RK4-stepped planar flow
  (``ż = (μ + iω) z + c|z|² z``, dt = 0.1, ω = 2). Each must also come back with the right type and
  criticality (``normal_form_all_classified=1``).
* ``gru_continuation_over_newton``: a 64-unit GRU (float64, random weights, biases), the gain ``g`` on
  its recurrent weight ``weight_hh`` continued from ``g = 1`` to ``g = 5`` with every special point
  located and classified, timed against one Newton solve of the fixed point at the first gain from the
  zero state (``kpflow.dynamics.newton_polish``). Contenders are interleaved, round by round; the
  figure is the median of the per-round ratios. ``gru_special_points`` counts what was found.

Prints ``key=value`` lines at the end and writes ``continuation.json`` beside this script
(``continuation_quick.json`` with ``--quick``: one round instead of three, about a minute).
``--threads 1`` is steadier on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kpflow.dynamics import (
    constant_input_map,
    continue_fixed_points,
    gain_path,
    newton_polish,
    normal_form,
    parameter_path,
)
from kpflow.files import atomic_write_text
from kpflow.models import GRU
from kpflow.models.base import RecurrentModel

D = torch.float64


class _Hopf(RecurrentModel):
    """ż = (μ + iω) z + c |z|² z, RK4 steps of dt (the neural-ODE default integrator)."""

    is_flow = True

    def __init__(self, mu, omega=2.0, cubic=-1.0, dt=0.1):
        super().__init__(2, 2, 2)
        self.cell = nn.Module()
        self.cell.mu = nn.Parameter(torch.tensor(float(mu), dtype=D))
        self.omega, self.cubic, self.dt = omega, cubic, dt
        self.to(D)

    def vector_field(self, params, z, x):
        mu = params["mu"]
        z1, z2 = z[..., :1], z[..., 1:]
        lin = torch.cat([mu * z1 - self.omega * z2, self.omega * z1 + mu * z2], -1)
        return lin + self.cubic * (z1 * z1 + z2 * z2) * z + x

    def step(self, params, z, x):
        f, h = (lambda y: self.vector_field(params, y, x)), self.dt
        k1 = f(z)
        k2 = f(z + 0.5 * h * k1)
        k3 = f(z + 0.5 * h * k2)
        k4 = f(z + h * k3)
        return z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


CASES = [  # name, kwargs, start, expected kind, expected criticality
    ("saddle-node", {}, [0.5 ** 0.5], "saddle-node", None),
    ("transcritical", {}, [0.0], "transcritical", None),
    ("pitchfork", {}, [0.0], "pitchfork", "supercritical"),
    ("pitchfork", {"cubic": 1.0}, [0.0], "pitchfork", "subcritical"),
    ("flip", {"cubic": 1.0}, [0.0], "flip", "supercritical"),
    ("flip", {}, [0.0], "flip", "subcritical"),
    ("neimark-sacker", {}, [0.0, 0.0], "neimark-sacker", "supercritical"),
    ("neimark-sacker", {"cubic": 1.0}, [0.0, 0.0], "neimark-sacker", "subcritical"),
    ("hopf (RK4 flow)", {}, [0.0, 0.0], "hopf", "supercritical"),
]


def normal_form_errors() -> tuple[float, bool, list[dict]]:
    worst, ok, rows = 0.0, True, []
    for name, kw, start, kind, crit in CASES:
        m = _Hopf(-0.5) if name.startswith("hopf") else normal_form(name, -0.5, **kw)
        res = continue_fixed_points(m, parameter_path(m, "mu"), torch.tensor(start, dtype=D), s_start=-0.5,
                                    s_range=(-0.5, 0.5))
        sps = res.special_points
        good = len(sps) == 1 and sps[0].kind == kind and sps[0].criticality == crit
        err = abs(sps[0].s) if sps else float("inf")
        worst, ok = max(worst, err), ok and good
        rows.append({"case": f"{name} {kw or ''}".strip(), "found": [sp.kind for sp in sps],
                     "criticality": [sp.criticality for sp in sps], "location_error": err, "correct": good})
        print(f"  {rows[-1]['case']:<32} {rows[-1]['found']} {rows[-1]['criticality']} |μ*| = {err:.2e}", flush=True)
    return worst, ok, rows


def gru_timing(H: int, rounds: int, g_range=(1.0, 5.0)) -> dict:
    torch.manual_seed(0)
    gru = GRU(3, H, 1, dtype=D)
    z0 = torch.zeros(H, dtype=D)
    path = gain_path(gru, "weight_hh")
    p0, _ = path(torch.tensor(g_range[0], dtype=D))

    def newton():
        fm = constant_input_map(gru, params=p0)
        z, q = newton_polish(fm, z0.unsqueeze(0), steps=60)
        return z[0], float(q[0])

    z_start, q0 = newton()
    if not q0 <= 1e-20:
        raise RuntimeError(f"the Newton solve at g = {g_range[0]} did not converge (q = {q0:.3g})")

    def continuation():
        return continue_fixed_points(gru, path, z_start, s_start=g_range[0], s_range=g_range, direction="forward")

    newton(), continuation()  # warm-up
    ratios, t_newton, t_cont = [], [], []
    res = None
    for r in range(rounds):
        t0 = time.perf_counter()
        newton()
        t1 = time.perf_counter()
        res = continuation()
        t2 = time.perf_counter()
        t_newton.append(t1 - t0)
        t_cont.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        print(f"  round {r + 1}/{rounds}: Newton {t1 - t0:.3f} s, continuation {t2 - t1:.2f} s "
              f"(ratio {ratios[-1]:.0f})", flush=True)
    b = res.branches[0]
    return {"gru_hidden": H, "gru_gain_range": list(g_range), "gru_newton_s": statistics.median(t_newton),
            "gru_continuation_s": statistics.median(t_cont), "gru_continuation_over_newton": statistics.median(ratios),
            "gru_special_points": len(res.special_points), "gru_branch_points": len(b),
            "gru_special_point_kinds": ",".join(sp.kind for sp in res.special_points),
            "gru_special_point_gains": [round(sp.s, 10) for sp in res.special_points],
            "gru_steps": b.info["steps"], "gru_newton_iterations": b.info["newton_iterations"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round instead of three (about a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="JSON path (default: continuation[_quick].json beside this script)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(__file__).with_name(
        "continuation_quick.json" if args.quick else "continuation.json")
    H = 64
    g_range = (1.0, 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"kpflow continuation benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
    print("normal forms (bifurcation at μ = 0):", flush=True)
    worst, ok, rows = normal_form_errors()
    print(f"GRU-{H}: gain on weight_hh continued over {list(g_range)}, {rounds} round(s):", flush=True)
    results = {"normal_form_location_max_err": worst, "normal_form_all_classified": int(ok)}
    results |= gru_timing(H, rounds, g_range)
    payload = {"results": results, "normal_forms": rows, "quick": args.quick, "torch": torch.__version__,
               "python": sys.version.split()[0], "platform": platform.platform(), "threads": torch.get_num_threads()}
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    for k, v in results.items():
        if isinstance(v, float):
            print(f"{k}={v:.3g}")
        elif not isinstance(v, list):
            print(f"{k}={v}")
    return results


if __name__ == "__main__":
    main()
