"""FAIR anomaly-detection challenges (arXiv:2503.02112), reproduced offline.

``kpflow.challenges`` ships the scheme of the NSF HDR anomaly challenges — dataset card + Croissant
metadata, deterministic data generators with checksums, a sandboxed ingestion program for code
submissions, scoring programs, a local leaderboard and a Codabench bundle export — with three
challenges: ``gw`` (gravitational waves), ``butterfly`` (hybrid butterflies), ``sealevel`` (coastal
sea-level anomalies). Importing this package does not import torch.
"""

from kpflow.challenges.registry import (
    CHALLENGES,
    get_challenge,
    list_challenges,
    make_challenge,
)

__all__ = ["CHALLENGES", "get_challenge", "list_challenges", "make_challenge"]
