"""`vmad bench control`: the DQN policy against fixed policies on held-out episodes.

Every policy plays the same "eval" episodes of the control environment (workload seeds
and SMD servers never used in training, controller/env.py), one state report at a time,
exactly as the live controller asks it. Per policy: the point-wise F1 and false-alarm
rate of the VM's verdicts pooled over each episode, then averaged over episodes; the
mean reward per step; and the training compute spent per episode (mini-batches and
seconds of fine-tuning).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from vmad.actions import action_index
from vmad.controller.env import EnvSettings, VMLifeEnv
from vmad.controller.policy import Policy, RulePolicy

__all__ = ["QUICK", "PolicyResult", "fixed_policies", "run_control_bench"]

QUICK = EnvSettings(steps=10, step_samples=180, warmup_samples=540, max_windows=1000,
                    pretrain_batches=200, smd_share=0.0)
"""CI-sized episodes: short, synthetic only."""


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    episodes: int
    f1: float
    f1_std: float
    false_alarm_rate: float
    reward: float
    batches: float
    seconds: float
    actions: dict[str, int]
    episode_f1: tuple[float, ...]

    @property
    def f1_se(self) -> float:
        """Standard error of the mean F1 over episodes."""
        return self.f1_std / max(1, self.episodes - 1) ** 0.5


def fixed_policies(k: int = 4, drift: float = 1.5, batches: int = 50) -> list[Policy]:
    from vmad.controller.baselines import AlwaysFinetune, EveryK, NeverRetrain, OnDrift

    return [NeverRetrain(), EveryK(k, batches), OnDrift(drift, batches), AlwaysFinetune(200),
            RulePolicy()]


def play(env: VMLifeEnv, policy: Policy, seed: int) -> dict[str, Any]:
    """One episode; pooled confusion counts, reward and compute."""
    if hasattr(policy, "forget"):
        policy.forget("vm")
    env.reset(seed=seed)
    counts = np.zeros(4, dtype=np.int64)
    rewards, batches, seconds, actions = [], 0, 0.0, {}
    while True:
        decision = policy.decide(env.last_state)
        _, reward, terminated, truncated, info = env.step(action_index(decision))
        counts += [info["tp"], info["fp"], info["fn"], info["tn"]]
        rewards.append(reward)
        batches += info["batches"]
        seconds += info["train_seconds"]
        actions[decision.label] = actions.get(decision.label, 0) + 1
        if terminated or truncated:
            break
    tp, fp, fn, tn = (int(c) for c in counts)
    # An episode without anomalies and without alarms was handled perfectly.
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"f1": f1, "far": fp / (fp + tn) if fp + tn else 0.0,
            "reward": float(np.mean(rewards)), "batches": batches, "seconds": seconds,
            "actions": actions}


def run_control_bench(policies: list[Policy], episodes: int, settings: EnvSettings,
                      *, first_seed: int = 0, progress: bool = True) -> list[PolicyResult]:
    env = VMLifeEnv(settings, split="eval")
    results = []
    try:
        for policy in policies:
            started = time.perf_counter()
            runs = [play(env, policy, first_seed + i) for i in range(episodes)]
            actions: dict[str, int] = {}
            for run in runs:
                for key, n in run["actions"].items():
                    actions[key] = actions.get(key, 0) + n
            result = PolicyResult(
                policy.name, episodes, float(np.mean([r["f1"] for r in runs])),
                float(np.std([r["f1"] for r in runs])),
                float(np.mean([r["far"] for r in runs])),
                float(np.mean([r["reward"] for r in runs])),
                float(np.mean([r["batches"] for r in runs])),
                float(np.mean([r["seconds"] for r in runs])), actions,
                tuple(r["f1"] for r in runs))
            results.append(result)
            if progress:
                print(f"{policy.name:>26}: F1 {result.f1:.3f}  false alarms "
                      f"{result.false_alarm_rate:.4f}  reward {result.reward:.3f}  "
                      f"{result.batches:.0f} batches/episode  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        env.close()
    return results


def render(results: list[PolicyResult], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("policy", "mean F1", "± SE", "false-alarm rate", "mean reward",
                   "batches / episode", "seconds / episode", "actions"):
        table.add_column(column, justify="left" if column in ("policy", "actions")
                         else "right")
    for r in results:
        actions = ", ".join(f"{k} {v}" for k, v in sorted(r.actions.items()))
        table.add_row(r.policy, f"{r.f1:.3f}", f"{r.f1_se:.3f}", f"{r.false_alarm_rate:.4f}",
                      f"{r.reward:.3f}", f"{r.batches:.0f}", f"{r.seconds:.1f}", actions)
    return table


def paired_against_best_fixed(results: list[PolicyResult]) -> list[str]:
    """For each DQN row: its F1 minus the best fixed policy's on the same episodes, with
    the standard error of that paired difference (episodes differ far more from each
    other than policies do on one episode, so unpaired errors would hide real gaps)."""
    fixed = [r for r in results if not r.policy.startswith("dqn")]
    if not fixed:
        return []
    best = max(fixed, key=lambda r: r.f1)
    lines = []
    for r in results:
        if r.policy.startswith("dqn"):
            diff = np.subtract(r.episode_f1, best.episode_f1)
            se = float(np.std(diff) / max(1, len(diff) - 1) ** 0.5)
            lines.append(f"{r.policy} - {best.policy}: F1 {diff.mean():+.3f} ± {se:.3f} "
                         f"(paired over {len(diff)} episodes), compute "
                         f"{r.batches:.0f} vs {best.batches:.0f} batches / episode")
    return lines


def bench_command(args: Any) -> int:
    from rich.console import Console

    from vmad.controller.dqn import DEFAULT_POLICY, DQNPolicy, DQNSettings, load_policy_file

    settings = QUICK if args.quick else EnvSettings()
    if args.kind:
        settings = replace(settings, kind=args.kind)
    if args.r1:
        settings = replace(settings, reward=settings.reward.model_copy(update={"r1": args.r1}))
    from vmad.controller.commands import with_validation

    settings = with_validation(settings, args)
    episodes = args.episodes or (2 if args.quick else 20)
    policies: list[Any] = []
    for path in args.policy or [DEFAULT_POLICY]:
        loaded = load_policy_file(path)
        dqn = DQNPolicy(loaded, DQNSettings(learn=False))
        dqn.name = f"dqn ({Path(path).parent.name}/{Path(path).name})" if args.policy \
            else "dqn (shipped default)"
        policies.append(dqn)
    policies += fixed_policies(args.k, args.drift)
    started = time.perf_counter()
    results = run_control_bench(policies, episodes, settings, first_seed=args.seed)
    title = (f"Control on {episodes} held-out episodes x {settings.steps} decisions "
             f"({settings.kind}, window {settings.window}, R1 = {settings.reward.r1}), "
             f"{time.perf_counter() - started:.0f} s")
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and docs: one row per policy
    console.print(render(results, title))
    for line in paired_against_best_fixed(results):
        console.print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": _jsonable(asdict(settings)),
                                         "episodes": episodes,
                                         "results": [asdict(r) for r in results]}, indent=2))
        print(f"results -> {args.json}")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value
