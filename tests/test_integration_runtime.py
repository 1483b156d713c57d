"""Real trainer and controller processes on loopback, driven by simulated agents over
gRPC. Small windows and tiny models keep these under a minute on two cores."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from vmad.launch import Process, free_port, start, wait_serving
from vmad.replay import ReplayAgent, ReplaySeries
from vmad.schema import DEFAULT_METRICS

pytestmark = pytest.mark.integration

WINDOW = 8


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    from vmad.trainer.checkpoint import Checkpoint, save_checkpoint
    from vmad.trainer.models import build_model
    from vmad.windows import Normalizer

    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit(rng.normal(30, 3, size=(200, 4)))
    folder = tmp_path_factory.mktemp("pretrained")
    save_checkpoint(folder, Checkpoint(build_model("mlp", 4, WINDOW), "mlp", DEFAULT_METRICS,
                                       WINDOW, normalizer, 0.5))
    return folder


def _series(n: int, seed: int = 0) -> ReplaySeries:
    rng = np.random.default_rng(seed)
    values = rng.normal(30, 3, size=(n, 4)).astype(np.float32)
    labels = np.zeros(n, dtype=np.int8)
    for first in range(60, n - 20, 80):
        values[first:first + 15, 1] += 40
        labels[first:first + 15] = 1
    return ReplaySeries("test", values, labels, "test")


def _trainer_config(path: Path, port: int, checkpoint: Path, controller: str | None,
                    **extra: object) -> Path:
    config = {
        "trainer_id": "node-test", "listen": f"127.0.0.1:{port}",
        "data_dir": str(path.parent / "trainer-data"),
        "controller": {"address": controller, "report_interval_s": 0.5, "timeout_s": 2},
        "model": {"pretrained": str(checkpoint)},
        "training": {"batch_size": 16, "assume_normal_unlabelled": True},
        "security": {"insecure": True},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _controller_config(path: Path, port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "database": str(path.parent / "registry.sqlite"),
        "policy": {"rules": {"min_labelled": 16, "min_f1": 1.0, "finetune_batches": 20,
                             "cooldown_s": 1.0}},
        "security": {"insecure": True},
    }))
    return path


def _start(name: str, role: str, config: Path, tmp_path: Path, port: int) -> Process:
    process = start(name, [role, "--config", str(config)], tmp_path / "logs")
    wait_serving(f"127.0.0.1:{port}", 60, process=process)
    return process


def test_trainer_killed_mid_stream_receives_every_sample_once(tmp_path, checkpoint_dir):
    from vmad.trainer.store import TelemetryStore

    port = free_port()
    config = _trainer_config(tmp_path / "trainer.yaml", port, checkpoint_dir, None)
    trainer = _start("trainer", "trainer", config, tmp_path, port)
    total = 600
    agent = ReplayAgent(f"127.0.0.1:{port}", "vm-a", _series(total), batch_size=10)
    try:
        assert agent.send_until(100) == 100  # telemetry arrives and is acknowledged
        trainer.kill()  # SIGKILL while the agent keeps streaming
        with pytest.raises(grpc.RpcError):
            agent.send_until(total)
        trainer = _start("trainer", "trainer", config, tmp_path, port)
        # Resume exactly after the last ack: a sample acked before it was committed would
        # be missing now (no rewind that would send it again and hide the loss).
        agent.reconnect()
        assert agent.send_until(total) == total
        store = TelemetryStore(tmp_path / "trainer-data" / "store.sqlite")
        counters = store.counters("vm-a")
        assert counters is not None
        assert counters.received == total and counters.lost == 0
        assert store.recent("vm-a").seqs.tolist() == list(range(1, total + 1))
        store.close()
        # Then replay 30 on purpose: the trainer must drop what it already has.
        agent.acked = total - 30
        assert agent.send_until(total) == total
    finally:
        agent.close()
        trainer.stop()
    store = TelemetryStore(tmp_path / "trainer-data" / "store.sqlite")
    counters = store.counters("vm-a")
    assert counters is not None
    assert counters.received == total and counters.lost == 0
    assert counters.duplicates >= 30
    recent = store.recent("vm-a")
    assert recent.seqs.tolist() == list(range(1, total + 1))


@pytest.mark.parametrize("role", ["trainer", "controller"])
def test_bad_yaml_key_fails_start_with_its_name(tmp_path, checkpoint_dir, role):
    import subprocess
    import sys

    if role == "trainer":
        config = _trainer_config(tmp_path / "t.yaml", free_port(), checkpoint_dir, None,
                                 training={"learning_rat": 0.1})
        key = "training.learning_rat"
    else:
        config = _controller_config(tmp_path / "c.yaml", free_port())
        config.write_text(config.read_text() + "polcy: {}\n")
        key = "polcy"
    result = subprocess.run([sys.executable, "-m", "vmad.cli", role, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert key in result.stderr and config.name in result.stderr


def test_controller_decides_trainer_pushes_and_restart_keeps_registry(tmp_path, checkpoint_dir):
    from vmad.bundle import Bundle
    from vmad.controller.service import fetch_fleet

    c_port, t_port = free_port(), free_port()
    c_config = _controller_config(tmp_path / "controller.yaml", c_port)
    controller = _start("controller", "controller", c_config, tmp_path, c_port)
    t_config = _trainer_config(tmp_path / "trainer.yaml", t_port, checkpoint_dir,
                               f"127.0.0.1:{c_port}")
    trainer = _start("trainer", "trainer", t_config, tmp_path, t_port)
    agent = ReplayAgent(f"127.0.0.1:{t_port}", "vm-b", _series(400), batch_size=20)
    try:
        agent.start_watch()
        agent.send_until(400)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any("-ft" in v for v in
                                                      agent.bundles_received):
            time.sleep(0.3)
        assert any("-ft" in v for v in agent.bundles_received), agent.bundles_received
        assert isinstance(agent.bundle, Bundle) and "-ft" in agent.bundle.metadata.version
        fleet = fetch_fleet(c_config, 100)
        assert [vm["vm_id"] for vm in fleet["vms"]] == ["vm-b"]
        assert fleet["actions"].get("finetune", 0) >= 1
        before = fleet["counts"]
        controller.stop()
        controller = _start("controller", "controller", c_config, tmp_path, c_port)
        after = fetch_fleet(c_config, 100)["counts"]
        assert after["vms"] == 1 and after["decisions"] >= before["decisions"]
        assert after["trainers"] == 1
    finally:
        agent.close()
        trainer.stop()
        controller.stop()


def test_bad_and_oversized_batches_are_refused_without_harm(tmp_path, checkpoint_dir):
    from vmad.protos.vmad.v1 import telemetry_pb2 as pb
    from vmad.protos.vmad.v1 import telemetry_pb2_grpc
    from vmad.security import MAX_MESSAGE_BYTES

    port = free_port()
    config = _trainer_config(tmp_path / "trainer.yaml", port, checkpoint_dir, None)
    trainer = _start("trainer", "trainer", config, tmp_path, port)
    good = ReplayAgent(f"127.0.0.1:{port}", "vm-good", _series(100), batch_size=10)
    try:
        assert good.send_until(50) == 50
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            now = time.time()
            nan = pb.TelemetryBatch(vm_id="vm-bad", metrics=list(DEFAULT_METRICS), samples=[
                pb.Sample(seq=1, timestamp=now, values=[1.0, float("nan"), 1.0, 1.0]),
                pb.Sample(seq=2, timestamp=now, values=[1.0, 2.0, 1.0, 1.0])])
            wrong = pb.TelemetryBatch(vm_id="vm-bad", metrics=["cpu"],
                                      samples=[pb.Sample(seq=3, values=[1.0])])
            replies = list(stub.Stream(iter([nan, wrong, pb.TelemetryBatch()]), timeout=10))
            assert len(replies) == 3
            # The NaN sample alone is refused; the good one is stored, both are acked.
            assert not replies[0].error and replies[0].refused == 1
            assert "NaN" in replies[0].refused_reason
            assert (replies[0].stored, replies[0].acked_seq) == (1, 2)
            assert "metrics" in replies[1].error and "vm_id" in replies[2].error
            huge = pb.TelemetryBatch(vm_id="vm-huge",
                                     metrics=["m" * 1000] * (MAX_MESSAGE_BYTES // 1000 + 1))
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Stream(iter([huge]), timeout=20))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert good.send_until(100) == 100  # the well-behaved agent never noticed
        assert trainer.alive()
    finally:
        good.close()
        trainer.stop()


def test_wrong_token_is_refused(tmp_path, checkpoint_dir):
    from vmad.security import SecurityConfig

    port = free_port()
    config = _trainer_config(tmp_path / "trainer.yaml", port, checkpoint_dir, None,
                             security={"insecure": True, "tokens": {"vm-t": "right"}})
    trainer = _start("trainer", "trainer", config, tmp_path, port)
    address = f"127.0.0.1:{port}"
    try:
        for client in (SecurityConfig(insecure=True, client_id="vm-t", token="wrong"),
                       SecurityConfig(insecure=True),
                       SecurityConfig(insecure=True, client_id="vm-x", token="right")):
            agent = ReplayAgent(address, "vm-t", _series(20), security=client)
            with pytest.raises(grpc.RpcError) as refused:
                agent.send_until(20)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            agent.close()
        right = SecurityConfig(insecure=True, client_id="vm-t", token="right")
        agent = ReplayAgent(address, "vm-t", _series(20), security=right)
        assert agent.send_until(20) == 20
        agent.close()
        # A valid token speaks only for its own VM.
        other = ReplayAgent(address, "vm-other", _series(20), security=right)
        with pytest.raises(grpc.RpcError) as denied:
            other.send_until(20)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        other.close()
    finally:
        trainer.stop()


def test_real_agent_telemetry_arrives(tmp_path, checkpoint_dir):
    """The real edge agent process streams this host's samples to a real trainer
    process: every sample once, none lost; then its spool is deleted (as an operator
    might) and the restarted agent's new samples are stored, not taken for duplicates."""
    pytest.importorskip("vmad.edge_agent.agent_commands")
    from vmad.trainer.store import TelemetryStore

    port = free_port()
    config = _trainer_config(tmp_path / "trainer.yaml", port, checkpoint_dir, None)
    trainer = _start("trainer", "trainer", config, tmp_path, port)
    agent_config = tmp_path / "agent.yaml"
    agent_config.write_text(yaml.safe_dump({
        "vm_id": "real-test", "interval_s": 0.2, "bundle_dir": str(tmp_path / "bundles"),
        "trainer": {"address": f"127.0.0.1:{port}", "flush_s": 0.5},
        "spool": {"path": str(tmp_path / "spool.db")}, "metrics": {"listen": None},
        "inject": {"labels_file": str(tmp_path / "labels.jsonl")},
        "security": {"insecure": True}}))

    def counters():
        store = TelemetryStore(tmp_path / "trainer-data" / "store.sqlite")
        try:
            return store.counters("real-test"), store.recent("real-test").seqs.tolist()
        finally:
            store.close()

    def run_agent_until(received: int) -> None:
        agent = start("agent", ["agent", "--config", str(agent_config)], tmp_path / "logs")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.5)
                assert agent.alive(), agent.log_text()[-2000:]
                current, _ = counters()
                if current is not None and current.received >= received:
                    break
        finally:
            assert agent.stop() == 0, agent.log_text()[-2000:]

    try:
        run_agent_until(10)
        first, seqs = counters()
        assert first is not None and first.received >= 10
        assert (first.lost, first.duplicates, first.refused) == (0, 0, 0)
        assert seqs == list(range(1, first.received + 1))  # each sample once, in order
        (tmp_path / "spool.db").unlink()  # a new spool: seqs restart at 1, new spool id
        for suffix in ("-wal", "-shm"):
            Path(f"{tmp_path / 'spool.db'}{suffix}").unlink(missing_ok=True)
        run_agent_until(first.received + 10)
        second, seqs = counters()
        assert second.received >= first.received + 10
        assert (second.lost, second.duplicates) == (0, 0)
        assert seqs == list(range(1, second.received + 1))  # one seq space, no gap
    finally:
        trainer.stop()


def test_a_vm_with_metrics_of_its_own_is_served_a_detector_over_all_of_them(
        tmp_path, checkpoint_dir):
    """A real trainer, a simulated agent that reports the network's 4 metrics and 16 of
    its own: it is sent a warm-up bundle over its 20 metrics (after the network's, which
    it refuses), then its own adapted bundle with the subspace and the states; a VM that
    sends a bad metric name is refused by name and counted."""
    import json
    import urllib.request

    port, metrics_port = free_port(), free_port()
    config = _trainer_config(
        tmp_path / "trainer.yaml", port, checkpoint_dir, None,
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        adaptation={"warmup_samples": 200, "refresh_samples": 10_000})
    trainer = _start("trainer", "trainer", config, tmp_path, port)
    own = tuple(f"app.m{i}" for i in range(16))
    rng = np.random.default_rng(1)
    level = 50 + 10 * np.sin(np.arange(400) / 30)
    values = np.column_stack([rng.normal(30, 3, size=(400, 4))]
                             + [level + rng.normal(0, 1, 400) for _ in own])
    series = ReplaySeries("wide", values.astype(np.float32), np.zeros(400, np.int8), "test")
    agent = ReplayAgent(f"127.0.0.1:{port}", "vm-wide", series, batch_size=20,
                        metrics=DEFAULT_METRICS + own)
    bad = ReplayAgent(f"127.0.0.1:{port}", "vm-bad", ReplaySeries(
        "bad", values[:20, :5].astype(np.float32), np.zeros(20, np.int8), "test"),
        metrics=(*DEFAULT_METRICS, "load 1"))
    try:
        agent.start_watch()
        assert agent.send_until(40) == 40
        deadline = time.monotonic() + 30
        while not agent.bundles_received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.bundles_received[0].endswith("-20metrics-warmup")
        assert agent.send_until(400) == 400
        deadline = time.monotonic() + 60
        while "+" not in agent.bundles_received[-1] and time.monotonic() < deadline:
            time.sleep(0.2)
        adapted = agent.bundle
        assert "+" in adapted.metadata.version, agent.bundles_received
        assert adapted.metadata.metrics == DEFAULT_METRICS + own
        assert not adapted.metadata.warmup
        adaptation = json.loads(adapted.metadata.to_json())["provenance"]["adaptation"]
        assert "subspace" in adaptation["deviation"] and "states" in adaptation["deviation"]
        with pytest.raises(ValueError, match="load 1"):
            bad.send_until(20)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert 'vmad_trainer_batches_refused_total{reason="bad_metric_name"} 1.0' in text
    finally:
        agent.close()
        bad.close()
        trainer.stop()
