"""Shadow mode (`policy.kind: shadow`): the rule policy acts, the DQN decides beside it,
learns from the fleet's transitions, and takes over only when a backtest on the fleet's
own logged transitions says it would do better.

Every state report gets both decisions; the registry logs the acted one and, beside it
(`decisions.shadow`), the other. Every `backtest_every` new transitions the controller
backtests on the newest `window` logged transitions:

1. A reward model from the log alone: per action, a ridge regression of the *quality*
   part of the logged reward (a1*R1 + a2*R2: what the action did to the detector) on
   the state vector. The cost part (a3*R3) is known exactly for any action
   (controller/reward.py), so it is added, not learned: no action is flattered by the
   batch counts the rules happened to use.
2. For each logged state, the estimated reward of the DQN's greedy action minus that of
   the rule policy's action (the direct method of off-policy evaluation; a one-step
   estimate, because the log can say what an action did next, not what the DQN's
   values promise beyond it). Where the two agree the difference is 0.
3. The DQN acts while the latest backtest passes: at least `min_transitions` logged
   transitions, both policies' actions supported (`min_support` logged examples each)
   on at least `min_coverage` of the states, and the lower end of the 95 % interval of
   the mean difference above `margin`. Otherwise the rules act. An action the fleet
   never tried has no support: the DQN cannot take over on a promise nobody measured.

The latest backtest is kept in the registry (a restart keeps who acts) and shown by
`vmad status`. The rules never take some actions (a 10- or 200-batch fine-tune, a bare
reset), so a backtest cannot judge a DQN that prefers them: with `policy.dqn.epsilon`
> 0, a bounded share of decisions (at most `explore_per_hour` an hour) is a random
action instead of the rules' one, logged as `dqn explore (shadow)`, which is how the log
comes to cover them. With epsilon 0 (the default) the DQN never acts before it passes.

Plain attributes for exporters: `decisions`, `agreements`, `verdict`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import Field

from vmad.actions import CONTROL_ACTIONS, Decision, action_index
from vmad.config import StrictModel
from vmad.controller.policy import RulePolicy
from vmad.controller.reward import RewardSettings, action_cost
from vmad.state import VMState

__all__ = ["BACKTEST_FACT", "Backtest", "ShadowPolicy", "ShadowSettings", "backtest"]

log = logging.getLogger("vmad.controller.shadow")

BACKTEST_FACT = "shadow_backtest"
"""The registry `meta` key of the latest backtest."""


class ShadowSettings(StrictModel):
    """`policy.shadow` in controller.yaml (used when `policy.kind` is `shadow`)."""

    backtest_every: int = Field(100, ge=1, description="new transitions between backtests")
    window: int = Field(5000, ge=10, description="newest logged transitions a backtest uses")
    min_transitions: int = Field(500, ge=10, description="logged transitions a backtest "
                                                         "needs before it can pass")
    min_support: int = Field(30, ge=2, description="logged transitions of an action before "
                                                    "the reward model may judge it")
    min_coverage: float = Field(0.9, gt=0, le=1, description="share of states where both "
                                                              "policies' actions have support")
    margin: float = Field(0.0, ge=-1, le=1, description="the DQN takes over when the lower "
                          "95 % bound of its estimated reward gain per decision exceeds this")
    ridge: float = Field(1.0, gt=0, description="L2 penalty of the per-action reward model")


@dataclass(frozen=True)
class Backtest:
    """One backtest's outcome (see the module docstring)."""

    at: float
    transitions: int
    coverage: float
    agreement: float
    difference: float
    lower: float
    passed: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Backtest:
        return cls(**data)


def _features(states: Sequence[VMState]) -> np.ndarray:
    vectors = np.stack([s.to_vector() for s in states]).astype(np.float64)
    return np.hstack([vectors, np.ones((len(states), 1))])


def backtest(states: Sequence[VMState], logged: Sequence[Decision], rewards: Sequence[float],
             dqn: Sequence[Decision], rules: Sequence[Decision], reward: RewardSettings,
             settings: ShadowSettings, now: float | None = None) -> Backtest:
    """Compare the DQN's decisions `dqn` with the rule policy's `rules` on logged
    transitions (`states`, the `logged` decisions taken there, their `rewards`)."""
    now = time.time() if now is None else now
    n = len(states)
    agreement = float(np.mean([action_index(a) == action_index(b)
                               for a, b in zip(dqn, rules, strict=True)])) if n else 0.0
    if n < settings.min_transitions:
        return Backtest(now, n, 0.0, agreement, 0.0, -math.inf, False,
                        f"{n} logged transitions < {settings.min_transitions}")
    x = _features(states)
    known = np.array([reward.a3 * (1.0 - action_cost(d, reward)) for d in logged])
    quality = np.asarray(rewards, dtype=np.float64) - known
    taken = np.array([action_index(d) for d in logged])
    weights: dict[int, np.ndarray] = {}
    penalty = settings.ridge * np.eye(x.shape[1])
    for a in range(len(CONTROL_ACTIONS)):
        rows = taken == a
        if rows.sum() >= settings.min_support:
            xa = x[rows]
            weights[a] = np.linalg.solve(xa.T @ xa + penalty, xa.T @ quality[rows])

    def estimate(i: int, decision: Decision) -> float:
        return float(x[i] @ weights[action_index(decision)]
                     + reward.a3 * (1.0 - action_cost(decision, reward)))

    gains = [estimate(i, d) - estimate(i, r) if action_index(d) != action_index(r) else 0.0
             for i, (d, r) in enumerate(zip(dqn, rules, strict=True))
             if action_index(d) in weights and action_index(r) in weights]
    coverage = len(gains) / n
    if not gains:
        return Backtest(now, n, 0.0, agreement, 0.0, -math.inf, False,
                        f"coverage 0.00 < {settings.min_coverage}: no state where both "
                        f"policies' actions have support")
    diff = np.asarray(gains)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    lower = mean - 1.96 * se
    if coverage < settings.min_coverage:
        passed, why = False, (f"coverage {coverage:.2f} < {settings.min_coverage}: the DQN "
                              f"picks actions the fleet has rarely tried")
    elif lower <= settings.margin:
        passed, why = False, (f"estimated gain {mean:+.4f} per decision, 95 % lower bound "
                              f"{lower:+.4f} <= margin {settings.margin:+.4f}")
    else:
        passed, why = True, (f"estimated gain {mean:+.4f} per decision, 95 % lower bound "
                             f"{lower:+.4f} > margin {settings.margin:+.4f}")
    return Backtest(now, n, coverage, agreement, mean, lower, passed, why)


class ShadowPolicy:
    """The rules act; the DQN (controller/dqn.py's DQNPolicy) runs beside them, learns,
    and acts only while the latest backtest passes. `registry` keeps the log and the
    verdict (controller/registry.py)."""

    def __init__(self, rules: RulePolicy, dqn: Any, registry: Any,
                 settings: ShadowSettings | None = None,
                 reward: RewardSettings | None = None) -> None:
        self.rules = rules
        self.dqn = dqn
        self.registry = registry
        self.settings = settings or ShadowSettings()
        self.reward = reward or RewardSettings()
        saved = registry.fact(BACKTEST_FACT)
        self.verdict: Backtest | None = Backtest.from_dict(saved) if saved else None
        self.decisions = 0
        self.agreements = 0
        self._since_backtest = 0

    @property
    def dqn_acts(self) -> bool:
        return self.verdict is not None and self.verdict.passed

    @property
    def name(self) -> str:
        return "dqn (backtest passed)" if self.dqn_acts else "rules (dqn in shadow)"

    def decide_both(self, state: VMState, now: float | None = None
                    ) -> tuple[Decision, Decision]:
        """(the decision to act on, the other policy's decision to log beside it)."""
        ruled = self.rules.decide(state)
        if self.dqn_acts:
            acted, other = self.dqn.decide(state, now=now), ruled
        else:
            acted, other = ruled, self.dqn.decide(state, explore=False, now=now)
            explored = self.dqn.explore(now) if other.q_values else None
            if explored is not None:
                # The one way an action the rules never take gets into the log, so a
                # backtest can judge it: bounded (epsilon, explore_per_hour), counted.
                random = CONTROL_ACTIONS[explored]
                acted = Decision(random.action, random.batches,
                                 f"dqn explore (shadow): instead of {ruled.label} "
                                 f"({ruled.reason})", other.q_values)
        self.decisions += 1
        self.agreements += action_index(acted) == action_index(other)
        return acted, other

    def decide(self, state: VMState) -> Decision:
        return self.decide_both(state)[0]

    def observe(self, state: VMState, decision: Decision, reward: float,
                next_state: VMState, transition_id: int = 0) -> None:
        self.dqn.observe(state, decision, reward, next_state, transition_id)
        self._since_backtest += 1
        if self._since_backtest >= self.settings.backtest_every:
            self.run_backtest()

    def run_backtest(self, now: float | None = None) -> Backtest:
        """Backtest on the newest logged transitions, keep and return the verdict."""
        self._since_backtest = 0
        rows = self.registry.transitions(self.settings.window, newest=True)
        states = [r.state for r in rows]
        ruled = [self.rules.decide(s) for s in states]
        greedy = self.dqn.greedy_indices(states)
        dqn = [CONTROL_ACTIONS[g] if g is not None else r
               for g, r in zip(greedy, ruled, strict=True)]
        verdict = backtest(states, [r.decision for r in rows], [r.reward for r in rows],
                           dqn, ruled, self.reward, self.settings, now)
        if self.verdict is None or verdict.passed != self.verdict.passed:
            log.info("shadow backtest on %d transitions: %s; %s acts", verdict.transitions,
                     verdict.why, "the DQN" if verdict.passed else "the rule policy")
        self.verdict = verdict
        self.registry.put_fact(BACKTEST_FACT, verdict.to_dict())
        return verdict

    def close(self) -> None:
        self.dqn.close()
