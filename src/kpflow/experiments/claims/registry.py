"""The claim registry: each paper claim as a pre-registered study with a verdict fixed in code.

A :class:`Claim` bundles the claim quoted from its paper, the criterion in words, a
``measure(seed, size) -> dict`` function (one independent, seeded measurement; ``size`` is
``"quick"`` or ``"full"``) and a pure ``verdict(measurements) -> Verdict``. ``measure`` and
``verdict`` are kept apart so that a test can feed synthetic measurements on both sides of the
criterion and check that the verdict flips.

Every criterion is a threshold on an effect size relative to its standard error across seeds
(:func:`threshold_verdict`): with per-seed effects ``x_1..x_n``, mean ``x̄`` and standard error
``s/√n``, the verdict is ``agree`` when ``x̄`` lies beyond the threshold by more than ``Z_CRIT``
standard errors on the claim's side, ``disagree`` when it lies beyond it on the other side by
more than ``Z_CRIT`` standard errors, and ``inconclusive`` otherwise (or with fewer than two
finite seeds). Compound claims combine sub-verdicts with :func:`all_of`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: standard errors between the mean effect and the threshold needed for a verdict either way
Z_CRIT = 2.0
VERDICTS = ("agree", "disagree", "inconclusive")
SIZES = ("quick", "full")


@dataclass(frozen=True)
class Verdict:
    """Outcome of a claim's criterion.

    Attributes:
        verdict: ``agree``, ``disagree`` or ``inconclusive``.
        effect, se: the mean effect over seeds and its standard error.
        n: number of seeds with a finite effect.
        threshold: the threshold fixed in code; direction: ``above`` or ``below`` (the claim's side).
        name: what the effect is; parts: sub-verdicts of a compound criterion.
        values: the per-seed effects the mean was taken over.
    """

    verdict: str
    effect: float
    se: float
    n: int
    threshold: float
    direction: str
    name: str = "effect"
    parts: tuple[Verdict, ...] = ()
    values: tuple[float, ...] = ()

    def summary(self) -> dict:
        return {"verdict": self.verdict, "effect": self.effect, "se": self.se, "n": self.n,
                "threshold": self.threshold, "direction": self.direction, "name": self.name,
                "parts": [p.summary() for p in self.parts], "values": list(self.values)}

    def describe(self) -> str:
        side = ">" if self.direction == "above" else "<"
        return f"{self.name} = {self.effect:.4g} ± {self.se:.2g} (n={self.n}; claim side {side} {self.threshold:g})"


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error ``s/√n`` (ddof 1) and count of the finite values (NaN se below two)."""
    x = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(x.mean()), se, n


def threshold_verdict(effects: Sequence[float], threshold: float, direction: str = "above", *,
                      name: str = "effect", z: float = Z_CRIT) -> Verdict:
    """Compare the mean of per-seed ``effects`` with ``threshold`` in units of its standard error.

    Args:
        effects: one effect per seed (non-finite entries are dropped).
        threshold: the criterion's threshold, fixed in the claim's module before any data.
        direction: ``above`` (the claim says effect > threshold) or ``below``.
        name: what the effect measures (for the report).
        z: standard errors of margin required for ``agree`` / ``disagree``.

    Returns:
        A :class:`Verdict`; ``inconclusive`` with fewer than two finite seeds.

    Raises:
        ValueError: for a direction other than ``above``/``below``.
    """
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    mean, se, n = mean_se(effects)
    verdict = "inconclusive"
    if n >= 2 and math.isfinite(se):
        margin = (mean - threshold) if direction == "above" else (threshold - mean)
        if margin > z * se:
            verdict = "agree"
        elif margin < -z * se:
            verdict = "disagree"
    return Verdict(verdict, mean, se, n, float(threshold), direction, name,
                   values=tuple(float(v) for v in effects))


def all_of(primary: Verdict, *others: Verdict) -> Verdict:
    """A compound verdict: ``agree`` if every part agrees, ``disagree`` if any part disagrees, else
    ``inconclusive``; effect and se are the primary part's."""
    parts = (primary, *others)
    vs = [p.verdict for p in parts]
    verdict = "agree" if all(v == "agree" for v in vs) else "disagree" if "disagree" in vs else "inconclusive"
    return Verdict(verdict, primary.effect, primary.se, primary.n, primary.threshold, primary.direction,
                   primary.name, parts, primary.values)


def column(measurements: Sequence[dict], key: str) -> list[float]:
    """``[m[key] for m in measurements]`` (NaN where a measurement lacks it)."""
    return [float(m.get(key, math.nan)) if m.get(key) is not None else math.nan for m in measurements]


@dataclass(frozen=True)
class Claim:
    """One paper claim as a registered study.

    Attributes:
        id: short identifier (``kpflow reproduce --only ID``).
        number: its number in issue 11's list.
        quote: the claim, quoted from the paper's abstract (or the issue's wording of it).
        paper: which paper (short citation with arXiv id).
        criterion: the criterion in words (what ``verdict`` computes).
        measure: ``measure(seed, size) -> dict`` of JSON-serialisable numbers; independent per seed.
        verdict: pure ``verdict(measurements) -> Verdict``.
        setting: the experimental setting at each size, in words.
        figure: optional ``figure(measurements, ax)`` drawing the claim's figure (default: the effect per seed).
        seeds: default number of seeds; quick_seeds: at the quick size.
    """

    id: str
    number: int
    quote: str
    paper: str
    criterion: str
    measure: Callable[[int, str], dict]
    verdict: Callable[[Sequence[dict]], Verdict]
    setting: str = ""
    figure: Callable | None = field(default=None, repr=False)
    seeds: int = 5
    quick_seeds: int = 5


CLAIMS: dict[str, Claim] = {}

#: the modules of the built-in claims, imported on first use of the registry (so ``kpflow --help`` stays torch-free)
CLAIM_MODULES = ("identities", "collapse", "tasks_structure", "spectra", "bifurcation", "natural_gradient",
                 "trace_estimators", "transformer", "language_model")


def load_builtin_claims() -> None:
    """Import the built-in claim modules (each registers its claims)."""
    import importlib

    for name in CLAIM_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def register_claim(claim: Claim) -> Claim:
    """Add ``claim`` to the registry (ids are unique)."""
    if claim.id in CLAIMS and CLAIMS[claim.id] is not claim:
        raise ValueError(f"a claim with id {claim.id!r} is already registered")
    CLAIMS[claim.id] = claim
    return claim


def claim_ids() -> list[str]:
    """Registered claim ids in the issue's order."""
    load_builtin_claims()
    return [c.id for c in sorted(CLAIMS.values(), key=lambda c: c.number)]  # stable: registration order within a number


def get_claim(claim_id: str) -> Claim:
    """The registered claim ``claim_id``; a ValueError lists the valid ids."""
    load_builtin_claims()
    if claim_id not in CLAIMS:
        raise ValueError(f"unknown claim {claim_id!r}; valid claims: {', '.join(claim_ids())}")
    return CLAIMS[claim_id]
