"""Layer 4, plans: ``mfnoise.plan(epsilon, delta, ...)`` -> a checked ``Plan`` (docs/design.md, "Plan").

Modules: ``choose`` (the candidates and the choice: ``plan``), ``plans`` (the ``Plan`` dataclass, its
batches, transform, loss, refusals and files), ``fingerprint`` (what the plan's fingerprint hashes),
``report`` (the text and JSON report, the candidates table).
"""

from mfnoise.planning.choose import MECHANISMS, plan, workload_for
from mfnoise.planning.fingerprint import Fingerprint, strategy_digest
from mfnoise.planning.plans import SAMPLINGS, Batch, Batches, Candidate, Plan, PlanState, load

__all__ = [
    "MECHANISMS", "SAMPLINGS", "Batch", "Batches", "Candidate", "Fingerprint", "Plan", "PlanState", "load", "plan",
    "strategy_digest", "workload_for",
]
