"""`vmad controller --config controller.yaml`, `vmad controller train-policy`,
`vmad bench control` and `vmad status`.

Heavy imports (grpc servers) happen inside the run functions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any, bench: Any) -> None:
    controller = commands.add_parser(
        "controller", help="run the central control module (fleet registry + policy)")
    controller.add_argument("--config", type=Path, help="controller.yaml (to run it)")
    controller.set_defaults(run=run_controller)
    tasks = controller.add_subparsers(dest="controller_task", metavar="TASK")
    train = tasks.add_parser(
        "train-policy", help="train the DQN policy offline in the control environment")
    train.add_argument("--out", required=True, type=Path,
                       help="folder for policy.npz, checkpoints/ and steps.csv")
    train.add_argument("--steps", type=int, default=10_000, help="decisions (default 10000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", dest="train_config", type=Path,
                       help="controller.yaml whose `reward:` (weights, R1, gamma) to train for")
    train.add_argument("--r1", choices=("accuracy", "f1"), help="override reward.r1")
    train.add_argument("--gamma", type=float,
                       help="override reward.gamma; 0 trains the one-step contextual bandit")
    train.add_argument("--kind", help="detector kind in the environment (default mlp)")
    train.add_argument("--validation", choices=("labels", "injected"),
                       help="what R1 and the state's quality are measured on (default "
                            "labels; injected: synthetic faults in the VM's own samples)")
    train.add_argument("--label-share", type=float,
                       help="with --validation injected: share of incidents labelled")
    train.add_argument("--checkpoint-every", type=int, default=2_000)
    train.add_argument("--quick", action="store_true", help="tiny episodes, for CI")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=run_train_policy)

    control = bench.add_parser(
        "control", help="DQN vs fixed retraining policies on held-out episodes")
    control.add_argument("--policy", type=Path, action="append",
                         help="DQN policy.npz to evaluate (repeatable, one per seed: their "
                              "mean is compared; default: the shipped one)")
    control.add_argument("--bandit", type=Path, action="append",
                         help="contextual-bandit policy.npz (train-policy --gamma 0; "
                              "repeatable, one per seed)")
    control.add_argument("--episodes", type=int, help="held-out episodes (default 20; quick 2)")
    control.add_argument("--steps", type=int, help="decisions per episode (default 36)")
    control.add_argument("--plot", type=Path, help="write the F1-vs-compute frontier here")
    control.add_argument("--results", type=Path, action="append",
                         help="add the rows of an earlier --json run on the same episodes")
    control.add_argument("--no-fixed", action="store_true", help="skip the fixed policies")
    control.add_argument("--no-dqn", action="store_true",
                         help="skip the DQN (with --no-fixed and --bandit: bandits only)")
    control.add_argument("--seed", type=int, default=0, help="first held-out episode")
    control.add_argument("--k", type=int, default=4, help="K of 'retrain every K steps'")
    control.add_argument("--drift", type=float, default=1.5,
                         help="threshold of 'retrain when drift exceeds'")
    control.add_argument("--r1", choices=("accuracy", "f1"),
                         help="R1 of the reported reward (default f1)")
    control.add_argument("--kind", help="detector kind in the environment (default mlp)")
    control.add_argument("--validation", choices=("labels", "injected"),
                         help="what the state's quality features are measured on (as the "
                              "evaluated policies were trained; default labels)")
    control.add_argument("--label-share", type=float,
                         help="with --validation injected: share of incidents labelled")
    control.add_argument("--json", type=Path, help="write the results here")
    control.add_argument("--quick", action="store_true", help="CI-sized: well under a minute")
    control.set_defaults(run=run_bench_control)

    status = commands.add_parser("status", help="print the fleet as the controller sees it")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path,
                       help="controller.yaml: ask the running controller (its Fleet call)")
    where.add_argument("--database", type=Path,
                       help="read the registry file directly (works while it is stopped)")
    status.add_argument("--decisions", type=int, default=10,
                        help="also list this many recent decisions (default 10)")
    status.set_defaults(run=run_status)


def run_controller(args: argparse.Namespace) -> int:
    from vmad.controller.service import serve_from_config

    if args.config is None:
        from vmad.errors import UsageError

        raise UsageError("--config controller.yaml is required to run the controller")
    return serve_from_config(args.config)


def run_train_policy(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vmad.controller.bench import QUICK
    from vmad.controller.env import EnvSettings
    from vmad.controller.training import TrainSettings, train_policy

    env = QUICK if args.quick else EnvSettings()
    gamma = TrainSettings.gamma
    if args.train_config is not None:
        from vmad.config import ConfigError, load_config
        from vmad.controller.config import ControllerConfig

        try:
            config = load_config(args.train_config, ControllerConfig)
        except (ConfigError, ValueError) as error:
            from vmad.errors import UsageError

            raise UsageError(f"config error: {error}") from None
        env = replace(env, reward=config.reward)
        gamma = config.reward.gamma
    if args.r1:
        env = replace(env, reward=env.reward.model_copy(update={"r1": args.r1}))
    if args.gamma is not None:
        if not 0.0 <= args.gamma < 1.0:
            from vmad.errors import UsageError

            raise UsageError(f"--gamma must be in [0, 1), got {args.gamma}")
        gamma = args.gamma
    if args.kind:
        env = replace(env, kind=args.kind)
    env = with_validation(env, args)
    settings = TrainSettings(steps=args.steps, seed=args.seed, gamma=gamma,
                             checkpoint_every=args.checkpoint_every,
                             learning_starts=min(TrainSettings.learning_starts,
                                                 max(1, args.steps // 4)),
                             env=replace(env, seed=args.seed))
    started = time.monotonic()
    path = train_policy(args.out, settings, progress=not args.no_progress)
    print(f"policy -> {path} ({args.steps} steps in {time.monotonic() - started:.0f} s, "
          f"R1 = {env.reward.r1}, gamma {gamma}); per-step log {args.out / 'steps.csv'}")
    return 0


def with_validation(env: Any, args: argparse.Namespace) -> Any:
    """`env` with the --validation / --label-share options applied."""
    from dataclasses import replace

    if args.validation:
        env = replace(env, validation=args.validation)
    if args.label_share is not None:
        if not 0.0 <= args.label_share <= 1.0:
            from vmad.errors import UsageError

            raise UsageError(f"--label-share must be in [0, 1], got {args.label_share}")
        env = replace(env, label_share=args.label_share)
    return env


def run_bench_control(args: argparse.Namespace) -> int:
    from vmad.controller.bench import bench_command

    return bench_command(args)


def run_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.database is not None:
        from vmad.controller.registry import Registry

        if not args.database.is_file():
            from vmad.errors import UsageError

            raise UsageError(f"{args.database}: no such registry file")
        registry = Registry(args.database)
        try:
            fleet = fleet_from_registry(registry, args.decisions)
        finally:
            registry.close()
    else:
        from vmad.controller.service import fetch_fleet

        fleet = fetch_fleet(args.config, args.decisions)
    Console().print(*render_fleet(fleet))
    return 0


def fleet_from_registry(registry: Any, decisions: int) -> dict[str, Any]:
    """The fleet as plain data (what the Fleet call returns too)."""
    return {
        "trainers": [vars(t) for t in registry.trainers()],
        "vms": [{"vm_id": v.vm_id, "trainer_id": v.trainer_id, "last_seen": v.last_seen,
                 "reports": v.reports, "model_version": v.model_version,
                 "last_action": v.last_action.value if v.last_action else "",
                 "last_reason": v.last_reason,
                 "state": v.state.to_dict() if v.state else None} for v in registry.vms()],
        "decisions": [{"decision_id": d.decision_id, "at": d.at, "vm_id": d.vm_id,
                       "action": d.decision.action.value, "batches": d.decision.batches,
                       "reason": d.decision.reason, "policy": d.policy,
                       "q_values": list(d.decision.q_values),
                       "shadow": (f"{d.shadow.label}: {d.shadow.reason}" if d.shadow
                                  else "")}
                      for d in registry.decisions(limit=decisions)],
        "counts": registry.counts(),
        "actions": registry.action_counts(),
        "controller": controller_facts(registry),
    }


def controller_facts(registry: Any) -> dict[str, Any]:
    """What the registry says about the controller itself: the DQN's learning progress
    and exploration (its last checkpoint), the shadow mode's latest backtest, and each
    node's fine-tuning batches in the last hour against the budget."""
    from vmad.controller.budget import BUDGET_FACT, HOUR
    from vmad.controller.dqn import LEARNER
    from vmad.controller.shadow import BACKTEST_FACT

    now = time.time()
    return {"learner": registry.learner_meta(LEARNER),
            "explorations_last_hour": len(registry.exploration_times(now - HOUR)),
            "backtest": registry.fact(BACKTEST_FACT),
            "budget": registry.fact(BUDGET_FACT),
            "budget_use": registry.budget_use(now - HOUR)}


def _ago(ts: float) -> str:
    from vmad.state import age_text

    return age_text(time.time() - ts)


def render_fleet(fleet: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    vms = Table(title="VMs")
    for column in ("VM", "trainer", "seen", "reports", "model", "detector", "labelled", "F1",
                   "accuracy", "drift", "flagged", "blamed", "last action", "why"):
        vms.add_column(column, justify="right" if column in
                       ("reports", "labelled", "F1", "accuracy", "drift", "flagged") else "left")
    for vm in fleet["vms"]:
        state = vm.get("state") or {}
        vms.add_row(vm["vm_id"], vm["trainer_id"], _ago(vm["last_seen"]), str(vm["reports"]),
                    vm["model_version"], state.get("detector") or "-",
                    str(state.get("labelled_windows", "")),
                    f"{state.get('f1', 0):.2f}", f"{state.get('accuracy', 0):.2f}",
                    f"{state.get('drift', 0):.2f}", f"{state.get('flagged_share', 0):.2f}",
                    # The metrics to blame in the VM's newest anomalous verdict.
                    state.get("blamed") or "-", vm["last_action"], vm["last_reason"])
    trainers = Table(title="Trainers")
    for column in ("trainer", "address", "last seen"):
        trainers.add_column(column)
    for trainer in fleet["trainers"]:
        trainers.add_row(trainer["trainer_id"], trainer["address"], _ago(trainer["last_seen"]))
    decisions = Table(title="Recent decisions")
    shadows = any(d.get("shadow") for d in fleet["decisions"])
    for column in ("#", "VM", "action", "batches", "why", "policy",
                   *(["in shadow"] if shadows else [])):
        decisions.add_column(column)
    for d in fleet["decisions"]:
        # A DQN decision's reason already lists its Q-values by action.
        decisions.add_row(str(d["decision_id"]), d["vm_id"], d["action"], str(d["batches"]),
                          d["reason"], d["policy"], *([d.get("shadow", "")] if shadows else []))
    counts = fleet["counts"]
    actions = ", ".join(f"{k} {v}" for k, v in sorted(fleet["actions"].items())) or "none"
    summary = (f"{counts['trainers']} trainers, {counts['vms']} VMs, {counts['decisions']} "
               f"decisions ({actions}), {counts.get('transitions', '?')} transitions")
    return [trainers, vms, decisions, summary, *render_controller(fleet.get("controller"))]


def render_controller(facts: dict[str, Any] | None) -> list[str]:
    """Learning, exploration, shadow verdict and budget, one line each (when known)."""
    if not facts:
        return []
    lines = []
    learner = facts.get("learner")
    if learner:
        lines.append(f"DQN learning: {learner['updates']} gradient steps, "
                     f"{learner['transitions']} transitions learned from (checkpoint "
                     f"{_ago(learner['saved_at'])} ago); exploration: "
                     f"{learner.get('explorations', 0)} random decisions in all")
    lines.append(f"Exploration: {facts['explorations_last_hour']} random decisions in the "
                 f"last hour")
    backtest = facts.get("backtest")
    if backtest:
        who = "the DQN acts" if backtest["passed"] else "the rules act, the DQN in shadow"
        lines.append(f"Shadow backtest ({_ago(backtest['at'])} ago, "
                     f"{backtest['transitions']} transitions, agreement "
                     f"{backtest['agreement']:.0%}): {who}: {backtest['why']}")
    budget = facts.get("budget") or {}
    limit = budget.get("batches_per_node_hour")
    use = ", ".join(f"{node} {n}" for node, n in facts.get("budget_use", {}).items()) or "none"
    lines.append(f"Compute budget: {limit if limit is not None else '?'} batches per node "
                 f"per hour; used in the last hour: {use}")
    return lines
