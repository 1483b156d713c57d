"""No single value stops a VM's telemetry: bad samples are refused one by one on a real
trainer over gRPC, bad bundles never install, a bundle that fails while scoring is
rolled back, agent worker threads are restarted, missing TLS files are a one-line
start-up error."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.agent_fixtures import tiny_bundle, tiny_onnx
from tests.trainer_fixtures import OpenStream, trainer_server
from vmad.bundle import Bundle, BundleError, BundleMetadata, sha256_hex
from vmad.edge_agent.detector import BundleSlot, WindowScorer
from vmad.edge_agent.sampler import METRICS
from vmad.protos.vmad.v1 import telemetry_pb2 as pb
from vmad.protos.vmad.v1 import telemetry_pb2_grpc
from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW
from vmad.windows import Normalizer

ROOT = Path(__file__).resolve().parents[1]


def test_bad_values_are_refused_alone_and_the_stream_goes_on(tmp_path, small_checkpoint):
    server = trainer_server(tmp_path, small_checkpoint)
    stream = OpenStream(server.address)
    now = time.time()
    good = [1.0, 2.0, 3.0, 4.0]
    try:
        ack = stream.send(pb.TelemetryBatch(
            vm_id="vm-1", metrics=list(DEFAULT_METRICS), batch_id=1, samples=[
                pb.Sample(seq=1, timestamp=now, values=good),
                pb.Sample(seq=2, timestamp=float("nan"), values=good),
                pb.Sample(seq=3, timestamp=now, values=[1.0, float("inf"), 3.0, 4.0]),
                pb.Sample(seq=4, timestamp=now, values=[1e39, 2.0, 3.0, 4.0]),
                pb.Sample(seq=5, timestamp=now, values=[1.0]),
                pb.Sample(seq=2**63, timestamp=now, values=good),
                pb.Sample(seq=2**64 - 1, timestamp=now, values=good),
                pb.Sample(seq=6, timestamp=now + 10 * 86400, values=good),
                pb.Sample(seq=7, timestamp=now, values=good)],
            verdicts=[pb.Verdict(timestamp=now, score=float("nan")),
                      pb.Verdict(timestamp=now, score=1.5),
                      pb.Verdict(timestamp=now, score=0.3, model_version="v")],
            labels=[pb.LabelInterval(start=now, end=now - 5),
                    pb.LabelInterval(start=float("inf"), end=now)]))
        assert not ack.error
        assert (ack.stored, ack.acked_seq, ack.lost) == (2, 7, 0)
        assert ack.refused == 7 + 2 + 2
        assert ack.refused_reason
        refused = server.stats.refused
        assert refused["seq out of range"] == 2
        assert refused["NaN or infinite metric value"] == 2
        assert refused["timestamp not a plausible Unix time"] == 2
        assert refused["sample without one value per metric"] == 1
        assert refused["verdict score not a finite number in [0, 1]"] == 2
        # The stream goes on.
        ack = stream.send(pb.TelemetryBatch(vm_id="vm-1", metrics=list(DEFAULT_METRICS),
                                            batch_id=2, samples=[pb.Sample(
                                                seq=8, timestamp=now, values=good)]))
        assert (ack.error, ack.stored, ack.acked_seq) == ("", 1, 8)
        ack = stream.send(pb.TelemetryBatch(vm_id="v" * 200, metrics=list(DEFAULT_METRICS)))
        assert "vm_id is 200 characters" in ack.error
        counters = server.store.counters("vm-1")
        # Refused samples with a usable seq (2..6) are counted per VM, never as lost.
        assert (counters.received, counters.lost, counters.refused) == (3, 0, 5)
        assert len(server.store.verdicts("vm-1")[0]) == 1
    finally:
        stream.close()
        server.stop(0)


def test_label_call_refuses_bad_intervals_by_name(tmp_path, small_checkpoint):
    server = trainer_server(tmp_path, small_checkpoint)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Label(pb.LabelRequest(vm_id="vm-1", labels=[
                    pb.LabelInterval(start=float("nan"), end=1.0)]), timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "plausible" in refused.value.details()
            reply = stub.Label(pb.LabelRequest(vm_id="vm-1", labels=[
                pb.LabelInterval(start=1.0, end=2.0, anomalous=True)]), timeout=10)
            assert reply.accepted == 1
    finally:
        server.stop(0)


def _bundle_parts(onnx_bytes: bytes, version: str) -> tuple[str, bytes]:
    metadata = BundleMetadata(
        version=version, model_kind="tiny", metrics=DEFAULT_METRICS, window=DEFAULT_WINDOW,
        normalization=Normalizer((30.0,) * 4, (3.0,) * 4, 10.0), threshold=0.5,
        onnx_sha256=sha256_hex(onnx_bytes))
    return metadata.to_json(), onnx_bytes


def failing_onnx() -> bytes:
    """Loads, but fails at run time: reshapes every batch to 7 values."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                      ["batch", len(DEFAULT_METRICS), DEFAULT_WINDOW])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [7])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
                              [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("onnx_bytes, problem", [
    (tiny_onnx(bias=float("nan")), "not a finite probability"),
    (tiny_onnx(bias=0.0, squash=False), "not a finite probability"),  # raw mean: outside [0, 1]
    (failing_onnx(), "fails to run"),
])
def test_bundle_that_is_not_a_working_probability_is_refused(tmp_path, onnx_bytes, problem):
    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("good"))
    with pytest.raises(BundleError, match=problem):
        slot.install(*_bundle_parts(onnx_bytes, "bad"), sha256_hex(onnx_bytes))
    assert slot.current.metadata.version == "good" and slot.rejected == 1
    # The same files in bundle_dir/current do not stop an agent from starting.
    bad = tmp_path / "other" / "current"
    metadata, data = _bundle_parts(onnx_bytes, "bad")
    bad.mkdir(parents=True)
    (bad / "bundle.json").write_text(metadata)
    (bad / "model.onnx").write_bytes(data)
    fresh = BundleSlot(tmp_path / "other", METRICS, DEFAULT_WINDOW)
    assert fresh.load_initial(None).metadata.version != "bad"


def test_bundle_failing_while_scoring_rolls_back_and_scoring_goes_on(tmp_path):
    slot = BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW)
    slot.install(*tiny_bundle("v1"))
    slot.install(*tiny_bundle("v2", bias=1.0))
    detector = WindowScorer(slot)
    broken = slot.current
    assert isinstance(broken, Bundle)

    def fails(raw):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    broken.score_window = fails  # type: ignore[method-assign]
    results = [detector.push([10.0, 40.0, 1.0, 1.0]) for _ in range(DEFAULT_WINDOW + 1)]
    assert results[DEFAULT_WINDOW - 1] is None  # the failing step gives no verdict...
    assert results[DEFAULT_WINDOW].version == "v1"  # ...the next is scored by the previous
    assert slot.run_failures == 1 and slot.current.metadata.version == "v1"
    assert "failed to score" in slot.last_error


def test_agent_worker_thread_is_restarted_and_counted(tmp_path):
    from tests.test_agent import agent_config, fake_source
    from vmad.edge_agent.agent import Agent

    agent = Agent(agent_config(tmp_path, None), source=fake_source())
    calls: list[float] = []
    done = threading.Event()

    def flaky() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("database or disk is full")
        done.set()
        agent.stop_event.wait()

    thread = agent._supervised("flaky", flaky)
    thread.start()
    try:
        assert done.wait(15)
        assert agent.thread_restarts == {"flaky": 2}
        text = agent.metrics.registry.get_sample_value(
            "vmad_agent_thread_restarts_total", {"thread": "flaky"})
        assert text == 2
        assert calls[2] - calls[1] >= 0.9  # with a backoff, not a busy loop
    finally:
        agent.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_missing_tls_file_is_one_line_at_start(tmp_path):
    import yaml

    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "vm_id": "vm-1", "trainer": {"address": "127.0.0.1:1"},
        "spool": {"path": str(tmp_path / "spool.db")}, "metrics": {"listen": None},
        "security": {"ca": str(tmp_path / "missing-ca.pem"), "cert": str(tmp_path / "c.pem"),
                     "key": str(tmp_path / "k.pem")}}))
    result = subprocess.run([sys.executable, "-m", "vmad.cli", "agent", "--config",
                             str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "security.ca: cannot read" in lines[0], result.stderr
    assert "missing-ca.pem" in lines[0]
