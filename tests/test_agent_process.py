"""The real `vmad agent` process on loopback with a real gRPC trainer stand-in, a real
`vmad inject` whose labelled interval reaches the trainer, clean SIGTERM, bad config."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from tests.agent_fixtures import tiny_bundle
from tests.test_agent import start_trainer, wait_for
from vmad.edge_agent.detector import BundleSlot
from vmad.edge_agent.sampler import METRICS
from vmad.schema import DEFAULT_WINDOW

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, port: int, **extra) -> Path:
    config = {
        "vm_id": "vm-1", "interval_s": 0.05, "bundle_dir": str(tmp_path / "bundles"),
        "trainer": {"address": f"127.0.0.1:{port}", "flush_s": 0.1, "timeout_s": 2.0,
                    "backoff_initial_s": 0.05, "backoff_max_s": 0.5},
        "spool": {"path": str(tmp_path / "spool.db")},
        "metrics": {"listen": None},
        "inject": {"labels_file": str(tmp_path / "labels.jsonl"), "max_memory_share": 0.05},
        "security": {"insecure": True, "client_id": "vm-1", "token": "t1"},
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def vmad(*args: str) -> list[str]:
    # The installed entry point, as operators run it.
    return [str(Path(sys.executable).parent / "vmad"), *args]


def test_agent_process_streams_and_ships_injected_fault_label(tmp_path: Path) -> None:
    BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW).install(*tiny_bundle("v1"))
    server, port, trainer = start_trainer()
    config = write_config(tmp_path, port)
    agent = subprocess.Popen(vmad("agent", "--config", str(config)), cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(trainer.samples) >= 5, timeout=30)
        injected = subprocess.run(
            vmad("inject", "memory-leak", "--duration", "1", "--intensity", "0.2",
                 "--config", str(config)), cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert injected.returncode == 0, injected.stderr
        wait_for(lambda: any(label.kind == "memory-leak" and label.anomalous
                             for label in trainer.labels.values()), timeout=20)
        wait_for(lambda: trainer.verdicts > 0, timeout=30)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=20)
        server.stop(None)
    assert agent.returncode == 0, stderr
    seqs = sorted(seq for _, seq in trainer.samples)
    assert seqs == list(range(1, len(seqs) + 1))  # no gap
    # No duplicate: one stream that never broke sends each sample once (the dict above
    # would hide a copy; the arrival log does not).
    assert sorted(trainer.arrivals) == seqs


def test_agent_refuses_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, spool={"path": str(tmp_path / "s.db"), "max_bytes": "x"})
    started = time.monotonic()
    result = subprocess.run(vmad("agent", "--config", str(config)), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "agent.yaml: spool.max_bytes: Input should be a valid integer" in result.stderr
    assert time.monotonic() - started < 30


def test_inject_refuses_out_of_range_intensity(tmp_path: Path) -> None:
    result = subprocess.run(
        vmad("inject", "cpu-hog", "--duration", "1", "--intensity", "3",
             "--labels-file", str(tmp_path / "l.jsonl")),
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "intensity" in result.stderr
    assert not (tmp_path / "l.jsonl").exists()


def test_operator_label_reaches_the_trainer_with_token(tmp_path: Path) -> None:
    server, port, trainer = start_trainer()
    try:
        config = write_config(tmp_path, port)
        result = subprocess.run(
            vmad("label", "--vm", "vm-1", "--start", "100", "--end", "200", "--normal",
                 "--config", str(config)), cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert result.returncode == 0, result.stderr
        (label,) = trainer.labels.values()
        assert (label.start, label.end, label.anomalous) == (100, 200, False)
        refused = subprocess.run(
            vmad("label", "--vm", "vm-1", "--start", "1", "--end", "2", "--anomalous",
                 "--trainer", f"127.0.0.1:{port}", "--insecure"), cwd=ROOT,
            capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    finally:
        server.stop(None)


def test_agent_with_own_metrics_gets_its_own_detector_from_a_real_trainer(
        tmp_path: Path) -> None:
    """A real `vmad agent` that samples 4 metrics of its own after the default four, and a
    real `vmad trainer` (shipped checkpoint, warm-up shortened): the agent starts on the
    packaged bundle (the four), the trainer stores the VM's 8 metrics and sends a warm-up
    bundle over them, then the VM's adapted bundle, which the agent installs."""
    import json

    import pytest

    from vmad.launch import free_port, start, wait_serving
    from vmad.trainer.store import TelemetryStore

    pytest.importorskip("torch")
    own = ["load_1", "cpu_iowait_percent", "processes", "tcp_retrans_segs_s"]
    port = free_port()
    trainer_yaml = tmp_path / "trainer.yaml"
    trainer_yaml.write_text(yaml.safe_dump({
        "trainer_id": "t", "listen": f"127.0.0.1:{port}", "data_dir": str(tmp_path / "t"),
        "security": {"insecure": True}, "metrics": {"listen": None},
        "adaptation": {"warmup_samples": 100}}))
    config = write_config(tmp_path, port, interval_s=0.05, own_metrics=own)
    trainer = start("trainer", ["trainer", "--config", str(trainer_yaml)], tmp_path / "logs")
    agent = None
    current = tmp_path / "bundles" / "current" / "bundle.json"
    try:
        wait_serving(f"127.0.0.1:{port}", 120, process=trainer)
        agent = start("agent", ["agent", "--config", str(config)], tmp_path / "logs")
        wait_for(lambda: current.is_file() and "+" in json.loads(current.read_text())[
            "version"], timeout=120)
        metadata = json.loads(current.read_text())
        assert metadata["metrics"] == [*METRICS, *own] and not metadata["warmup"]
    finally:
        if agent is not None:
            agent.stop()
        trainer.stop()
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert "-8metrics-warmup" in log, log[-2000:]
    store = TelemetryStore(tmp_path / "t" / "store.sqlite")
    counters = store.counters("vm-1")
    assert counters is not None and counters.metrics == (*METRICS, *own)
    values = store.recent("vm-1").values
    assert values.shape[1] == 8 and np.isfinite(values).all()
