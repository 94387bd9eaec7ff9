"""All baselines of the three anomaly-detection challenges, with one command.

For each challenge: make it (timed; default scale = the size `kpflow challenge make` uses), train its
baselines on `train/`, run every baseline as a sandboxed code submission on the **test** phase, and
score it with the challenge's scoring program. Ends with `key=value` lines and writes the same to
`challenge_baselines.json` (`challenge_baselines_quick.json` with `--quick`) beside this script.

    .venv/bin/python benchmarks/challenge_baselines.py            # default sizes (a few minutes)
    .venv/bin/python benchmarks/challenge_baselines.py --quick    # small sizes, short training (< 1 min)

`--only NAME ...` re-measures some challenges and keeps the others' figures in the JSON file.
`--workdir DIR` keeps the made challenges and submissions and reuses them on the next run (a made
challenge is reused when its seed and scale match).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kpflow.challenges import get_challenge, list_challenges, make_challenge
from kpflow.challenges.baselines import build_baselines
from kpflow.challenges.common import atomic_write_json
from kpflow.challenges.runner import run_submission

QUICK_SCALE = {"gw": 0.05, "butterfly": 0.1, "sealevel": 0.1}


def _challenge(name: str, workdir: Path, seed: int, scale: float) -> tuple[Path, float]:
    folder = workdir / name
    manifest = folder / "challenge.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info["seed"] == seed and info["scale"] == scale:
            return folder, float(info["seconds"])
    start = time.perf_counter()
    # a fixed hidden seed, so that the published table can be reproduced (a real challenge keeps a fresh secret)
    make_challenge(name, folder, seed=seed, scale=scale, overwrite=True, hidden_seed=10 ** 6 + seed)
    return folder, time.perf_counter() - start


def _slug(key: str) -> str:
    """A score key as one `key=value` token ('Final Grade' -> 'Final_Grade')."""
    return key.replace(" ", "_").replace("-", "_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and short training (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", default="test", choices=["val", "test"])
    parser.add_argument("--workdir", type=Path, default=None, help="keep and reuse challenges/submissions here")
    parser.add_argument("--only", nargs="*", default=None, help="subset of challenges")
    args = parser.parse_args(argv)
    names = args.only or list_challenges()
    tmp = tempfile.TemporaryDirectory(prefix="kpflow-baselines-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    rows = []
    for name in names:
        spec = get_challenge(name)
        scale = QUICK_SCALE[name] if args.quick else 1.0
        folder, seconds = _challenge(name, workdir, args.seed, scale)
        results[f"{name}_make_seconds"] = round(seconds, 2)
        start = time.perf_counter()
        subs = build_baselines(folder, workdir / "submissions" / name, quick=args.quick, seed=args.seed)
        results[f"{name}_train_seconds"] = round(time.perf_counter() - start, 2)
        for baseline, path in subs.items():
            entry = run_submission(folder, path, phase=args.phase, name=baseline, timeout_s=1800)
            if entry["status"] != "ok":
                print(f"{name}/{baseline} FAILED: {entry['error']}", file=sys.stderr)
                results[f"{name}_{baseline}_{_slug(spec.primary)}"] = float("nan")
                continue
            scores = entry["scores"]
            rows.append((name, baseline, scores, entry["seconds"]))
            for key in spec.score_keys[:4]:
                results[f"{name}_{baseline}_{_slug(key)}"] = round(float(scores[key]), 4)
            results[f"{name}_{baseline}_seconds"] = entry["seconds"]
    print(f"\nphase={args.phase} seed={args.seed} quick={args.quick}")
    print(f"{'challenge':10s} {'baseline':22s} {'primary':>8s}  other scores")
    for name, baseline, scores, seconds in rows:
        spec = get_challenge(name)
        others = ", ".join(f"{k}={scores[k]:.3f}" for k in spec.score_keys[1:4])
        print(f"{name:10s} {baseline:22s} {scores[spec.primary]:8.4f}  {others}  ({seconds:.1f} s)")
    out = Path(__file__).with_name("challenge_baselines_quick.json" if args.quick else "challenge_baselines.json")
    kept = {}
    if args.only and out.is_file():  # re-measuring a subset keeps the other challenges' figures of the same setup
        previous = json.loads(out.read_text())
        if (previous.get("seed"), previous.get("phase")) == (args.seed, args.phase):
            kept = {k: v for k, v in previous["results"].items() if not k.startswith(tuple(f"{n}_" for n in names))}
    atomic_write_json(out, {"quick": args.quick, "seed": args.seed, "phase": args.phase,
                            "results": {**kept, **results}})
    print()
    for key, value in results.items():
        print(f"{key}={value}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
