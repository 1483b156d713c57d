"""Test helpers for the agent tests: a tiny real ONNX bundle (built with the `onnx`
package here, never in edge_agent) and a minimal real TelemetryService on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from vmad.bundle import BundleMetadata, sha256_hex
from vmad.protos.vmad.v1 import bundle_pb2, telemetry_pb2, telemetry_pb2_grpc
from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW
from vmad.windows import Normalizer


def tiny_onnx(metrics: int = len(DEFAULT_METRICS), window: int = DEFAULT_WINDOW,
              bias: float = 0.0, squash: bool = True) -> bytes:
    """score = sigmoid(mean of the normalized window + bias) (without the sigmoid when
    not `squash`: not a probability)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", metrics, window])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Add", ["m", "b"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["y"]) if squash
        else helper.make_node("Add", ["s", "b"], ["y"]),
    ]
    bias_init = helper.make_tensor("b", TensorProto.FLOAT, [], [bias])
    graph = helper.make_graph(nodes, "tiny", [x], [y], [bias_init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def tiny_bundle(version: str = "tiny-1", bias: float = 0.0, threshold: float = 0.5,
                metrics: tuple[str, ...] = DEFAULT_METRICS,
                window: int = DEFAULT_WINDOW, alarm_after: int = 1) -> tuple[str, bytes]:
    onnx_bytes = tiny_onnx(len(metrics), window, bias)
    metadata = BundleMetadata(
        version=version, model_kind="tiny", metrics=metrics, window=window,
        normalization=Normalizer(tuple(0.0 for _ in metrics), tuple(1.0 for _ in metrics),
                                 10.0),
        threshold=threshold, onnx_sha256=sha256_hex(onnx_bytes), alarm_after=alarm_after)
    return metadata.to_json(), onnx_bytes


class RecordingTrainer(telemetry_pb2_grpc.TelemetryServiceServicer):
    """Stores samples de-duplicated by (vm_id, seq), acks the highest contiguous seq, and
    pushes whatever bundles the test queues."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: dict[tuple[str, int], telemetry_pb2.Sample] = {}
        self.received = 0
        self.labels: dict[str, telemetry_pb2.LabelInterval] = {}
        self.verdicts = 0
        self.flagged: list[float] = []  # timestamps of anomalous verdicts
        self.acked: dict[str, int] = {}
        self.arrivals: list[int] = []  # every seq received, copies included, in order
        self.refuse_batches = 0  # answer this many batches with Ack.error first
        self.bundles: list[bundle_pb2.ModelBundle] = []
        self.metadata: list[dict[str, str]] = []

    def Stream(self, request_iterator: Iterator[telemetry_pb2.TelemetryBatch],
               context: grpc.ServicerContext) -> Iterator[telemetry_pb2.Ack]:
        self.metadata.append(dict(context.invocation_metadata()))
        for batch in request_iterator:
            with self.lock:
                if self.refuse_batches and batch.samples:
                    self.refuse_batches -= 1
                    # A misleading acked_seq too: an agent must not act on a refusal's.
                    yield telemetry_pb2.Ack(batch_id=batch.batch_id, error="bad batch: test",
                                            acked_seq=batch.samples[-1].seq)
                    continue
                self.arrivals += [sample.seq for sample in batch.samples]
                stored = 0
                for sample in batch.samples:
                    self.received += 1
                    key = (batch.vm_id, sample.seq)
                    if key not in self.samples:
                        self.samples[key] = sample
                        stored += 1
                self.verdicts += len(batch.verdicts)
                self.flagged += [v.timestamp for v in batch.verdicts if v.anomalous]
                for label in batch.labels:
                    self.labels[label.id] = label
                acked = max(self.acked.get(batch.vm_id, 0), batch.first_seq - 1)
                while (batch.vm_id, acked + 1) in self.samples:
                    acked += 1
                self.acked[batch.vm_id] = acked
            yield telemetry_pb2.Ack(batch_id=batch.batch_id, acked_seq=acked, stored=stored,
                                    duplicates=len(batch.samples) - stored)

    def Label(self, request: telemetry_pb2.LabelRequest,
              context: grpc.ServicerContext) -> telemetry_pb2.LabelReply:
        with self.lock:
            for label in request.labels:
                self.labels[label.id] = label
        return telemetry_pb2.LabelReply(accepted=len(request.labels))

    def WatchBundles(self, request: telemetry_pb2.WatchBundlesRequest,
                     context: grpc.ServicerContext) -> Iterator[bundle_pb2.ModelBundle]:
        sent = 0
        while context.is_active():
            with self.lock:
                pending = self.bundles[sent:]
            for bundle in pending:
                yield bundle
                sent += 1
            threading.Event().wait(0.05)
