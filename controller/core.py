"""The controller's logic apart from gRPC: answer a VM's state report with a decision
within the node's compute budget, record both in the registry, and feed the finished
transition to the policy.

controller/service.py adapts this to the wire; tests drive it directly. Plain
attributes and `gauges()` are what an exporter publishes (`/metrics`) and what
`vmad status` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vmad.actions import Decision
from vmad.controller.budget import HOUR, BudgetGuard
from vmad.controller.policy import Policy
from vmad.controller.registry import Registry
from vmad.controller.reward import reward
from vmad.controller.shadow import ShadowPolicy
from vmad.state import VMState

__all__ = ["ControlCore"]

log = logging.getLogger("vmad.controller")


class ControlCore:
    """`decisions`: state reports answered, ever (this process)."""

    def __init__(self, registry: Registry, policy: Policy,
                 reward_of: Callable[[Decision, VMState], float] = reward,
                 budget: BudgetGuard | None = None) -> None:
        self.registry = registry
        self.policy = policy
        self.reward_of = reward_of
        self.budget = budget or BudgetGuard()
        self.decisions = 0
        # Serializes decide+record per controller: a policy (the DQN) may hold state that
        # is not thread-safe, the registry's order must match the policy's, and a node's
        # budget must be read and spent in one step.
        self._lock = threading.Lock()

    def report(self, trainer_id: str, state: VMState, address: str = "",
               now: float | None = None) -> tuple[int, Decision]:
        """Decide for one VM's state and record it. Returns (decision id, decision)."""
        with self._lock:
            now = time.time() if now is None else now
            shadow: Decision | None = None
            if isinstance(self.policy, ShadowPolicy):
                decision, shadow = self.policy.decide_both(state, now)
            else:
                decision = self.policy.decide(state)
            decision = self.budget.check(trainer_id, decision,
                                         self.registry.batches_since(trainer_id, now - HOUR))
            if address:
                self.registry.touch_trainer(trainer_id, address, now=now)
            decision_id, transition = self.registry.record_report(
                trainer_id, state, decision, self.policy.name, reward_of=self.reward_of,
                now=now, shadow=shadow)
            if transition is not None:
                self.policy.observe(transition.state, transition.decision, transition.reward,
                                    transition.next_state, transition.transition_id)
            self.decisions += 1
        if decision.action.value != "keep":
            log.info("VM %s on %s: %s %d (%s)", state.vm_id, trainer_id, decision.action.value,
                     decision.batches, decision.reason)
        return decision_id, decision

    def gauges(self) -> dict[str, float]:
        """The controller's counters and gauges by name, for an exporter and
        `vmad status`: decisions, the budget, and the learning policy's exploration,
        learning progress and shadow verdict when there is one."""
        out = {"decisions_total": float(self.decisions),
               "budget_batches_per_node_hour": float(self.budget.limit),
               "budget_refusals_total": float(self.budget.refusals)}
        policy = self.policy
        if isinstance(policy, ShadowPolicy):
            out["shadow_dqn_acts"] = float(policy.dqn_acts)
            out["shadow_decisions_total"] = float(policy.decisions)
            out["shadow_agreements_total"] = float(policy.agreements)
            if policy.verdict is not None:
                out["shadow_backtest_gain"] = policy.verdict.difference
                out["shadow_backtest_gain_lower"] = policy.verdict.lower
                out["shadow_backtest_coverage"] = policy.verdict.coverage
            policy = policy.dqn
        if hasattr(policy, "updates"):
            out["dqn_updates_total"] = float(policy.updates)
            out["dqn_transitions_total"] = float(policy.transitions)
            out["dqn_replay_size"] = float(policy.stored)
            out["dqn_epsilon"] = float(policy.settings.epsilon)
            out["dqn_explorations_total"] = float(policy.explorations)
            out["dqn_explorations_last_hour"] = float(policy.explorations_last_hour)
            out["dqn_explore_per_hour"] = float(policy.settings.explore_per_hour)
        return out
