"""Every paper claim as a pre-registered, seeded study with a verdict: ``kpflow reproduce``.

``CLAIMS`` maps a claim id to its :class:`Claim` (quote, paper, criterion, ``measure``, ``verdict``);
``plan`` / ``run_task`` / ``evaluate`` are the plain functions a runner maps over; ``reproduce`` runs
them all and writes the claims report. See docs/claims.md. The claim modules (and torch) are imported
on the registry's first use.
"""

from .registry import (
    CLAIMS,
    Z_CRIT,
    Claim,
    Verdict,
    all_of,
    claim_ids,
    get_claim,
    load_builtin_claims,
    mean_se,
    register_claim,
    threshold_verdict,
)
from .runner import ClaimTask, claim_line, evaluate, load_result, plan, reproduce, run_plan, run_task

__all__ = ["CLAIMS", "Z_CRIT", "Claim", "ClaimTask", "Verdict", "all_of", "claim_ids", "claim_line", "evaluate",
           "get_claim", "load_builtin_claims", "load_result", "mean_se", "plan", "register_claim", "reproduce",
           "run_plan", "run_task", "threshold_verdict"]
