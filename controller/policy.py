"""Policies: turn one VM's state into an action for its trainer.

Every policy honours `Policy` (`decide` a state, `observe` a finished transition), so the
controller service does not care whether a rule table or the DQN (controller/dqn.py)
answers. The DQN learns from the transitions the controller records; the rule policy
ignores them.

The actions and decisions themselves are the shared contract in `vmad/actions.py`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import Field

from vmad.actions import ACTIONS, CONTROL_ACTIONS, Action, Decision, action_index
from vmad.config import StrictModel
from vmad.state import VMState

__all__ = ["ACTIONS", "CONTROL_ACTIONS", "Action", "Decision", "Policy", "RulePolicy",
           "RuleSettings", "action_index"]


@runtime_checkable
class Policy(Protocol):
    """What the controller asks of a policy."""

    name: str

    def decide(self, state: VMState) -> Decision:
        """The action for the VM in `state` (called once per state report)."""
        ...

    def observe(self, state: VMState, decision: Decision, reward: float,
                next_state: VMState, transition_id: int = 0) -> None:
        """A transition finished: `decision` taken in `state` led to `next_state`
        (`transition_id`: its row in the registry, 0 when it has none)."""
        ...

    def close(self) -> None:
        """The controller is stopping: persist whatever was learned."""
        ...


class RuleSettings(StrictModel):
    """Thresholds of the rule policy (`policy.rules` in controller.yaml).

    min_labelled: labelled windows needed before the model is judged at all; below this
        the VM keeps its model (judging on a handful of windows chases noise).
    min_f1 / min_accuracy: the model is poor when F1 or accuracy on recent labelled
        windows falls below these.
    finetune_batches: mini-batches per fine-tune (the paper: fewer than 200).
    max_batches_per_model: once a model has had this many fine-tuning batches since its
        last reset and is still poor, start again from the pretrained weights.
    reset_drift: drift (vmad/state.py) beyond which a poor fine-tuned model is
        reset before fine-tuning: it was tuned to data that no longer looks like now.
    cooldown_s: after a training, keep the new model at least this long so its verdicts
        are judged on windows it has actually scored.
    """

    min_labelled: int = Field(32, ge=0)
    # Above 1: every judged model is poor (tests use this to force training).
    min_f1: float = Field(0.6, ge=0)
    min_accuracy: float = Field(0.9, ge=0)
    finetune_batches: int = Field(100, ge=1, le=10_000)
    max_batches_per_model: int = Field(600, ge=1)
    reset_drift: float = Field(3.0, ge=0)
    cooldown_s: float = Field(30.0, ge=0)


class RulePolicy:
    """A documented rule table: the policy when no DQN is configured or loaded.

    In order, the first rule that matches wins:
    1. fewer than `min_labelled` labelled windows -> keep (nothing to judge on);
    2. trained less than `cooldown_s` ago -> keep (let the new model prove itself);
    3. F1 >= `min_f1` and accuracy >= `min_accuracy` -> keep (the model is good);
    4. poor, fine-tuned, and drift > `reset_drift` -> reset + fine-tune;
    5. poor and `batches_trained` >= `max_batches_per_model` -> reset + fine-tune;
    6. poor -> fine-tune `finetune_batches`.
    A bare reset is never chosen by these rules; it stays an action for operators and for
    the DQN, which may learn when the pretrained model beats a fine-tuned one.
    """

    name = "rules"

    def __init__(self, settings: RuleSettings | None = None) -> None:
        self.settings = settings or RuleSettings()

    def decide(self, state: VMState) -> Decision:
        s = self.settings
        if state.labelled_windows < s.min_labelled:
            return Decision(Action.KEEP, 0, f"{state.labelled_windows} labelled windows "
                                            f"< {s.min_labelled}")
        if state.seconds_since_training < s.cooldown_s:
            return Decision(Action.KEEP, 0, f"trained {state.seconds_since_training:.0f} s ago")
        quality = f"F1 {state.f1:.2f}, accuracy {state.accuracy:.2f}"
        if state.f1 >= s.min_f1 and state.accuracy >= s.min_accuracy:
            return Decision(Action.KEEP, 0, f"good: {quality}")
        if state.finetuned and state.drift > s.reset_drift:
            return Decision(Action.RESET_FINETUNE, s.finetune_batches,
                            f"poor ({quality}) and drifted {state.drift:.1f}")
        if state.batches_trained >= s.max_batches_per_model:
            return Decision(Action.RESET_FINETUNE, s.finetune_batches,
                            f"poor ({quality}) after {state.batches_trained} batches")
        return Decision(Action.FINETUNE, s.finetune_batches, f"poor: {quality}")

    def observe(self, state: VMState, decision: Decision, reward: float,
                next_state: VMState, transition_id: int = 0) -> None:
        """Rules do not learn."""

    def close(self) -> None:
        """Nothing to persist."""
