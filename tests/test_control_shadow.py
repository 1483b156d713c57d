"""Shadow mode, the compute budget and bounded exploration: the controller's core driven
in-process on a real registry file, and a real controller process configured for
shadow mode and a budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from vmad.actions import CONTROL_ACTIONS, Action, Decision
from vmad.controller.baselines import AlwaysFinetune
from vmad.controller.budget import BudgetGuard, BudgetSettings
from vmad.controller.core import ControlCore
from vmad.controller.dqn import DQNPolicy, DQNSettings, PolicyFile, save_policy_file
from vmad.controller.policy import RulePolicy, RuleSettings
from vmad.controller.registry import Registry
from vmad.controller.shadow import ShadowPolicy, ShadowSettings
from vmad.state import FEATURES, VMState

SIZE = len(FEATURES) + 8


def _always(action_number: int) -> PolicyFile:
    """A Q-network whose greedy action is always CONTROL_ACTIONS[action_number]."""
    bias = np.zeros(len(CONTROL_ACTIONS), dtype=np.float32)
    bias[action_number] = 1.0
    return PolicyFile(((np.zeros((4, SIZE), np.float32), np.zeros(4, np.float32)),
                       (np.zeros((len(CONTROL_ACTIONS), 4), np.float32), bias)),
                      {"trained": "test: constant"})


def _state(vm: str, poor: bool, t: float) -> VMState:
    return VMState(vm, t, f1=0.2 if poor else 0.9, accuracy=0.5 if poor else 0.99,
                   labelled_windows=500, seconds_since_training=3600.0,
                   summary=(0.1,) * 8)


RULES = RuleSettings(finetune_batches=100, cooldown_s=0.0)
SHADOW = ShadowSettings(backtest_every=10, min_transitions=40, min_support=5, window=500)


def _drive(core: ControlCore, reports: int, start: float = 1000.0) -> list[Decision]:
    """Reports from 4 VMs, each alternating good and poor, 20 minutes apart."""
    out = []
    for i in range(reports):
        vm = f"vm-{i % 4}"
        t = start + i * 300.0
        out.append(core.report("node-1", _state(vm, poor=(i // 4) % 2 == 0, t=t), now=t)[1])
    return out


@pytest.mark.parametrize("keep_pays", [True, False])
def test_dqn_takes_over_only_when_the_backtest_says_it_does_better(tmp_path, keep_pays) -> None:
    """The rules fine-tune poor VMs; the DQN (frozen) always keeps. When the fleet's
    rewards show fine-tuning poor VMs does not pay, the backtest hands over; when it
    pays, the rules keep acting. The verdict survives a restart."""

    def reward_of(decision: Decision, next_state: VMState) -> float:
        # What a VM's next window is worth after `decision`, cost term included.
        trained = decision.action.trains
        return (0.9 if not trained else 0.2) if keep_pays else (0.2 if not trained else 0.9)

    registry = Registry(tmp_path / "registry.sqlite")
    dqn = DQNPolicy(_always(0), DQNSettings(learn=False))
    shadow = ShadowPolicy(RulePolicy(RULES), dqn, registry, SHADOW)
    core = ControlCore(registry, shadow, reward_of=reward_of,
                       budget=BudgetGuard(BudgetSettings(batches_per_node_hour=10**6)))
    first = _drive(core, 41)
    # Before 40 transitions are logged, the rules act and the DQN is logged beside them.
    assert shadow.verdict is not None and not shadow.verdict.passed
    assert {d.action for d in first} == {Action.KEEP, Action.FINETUNE}
    logged = registry.decisions(limit=41)
    assert all(r.policy == "rules (dqn in shadow)" and r.shadow is not None
               and r.shadow.action is Action.KEEP and r.shadow.reason.startswith("dqn greedy")
               for r in logged)
    after = _drive(core, 40, start=1000.0 + 41 * 300.0)
    verdict = shadow.verdict
    assert verdict.transitions >= 40 and verdict.coverage == 1.0
    assert 0.0 < verdict.agreement < 1.0
    gauges = core.gauges()
    assert gauges["shadow_dqn_acts"] == float(keep_pays)
    assert gauges["shadow_decisions_total"] == 81 and gauges["dqn_explorations_total"] == 0
    if keep_pays:
        assert verdict.passed and verdict.difference > 0 and verdict.lower > 0
        assert shadow.name == "dqn (backtest passed)"
        assert after[-1].action is Action.KEEP and after[-1].reason.startswith("dqn greedy")
        # Now the rules' decisions are the ones logged beside.
        assert any(r.shadow.reason.startswith("poor") for r in registry.decisions(limit=8))
    else:
        assert not verdict.passed and verdict.difference < 0
        assert "lower bound" in verdict.why and shadow.name == "rules (dqn in shadow)"
    registry.close()

    # A restarted controller reads the latest verdict: who acts does not change.
    registry = Registry(tmp_path / "registry.sqlite")
    again = ShadowPolicy(RulePolicy(RULES), DQNPolicy(_always(0)), registry, SHADOW)
    assert again.dqn_acts == keep_pays and again.verdict == verdict
    registry.close()


def test_actions_the_fleet_never_tried_cannot_take_over_without_exploration(tmp_path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    # The DQN prefers fine-tuning 200 batches, which the rules never do.
    quiet = ShadowPolicy(RulePolicy(RULES), DQNPolicy(_always(3)), registry, SHADOW)
    core = ControlCore(registry, quiet, reward_of=lambda d, s: 0.5)
    _drive(core, 81)
    assert not quiet.dqn_acts and quiet.verdict.coverage < 0.9
    assert "coverage" in quiet.verdict.why
    registry.close()

    # With bounded exploration in shadow, random actions reach the log (counted, and
    # never more than explore_per_hour an hour), and the backtest can judge them.
    registry = Registry(tmp_path / "explore.sqlite")
    explorer = DQNPolicy(_always(3), DQNSettings(learn=False, epsilon=0.2, explore_per_hour=3))
    shadow = ShadowPolicy(RulePolicy(RULES), explorer, registry, SHADOW)
    core = ControlCore(registry, shadow, reward_of=lambda d, s: 0.5)
    decisions = _drive(core, 120)  # ten hours, 12 reports an hour
    explored = [d for d in decisions if d.reason.startswith("dqn explore (shadow)")]
    assert 0 < len(explored) == explorer.explorations <= 3 * 10
    per_hour = np.bincount([int(r.at - 1000.0) // 3600 for r in registry.decisions(limit=200)
                            if r.decision.reason.startswith("dqn explore")])
    assert per_hour.max() <= 3
    assert core.gauges()["dqn_explorations_total"] == len(explored)
    registry.close()


def test_no_policy_exceeds_the_nodes_hourly_budget(tmp_path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    for policy, batches in [(RulePolicy(RULES), 100), (AlwaysFinetune(200), 200)]:
        guard = BudgetGuard(BudgetSettings(batches_per_node_hour=450))
        core = ControlCore(registry, policy, budget=guard)
        node = f"node-{batches}"
        t0 = 10_000.0 * batches
        answers = [core.report(node, _state(f"{node}-vm-{i}", poor=True, t=t0 + i),
                               now=t0 + i)[1] for i in range(6)]
        allowed = 450 // batches
        assert [d.action.trains for d in answers] == [True] * allowed + [False] * (6 - allowed)
        assert answers[-1].reason.startswith(f"compute budget: node {node} has used "
                                             f"{allowed * batches} of 450")
        assert guard.refusals == 6 - allowed == core.gauges()["budget_refusals_total"]
        assert registry.batches_since(node, t0 - 1) == allowed * batches
        # Another node has its own budget; an hour later this one has room again.
        assert core.report("other", _state(f"o-{batches}", True, t0), now=t0)[1].action.trains
        later = core.report(node, _state(f"{node}-vm-0", True, t0 + 3601), now=t0 + 3601)[1]
        assert later.action.trains
    registry.close()


@pytest.mark.integration
def test_controller_process_in_shadow_mode_with_a_budget(tmp_path, capsys) -> None:
    """A real controller, `policy.kind: shadow` and a budget in its YAML, reports over
    gRPC: the rules act within the budget, the DQN's decisions are logged beside them,
    and `vmad status` shows both, the budget and the learning state."""
    import grpc

    from vmad.cli import main
    from vmad.launch import free_port, start, wait_serving
    from vmad.protos.vmad.v1 import control_pb2, control_pb2_grpc
    from vmad.wire import decision_from_message, state_to_message

    initial = save_policy_file(tmp_path / "initial.npz", _always(0))
    port = free_port()
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "database": str(tmp_path / "registry.sqlite"),
        "policy": {"kind": "shadow", "rules": {"finetune_batches": 100, "cooldown_s": 0},
                   "dqn": {"initial": str(initial), "learning_starts": 4, "batch_size": 2,
                           "train_every": 1, "save_every": 2},
                   "shadow": {"backtest_every": 5, "min_transitions": 10}},
        "budget": {"batches_per_node_hour": 250},
        "security": {"insecure": True}}))
    process = start("controller", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            answers = [decision_from_message(stub.Report(control_pb2.StateReport(
                trainer_id="node-1", state=state_to_message(
                    dataclasses.replace(_state(f"vm-{i % 3}", poor=True, t=float(i)))),
            ), timeout=10)) for i in range(12)]
    finally:
        assert process.stop() == 0, process.log_text()[-2000:]
    assert [a.action for a in answers[:2]] == [Action.FINETUNE] * 2
    assert all(a.action is Action.KEEP and a.reason.startswith("compute budget")
               for a in answers[2:])
    registry = Registry(tmp_path / "registry.sqlite")
    try:
        logged = registry.decisions(limit=20)
        learner = registry.learner_meta("dqn")
    finally:
        registry.close()
    assert all(r.shadow is not None and r.shadow.reason.startswith("dqn greedy")
               for r in logged)
    assert learner is not None and learner["transitions"] == 9 and learner["updates"] > 0
    capsys.readouterr()
    assert main(["status", "--database", str(tmp_path / "registry.sqlite")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "in shadow" in shown and f"DQN learning: {learner['updates']} gradient steps" in shown
    assert "Compute budget: 250 batches per node per hour; used in the last hour: node-1 200" \
        in shown
    assert "Shadow backtest" in shown and "the rules act" in shown
