"""SGD, Adam and low-rank natural gradient side by side through a pitchfork bifurcation.

Student-teacher setup (built here, documented in docs/natural_gradient.md): tanh RNN
``h_t = tanh(W h_{t-1} + x_t)`` with ``H`` units. The teacher's recurrent matrix is
``W* = g* M`` with ``M`` symmetric, top eigenvalue 1 and the rest uniform in [-0.6, 0.6], so at
``g* = 1.2`` the teacher is past a pitchfork (its origin is unstable, trials settle on ±x*). Each trial
gets a random input pulse at t = 0 and evolves freely after it. The student starts at
``W0 = g M'`` (g = 0.4, M' drawn like M from another seed), below the bifurcation; only ``W`` is trained
(input weights, bias and an identity readout are fixed and equal to the teacher's), on the MSE between
student and teacher states, full batch. To reach the teacher, the student's spectral radius must
cross 1: the first bifurcation.

All optimizers start from the same student, see the same batch and are stepped in lockstep (one step
of each in turn), so machine load affects their timings alike. Reported:

* peak loss spike around the first bifurcation: ``max_t (L_t − min_{s≤t} L_s)`` over the steps within
  ``window`` of the first step where the spectral radius of W reaches 1 (whole run if it never does);
* steps to the teacher's loss floor: first step with ``L ≤ floor · L_0`` (the teacher is realizable,
  its own loss is 0; ``floor`` defaults to 1e-2); -1 when not reached within the budget;
* wall time per step as a ratio to SGD: the median over blocks of 10 lockstep steps of the ratio of
  mean step times within the block (so both sides of every ratio ran under the same machine load).

Usage: ``python benchmarks/natural_gradient.py [--quick]``; ends with ``key=value`` lines, also written
to ``benchmarks/natural_gradient.json``; the figure goes to ``benchmarks/natural_gradient.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kpflow.models import VanillaRNN
from kpflow.training.natural_gradient import LowRankNaturalGradient

HERE = Path(__file__).resolve().parent
#: extra NG runs of the full benchmark: rank:refresh_every[:nystrom][:ritz] ('a' = adaptive only)
DEFAULT_VARIANTS = "1:a,2:1,2:4,2:1:nystrom,2:3:nystrom,2:3:nystrom:ritz"


def symmetric_matrix(H: int, seed: int, top: float = 1.0, rest: float = 0.6) -> torch.Tensor:
    """``Q diag(top, s_2..s_H) Qᵀ`` with random orthogonal Q and s_i ~ U[-rest, rest]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))
    s = torch.empty(H, dtype=torch.float64).uniform_(-rest, rest, generator=g)
    s[0] = top
    return Q @ torch.diag(s) @ Q.T


def make_rnn(H: int, gain: float, seed: int, dtype, device) -> VanillaRNN:
    model = VanillaRNN(H, H, H, dtype=dtype, device=device)
    with torch.no_grad():
        model.cell.W.copy_(gain * symmetric_matrix(H, seed))
        model.cell.U.copy_(torch.eye(H))
        model.cell.b.zero_()
        model.readout.weight.copy_(torch.eye(H))
        model.readout.bias.zero_()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "cell.W")
    return model


def make_problem(H, T, B, g_teacher, seed, dtype, device):
    teacher = make_rnn(H, g_teacher, seed, dtype, device)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = torch.zeros(B, T, H, dtype=dtype)
    inputs[:, 0] = 0.5 * torch.randn(B, H, generator=gen, dtype=dtype)
    inputs = inputs.to(device)
    with torch.no_grad():
        targets, _ = teacher(inputs)
    return inputs, targets


def make_study_problem(H, T, B, g_teacher, g_student, seed, dtype, device):
    """The issue-6 study's student-teacher setup (``kpflow.experiments.bifurcation.build_student``):
    input-driven tanh RNN, ``W = g W_base`` with W_base random orthogonal, teacher ``g* W_base``, frozen
    input and readout weights, loss on the 1-D readout; here at size H and one fixed batch of B trials."""
    from kpflow.experiments.bifurcation import bifurcation_config, build_student

    cfg = bifurcation_config().model_copy(deep=True)
    cfg.task.params.update(hidden=H, seq_len=T, g_teacher=g_teacher, teacher_seed=seed)
    cfg.model.hidden, cfg.model.g = H, g_student
    task, _ = build_student(cfg)
    batch = task.sample(B, seed + 1, device=device, dtype=dtype)

    def student():
        _, model = build_student(cfg)
        return model.to(device=device, dtype=dtype)

    return student, batch.inputs, batch.targets


def spectral_radius(W: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(W.detach().double().cpu()).abs().max())


class Method:
    """One optimizer on its own copy of the student."""

    def __init__(self, name, model, inputs, targets, make_opt):
        self.name, self.model, self.inputs, self.targets = name, model, inputs, targets
        self.opt = make_opt(model)
        self.losses, self.radius, self.seconds, self.updates = [], [], [], []

    def step(self, sync):
        W = self.model.cell.W
        self.radius.append(spectral_radius(W))
        sync()
        t0 = time.perf_counter()
        if isinstance(self.opt, LowRankNaturalGradient):
            loss = float(self.opt.step(lambda: {"inputs": self.inputs, "targets": self.targets}))
            stats = self.opt.last_stats
            self.updates.append(bool(stats["refreshed"] or stats["krylov"] or stats["ritz_updated"]))
        else:
            self.opt.zero_grad(set_to_none=True)
            _, out = self.model(self.inputs)
            value = ((out - self.targets) ** 2).mean()
            value.backward()
            self.opt.step()
            loss = float(value.detach())
        sync()
        self.seconds.append(time.perf_counter() - t0)
        self.losses.append(loss)


def block_means(seconds, size=10):
    """Mean step time of consecutive blocks of ``size`` steps (the first, cold step left out)."""
    return [statistics.fmean(seconds[i:i + size]) for i in range(1, len(seconds) - size + 1, size)] or seconds


def time_ratio(a: Method, b: Method) -> float:
    """Median over blocks of 10 lockstep steps of (mean step time of a) / (that of b): both sides of each
    ratio ran interleaved in the same seconds, so machine load cancels."""
    return statistics.median(x / y for x, y in zip(block_means(a.seconds), block_means(b.seconds), strict=True))


def summarize(m: Method, floor: float, window: int) -> dict:
    L, R = m.losses, m.radius
    cross = next((i for i, r in enumerate(R) if r >= 1.0), None)
    lo, hi = (0, len(L)) if cross is None else (max(0, cross - window), min(len(L), cross + window + 1))
    running, spike = math.inf, 0.0
    for i, v in enumerate(L):
        running = min(running, v) if math.isfinite(v) else running
        if lo <= i < hi:
            spike = max(spike, (v - running) if math.isfinite(v) else math.inf)
    target = floor * L[0]
    to_floor = next((i for i, v in enumerate(L) if v <= target), -1)
    blocks = block_means(m.seconds)
    out = dict(first_bifurcation_step=cross, peak_spike=spike, peak_spike_rel=spike / L[0],
               steps_to_floor=to_floor, initial_loss=L[0], final_loss=L[-1], min_loss=min(L),
               time_per_step=statistics.median(blocks), final_radius=R[-1])
    if isinstance(m.opt, LowRankNaturalGradient):
        out["products_per_step"] = m.opt.products_per_step
        out["extra_products_per_step"] = m.opt.products_per_step - 1
        out["basis_updates"] = sum(m.updates)
    return out


def sgd_maker(model, lr):
    return torch.optim.SGD([model.cell.W], lr=lr)


def ng_maker(model, **options):
    return LowRankNaturalGradient(model, param_names=["W"], **options)



def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def figure(methods, summary, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    extra = iter(["tab:olive", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:gray", "gold",
                  "salmon", "navy", "lime", "teal", "maroon", "orchid", "darkkhaki"])
    colors = {"sgd": "tab:red", "adam": "tab:blue", "ng": "tab:green"}
    for m in methods:
        colors.setdefault(m.name, next(extra, "k"))
    for m in methods:
        c = colors[m.name]
        s = summary[m.name]
        floor_at = s["steps_to_floor"] if s["steps_to_floor"] >= 0 else "never"
        label = f"{m.name} (spike {s['peak_spike']:.3g}, floor at {floor_at})"
        ax1.semilogy(m.losses, color=c, label=label)
        ax2.plot(m.radius, color=c, label=m.name)
        if s["first_bifurcation_step"] is not None:
            ax1.axvline(s["first_bifurcation_step"], color=c, ls=":", lw=1)
    ax1.axhline(summary["floor"] * methods[0].losses[0], color="k", ls="--", lw=0.8, label="loss floor")
    ax1.set(xlabel="step", ylabel="loss (MSE to the teacher)", title="loss (dotted: first bifurcation)")
    ax1.legend(fontsize=7, loc="upper right", framealpha=0.6)
    ax2.axhline(1.0, color="k", ls="--", lw=0.8)
    top = max(max(r for r in m.radius if math.isfinite(r)) for m in methods)
    ax2.set_ylim(0, min(top * 1.05, 3.0))
    ax2.set(xlabel="step", ylabel="spectral radius of W (clipped at 3)",
            title="student crosses the bifurcation at 1")
    ax2.legend(fontsize=8)
    names = [m.name for m in methods]
    ratios = [summary[n]["time_per_step_over_sgd"] for n in names]
    ax3.bar(names, ratios, color=[colors[n] for n in names])
    ax3.tick_params(axis="x", labelrotation=30)
    ax3.axhline(1.5, color="k", ls="--", lw=0.8, label="1.5× target")
    ax3.set(ylabel="wall time per step / SGD", title="cost per step (median over 10-step lockstep blocks)")
    ax3.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small problem, under a minute")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--g-teacher", type=float, default=1.2)
    ap.add_argument("--g-student", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setup", default="pitchfork", choices=["pitchfork", "study"],
                    help="pitchfork: the free-running setup built here (default); study: the issue-6 study's "
                         "input-driven student-teacher (kpflow.experiments.bifurcation)")
    ap.add_argument("--sgd-lr", type=float, default=None, help="default 5 (pitchfork) / 0.2 (study)")
    ap.add_argument("--adam-lr", type=float, default=None, help="default 0.01")
    ap.add_argument("--ng-lr", type=float, default=None, help="default 0.5")
    ap.add_argument("--space", default=None, choices=["state", "output"],
                    help="NG metric: default state (pitchfork) / output (study)")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--refresh-every", type=int, default=None,
                    help="basis update period of the main NG run (default: krylov updates only when its free "
                         "staleness tests fire; nystrom sketches every step)")
    ap.add_argument("--update", default="krylov", choices=["krylov", "nystrom"],
                    help="how the main NG run tracks its basis between Nyström refreshes")
    ap.add_argument("--variants", default=None,
                    help="extra NG settings run in the same lockstep, 'rank:refresh_every[:nystrom][:ritz],...' "
                         "(refresh_every 'a': adaptive only; default: " + DEFAULT_VARIANTS + " in the full run, "
                         "none with --quick)")
    ap.add_argument("--sgd-sweep", default=None,
                    help="extra SGD learning rates run in the same lockstep, comma-separated "
                         "(default: 1,2,10 for pitchfork, 0.05,1 for study; none with --quick)")
    ap.add_argument("--floor", type=float, default=1e-2, help="loss floor as a fraction of the initial loss")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default natural_gradient.json; natural_gradient_quick.json with --quick)")
    ap.add_argument("--figure", type=Path, default=None, help="figure path (default beside the JSON)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    stem = "natural_gradient_quick" if args.quick else "natural_gradient"
    args.out = args.out if args.out is not None else HERE / f"{stem}.json"
    args.figure = args.figure if args.figure is not None else args.out.with_suffix(".png")
    quick = dict(steps=80, hidden=8, seq_len=25, batch=8)
    full = dict(steps=300, hidden=16, seq_len=40, batch=16)
    if args.variants is None and not args.quick:
        args.variants = DEFAULT_VARIANTS
    if args.sgd_sweep is None and not args.quick:
        args.sgd_sweep = "1,2,10" if args.setup == "pitchfork" else "0.05,1"
    size = {k: (getattr(args, k) if getattr(args, k) is not None else (quick if args.quick else full)[k])
            for k in quick}
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    H, T, B, steps = size["hidden"], size["seq_len"], size["batch"], size["steps"]
    study = args.setup == "study"
    lrs = dict(sgd=0.2 if study else 5.0, adam=1e-2, ng=0.5)
    for k, v in lrs.items():
        if getattr(args, f"{k}_lr") is None:
            setattr(args, f"{k}_lr", v)
    if args.space is None:
        args.space = "output" if study else "state"
    if study:
        student, inputs, targets = make_study_problem(H, T, B, args.g_teacher, args.g_student, args.seed,
                                                      dtype, device)
    else:
        inputs, targets = make_problem(H, T, B, args.g_teacher, args.seed, dtype, device)

        def student():
            return make_rnn(H, args.g_student, args.seed + 100, dtype, device)

    makers = {
        "sgd": lambda m: torch.optim.SGD([m.cell.W], lr=args.sgd_lr),
        "adam": lambda m: torch.optim.Adam([m.cell.W], lr=args.adam_lr),
        "ng": functools.partial(ng_maker, lr=args.ng_lr, rank=args.rank, refresh_every=args.refresh_every,
                                space=args.space, update=args.update,
                                seed=args.seed),
    }
    for lr in (args.sgd_sweep.split(",") if args.sgd_sweep else []):
        makers[f"sgd_lr{lr}"] = functools.partial(sgd_maker, lr=float(lr))
    for item in (args.variants.split(",") if args.variants else []):
        rank, every, *flags = item.split(":")
        update = "nystrom" if "nystrom" in flags else "krylov"
        name = f"ng_r{rank}_k{every}_{update}" + ("_ritz" if "ritz" in flags else "")
        makers[name] = functools.partial(ng_maker, lr=args.ng_lr, rank=int(rank), space=args.space,
                                         refresh_every=None if every == "a" else int(every), update=update,
                                         ritz_updates="ritz" in flags,
                                         seed=args.seed)
    methods = [Method(name, student(), inputs, targets, make) for name, make in makers.items()]
    bar = range(steps)
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="lockstep sgd/adam/ng", unit="step", mininterval=0.5)
    for _ in bar:
        for m in methods:
            m.step(sync)
    window = max(10, steps // 5)
    summary = {m.name: summarize(m, args.floor, window) for m in methods}
    summary["floor"] = args.floor
    by = {m.name: m for m in methods}
    for m in methods:
        summary[m.name]["time_per_step_over_sgd"] = time_ratio(m, by["sgd"])
    headline = {
        "ng_time_per_step_over_sgd": summary["ng"]["time_per_step_over_sgd"],
        "adam_time_per_step_over_sgd": summary["adam"]["time_per_step_over_sgd"],
        "sgd_peak_spike": summary["sgd"]["peak_spike"],
        "adam_peak_spike": summary["adam"]["peak_spike"],
        "ng_peak_spike": summary["ng"]["peak_spike"],
        "sgd_steps_to_floor": summary["sgd"]["steps_to_floor"],
        "adam_steps_to_floor": summary["adam"]["steps_to_floor"],
        "ng_steps_to_floor": summary["ng"]["steps_to_floor"],
        "ng_extra_products_per_step": summary["ng"]["extra_products_per_step"],
        "ng_rank": args.rank,
    }
    record = dict(headline=headline, methods=summary, settings=dict(vars(args), **size),
                  losses={m.name: m.losses for m in methods}, radius={m.name: m.radius for m in methods},
                  seconds={m.name: m.seconds for m in methods},
                  device=str(device), torch=torch.__version__, threads=torch.get_num_threads())
    record["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in record["settings"].items()}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, write_json)
    title = (f"student-teacher ({args.setup}): H={H}, T={T}, B={B}, g {args.g_student} → g* {args.g_teacher}; "
             f"SGD lr {args.sgd_lr}, Adam lr {args.adam_lr}, low-rank NG r={args.rank} lr {args.ng_lr}")
    figure(methods, summary, args.figure, title)
    for m in methods[3:]:
        for key in ("time_per_step_over_sgd", "peak_spike", "steps_to_floor", "extra_products_per_step"):
            if key in summary[m.name]:
                headline[f"{m.name}_{key}"] = summary[m.name][key]
    for name in [m.name for m in methods]:
        s = summary[name]
        print(f"{name:>9}: first bifurcation at step {s['first_bifurcation_step']}, peak spike "
              f"{s['peak_spike']:.4g} ({s['peak_spike_rel']:.3g} of L0), floor at step {s['steps_to_floor']}, "
              f"final loss {s['final_loss']:.3g}, {1e3 * s['time_per_step']:.1f} ms/step")
    print(f"figure: {args.figure}\njson: {args.out}")
    for k, v in headline.items():
        print(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return record


if __name__ == "__main__":
    main()
