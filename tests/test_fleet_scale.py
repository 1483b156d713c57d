"""A trainer holds a node's fleet: many agents each with two calls open, a clear refusal
when full, an agent that notices a trainer that never acks, and the two trainer
benchmarks in their small modes."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.trainer_fixtures import OpenStream, batch, trainer_server
from vmad.protos.vmad.v1 import telemetry_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
def test_full_trainer_refuses_the_next_agent_clearly(tmp_path, small_checkpoint, caplog):
    server = trainer_server(tmp_path, small_checkpoint, max_agents=2)
    streams = [OpenStream(server.address) for _ in range(2)]
    try:
        for i, stream in enumerate(streams):
            assert stream.send(batch(f"vm-{i}", 1)).acked_seq == 1
        third = OpenStream(server.address)
        with caplog.at_level(logging.WARNING, "vmad.trainer"), \
                pytest.raises(grpc.RpcError) as refused:
            third.send(batch("vm-2", 1))
        third.close()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 agents" in refused.value.details()
        assert server.stats.calls_refused["too many agents"] == 1
        assert any("RESOURCE_EXHAUSTED" in r.getMessage() for r in caplog.records)
        # A slot freed is a slot for the next agent.
        streams.pop().close()
        deadline = time.monotonic() + 5
        while server.stats.open_streams > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = OpenStream(server.address)
        streams.append(again)
        assert again.send(batch("vm-2", 1)).acked_seq == 1
        assert streams[0].send(batch("vm-0", 2)).acked_seq == 2  # the others never noticed
    finally:
        for stream in streams:
            stream.close()
        server.stop(0)


def test_idle_stream_is_closed_to_free_its_slot(tmp_path, small_checkpoint):
    server = trainer_server(tmp_path, small_checkpoint, stream_idle_s=0.4)
    stream = OpenStream(server.address)
    try:
        assert stream.send(batch("vm-idle", 1)).acked_seq == 1
        with pytest.raises(grpc.RpcError) as closed:
            time.sleep(1.0)
            stream.send(batch("vm-idle", 2))
        assert closed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no telemetry for 0.4 s" in closed.value.details()
        assert server.stats.calls_refused["idle"] == 1
        assert server.stats.open_streams == 0
    finally:
        stream.close()
        server.stop(0)


class SilentTrainer(telemetry_pb2_grpc.TelemetryServiceServicer):
    """Takes batches and never acks (a wedged trainer)."""

    def __init__(self) -> None:
        self.streams = 0

    def Stream(self, requests, context):
        self.streams += 1
        for _ in requests:
            pass
        return iter(())


def test_agent_reopens_a_stream_whose_acks_never_come(tmp_path, caplog):
    from tests.test_agent import agent_config, fake_source
    from vmad import security
    from vmad.edge_agent.agent import Agent

    config = security.SecurityConfig(insecure=True)
    server, _ = security.make_server(config, max_workers=8)
    silent = SilentTrainer()
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(silent, server)
    port = security.add_port(server, "127.0.0.1:0", config)
    server.start()
    agent = Agent(agent_config(tmp_path, port), source=fake_source())
    try:
        with caplog.at_level(logging.WARNING, "vmad.edge_agent.link"):
            agent.start()
            deadline = time.monotonic() + 15
            while silent.streams < 2 and time.monotonic() < deadline:
                agent.tick()
                time.sleep(0.05)
        assert silent.streams >= 2  # the agent gave up on the first stream and reopened
        assert any("no ack for batch" in r.getMessage() for r in caplog.records)
        assert agent.spool.rows > 0  # nothing acked, nothing deleted
    finally:
        agent.stop()
        server.stop(None)


@pytest.mark.slow
@pytest.mark.integration
def test_fleet_bench_small_mode_holds_more_agents_than_a_thread_pool():
    """150 agents, each with two calls open (300 calls: the old 64-thread server held
    32 agents), mTLS and a token each, every batch acked."""
    result = subprocess.run(
        [sys.executable, "bench/trainer_fleet.py", "--agents", "150", "--seconds", "6",
         "--period", "2", "--procs", "2"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.strip().splitlines()[2].split()
    assert row[:3] == ["150", "150", "150"], result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_ingest_bench_small_mode_prints_its_table():
    result = subprocess.run(
        [sys.executable, "bench/trainer_ingest.py", "--agents", "8", "--samples", "1",
         "--seconds", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert "batches/CPU-s" in lines[1]
    row = lines[2].split()
    assert row[:2] == ["8", "1"] and float(row[2]) > 0 and row[-1] == "0"
