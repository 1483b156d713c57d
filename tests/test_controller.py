"""Controller pieces without processes: the SQLite registry, the rule policy, the reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vmad.actions import ACTIONS, Action, Decision
from vmad.controller.policy import Policy, RulePolicy, RuleSettings
from vmad.controller.registry import Registry
from vmad.controller.reward import reward
from vmad.state import VMState


def _state(vm: str = "vm-1", **kw: object) -> VMState:
    base = dict(vm_id=vm, timestamp=1000.0, accuracy=0.95, f1=0.9, loss=0.2,
                labelled_windows=100, recent_windows=200, summary=(0.0,) * 8,
                seconds_since_training=math.inf, model_version="m1")
    base.update(kw)
    return VMState(**base)  # type: ignore[arg-type]


def test_rule_policy_follows_its_table() -> None:
    policy = RulePolicy(RuleSettings(min_labelled=32, min_f1=0.6, min_accuracy=0.9,
                                     finetune_batches=50, max_batches_per_model=100,
                                     reset_drift=3.0, cooldown_s=30.0))
    assert isinstance(policy, Policy)
    assert policy.decide(_state(labelled_windows=10, f1=0.0)).action is Action.KEEP
    assert policy.decide(_state(f1=0.1, seconds_since_training=5.0)).action is Action.KEEP
    assert policy.decide(_state()).action is Action.KEEP
    poor = policy.decide(_state(f1=0.3))
    assert poor == Decision(Action.FINETUNE, 50, poor.reason) and "F1 0.30" in poor.reason
    assert policy.decide(_state(f1=0.3, finetuned=True, drift=5.0)).action \
        is Action.RESET_FINETUNE
    assert policy.decide(_state(f1=0.3, batches_trained=100)).action is Action.RESET_FINETUNE


def test_reward_weights_and_terms() -> None:
    good = _state(accuracy=1.0, f1=1.0, loss=0.0)
    assert reward(Decision(Action.KEEP), good) == pytest.approx(1.0)
    # A 200-batch fine-tune costs the whole cost term (0.3) for the same result.
    assert reward(Decision(Action.FINETUNE, 200), good) == pytest.approx(0.7)
    unknown = _state(labelled_windows=0)
    assert reward(Decision(Action.KEEP), unknown) == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3)


def test_registry_persists_across_reopen(tmp_path) -> None:
    path = tmp_path / "registry.sqlite"
    registry = Registry(path)
    registry.touch_trainer("t1", "127.0.0.1:1")
    first, transition = registry.record_report("t1", _state(f1=0.2),
                                               Decision(Action.FINETUNE, 50, "poor"), "rules",
                                               reward_of=reward)
    assert transition is None
    second, transition = registry.record_report("t1", _state(f1=0.9, accuracy=1.0, loss=0.0),
                                                Decision(Action.KEEP, 0, "good"), "rules",
                                                reward_of=reward)
    assert second > first and transition is not None
    assert transition.decision.action is Action.FINETUNE
    assert transition.state.f1 == pytest.approx(0.2)
    assert transition.next_state.f1 == pytest.approx(0.9)
    registry.record_report("t1", _state("vm-2"), Decision(Action.KEEP), "rules", reward)
    registry.close()

    again = Registry(path)
    assert again.counts() == {"trainers": 1, "vms": 2, "decisions": 3, "transitions": 1}
    assert [t.address for t in again.trainers()] == ["127.0.0.1:1"]
    vms = {row.vm_id: row for row in again.vms()}
    assert vms["vm-1"].reports == 2 and vms["vm-1"].last_action is Action.KEEP
    assert vms["vm-1"].state is not None and vms["vm-1"].state.f1 == pytest.approx(0.9)
    assert math.isinf(vms["vm-1"].state.seconds_since_training)
    log = again.decisions("vm-1")
    assert [d.decision.action for d in log] == [Action.KEEP, Action.FINETUNE]
    assert again.action_counts() == {"keep": 2, "finetune": 1}
    (stored,) = again.transitions()
    assert stored.reward == pytest.approx(transition.reward)
    again.close()


def test_state_vector_has_fixed_layout() -> None:
    state = _state(seconds_since_training=math.inf, drift=100.0, loss=50.0)
    vector = state.to_vector()
    assert vector.shape == (11 + 8,)
    assert vector.min() >= -1.0 and vector.max() <= 1.0
    assert VMState.from_dict(state.to_dict()) == state
    assert len(ACTIONS) == 4


def test_status_renders_registry(tmp_path, capsys) -> None:
    from vmad.cli import main

    registry = Registry(tmp_path / "r.sqlite")
    registry.record_report("t1", _state(f1=0.2), Decision(Action.FINETUNE, 50, "poor"),
                           "rules", reward)
    registry.close()
    assert main(["status", "--database", str(tmp_path / "r.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "vm-1" in out and "finetune" in out and "1 decisions" in out
    assert main(["status", "--database", str(tmp_path / "missing.sqlite")]) == 2


def test_event_scoring() -> None:
    import numpy as np

    from vmad.replay import runs, score_events

    labels = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0])
    flagged = np.array([0, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    assert runs(labels) == [(2, 3), (7, 7)]
    score = score_events(labels, flagged, np.ones(10, bool))
    assert (score.events, score.detected, score.missed, score.false_alarms) == (2, 1, 1, 1)
    # A segment never scored (before the first full window) is left out, not "missed".
    unscored = np.arange(10) >= 5
    assert score_events(labels, flagged, unscored).events == 1


def test_smd_replay_carries_every_metric_from_before_the_first_anomaly(tmp_path: Path) -> None:
    """The demo's SMD VM replays the agent's 4 metrics (in the agent's units) and the
    machine's other columns as its own, from `lead` samples before its first anomaly,
    after its past."""
    import gzip

    import numpy as np

    from vmad.replay import SMD_COLUMNS, load_smd
    from vmad.schema import DEFAULT_METRICS

    names = ["load_1", *(SMD_COLUMNS[m][0] for m in DEFAULT_METRICS)]
    machine = tmp_path / "machine-9-9"
    machine.mkdir()
    labels = np.zeros(400, int)
    labels[100:110] = 1
    labels[250:260] = 1
    rows = [",".join(["timestamp", *names, "label"])] + [
        ",".join([str(i), *(f"{0.1 + 0.001 * (i % 7):.3f}" for _ in names), str(labels[i])])
        for i in range(400)]
    with gzip.open(machine / "test.csv.gz", "wt") as handle:
        handle.write("\n".join(rows) + "\n")
    (series,) = load_smd(tmp_path, 1, 150, lead=20)
    assert series.metrics == (*DEFAULT_METRICS, "smd.load_1")
    assert series.values.shape == (150, 5)
    assert np.flatnonzero(series.labels)[0] == 20  # the first anomaly, 100
    scale = np.array([SMD_COLUMNS[m][1] for m in DEFAULT_METRICS])
    assert np.allclose(series.values[:, :4] / scale, series.values[:, 4:5], atol=1e-6)
    (series,) = load_smd(tmp_path, 1, 150, lead=20, history=50)
    assert series.history == 50 and series.labels[50 + 20] == 1
    assert series.values.shape == (200, 5)


def test_example_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import REPO_ROOT

    for name in ("VMAD_TRAINER_TOKEN", "VMAD_AGENT_TOKEN_VM_1", "VMAD_TRAINER_TOKEN_NODE_1"):
        monkeypatch.setenv(name, "example-token")
    from vmad.config import load_config
    from vmad.controller.budget import BudgetSettings
    from vmad.controller.config import ControllerConfig, PolicyConfig
    from vmad.controller.reward import RewardSettings
    from vmad.trainer.config import TrainerConfig

    controller = load_config(REPO_ROOT / "deploy" / "controller.yaml",
                                       ControllerConfig)
    # The example file documents the defaults: loading it gives them, section by section.
    assert controller.policy == PolicyConfig()
    assert controller.reward == RewardSettings() and controller.budget == BudgetSettings()
    trainer = load_config(REPO_ROOT / "deploy" / "trainer.yaml", TrainerConfig)
    assert trainer.controller.address == "127.0.0.1:50071"
    load_config(REPO_ROOT / "deploy" / "demo" / "controller.yaml", ControllerConfig)
    demo = load_config(REPO_ROOT / "deploy" / "demo" / "trainer.yaml", TrainerConfig)
    assert not demo.training.assume_normal_unlabelled  # as in production
