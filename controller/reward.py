"""The reward of one transition, as the central control module learns from it.

Jiang 2024 (central control module) defines R = a1*R1 + a2*R2 + a3*R3 with a1 = 0.4
(R1: accuracy on the batch), a2 = 0.3 (R2: a loss term, 1 - 1/Loss) and a3 = 0.3 (R3: a
compression term). Ours keeps the weights (configurable, `reward:` in controller.yaml)
and makes each term lie in [0, 1], so the weights mean what they say:

- R1 = accuracy of the model *after* the action on a batch of labelled windows, or, with
  `r1: f1`, its F1 there. Accuracy is the paper's; on data with a few percent anomalies
  a model that never alarms scores about 0.95 on it, so the reward barely separates a
  useful detector from a mute one. F1 does (docs/control.md measures both). F1 of a
  batch without anomalies and without alarms is 1, with alarms 0 (vmad/state.py).
  With no labelled window there is nothing to measure: R1 = 0.5, neither praise nor
  blame.
- R2 = exp(-loss), loss being that model's class-balanced cross-entropy on the same
  windows: 1 for a perfect, confident model, falling smoothly and monotonically as the
  loss grows. The paper's 1 - 1/Loss is unbounded below (and rewards a *higher* loss),
  so we depart from it; exp keeps R in [0, 1]. 0.5 with no labelled windows.
- R3 = 1 - cost of the action: the paper's "compression" term rewarded sending less; the
  controller's levers here are training compute and bundle traffic, so cost =
  fine-tuning batches / `batch_budget` (training time grows linearly with batches; the
  paper fine-tunes with fewer than 200) plus `push_cost` for the bundle any action but
  keep sends to the agent (bundles of one model kind all have the same size, so bytes
  sent are proportional to pushes), capped at 1.

Where the labels come from (a departure from the paper, which measures R1 on labelled
batches): a fleet has almost none. So R1 and R2, and the state's quality features, are
meant to be measured on a per-VM *validation set without human labels*: synthetic faults
of the project's kinds (vmad/synthetic.py) injected into the VM's own recent samples,
plus the incidents an operator did label, each counted `real_weight` (5) times
(controller/validation.py). The environment measures on it with
`EnvSettings(validation="injected")`; the live controller reads whatever the trainer's
state report measured. The weights stay the paper's (0.4, 0.3, 0.3) by default, with
R1 = F1 rather than accuracy (docs/control.md measures both).

Where the batch comes from: the control environment (controller/env.py) measures R1 and
R2 on the windows that arrive *after* the action, scored by the model the action left
in place: what the agent will actually see. The live controller only has the trainer's
next state report, whose accuracy / F1 / loss cover the VM's recent labelled windows,
some of which a fine-tune has just trained on; that reward is optimistic for training
actions, which is one reason the live policy starts from one trained offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from vmad.actions import Action, Decision
from vmad.config import StrictModel
from vmad.state import VMState

__all__ = ["DEFAULT_GAMMA", "WEIGHTS", "RewardSettings", "RewardTerms", "reward", "reward_terms"]

WEIGHTS: tuple[float, float, float] = (0.4, 0.3, 0.3)
"""The paper's (a1, a2, a3)."""
DEFAULT_GAMMA = 0.9
"""The discount of future rewards the shipped policy was trained with."""


class RewardSettings(StrictModel):
    """`reward:` in controller.yaml: R = a1*R1 + a2*R2 + a3*R3 and its discount."""

    a1: float = Field(WEIGHTS[0], ge=0, le=1, description="weight of R1 (accuracy or F1)")
    a2: float = Field(WEIGHTS[1], ge=0, le=1, description="weight of R2 (exp(-loss))")
    a3: float = Field(WEIGHTS[2], ge=0, le=1, description="weight of R3 (1 - action cost)")
    r1: Literal["accuracy", "f1"] = Field("f1", description="what R1 measures")
    gamma: float = Field(DEFAULT_GAMMA, ge=0, lt=1, description="discount of future rewards")
    batch_budget: int = Field(200, ge=1, description="fine-tuning batches that cost all of R3")
    push_cost: float = Field(0.1, ge=0, le=1, description="cost of sending a new bundle")

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> RewardSettings:
        total = self.a1 + self.a2 + self.a3
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"a1 + a2 + a3 must be 1 (R stays in [0, 1]); got {total:g}")
        return self


@dataclass(frozen=True)
class RewardTerms:
    r1: float
    r2: float
    r3: float
    total: float


def action_cost(decision: Decision, settings: RewardSettings) -> float:
    """The normalized cost in [0, 1] of carrying out `decision`."""
    cost = min(decision.batches / settings.batch_budget, 1.0) if decision.action.trains else 0.0
    if decision.action is not Action.KEEP:
        cost = min(cost + settings.push_cost, 1.0)
    return cost


def reward_terms(decision: Decision, *, accuracy: float, f1: float, loss: float,
                 labelled: int, settings: RewardSettings | None = None) -> RewardTerms:
    """R and its terms for `decision` given how the model did on `labelled` windows."""
    s = settings or RewardSettings()
    if labelled > 0:
        r1 = f1 if s.r1 == "f1" else accuracy
        r2 = math.exp(-max(loss, 0.0))
    else:
        r1 = r2 = 0.5
    r3 = 1.0 - action_cost(decision, s)
    return RewardTerms(r1, r2, r3, s.a1 * r1 + s.a2 * r2 + s.a3 * r3)


def reward(decision: Decision, next_state: VMState,
           settings: RewardSettings | None = None) -> float:
    """R of a transition as the live controller sees it: from the next state report."""
    return reward_terms(decision, accuracy=next_state.accuracy, f1=next_state.f1,
                        loss=next_state.loss, labelled=next_state.labelled_windows,
                        settings=settings).total
