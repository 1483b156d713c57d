"""The controller's logic, apart from gRPC: answer a state report with a decision,
record it, and feed finished transitions to the policy.

controller/service.py adapts this to the wire; tests and the future DQN environment can
drive it directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from vmad.actions import Decision
from vmad.controller.policy import Policy
from vmad.controller.registry import Registry
from vmad.controller.reward import reward
from vmad.state import VMState

__all__ = ["ControlCore"]

log = logging.getLogger("vmad.controller")


class ControlCore:
    def __init__(self, registry: Registry, policy: Policy,
                 reward_of: Callable[[Decision, VMState], float] = reward) -> None:
        self.registry = registry
        self.policy = policy
        self.reward_of = reward_of
        # Serializes decide+record per controller: a policy (the DQN) may hold state that
        # is not thread-safe, and the registry's order must match the policy's.
        self._lock = threading.Lock()

    def report(self, trainer_id: str, state: VMState, address: str = "") -> tuple[int, Decision]:
        """Decide for one VM's state and record it. Returns (decision id, decision)."""
        with self._lock:
            decision = self.policy.decide(state)
            if address:
                self.registry.touch_trainer(trainer_id, address)
            decision_id, transition = self.registry.record_report(
                trainer_id, state, decision, self.policy.name, reward_of=self.reward_of)
            if transition is not None:
                self.policy.observe(transition.state, transition.decision, transition.reward,
                                    transition.next_state)
        if decision.action.value != "keep":
            log.info("VM %s on %s: %s %d (%s)", state.vm_id, trainer_id, decision.action.value,
                     decision.batches, decision.reason)
        return decision_id, decision
