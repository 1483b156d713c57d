"""The live DQN policy: a real controller process on loopback, driven over gRPC with
state reports recorded from the control environment; policy files and their errors."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO_ROOT
from vmad.actions import CONTROL_ACTIONS, Action, Decision
from vmad.controller.dqn import (
    DEFAULT_POLICY,
    DQNPolicy,
    DQNSettings,
    PolicyFile,
    PolicyFileError,
    build_sb3_dqn,
    load_policy_file,
    policy_file_of,
    save_policy_file,
)
from vmad.state import FEATURES, VMState

LEARNING_STARTS = 6


@pytest.fixture(scope="module")
def recorded_states() -> list[VMState]:
    """The trainer's state reports over one small episode, mixed actions."""
    from vmad.controller.env import EnvSettings, VMLifeEnv

    env = VMLifeEnv(EnvSettings(window=16, steps=12, step_samples=60, warmup_samples=240,
                                mean_regime_steps=3.0, max_windows=300, pretrain_batches=30,
                                smd_share=0.0))
    states = []
    try:
        env.reset(seed=11)
        states.append(env.last_state)
        for action in [2, 0, 0, 3, 0, 4, 1, 0, 5, 0, 2, 0]:
            env.step(action)
            states.append(env.last_state)
    finally:
        env.close()
    return states


@pytest.fixture(scope="module")
def initial_policy(tmp_path_factory) -> Path:
    model = build_sb3_dqn(None, DQNSettings(seed=3), observation_size=len(FEATURES) + 8,
                          net_arch=(32,))
    path = tmp_path_factory.mktemp("policy") / "initial.npz"
    return save_policy_file(path, policy_file_of(model, {"trained": "test: random init"}))


def _controller_config(folder: Path, port: int, initial: Path, **dqn: object) -> Path:
    path = folder / "controller.yaml"
    path.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "database": str(folder / "registry.sqlite"),
        "policy": {"kind": "dqn", "dqn": {
            "initial": str(initial), "learning_starts": LEARNING_STARTS, "train_every": 1,
            "batch_size": 4, "learning_rate": 0.01, "save_every": 1000, "target_update": 3,
            **dqn}},
        "budget": {"batches_per_node_hour": 1_000_000},
        "security": {"insecure": True},
    }))
    return path


def _learned(database: Path) -> tuple[PolicyFile, dict]:
    """The DQN's checkpointed learning state in the registry: its network and counters."""
    from vmad.controller.registry import Registry

    registry = Registry(database)
    try:
        arrays, meta = registry.load_learner("dqn")
    finally:
        registry.close()
    layers = tuple((arrays[f"net/q_net.q_net.{2 * i}.weight"],
                    arrays[f"net/q_net.q_net.{2 * i}.bias"])
                   for i in range(len(meta["net_arch"]) + 1))
    return PolicyFile(layers, meta), meta


def _report(stub: object, state: VMState) -> Decision:
    from vmad.protos.vmad.v1 import control_pb2
    from vmad.wire import decision_from_message, state_to_message

    reply = stub.Report(control_pb2.StateReport(trainer_id="node-1",  # type: ignore[attr-defined]
                                                state=state_to_message(state)), timeout=10)
    return decision_from_message(reply)


def _greedy(policy: PolicyFile, state: VMState) -> Decision:
    return CONTROL_ACTIONS[int(np.argmax(policy.q_values(state.to_vector())))]


def _logged(database: Path) -> list[tuple[str, int, str, list[float]]]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT action, batches, policy, q_values FROM decisions "
                          "ORDER BY decision_id").fetchall()
    return [(a, b, p, json.loads(q)) for a, b, p, q in rows]


@pytest.mark.integration
def test_live_dqn_decides_logs_learns_and_survives_a_restart(tmp_path, recorded_states,
                                                             initial_policy) -> None:
    import grpc

    from vmad.launch import free_port, start, wait_serving
    from vmad.protos.vmad.v1 import control_pb2_grpc

    port = free_port()
    config = _controller_config(tmp_path, port, initial_policy)
    initial = load_policy_file(initial_policy)
    states = recorded_states[:-1]
    process = start("controller", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            answers = [_report(stub, s) for s in states]
    finally:
        assert process.stop() == 0, process.log_text()[-2000:]

    # Until `learning_starts` transitions are stored the network is the initial one:
    # report k stores transition k-1 after deciding, so the first LEARNING_STARTS + 1
    # decisions are the initial network's greedy actions.
    before = LEARNING_STARTS + 1
    for state, answer in zip(states[:before], answers[:before], strict=True):
        expected = _greedy(initial, state)
        assert (answer.action, answer.batches) == (expected.action, expected.batches)
        assert answer.reason.startswith("dqn greedy: Q keep=")
    logged = _logged(tmp_path / "registry.sqlite")
    assert len(logged) == len(states) and {p for _, _, p, _ in logged} == {"dqn"}
    for action, batches, _, q in logged:
        assert len(q) == len(CONTROL_ACTIONS)
        assert (action, batches) == (CONTROL_ACTIONS[int(np.argmax(q))].action.value,
                                     CONTROL_ACTIONS[int(np.argmax(q))].batches)
    for state, (_, _, _, q) in zip(states[:before], logged[:before], strict=True):
        np.testing.assert_allclose(q, initial.q_values(state.to_vector()), atol=1e-4)
    # Then it learns: later Q-values are no longer the initial network's.
    late = [np.abs(np.array(q) - initial.q_values(s.to_vector())).max()
            for s, (_, _, _, q) in zip(states[before + 1:], logged[before + 1:], strict=True)]
    assert min(late) > 1e-3
    assert "DQN started learning" in process.log_text()

    # Stopped gracefully, it checkpointed its learning state into the registry: one
    # gradient step per transition from the LEARNING_STARTS-th on.
    saved, meta = _learned(tmp_path / "registry.sqlite")
    transitions = len(states) - 1
    assert meta["updates"] == transitions - LEARNING_STARTS + 1
    assert meta["transitions"] == transitions and meta["consumed_through"] == transitions
    assert not (tmp_path / "policy.npz").exists()

    # Restart: the same weights answer, and the replay buffer comes back from the
    # registry, so learning goes on at once (an empty buffer would wait for
    # LEARNING_STARTS new transitions).
    process = start("controller-2", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            again = _report(control_pb2_grpc.ControlServiceStub(channel), recorded_states[-1])
    finally:
        assert process.stop() == 0, process.log_text()[-2000:]
    expected = _greedy(saved, recorded_states[-1])
    assert (again.action, again.batches) == (expected.action, expected.batches)
    _, _, _, q = _logged(tmp_path / "registry.sqlite")[-1]
    np.testing.assert_allclose(q, saved.q_values(recorded_states[-1].to_vector()), atol=1e-4)
    assert f"{transitions} transitions restored" in process.log_text()
    _, resumed = _learned(tmp_path / "registry.sqlite")
    assert resumed["updates"] == meta["updates"] + 1


@pytest.mark.integration
def test_kill_9_during_live_learning_loses_no_transition(tmp_path, recorded_states,
                                                         initial_policy) -> None:
    """A controller killed with SIGKILL while trainers report and it learns: after a
    restart every recorded transition has been learned from and the gradient-step
    counter is where an uninterrupted controller's would be."""
    import dataclasses
    import threading
    import time

    import grpc

    from vmad.controller.registry import Registry
    from vmad.launch import free_port, start, wait_serving
    from vmad.protos.vmad.v1 import control_pb2_grpc

    port = free_port()
    # Checkpoints every 4 gradient steps: the kill lands between two of them.
    config = _controller_config(tmp_path, port, initial_policy, save_every=4)
    database = tmp_path / "registry.sqlite"
    vms = [f"vm-{i}" for i in range(4)]
    reports = [dataclasses.replace(s, vm_id=vm) for s in recorded_states for vm in vms]
    answered: list[int] = []

    def send(stub: object, queue: list[VMState]) -> None:
        from vmad.protos.vmad.v1 import control_pb2
        from vmad.wire import state_to_message

        while queue:
            try:
                reply = stub.Report(control_pb2.StateReport(  # type: ignore[attr-defined]
                    trainer_id="node-1", state=state_to_message(queue[0])), timeout=10)
            except grpc.RpcError:
                return  # the controller died: the trainer will send this one again
            answered.append(reply.decision_id)
            queue.pop(0)

    queue = list(reports)
    process = start("controller", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            sender = threading.Thread(target=send, args=(stub, queue))
            sender.start()
            deadline = time.monotonic() + 60
            while len(answered) < len(reports) // 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            process.kill()  # SIGKILL, mid-stream: no shutdown hook runs
            sender.join(30)
    finally:
        process.kill()
    assert process.popen.returncode == -9
    assert LEARNING_STARTS + 4 < len(answered) < len(reports)

    registry = Registry(database)
    try:
        at_kill = registry.counts()["transitions"]
        checkpoint = registry.learner_meta("dqn")
    finally:
        registry.close()
    # The last checkpoint is behind what the controller had learned when it died.
    assert checkpoint is not None and checkpoint["updates"] % 4 == 0
    assert checkpoint["consumed_through"] < at_kill

    # Restart; the trainer sends what was not answered.
    process = start("controller-2", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        assert f"caught up on {at_kill - checkpoint['consumed_through']} transitions" \
            in process.log_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            send(control_pb2_grpc.ControlServiceStub(channel), queue)
    finally:
        assert process.stop() == 0, process.log_text()[-2000:]
    assert not queue

    registry = Registry(database)
    try:
        rows = registry.transitions()
        decision_ids = {d.decision_id for d in registry.decisions(limit=10_000)}
    finally:
        registry.close()
    # Every answered decision is on disk, and every transition was learned from, once.
    assert set(answered) <= decision_ids
    _, meta = _learned(database)
    assert meta["transitions"] == len(rows) >= len(reports) - len(vms)
    assert meta["consumed_through"] == rows[-1].transition_id
    # One gradient step per transition from the LEARNING_STARTS-th on, across the crash.
    assert meta["updates"] == len(rows) - LEARNING_STARTS + 1


def test_exploration_fallback_and_learning_start_in_process(recorded_states,
                                                            initial_policy) -> None:
    policy = load_policy_file(initial_policy)
    state = recorded_states[3]
    greedy = DQNPolicy(policy, DQNSettings(epsilon=0.0))
    assert {greedy.decide(state).reason.split(":")[0] for _ in range(20)} == {"dqn greedy"}
    # Exploration is bounded: epsilon per decision, and explore_per_hour in all.
    explorer = DQNPolicy(policy, DQNSettings(epsilon=0.2, explore_per_hour=25, seed=1))
    hour = [explorer.decide(state, now=1000.0 + i) for i in range(400)]
    explored = [d for d in hour if d.reason.startswith("dqn explore")]
    assert len(explored) == explorer.explorations == explorer.explorations_last_hour == 25
    assert len({(d.action, d.batches) for d in explored}) == len(CONTROL_ACTIONS)
    assert all(d.reason.startswith("dqn greedy") for d in hour[-100:])
    # An hour later the cap has room again; a shadow decision never explores.
    later = [explorer.decide(state, now=1000.0 + 3700 + i) for i in range(200)]
    assert any(d.reason.startswith("dqn explore") for d in later)
    assert explorer.explorations_last_hour <= 25
    assert all(explorer.decide(state, explore=False).reason.startswith("dqn greedy")
               for _ in range(50))
    # A trainer with 38 metrics reports a longer vector: the rules answer, saying why.
    wide = VMState("vm-wide", 0.0, f1=0.1, accuracy=0.5, labelled_windows=500,
                   summary=(0.0,) * 76)
    decision = greedy.decide(wide)
    assert decision.reason.startswith("rules (state has 87 features, the DQN takes 19)")
    assert decision.action is Action.FINETUNE and decision.q_values == ()

    learner = DQNPolicy(policy, DQNSettings(learning_starts=4, train_every=2, batch_size=2))
    pairs = list(itertools.pairwise(recorded_states))
    for i, (s, n) in enumerate(pairs[:5]):
        learner.observe(s, Decision(Action.KEEP), 0.5, n)
        # Stored transitions 4 and 5 reach learning_starts; updates only on even counts.
        assert learner.updates == (1 if i + 1 >= 4 else 0)
    learner.observe(pairs[5][0], Decision(Action.FINETUNE, 100), 0.2, pairs[5][1])
    assert learner.updates == 2 and learner.stored == 6


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def test_corrupt_or_foreign_policy_files_are_refused_by_name(tmp_path, initial_policy) -> None:
    good = load_policy_file(initial_policy)
    meta = np.array(json.dumps(good.meta))
    w0, b0 = good.layers[0]
    w1, b1 = good.layers[1]
    cases = {
        "missing.npz": (None, "no such policy file"),
        "garbage.npz": (b"not a zip at all", "not an .npz archive"),
        "truncated.npz": (initial_policy.read_bytes()[:200], "policy file"),
        "pickled.npz": ({"meta": meta, "w0": np.array([object()], dtype=object)},
                        "not a policy file"),
        "nometa.npz": ({"w0": w0, "b0": b0}, "no 'meta' entry"),
        "nan.npz": ({"meta": meta, "w0": w0 * np.nan, "b0": b0, "w1": w1, "b1": b1},
                    "NaN"),
        "shape.npz": ({"meta": meta, "w0": w0[:, :5], "b0": b0, "w1": w1, "b1": b1},
                      "layer 0 has shapes"),
        "actions.npz": ({"meta": np.array(json.dumps({**good.meta, "actions": [["keep", 0]]})),
                         "w0": w0, "b0": b0, "w1": w1, "b1": b1}, "not this controller's"),
        "outputs.npz": ({"meta": meta, "w0": w0, "b0": b0, "w1": w1[:3], "b1": b1[:3]},
                        "3 outputs for 6 actions"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict):
            _write_npz(path, **content)
        with pytest.raises(PolicyFileError, match=problem) as error:
            load_policy_file(path)
        assert name in str(error.value)

    # A controller configured with a corrupt policy refuses to start and says why.
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "database": str(tmp_path / "r.sqlite"),
        "policy": {"kind": "dqn", "dqn": {"initial": str(tmp_path / "garbage.npz")}},
        "security": {"insecure": True}}))
    result = subprocess.run([sys.executable, "-m", "vmad.cli", "controller", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT)
    assert result.returncode == 2
    assert "garbage.npz: not a policy file" in result.stderr


def test_shipped_default_policy_loads_and_reads_the_state_vector() -> None:
    policy = load_policy_file(DEFAULT_POLICY)
    assert policy.observation_size == len(FEATURES) + 8
    assert "train-policy" in policy.meta["trained"]
    q = policy.q_values(VMState("vm", 0.0, summary=(0.0,) * 8).to_vector())
    assert q.shape == (len(CONTROL_ACTIONS),) and np.isfinite(q).all()


def test_rules_controller_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from vmad.controller.config import ControllerConfig\n"
        "from vmad.controller.registry import Registry\n"
        "from vmad.controller.service import make_policy\n"
        "config = ControllerConfig(database=':memory:')\n"
        "policy = make_policy(config, Registry(':memory:'))\n"
        "assert policy.name == 'rules'\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_registry_of_the_previous_schema_is_upgraded(tmp_path) -> None:
    from vmad.controller.registry import Registry

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE decisions (decision_id INTEGER PRIMARY KEY AUTOINCREMENT,
                at REAL NOT NULL, vm_id TEXT NOT NULL, trainer_id TEXT NOT NULL,
                state TEXT NOT NULL, action TEXT NOT NULL, batches INTEGER NOT NULL,
                reason TEXT NOT NULL, policy TEXT NOT NULL);
        """)
        state = json.dumps(VMState("vm-1", 1.0).to_dict())
        db.execute("INSERT INTO decisions (at, vm_id, trainer_id, state, action, batches, "
                   "reason, policy) VALUES (1, 'vm-1', 't', ?, 'keep', 0, 'old', 'rules')",
                   (state,))
    registry = Registry(path)
    (old,) = registry.decisions()
    assert old.decision.reason == "old" and old.decision.q_values == ()
    registry.record_report("t", VMState("vm-2", 2.0),
                           Decision(Action.KEEP, 0, "new", (0.5, 0.25)), "dqn")
    assert registry.decisions(limit=1)[0].decision.q_values == (0.5, 0.25)
    registry.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
            == ("3",)


def test_first_dqn_start_on_a_registry_with_history_fills_the_buffer_only(
        tmp_path, recorded_states, initial_policy) -> None:
    """Switching a fleet from the rules to the DQN: the rules' transitions fill the
    replay buffer but are not replayed as gradient steps, and a checkpoint is written at
    once, so a crash right after catches up from there."""
    from vmad.controller.core import ControlCore
    from vmad.controller.dqn import build_dqn_policy
    from vmad.controller.policy import RulePolicy
    from vmad.controller.registry import Registry

    registry = Registry(tmp_path / "registry.sqlite")
    rules = ControlCore(registry, RulePolicy())
    for i, state in enumerate(recorded_states):
        rules.report("node-1", state, now=1000.0 + i)
    history = registry.counts()["transitions"]
    settings = DQNSettings(initial=initial_policy, learning_starts=2, train_every=1,
                           batch_size=2)
    dqn = build_dqn_policy(settings, gamma=0.9, store=registry, fallback=RulePolicy())
    assert dqn is not None and dqn.stored == history and dqn.updates == 0
    meta = registry.learner_meta("dqn")
    assert meta["consumed_through"] == history and meta["updates"] == 0
    # The next transition is learned from at once (the buffer is past learning_starts).
    core = ControlCore(registry, dqn)
    core.report("node-1", recorded_states[0], now=5000.0)
    assert dqn.updates == 1 and dqn.transitions == 1
    registry.close()
