"""The reward of one transition, as the central control module learns from it.

Jiang 2024 defines R = a1*R1 + a2*R2 + a3*R3 with a1 = 0.4 (R1: accuracy on the batch),
a2 = 0.3 (R2: a loss term) and a3 = 0.3 (R3: a compression / cost term), without fixing
the terms' exact forms. Ours, each in [0, 1] so the weights mean what they say:

- R1 = accuracy of the model *after* the action on the VM's recent labelled windows
  (`next_state.accuracy`). With no labelled windows there is nothing to measure and
  R1 = 0.5, neither praise nor blame.
- R2 = exp(-loss) of that model on the same windows: 1 for a perfect, confident model,
  falling smoothly as the class-balanced cross-entropy grows. (The paper's loss term is
  not bounded; exp keeps R in [0, 1].)
- R3 = 1 - cost of the action, cost = fine-tuning batches / `batch_budget` (the paper
  fine-tunes with fewer than 200 batches) plus `push_cost` when a new bundle goes to the
  agent (any action but keep). This is where we depart from "compression": what the
  controller can trade against accuracy in this system is compute and model churn.
"""

from __future__ import annotations

import math

from controller.policy import Action, Decision
from trainer.state import VMState

__all__ = ["WEIGHTS", "reward"]

WEIGHTS: tuple[float, float, float] = (0.4, 0.3, 0.3)


def reward(decision: Decision, next_state: VMState, *, batch_budget: int = 200,
           push_cost: float = 0.1) -> float:
    if next_state.labelled_windows > 0:
        r1 = next_state.accuracy
        r2 = math.exp(-max(next_state.loss, 0.0))
    else:
        r1 = r2 = 0.5
    cost = min(decision.batches / batch_budget, 1.0) if decision.action.trains else 0.0
    if decision.action is not Action.KEEP:
        cost = min(cost + push_cost, 1.0)
    r3 = 1.0 - cost
    a1, a2, a3 = WEIGHTS
    return a1 * r1 + a2 * r2 + a3 * r3
