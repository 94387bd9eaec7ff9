"""Claim 13 (Global Empirical NTK, arXiv 2605.08746): the NTK of a self-attention transformer is
structurally low-rank. A thin wrapper of the study ``kpflow run transformer``
(``kpflow.experiments.transformer``): its measurement ``measure_one`` per (input size d, length T, seed)
and its own criterion ``verdict`` (fixed in that module before any data: agree if the token effective
rank of the NTK stays below 0.25 of the N token positions by 2 SE at every (d, T), disagree if it
exceeds 0.5 by 2 SE at some (d, T)), applied to the per-(d, T) mean ± SE over the seeds here.
"""

from __future__ import annotations

import math

from .common import pick
from .registry import Claim, Verdict, mean_se, register_claim


def _grid(size):
    from kpflow.experiments import transformer as study

    return pick(size, ((1, 16, 256), (25,)), (study.INPUT_DIMS, study.LENGTHS))


def measure_transformer(seed: int, size: str) -> dict:
    from kpflow.experiments import transformer as study

    dims, lengths = _grid(size)
    rows = [{"d": d, "T": T, **study.measure_one(d, T, seed)} for d in dims for T in lengths]
    worst = max(rows, key=lambda r: r["ntk_token_fraction"])
    return {"rows": rows, "largest_token_fraction": worst["ntk_token_fraction"],
            "notes": [f"seed {seed}: NTK token erank / N from {min(r['ntk_token_fraction'] for r in rows):.3g} to "
                      f"{worst['ntk_token_fraction']:.3g} (d={worst['d']}, T={worst['T']}); Kronecker core's up to "
                      f"{max(r['core_token_fraction'] for r in rows):.3g}"]}


def verdict_transformer(ms) -> Verdict:
    from kpflow.experiments import transformer as study

    cells: dict = {}
    for m in ms:
        for r in m["rows"]:
            cells.setdefault((r["d"], r["T"]), []).append(r)
    summary = {k: {"ntk_token_fraction": mean_se([r["ntk_token_fraction"] for r in v])[:2]} for k, v in cells.items()}
    worst = max(summary, key=lambda k: summary[k]["ntk_token_fraction"][0]) if summary else None
    effect, se = summary[worst]["ntk_token_fraction"] if worst else (math.nan, math.nan)
    verdict = "inconclusive"
    if len(ms) >= 2 and worst is not None:
        verdict = study.verdict(summary)[0]
    return Verdict(verdict, effect, se, len(ms), study.LOW, "below", "largest NTK token erank / N over (d, T)",
                   values=tuple(m["largest_token_fraction"] for m in ms))


def _setting() -> str:
    return ("one-block transformer at initialisation (the study's MODEL), 5 Gaussian sequences; quick: d in "
            "{1, 16, 256}, T = 25; full: the study's grid d in {1, 4, 16, 64, 256, 512}, T in {25, 50}")


register_claim(Claim(
    id="transformer_lowrank", number=13,
    quote="we show that the NTK associated with a self-attention transformer is likewise structurally constrained to "
          "be low-rank",
    paper="Hazelden et al., The Global Empirical NTK (arXiv 2605.08746)",
    criterion="the study kpflow run transformer's own: agree if the NTK's token effective rank stays below 0.25 of "
              "the token positions by 2 SE at every (d, T); disagree if above 0.5 by 2 SE at some (d, T)",
    measure=measure_transformer, verdict=verdict_transformer, setting=_setting(), seeds=3, quick_seeds=3,
))
