"""The compute budget: fine-tuning batches per node (trainer) per hour that no policy may
exceed (`budget:` in controller.yaml).

Whatever policy decides, rules, DQN or a DQN that took over from shadow mode, the
controller checks the decision against the node's use in the last hour (a sliding hour,
counted from the registry's decision log, so a restart forgets nothing) before it is
recorded and sent. A training decision that does not fit becomes `keep`, with a reason
that says so; the refusal is logged and counted (`BudgetGuard.refusals`).
"""

from __future__ import annotations

import logging

from pydantic import Field

from vmad.actions import Action, Decision
from vmad.config import StrictModel

__all__ = ["BUDGET_FACT", "HOUR", "BudgetGuard", "BudgetSettings"]

log = logging.getLogger("vmad.controller.budget")

HOUR = 3600.0
BUDGET_FACT = "budget"
"""The registry `meta` key where the controller keeps the budget in force (for
`vmad status`)."""


class BudgetSettings(StrictModel):
    """`budget:` in controller.yaml."""

    batches_per_node_hour: int = Field(
        3000, ge=0, description="fine-tuning mini-batches one node (trainer) may be told to "
                                "run in any sliding hour, summed over its VMs; 0 = none")


class BudgetGuard:
    """Applies `BudgetSettings` to decisions. Plain attributes for exporters: `limit`,
    `refusals` (training decisions turned into keep, ever)."""

    def __init__(self, settings: BudgetSettings | None = None) -> None:
        self.settings = settings or BudgetSettings()
        self.limit = self.settings.batches_per_node_hour
        self.refusals = 0

    def check(self, trainer_id: str, decision: Decision, used: int) -> Decision:
        """`decision` when it fits in what is left of `trainer_id`'s hour (`used` batches
        already spent), else keep, saying why."""
        if not decision.action.trains or used + decision.batches <= self.limit:
            return decision
        self.refusals += 1
        reason = (f"compute budget: node {trainer_id} has used {used} of "
                  f"{self.limit} batches this hour; refused {decision.label} "
                  f"({decision.reason})")
        log.warning("%s", reason)
        return Decision(Action.KEEP, 0, reason, decision.q_values)
