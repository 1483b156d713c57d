"""The control environment, the reward, the fixed policies and offline training, on
episodes small enough to run in seconds."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from vmad.actions import CONTROL_ACTIONS, Action, Decision, action_index
from vmad.controller.env import EnvSettings, VMLifeEnv, make_stream, smd_machines
from vmad.controller.reward import RewardSettings, reward, reward_terms
from vmad.state import FEATURES, VMState

TINY = EnvSettings(kind="mlp", window=16, steps=4, step_samples=60, warmup_samples=240,
                   mean_regime_steps=2.0, max_windows=300, pretrain_batches=30,
                   smd_share=0.0)


def _episode(env: VMLifeEnv, seed: int, actions: list[int]) -> list[tuple]:
    obs, _ = env.reset(seed=seed)
    out = [(obs, 0.0, {})]
    for a in actions:
        obs, r, _, _, info = env.step(a)
        out.append((obs, r, info))
    return out


def test_reset_and_step_shapes_and_observation_is_the_trainers_state_vector() -> None:
    env = VMLifeEnv(TINY)
    try:
        obs, info = env.reset(seed=3)
        assert obs.shape == (len(FEATURES) + 8,) == env.observation_space.shape
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        assert info["regimes"][0][0] == 0
        # The vector is the trainer's own report of this VM, nothing env-specific.
        now = float(env.stream.timestamps(TINY.warmup_samples - 1, TINY.warmup_samples)[0])
        np.testing.assert_array_equal(obs, env.models.state("vm", now=now).to_vector())
        assert env.last_state.labelled_windows == TINY.warmup_samples - TINY.window + 1
        assert not env.last_state.finetuned
        seen_truncated = []
        for a in (3, 0, 4, 5):  # fine-tune 200, keep, reset, reset + fine-tune 50
            obs, r, terminated, truncated, info = env.step(a)
            assert env.observation_space.contains(obs) and not terminated
            seen_truncated.append(truncated)
            assert info["action"] == CONTROL_ACTIONS[a].action.value
            assert info["tp"] + info["fp"] + info["fn"] + info["tn"] == TINY.step_samples
            assert 0.0 <= r <= 1.0
        assert seen_truncated == [False, False, False, True]
        assert env.last_state.finetuned  # reset + fine-tune leaves a per-VM model
        assert env.last_state.batches_trained == 50
    finally:
        env.close()


def test_same_seed_same_episode_and_splits_differ() -> None:
    actions = [2, 0, 1, 3]
    first, second = VMLifeEnv(TINY), VMLifeEnv(TINY)
    try:
        a, b = _episode(first, 7, actions), _episode(second, 7, actions)
        for (obs_a, r_a, info_a), (obs_b, r_b, info_b) in zip(a, b, strict=True):
            np.testing.assert_array_equal(obs_a, obs_b)
            assert r_a == r_b
            assert {k: v for k, v in info_a.items() if k != "train_seconds"} == \
                {k: v for k, v in info_b.items() if k != "train_seconds"}
        other = _episode(first, 8, actions)
        assert not np.array_equal(a[-1][0], other[-1][0])
    finally:
        first.close()
        second.close()
    train, held = make_stream(0, "train", TINY), make_stream(0, "eval", TINY)
    assert not np.array_equal(train.values, held.values)


def test_step_reward_is_the_reward_of_the_windows_after_the_action() -> None:
    env = VMLifeEnv(replace(TINY, reward=RewardSettings(r1="accuracy")))
    try:
        env.reset(seed=1)
        _, r, _, _, info = env.step(2)  # fine-tune 50
        tp, fp, fn, tn = info["tp"], info["fp"], info["fn"], info["tn"]
        accuracy = (tp + tn) / (tp + fp + fn + tn)
        assert info["accuracy"] == pytest.approx(accuracy)
        f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert info["f1"] == pytest.approx(f1)
        expected = 0.4 * accuracy + 0.3 * math.exp(-info["loss"]) + 0.3 * (1 - (50 / 200 + 0.1))
        assert r == pytest.approx(expected)
    finally:
        env.close()


def test_smd_episodes_use_held_out_servers(shared_datasets) -> None:
    smd = shared_datasets / "smd"
    if not smd.is_dir():
        pytest.skip("../shared/datasets/smd is not present")
    train, held = smd_machines(smd, "train"), smd_machines(smd, "eval")
    assert held and train and not set(train) & set(held)
    settings = replace(TINY, smd_dir=smd, smd_share=1.0)
    stream = make_stream(0, "eval", settings)
    assert stream.interval_s == 60.0
    used = {name.split()[1] for _, name in stream.regimes}
    assert used <= {m.name for m in held}
    env = VMLifeEnv(settings, split="eval")
    try:
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        env.step(2)
    finally:
        env.close()


def _state(**kw: object) -> VMState:
    base = dict(vm_id="vm", timestamp=0.0, accuracy=0.9, f1=0.5, loss=math.log(2),
                labelled_windows=10, summary=(0.0,) * 8)
    base.update(kw)
    return VMState(**base)  # type: ignore[arg-type]


def test_reward_against_hand_computed_values() -> None:
    keep, ft50 = Decision(Action.KEEP), Decision(Action.FINETUNE, 50)
    # R1 = F1 0.5, R2 = exp(-ln 2) = 0.5, R3 = 1.
    assert reward(keep, _state()) == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3)
    accuracy = RewardSettings(r1="accuracy")
    assert reward(keep, _state(), accuracy) == pytest.approx(0.4 * 0.9 + 0.15 + 0.3)
    # 50 of 200 batches plus one bundle push: cost 0.35, R3 0.65.
    assert reward(ft50, _state()) == pytest.approx(0.35 + 0.3 * 0.65)
    # Cost is capped at 1: 400 batches cost as much as 200.
    big = reward_terms(Decision(Action.RESET_FINETUNE, 400), accuracy=1, f1=1, loss=0,
                       labelled=5)
    assert (big.r1, big.r2, big.r3, big.total) == pytest.approx((1.0, 1.0, 0.0, 0.7))
    assert reward_terms(Decision(Action.RESET), accuracy=1, f1=1, loss=0,
                        labelled=5).r3 == pytest.approx(0.9)
    # Nothing labelled: R1 = R2 = 0.5 whatever the state claims.
    assert reward(keep, _state(labelled_windows=0, f1=1.0)) == pytest.approx(0.35 + 0.3)
    weights = RewardSettings(a1=1.0, a2=0.0, a3=0.0, r1="f1", batch_budget=10, push_cost=0.0)
    assert reward(ft50, _state(f1=0.25), weights) == pytest.approx(0.25)


def test_reward_config_is_validated(tmp_path) -> None:
    from vmad.config import load_config
    from vmad.controller.config import ControllerConfig

    good = tmp_path / "controller.yaml"
    good.write_text("database: r.sqlite\nreward: {a1: 0.5, a2: 0.25, a3: 0.25, r1: accuracy,"
                    " gamma: 0.8}\npolicy: {kind: dqn, dqn: {learning_starts: 10}}\n")
    config = load_config(good, ControllerConfig)
    assert config.reward == RewardSettings(a1=0.5, a2=0.25, a3=0.25, r1="accuracy", gamma=0.8)
    assert config.reward.gamma == 0.8 and config.policy.dqn.learning_starts == 10
    for text, problem in [("reward: {a4: 0.1}", "a4"), ("reward: {a1: 0.5}", "must be 1"),
                          ("reward: {r1: recall}", "r1"), ("reward: {gamma: 1.5}", "gamma"),
                          ("policy: {dqn: {epsilon: 2}}", "epsilon"),
                          ("policy: {dqn: {epsilon: 0.5}}", "epsilon"),
                          ("policy: {kind: shadow, shadow: {min_coverage: 0}}", "min_coverage"),
                          ("budget: {batches_per_node_hour: -1}", "batches_per_node_hour"),
                          ("budget: {batches: 5}", "batches"),
                          ("policy: {dqn: {learnng_starts: 5}}", "learnng_starts"),
                          ("policy: {kind: ppo}", "kind")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"database: r.sqlite\n{text}\n")
        with pytest.raises(ValueError, match=problem) as error:
            load_config(bad, ControllerConfig)
        assert "bad.yaml" in str(error.value)


def test_action_table_and_mapping() -> None:
    assert [action_index(a) for a in CONTROL_ACTIONS] == list(range(len(CONTROL_ACTIONS)))
    # The rule policy's 100-batch fine-tune is learned from as the nearest: 50.
    assert CONTROL_ACTIONS[action_index(Decision(Action.FINETUNE, 100))].batches == 50
    assert CONTROL_ACTIONS[action_index(Decision(Action.FINETUNE, 180))].batches == 200
    assert CONTROL_ACTIONS[action_index(Decision(Action.RESET_FINETUNE, 7))].action \
        is Action.RESET_FINETUNE


def test_fixed_policies_and_bench_compute_accounting() -> None:
    from vmad.controller.baselines import AlwaysFinetune, EveryK, NeverRetrain, OnDrift
    from vmad.controller.bench import render, run_control_bench

    every = EveryK(3, 10)
    actions = [every.decide(_state()).action for _ in range(6)]
    assert actions == [Action.KEEP, Action.KEEP, Action.FINETUNE] * 2
    assert OnDrift(1.0).decide(_state(drift=1.5)).batches == 50
    assert OnDrift(1.0).decide(_state(drift=0.5)).action is Action.KEEP

    results = run_control_bench([NeverRetrain(), AlwaysFinetune(200), EveryK(2, 10)], 1,
                                TINY, progress=False)
    never, always, every2 = results
    assert never.batches == 0 and never.seconds == 0 and never.actions == {"keep": 4}
    assert always.batches == 200 * TINY.steps and always.seconds > 0
    assert every2.batches == 10 * (TINY.steps // 2)
    for r in results:
        assert 0 <= r.f1 <= 1 and 0 <= r.false_alarm_rate <= 1 and 0 <= r.reward <= 1
    # 200 batches every step pay the whole of R3: at most a1 + a2 is left.
    assert always.reward <= 0.7 + 1e-9
    assert render(results, "t").row_count == 3


def test_offline_training_writes_policy_checkpoints_and_step_log(tmp_path) -> None:
    import csv

    from vmad.controller.dqn import DQNPolicy, load_policy_file
    from vmad.controller.training import TrainSettings, train_policy

    settings = TrainSettings(steps=24, learning_starts=8, checkpoint_every=12,
                             target_update_interval=4, net_arch=(16,), env=TINY)
    path = train_policy(tmp_path, settings, progress=False)
    policy = load_policy_file(path)
    assert policy.net_arch == [16] and policy.observation_size == len(FEATURES) + 8
    assert "24 steps" in policy.meta["trained"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["dqn_12_steps.zip", "dqn_24_steps.zip"]
    with open(tmp_path / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24 and {r["episode"] for r in rows} == {str(i) for i in range(6)}
    assert all(0 <= float(r["f1"]) <= 1 for r in rows)
    # The file's network and the live policy's torch network agree.
    live = DQNPolicy(policy)
    state = _state()
    np.testing.assert_allclose(live.q_values(state), policy.q_values(state.to_vector()),
                               rtol=1e-5, atol=1e-6)
