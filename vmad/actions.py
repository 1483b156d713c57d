"""The controller's actions and decisions: the contract between the controller, which
decides, and the trainer, which carries decisions out.

Actions are the paper's (Jiang 2024, central control module): keep the model, fine-tune
it on the VM's recent labelled data, reset it to the pretrained weights, or reset and
fine-tune from there. A fine-tune action carries how many mini-batches to run (the paper
fine-tunes with fewer than 200).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ACTIONS", "CONTROL_ACTIONS", "Action", "Decision", "action_index"]


class Action(enum.Enum):
    KEEP = "keep"
    FINETUNE = "finetune"
    RESET = "reset"
    RESET_FINETUNE = "reset_finetune"

    @property
    def trains(self) -> bool:
        return self in (Action.FINETUNE, Action.RESET_FINETUNE)


ACTIONS: tuple[Action, ...] = tuple(Action)
"""The kinds of action, in a fixed order."""


@dataclass(frozen=True)
class Decision:
    """An action for one VM's trainer.

    q_values: the DQN's action values for the state, in `CONTROL_ACTIONS` order, kept so
        every decision can be explained afterwards (empty for other policies).
    """

    action: Action
    batches: int = 0
    reason: str = ""
    q_values: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        """Short name for tables and logs: keep, ft50, reset, reset+ft50."""
        name = {Action.KEEP: "keep", Action.FINETUNE: "ft", Action.RESET: "reset",
                Action.RESET_FINETUNE: "reset+ft"}[self.action]
        return f"{name}{self.batches}" if self.action.trains else name


CONTROL_ACTIONS: tuple[Decision, ...] = (
    Decision(Action.KEEP, 0),
    Decision(Action.FINETUNE, 10),
    Decision(Action.FINETUNE, 50),
    Decision(Action.FINETUNE, 200),
    Decision(Action.RESET, 0),
    Decision(Action.RESET_FINETUNE, 50),
)
"""The DQN's discrete actions: index i is action number i of its Q-network and of the
control environment (controller/env.py). Fine-tunes of 10, 50 and 200 mini-batches span
"a nudge" to the paper's upper bound; reset + fine-tune gets 50, enough to adapt the
pretrained model without paying for 200."""


def action_index(decision: Decision) -> int:
    """The `CONTROL_ACTIONS` number closest to `decision`: the same kind of action with
    the nearest batch count. Lets a learning policy use transitions whose decisions came
    from elsewhere (the rule policy fine-tunes 100 batches, say)."""
    same = [i for i, a in enumerate(CONTROL_ACTIONS) if a.action is decision.action]
    return min(same, key=lambda i: (abs(CONTROL_ACTIONS[i].batches - decision.batches), i))


