"""Edge agent units with real files, real ONNX Runtime and a real gRPC server on loopback:
sampler (recorded readings, counter resets), spool (bound, drop-oldest count, restart),
bundle swap (corrupt refused, old keeps running, rollback), streaming with replay."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.agent_fixtures import RecordingTrainer, tiny_bundle
from vmad import security
from vmad.bundle import BundleError, sha256_hex
from vmad.edge_agent.config import AgentConfig
from vmad.edge_agent.detector import BundleSlot, WindowScorer
from vmad.edge_agent.link import Backoff
from vmad.edge_agent.sampler import METRICS, Reading, Sampler, counter_delta
from vmad.edge_agent.spool import Spool
from vmad.protos.vmad.v1 import bundle_pb2, telemetry_pb2_grpc
from vmad.schema import DEFAULT_WINDOW


# -- sampler -------------------------------------------------------------------------
def recorded(readings: list[tuple[float, float, float, int, int]]):
    iterator = iter([Reading(*r) for r in readings])
    return lambda: next(iterator)


def test_sampler_rates_and_counter_reset() -> None:
    sampler = Sampler(recorded([
        (0.0, 10.0, 50.0, 0, 0),
        (5.0, 20.0, 51.0, 5_000_000, 10_000_000),          # 1 MB/s disk, 2 MB/s net
        (10.0, 30.0, 52.0, 1_000_000, 2**32 - 1_000_000),   # disk reset to zero
        (15.0, 40.0, 53.0, 6_000_000, 4_000_000),           # net 32-bit wrap
    ]))
    assert sampler.sample() is None  # a rate needs two readings
    assert sampler.sample() == (5.0, [20.0, 51.0, 1.0, 2.0])
    _, values = sampler.sample()
    assert values[2] == pytest.approx(0.2)  # bytes since the reset, not negative
    assert values[3] > 0
    _, values = sampler.sample()
    assert values[3] == pytest.approx((1_000_000 + 4_000_000) / 5 / 1e6)  # across the wrap
    assert values[2] == pytest.approx(1.0)
    assert sampler.resets == 2


def test_own_metrics_are_sampled_after_the_four_as_gauges_and_rates() -> None:
    """A gauge passes through, a counter becomes a rate (MB for bytes), a counter that
    steps back counts as a reset; a reading without the configured metrics is refused;
    an unknown name is refused by name."""
    sampler = Sampler(recorded([
        (0.0, 10.0, 50.0, 0, 0, (1.5, 1_000, 0)),
        (5.0, 20.0, 51.0, 0, 0, (2.5, 6_000, 10_000_000)),  # 1,000/s, 2 MB/s
        (10.0, 30.0, 52.0, 0, 0, (0.5, 500, 20_000_000)),   # retrans counter reset
    ]), own_metrics=("load_1", "tcp_retrans_segs_s", "disk_read_mb_s"))
    assert sampler.sample() is None
    assert sampler.sample() == (5.0, [20.0, 51.0, 0.0, 0.0, 2.5, 1000.0, 2.0])
    _, values = sampler.sample()
    assert values[4:] == [0.5, 100.0, 2.0] and sampler.resets == 1
    short = Sampler(recorded([(0.0, 1.0, 1.0, 0, 0), (5.0, 1.0, 1.0, 0, 0)]),
                    own_metrics=("load_1",))
    short.sample()
    with pytest.raises(ValueError, match="holds 0 own metrics, 1 configured"):
        short.sample()
    with pytest.raises(ValueError, match="unknown own metrics"):
        Sampler(recorded([]), own_metrics=("load_2",))


def test_agent_config_names_an_unknown_or_repeated_own_metric(tmp_path: Path) -> None:
    import pydantic

    for own, problem in ((["load_2"], "unknown own metrics ['load_2']"),
                         (["load_1", "load_1"], "listed twice")):
        with pytest.raises(pydantic.ValidationError, match="own_metrics") as error:
            agent_config(tmp_path, None, own_metrics=own)
        assert problem in str(error.value)
    assert agent_config(tmp_path, None, own_metrics=["load_1"]).own_metrics == ["load_1"]


def test_every_own_metric_reads_on_this_host() -> None:
    """The real readings (psutil and /proc/net/snmp): every metric of OWN_METRICS, two
    samples apart, finite and not negative."""
    import math

    from vmad.edge_agent.sampler import OWN_METRICS

    sampler = Sampler(own_metrics=tuple(OWN_METRICS))
    assert sampler.sample() is None
    time.sleep(0.2)
    _, values = sampler.sample()
    assert len(values) == 4 + len(OWN_METRICS)
    assert all(math.isfinite(v) and v >= 0 for v in values), values
    assert values[4 + list(OWN_METRICS).index("processes")] >= 1


def test_an_agent_with_own_metrics_runs_a_bundle_over_the_four_first(tmp_path: Path) -> None:
    """Until the trainer sends a bundle over all its metrics, an agent that samples its
    own runs the packaged one on the first four; each verdict names one contribution
    per metric the agent samples. A bundle over other metrics is refused."""
    from vmad.bundle import BundleError

    metrics = (*METRICS, "load_1", "processes")
    slot = BundleSlot(tmp_path / "bundles", metrics, DEFAULT_WINDOW)
    bundle = slot.load_initial(None)
    assert bundle is not None and bundle.metadata.metrics == METRICS
    detector = WindowScorer(slot)
    rng = np.random.default_rng(2)
    samples = (rng.random((DEFAULT_WINDOW, len(metrics))) * 60).tolist()
    for values in samples:
        verdict = detector.push(values)
    assert verdict is not None and len(verdict.contributions) == len(metrics)
    window = np.asarray(samples).T[None, :4]
    scores, contributions = bundle.score_with_contributions(window)
    assert verdict.score == float(scores[0])
    assert verdict.contributions == (*contributions[0].tolist(), 0.0, 0.0)
    other = BundleSlot(tmp_path / "other", METRICS[::-1], DEFAULT_WINDOW)
    with pytest.raises(BundleError, match="or the first of them"):
        other.install(*tiny_bundle("v9"))


def test_counter_delta_never_negative() -> None:
    assert counter_delta(100, 150) == 50
    assert counter_delta(2**64 - 10, 5) == 15
    assert counter_delta(1000, 10) == 10


def test_backoff_grows_with_jitter_to_a_cap() -> None:
    backoff = Backoff(0.5, 8.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1
    backoff.reset()
    assert backoff.next_delay() <= 0.5


# -- spool ---------------------------------------------------------------------------
def test_spool_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=10_000, max_rows=50)
    for seq in range(1, 81):
        spool.append(seq, b"x" * 20)
    assert spool.rows == 50 and spool.dropped == 30
    assert spool.pending(0, 1)[0][0] == 31  # the oldest went first
    spool.append(81, b"y" * 5000)
    spool.append(82, b"y" * 5000)
    assert spool.bytes <= 10_000 and spool.pending(0, 100)[-1][0] == 82


def test_spool_survives_restart_and_acks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20, max_rows=5)
    for _ in range(8):
        spool.append(spool.next_seq(), b"sample", b"verdict")
    spool.add_label("a", b"label")
    assert spool.ack(6) == 3 and spool.rows == 2
    spool.close()
    again = Spool(tmp_path / "s.db", max_bytes=1 << 20, max_rows=5)
    assert again.dropped == 3 and again.rows == 2
    assert [row[0] for row in again.pending(0, 10)] == [7, 8]
    assert again.next_seq() == 9  # sequence numbers keep growing across restarts
    assert again.labels() == [("a", b"label")]


# -- bundles -------------------------------------------------------------------------
def test_bundle_swap_refuses_corrupt_and_rolls_back(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("v1", bias=-5.0))
    detector = WindowScorer(slot)
    results = [detector.push([1.0, 1.0, 1.0, 1.0]) for _ in range(DEFAULT_WINDOW)]
    assert results[-2] is None and results[-1].version == "v1" and not results[-1].anomalous

    metadata, onnx = tiny_bundle("v2", bias=+5.0)
    corrupt = bytearray(onnx)
    corrupt[-1] ^= 0xFF
    with pytest.raises(BundleError, match="checksum"):
        slot.install(metadata, bytes(corrupt))
    with pytest.raises(BundleError, match="metrics"):
        slot.install(*tiny_bundle("v3", metrics=("a", "b", "c", "d")))
    assert slot.rejected == 2 and slot.current.metadata.version == "v1"
    assert detector.push([1.0] * 4).version == "v1"  # the old one keeps running

    slot.install(metadata, onnx)
    verdict = detector.push([1.0] * 4)
    assert verdict.version == "v2" and verdict.anomalous and verdict.score > 0.99
    assert slot.rollback().metadata.version == "v1"
    # On disk too: a restarted agent comes back with what ran last.
    fresh = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    assert fresh.load_initial(None).metadata.version == "v1"


def test_an_alarm_needs_alarm_after_windows_in_a_row(tmp_path: Path) -> None:
    """score = sigmoid(mean + 0): a window of -0.1 is under 0.5, one sample of 10 in it
    puts it over (the tiny bundle clips at 10). With
    alarm_after 3 the third window in a row over it is the first anomalous one; a window
    under it starts the count again."""
    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("v1", alarm_after=3))
    detector = WindowScorer(slot)
    quiet = [detector.push([-0.1] * 4) for _ in range(DEFAULT_WINDOW)]
    assert quiet[-1] is not None and quiet[-1].score < 0.5
    over = [detector.push([10.0] * 4) for _ in range(4)]
    assert all(v.score > 0.5 for v in over)
    assert [v.anomalous for v in over] == [False, False, True, True]
    # A bundle with alarm_after 1 (and every bundle written before the key existed) flags
    # each window on its own.
    slot.install(*tiny_bundle("v2", bias=-1000.0))
    assert not detector.push([10.0] * 4).anomalous
    slot.install(*tiny_bundle("v3", alarm_after=1))
    assert detector.push([10.0] * 4).anomalous


def test_window_scorer_scores_the_newest_window_oldest_first(tmp_path: Path) -> None:
    """The ring (each sample written twice, the window a view) must hand the bundle the
    last T samples in order, across wrap-arounds and a swap: the shipped bundle first
    (a CNN, so the order shows in the score, and contributions), then a one-output one."""
    from vmad.edge_agent.detector import WindowVerdict

    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    assert slot.load_initial(None) is not None
    detector = WindowScorer(slot)
    rng = np.random.default_rng(5)
    samples = (rng.random((3 * DEFAULT_WINDOW + 7, len(METRICS))) * 60).tolist()
    scored = 0
    for index, values in enumerate(samples):
        if index == 2 * DEFAULT_WINDOW:
            slot.install(*tiny_bundle("v2", bias=1.0))
        verdict = detector.push(values)
        if index < DEFAULT_WINDOW - 1:
            assert verdict is None
            continue
        bundle = slot.current
        window = np.asarray(samples[index - DEFAULT_WINDOW + 1:index + 1]).T[None]
        scores, contributions = bundle.score_with_contributions(window)
        meta = bundle.metadata
        assert verdict == WindowVerdict(
            float(scores[0]), float(scores[0]) >= meta.threshold and not meta.warmup,
            meta.version, meta.warmup,
            tuple(contributions[0].tolist()) if contributions is not None else ())
        scored += 1
    assert scored == 2 * DEFAULT_WINDOW + 8


# -- the agent against a real gRPC server ----------------------------------------------
def fake_source():
    counter = itertools.count()

    def read() -> Reading:
        i = next(counter)
        return Reading(time.time(), 10.0 + i % 3, 40.0, i * 1_000_000, i * 500_000)

    return read


def agent_config(tmp_path: Path, port: int | None, **extra) -> AgentConfig:
    return AgentConfig.model_validate({
        "vm_id": "vm-1", "interval_s": 0.01, "bundle_dir": str(tmp_path / "bundles"),
        "trainer": {"address": f"127.0.0.1:{port}" if port else None, "flush_s": 0.05,
                    "timeout_s": 1.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
                    "batch_max": 50},
        "spool": {"path": str(tmp_path / "spool.db")},
        "metrics": {"listen": None},
        "inject": {"labels_file": str(tmp_path / "labels.jsonl")},
        "security": {"insecure": True, "client_id": "vm-1", "token": "t1"},
        **extra,
    })


def start_trainer(port: int = 0) -> tuple[grpc.Server, int, RecordingTrainer]:
    config = security.SecurityConfig(insecure=True, tokens={"vm-1": "t1"})
    server, _ = security.make_server(config, max_workers=8)
    trainer = RecordingTrainer()
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(trainer, server)
    port = security.add_port(server, f"127.0.0.1:{port}", config)
    server.start()
    return server, port, trainer


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_agent_spools_while_trainer_away_then_replays_exactly_once(tmp_path: Path) -> None:
    from vmad.edge_agent.agent import Agent
    from vmad.edge_agent.inject import append_label

    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("v1"))
    server, port, trainer = start_trainer()
    server.stop(None)  # the trainer is down when the agent starts
    append_label(tmp_path / "labels.jsonl", 1.0, 2.0, True, "cpu-hog", "injection", "vm-1")
    agent = Agent(agent_config(tmp_path, port), source=fake_source())
    agent.start()
    for _ in range(120):
        agent.tick()
    assert agent.spool.rows == 119  # nothing lost, all waiting
    server, _, trainer = start_trainer(port)
    try:
        wait_for(lambda: trainer.acked.get("vm-1", 0) >= 119)
        for _ in range(30):
            agent.tick()
        wait_for(lambda: trainer.acked.get("vm-1", 0) >= 149)
        wait_for(lambda: agent.spool.rows == 0)
        assert sorted(seq for _, seq in trainer.samples) == list(range(1, 150))
        assert trainer.verdicts == 149 - DEFAULT_WINDOW + 1
        assert len(trainer.labels) == 1
        assert trainer.metadata[0]["authorization"] == "Bearer t1"

        metadata, onnx = tiny_bundle("v2", bias=3.0)
        other_metadata, other_onnx = tiny_bundle("v3", bias=1.0)
        with trainer.lock:
            trainer.bundles.append(bundle_pb2.ModelBundle(
                version="bad", onnx=onnx + b"x", metadata_json=metadata,
                sha256=sha256_hex(onnx)))
            # Consistent bundle, but not the bytes the trainer signed for in the message.
            trainer.bundles.append(bundle_pb2.ModelBundle(
                version="v3", onnx=other_onnx, metadata_json=other_metadata,
                sha256=sha256_hex(onnx)))
            trainer.bundles.append(bundle_pb2.ModelBundle(
                version="v2", onnx=onnx, metadata_json=metadata, sha256=sha256_hex(onnx)))
        wait_for(lambda: agent.slot.current.metadata.version == "v2")
        assert agent.slot.rejected == 2
        assert agent.slot.previous.metadata.version == "v1"  # v3 never ran
    finally:
        agent.stop()
        server.stop(None)


def test_metrics_endpoint_serves_agent_metrics(tmp_path: Path) -> None:
    import urllib.request

    from vmad.edge_agent.agent import Agent

    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("v1"))
    from vmad.launch import free_port

    port = free_port()
    config = agent_config(tmp_path, None, metrics={"listen": f"127.0.0.1:{port}"})
    agent = Agent(config, source=fake_source())
    agent.start()
    try:
        for _ in range(DEFAULT_WINDOW + 2):
            agent.tick()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        agent.stop()
    text = text.decode()
    for name in ("vmad_agent_anomaly_score", "vmad_agent_spool_depth",
                 "vmad_agent_inference_seconds_bucket", 'version="v1"',
                 "vmad_agent_bundles_rejected_total", "vmad_agent_samples_total"):
        assert name in text
    assert np.isfinite(agent.metrics.score._value.get())


def test_agent_with_wrong_token_is_refused_and_keeps_everything(tmp_path: Path) -> None:
    from vmad.edge_agent.agent import Agent

    server, port, trainer = start_trainer()
    config = agent_config(tmp_path, port).model_copy(update={
        "security": security.SecurityConfig(insecure=True, client_id="vm-1", token="wrong")})
    agent = Agent(config, source=fake_source())
    agent.start()
    try:
        for _ in range(20):
            agent.tick()
        time.sleep(0.5)  # several refused connection attempts
        assert trainer.received == 0 and agent.spool.rows == 19
    finally:
        agent.stop()
        server.stop(None)


def test_refused_batch_stays_spooled_and_arrives_after_reconnect(tmp_path: Path,
                                                                  caplog) -> None:
    import logging

    from vmad.edge_agent.agent import Agent

    server, port, trainer = start_trainer()
    trainer.refuse_batches = 1
    agent = Agent(agent_config(tmp_path, port), source=fake_source())
    with caplog.at_level(logging.ERROR, "vmad.edge_agent.link"):
        agent.start()
        try:
            for _ in range(20):
                agent.tick()
            wait_for(lambda: any("trainer refused batch" in r.getMessage()
                                 for r in caplog.records))
            for _ in range(20):
                agent.tick()
            time.sleep(0.3)
            # The refusal's acked_seq was not acted on: nothing left the spool.
            assert agent.spool.first_seq() == 1 and agent.spool.rows == 39
            server.stop(None)  # the next stream replays what was refused
            server, _, trainer = start_trainer(port)
            for _ in range(5):
                agent.tick()
            wait_for(lambda: trainer.acked.get("vm-1", 0) >= 44, timeout=15)
            assert sorted(seq for _, seq in trainer.samples) == list(range(1, 45))
        finally:
            agent.stop()
            server.stop(None)


def test_anomaly_end_prints_the_label_that_puts_the_alarm_back_into_refits(
        tmp_path: Path, caplog) -> None:
    """A burst alarms for a while; the `anomaly ongoing` lines (after
    `alarm_first_reminder_s`, then every `alarm_reminder_s`) and the `anomaly end` line
    name a `vmad label --normal` command. Run as printed, the end line's labels every
    sample the trainer's refits would leave out for that alarm (`alarm_covered`), and
    not far beyond it."""
    import logging
    import shlex
    import subprocess

    from tests.test_agent_process import vmad
    from vmad.edge_agent.agent import Agent
    from vmad.trainer.adaptation import alarm_covered

    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    # score = sigmoid(window mean - 0.5): 4 samples at the clip (10) in a window alarm.
    slot.install(*tiny_bundle("v1", bias=-0.5))
    hot = set(range(100, 110))
    counters = itertools.count()

    def source() -> Reading:
        i = next(counters)
        level = 100.0 if i in hot else 0.0
        return Reading(1_000_000.0 + i, level, level, i * (10**9 if i in hot else 0), 0)

    agent = Agent(agent_config(tmp_path, None, interval_s=1.0, alarm_first_reminder_s=10.0,
                               alarm_reminder_s=30.0), source=source)
    timestamps, alarmed = [], []
    with caplog.at_level(logging.WARNING, "vmad.agent"):
        for i in range(260):
            agent.tick()
            if i >= DEFAULT_WINDOW:  # a verdict per tick once the window is full
                timestamps.append(1_000_000.0 + i)
                alarmed.append(agent.metrics.anomalous._value.get() == 1)
    agent.spool.close()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("anomaly end")]
    assert len(ends) == 1 and sum(alarmed) > 3, ends
    command = shlex.split(ends[0].split("if it was normal: ")[1])
    # While it lasted, after 10 s and then every 30 s: the same command up to then (a
    # new normal level never ends, and must be labelled while it goes on).
    ongoing = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("anomaly ongoing")]
    assert sum(alarmed) > 41 and len(ongoing) == 1 + (sum(alarmed) - 1 - 10) // 30, ongoing
    reminded = shlex.split(ongoing[0].split("if it is the VM's new normal: ")[1])
    assert reminded[:-3] == command[:-3] and int(reminded[-3]) < int(command[-3])
    assert command[:2] == ["vmad", "label"] and "--normal" in command
    subprocess.run(vmad(*command[1:]), check=True, capture_output=True)
    label = json.loads((tmp_path / "labels.jsonl").read_text().splitlines()[-1])
    assert not label["anomalous"] and label["vm_id"] == "vm-1"
    times = np.asarray(timestamps)
    labelled = (times >= label["start"]) & (times <= label["end"])
    covered = alarm_covered(times, times[np.asarray(alarmed)], DEFAULT_WINDOW * 1.0)
    assert covered.any() and not (covered & ~labelled).any()
    assert labelled.sum() <= covered.sum() + 2
