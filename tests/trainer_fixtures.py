"""Test helpers: a real TrainerServer on loopback (in this process, real gRPC) with a
small model, and a telemetry stream held open from the client side."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np

from vmad.protos.vmad.v1 import telemetry_pb2 as pb
from vmad.protos.vmad.v1 import telemetry_pb2_grpc
from vmad.schema import DEFAULT_METRICS

WINDOW = 8


def small_checkpoint(kind: str = "mlp", window: int = WINDOW, threshold: float = 0.5,
                     metrics: tuple[str, ...] = DEFAULT_METRICS):
    """An untrained `kind` network over `metrics` (the default ones unless given), with a
    fixed normalizer (weights as torch's current seed draws them)."""
    from vmad.trainer.checkpoint import Checkpoint
    from vmad.trainer.models import build_model
    from vmad.windows import Normalizer

    normalizer = Normalizer.fit(
        np.random.default_rng(0).normal(30, 3, size=(200, len(metrics))))
    return Checkpoint(build_model(kind, len(metrics), window), kind, tuple(metrics), window,
                      normalizer, threshold)


def trainer_server(tmp_path: Path, checkpoint, **serving):
    from vmad.trainer.config import TrainerConfig
    from vmad.trainer.service import TrainerServer

    config = TrainerConfig.model_validate({
        "trainer_id": "t", "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
        "serving": serving, "security": {"insecure": True}})
    server = TrainerServer(config, checkpoint)
    server.start()
    return server


def batch(vm: str, seq: int) -> pb.TelemetryBatch:
    return pb.TelemetryBatch(vm_id=vm, metrics=list(DEFAULT_METRICS), batch_id=seq,
                             samples=[pb.Sample(seq=seq, timestamp=time.time(),
                                                values=[1.0, 2.0, 3.0, 4.0])])


class OpenStream:
    """A stream held open from the client side, batches written one at a time."""

    def __init__(self, address: str) -> None:
        import queue

        self.channel = grpc.insecure_channel(address)
        self.outbox: queue.Queue = queue.Queue()

        def requests():
            while (item := self.outbox.get()) is not None:
                yield item

        self.replies = telemetry_pb2_grpc.TelemetryServiceStub(self.channel).Stream(
            requests(), timeout=30)

    def send(self, message: pb.TelemetryBatch) -> pb.Ack:
        self.outbox.put(message)
        return next(self.replies)

    def close(self) -> None:
        self.outbox.put(None)
        self.replies.cancel()
        self.channel.close()


