"""`vmad bench control`: the DQN policy against fixed policies and a contextual bandit
on held-out episodes.

Every policy plays the same "eval" episodes of the control environment (workload seeds
and SMD servers never used in training, controller/env.py), one state report at a time,
exactly as the live controller asks it. Per policy: the point-wise F1 and false-alarm
rate of the VM's verdicts pooled over each episode, then averaged over episodes; the
mean reward per step; and the training compute spent per episode (mini-batches and
seconds of fine-tuning).

Several DQN policies (one per training seed) are summarized as "DQN, mean of N seeds":
per episode, the mean over seeds of F1, false alarms and batches. Its paired difference
to every other policy is reported per episode with a 95 % t-interval, so the spread
between episodes (far larger than between policies on one episode) does not hide a gap.
The contextual bandit (`--bandit`: a Q-network trained with gamma 0, the same state and
actions, one-step) is summarized the same way.
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
    episode_far: tuple[float, ...] = ()
    episode_batches: tuple[float, ...] = ()

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
                tuple(r["f1"] for r in runs), tuple(r["far"] for r in runs),
                tuple(float(r["batches"]) for r in runs))
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


def seed_mean(results: list[PolicyResult], name: str) -> PolicyResult:
    """Several seeds of one method as one row: per episode, the mean over seeds."""
    f1 = np.mean([r.episode_f1 for r in results], axis=0)
    far = np.mean([r.episode_far for r in results], axis=0)
    batches = np.mean([r.episode_batches for r in results], axis=0)
    actions: dict[str, int] = {}
    for r in results:
        for key, n in r.actions.items():
            actions[key] = actions.get(key, 0) + n
    return PolicyResult(name, results[0].episodes, float(f1.mean()), float(f1.std()),
                        float(far.mean()), float(np.mean([r.reward for r in results])),
                        float(batches.mean()), float(np.mean([r.seconds for r in results])),
                        actions, tuple(f1), tuple(far), tuple(batches))


@dataclass(frozen=True)
class Paired:
    """`policy` minus `other` on the same episodes: mean F1 difference, its 95 %
    t-interval, wins / ties / losses by episode, and the compute ratio."""

    policy: str
    other: str
    difference: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    far_difference: float
    compute_ratio: float


def paired(a: PolicyResult, b: PolicyResult) -> Paired:
    from scipy import stats

    diff = np.subtract(a.episode_f1, b.episode_f1)
    n = len(diff)
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)) if n > 1 \
        else float("inf")
    mean = float(diff.mean())
    return Paired(a.policy, b.policy, mean, mean - half, mean + half,
                  int(np.sum(diff > 1e-9)), int(np.sum(np.abs(diff) <= 1e-9)),
                  int(np.sum(diff < -1e-9)),
                  float(np.mean(np.subtract(a.episode_far, b.episode_far))),
                  a.batches / b.batches if b.batches else float("inf"))


def is_fixed(result: PolicyResult) -> bool:
    """A fixed policy's row (not a DQN's or a bandit's, seed or mean)."""
    return not result.policy.startswith(("dqn", "DQN", "bandit"))


def verdict(summary: PolicyResult, results: list[PolicyResult]) -> str:
    """The target, said plainly: F1 no worse than the best fixed policy (paired 95 %
    interval of the difference above -0.01) at <= 50 % of its fine-tuning compute."""
    fixed = [r for r in results if is_fixed(r)]
    best = max(fixed, key=lambda r: r.f1)
    p = paired(summary, best)
    f1_ok = p.low > -0.01
    compute_ok = summary.batches <= 0.5 * best.batches
    met = "MET" if f1_ok and compute_ok else "NOT MET"
    return (f"Target {met}: {summary.policy} vs the best fixed policy ({best.policy}, "
            f"F1 {best.f1:.3f}): F1 difference {p.difference:+.3f} [95 % {p.low:+.3f}, "
            f"{p.high:+.3f}] ({'above' if f1_ok else 'not above'} -0.01), compute "
            f"{summary.batches:.0f} vs {best.batches:.0f} batches / episode = "
            f"{p.compute_ratio:.0%} ({'within' if compute_ok else 'over'} 50 %)")


def paired_table(rows: list[Paired], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("minus", "F1 difference", "95 % interval", "W / T / L",
                   "false-alarm difference", "compute ratio"):
        table.add_column(column, justify="left" if column == "minus" else "right")
    for p in rows:
        table.add_row(p.other, f"{p.difference:+.3f}", f"[{p.low:+.3f}, {p.high:+.3f}]",
                      f"{p.wins} / {p.ties} / {p.losses}", f"{p.far_difference:+.4f}",
                      f"{p.compute_ratio:.2f}")
    return table


def frontier_plot(results: list[PolicyResult], path: Path, title: str) -> Path:
    """F1 against fine-tuning compute per episode, one point per policy; seeds small,
    their means large; the fixed policies' frontier (best F1 at no more compute) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    floor = 5.0  # never-retrain spends 0: drawn at the left edge of the log axis
    fixed = sorted((r for r in results if is_fixed(r)), key=lambda r: r.batches)
    xs = [max(r.batches, floor) for r in fixed]
    ax.scatter(xs, [r.f1 for r in fixed], marker="s", color="tab:gray", zorder=3,
               label="fixed policies")
    for r, x in zip(fixed, xs, strict=True):
        ax.annotate(r.policy, (x, r.f1), fontsize=7, xytext=(4, 3), textcoords="offset points")
    best, frontier = -1.0, []
    for r, x in zip(fixed, xs, strict=True):
        if r.f1 > best:
            best = r.f1
            frontier.append((x, r.f1))
    ax.step(*zip(*frontier, strict=True), where="post", color="tab:gray", lw=1, ls="--",
            label="fixed-policy frontier")
    for prefix, color in (("dqn (", "tab:blue"), ("bandit (", "tab:orange")):
        seeds = [r for r in results if r.policy.startswith(prefix)]
        if seeds:
            ax.scatter([max(r.batches, floor) for r in seeds], [r.f1 for r in seeds], s=14,
                       color=color, alpha=0.5, label=f"{prefix.strip(' (')} seeds")
    for r in results:
        if r.policy.startswith(("DQN, mean", "bandit, mean")):
            color = "tab:blue" if r.policy.startswith("DQN") else "tab:orange"
            ax.errorbar(max(r.batches, floor), r.f1, yerr=1.96 * r.f1_se, fmt="o", ms=8,
                        color=color, capsize=3, zorder=4, label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning mini-batches per episode (log; 0 drawn at 5)")
    ax.set_ylabel("mean point-wise F1 over held-out episodes\n(bars: unpaired 95 % over episodes)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(path: Path, name: str) -> Any:
    from vmad.controller.dqn import DQNPolicy, DQNSettings, load_policy_file

    policy = DQNPolicy(load_policy_file(path), DQNSettings(learn=False))
    policy.name = name
    return policy


def bench_command(args: Any) -> int:
    from rich.console import Console

    from vmad.controller.commands import with_validation
    from vmad.controller.dqn import DEFAULT_POLICY

    settings = QUICK if args.quick else EnvSettings()
    if args.kind:
        settings = replace(settings, kind=args.kind)
    if args.steps:
        settings = replace(settings, steps=args.steps)
    if args.r1:
        settings = replace(settings, reward=settings.reward.model_copy(update={"r1": args.r1}))
    settings = with_validation(settings, args)
    episodes = args.episodes or (2 if args.quick else 20)
    policies: list[Any] = []
    if not args.no_dqn:
        for path in args.policy or [DEFAULT_POLICY]:
            policies.append(_load(path, f"dqn ({Path(path).parent.name})" if args.policy
                                  else "dqn (shipped default)"))
    for path in args.bandit or []:
        policies.append(_load(path, f"bandit ({Path(path).parent.name})"))
    if not args.no_fixed:
        policies += fixed_policies(args.k, args.drift)
    earlier = [r for path in args.results or [] for r in
               _earlier_results(path, settings, episodes, args.seed)]
    started = time.perf_counter()
    results = earlier + run_control_bench(policies, episodes, settings,
                                          first_seed=args.seed)
    summaries = []
    for prefix, name in (("dqn (", "DQN"), ("bandit (", "bandit")):
        group = [r for r in results if r.policy.startswith(prefix)]
        if len(group) > 1:
            summaries.append(seed_mean(group, f"{name}, mean of {len(group)} seeds"))
    title = (f"Control on {episodes} held-out episodes x {settings.steps} decisions "
             f"({settings.kind}, window {settings.window}, R1 = {settings.reward.r1}, "
             f"validation {settings.validation})")
    took = (f"{time.perf_counter() - started:.0f} s" if not earlier else
            f"{len(earlier)} rows from earlier runs, {time.perf_counter() - started:.0f} s here")
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and docs: one row per policy
    rows = results + summaries
    console.print(render(rows, f"{title}, {took}"))
    dqn = next((r for r in summaries if r.policy.startswith("DQN")),
               next((r for r in results if r.policy.startswith("dqn")), None))
    if dqn is not None:
        others = [r for r in rows if r is not dqn and not r.policy.startswith("dqn (")]
        console.print(paired_table([paired(dqn, o) for o in others],
                                   f"{dqn.policy} minus each policy, paired by episode"))
        if any(is_fixed(r) for r in results):
            console.print(verdict(dqn, results))
    if args.plot is not None:
        print(f"frontier plot -> {frontier_plot(rows, args.plot, title)}")
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": _jsonable(asdict(settings)),
                                         "episodes": episodes, "first_seed": args.seed,
                                         "results": [asdict(r) for r in results],
                                         "summaries": [asdict(r) for r in summaries]},
                                        indent=2))
        print(f"results -> {args.json}")
    return 0


def _earlier_results(path: Path, settings: EnvSettings, episodes: int,
                     first_seed: int) -> list[PolicyResult]:
    """Rows of an earlier `--json` run on the very same episodes (checked), so a long
    benchmark can run in parts (the fixed policies while the DQN still trains)."""
    from vmad.errors import UsageError

    data = json.loads(Path(path).read_text())
    same = (data.get("settings") == _jsonable(asdict(settings))
            and data.get("episodes") == episodes and data.get("first_seed") == first_seed)
    if not same:
        raise UsageError(f"{path}: ran other episodes or settings than this run "
                         f"(episodes, --seed, --steps, --kind, --r1, --validation must match)")
    return [PolicyResult(**{**row, "actions": dict(row["actions"]),
                            **{k: tuple(row[k]) for k in
                               ("episode_f1", "episode_far", "episode_batches")}})
            for row in data["results"]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value
