"""The trainer's gRPC service (protos/vmad/v1/telemetry.proto: telemetry stream with
acks, labels, bundle push) and the client side that reports VM states to the
controller (control.proto).

The logic is in trainer/core.py. A bad batch is answered with an Ack whose `error`
names the problem (counted) and the stream stays open: one agent's bug never stops the
trainer or other agents.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from vmad.actions import Decision
from vmad.config import ConfigError, load_config
from vmad.protos.vmad.v1 import (
    bundle_pb2,
    control_pb2,
    control_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from vmad.security import (
    CLIENT_ID_HEADER,
    add_port,
    call_metadata,
    make_server,
    open_channel,
)
from vmad.state import VMState
from vmad.trainer.config import TrainerConfig
from vmad.trainer.core import TrainerCore
from vmad.trainer.store import TelemetryStore
from vmad.wire import decision_from_message, labels_from_messages, state_to_message

__all__ = ["TELEMETRY_SERVICE", "TrainerServer", "serve_from_config"]

log = logging.getLogger("vmad.trainer")

TELEMETRY_SERVICE = "vmad.v1.TelemetryService"


class _Servicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, owner: TrainerServer) -> None:
        self.owner = owner

    def Stream(self, requests: Iterator[telemetry_pb2.TelemetryBatch],
               context: grpc.ServicerContext) -> Iterator[telemetry_pb2.Ack]:
        return self.owner.stream(requests, context)

    def WatchBundles(self, request: telemetry_pb2.WatchBundlesRequest,
                     context: grpc.ServicerContext) -> Iterator[bundle_pb2.ModelBundle]:
        return self.owner.watch_bundles(request, context)

    def Label(self, request: telemetry_pb2.LabelRequest,
              context: grpc.ServicerContext) -> telemetry_pb2.LabelReply:
        return self.owner.label(request, context)


class TrainerServer:
    def __init__(self, config: TrainerConfig, checkpoint: Any | None = None) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from vmad.trainer.transfer import VMModels

        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            checkpoint = _load_pretrained(config)
        self.store = TelemetryStore(
            data_dir / "store.sqlite", max_samples=config.store.max_samples_per_vm,
            max_verdicts=config.store.max_verdicts_per_vm,
            max_labels=config.store.max_labels_per_vm)
        self.models = VMModels(checkpoint, self.store, data_dir / "models",
                               config.training, seed=config.training.seed,
                               adaptation=config.adaptation)
        self.core = TrainerCore(self.store, self.models)
        self.bad_batches = 0
        self.server, self.token_check = make_server(config.security, max_workers=64)
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(_Servicer(self), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = add_port(self.server, config.listen, config.security)
        self.address = f"{config.listen.rsplit(':', 1)[0]}:{self.port}"
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self._channel: grpc.Channel | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        self.health.set("", self._serving)
        self.health.set(TELEMETRY_SERVICE, self._serving)
        link = self.config.controller
        report = None
        if link.address:
            self._channel = open_channel(link.address, self.config.security)
            stub = control_pb2_grpc.ControlServiceStub(self._channel)
            metadata = call_metadata(self.config.security)

            def report(state: VMState) -> Decision:
                answer = stub.Report(control_pb2.StateReport(
                    trainer_id=self.config.trainer_id, address=self.address,
                    state=state_to_message(state)), timeout=link.timeout_s, metadata=metadata)
                return decision_from_message(answer)

        self.core.start(report, link.report_interval_s)

    def stop(self, grace: float = 5.0) -> None:
        self.health.set("", self._not_serving)
        self.core.stop()
        self.server.stop(grace).wait()
        if self._channel is not None:
            self._channel.close()
        self.store.close()

    # -- handlers ---------------------------------------------------------------------

    def stream(self, requests: Iterator[telemetry_pb2.TelemetryBatch],
               context: grpc.ServicerContext) -> Iterator[telemetry_pb2.Ack]:
        client_id = dict(context.invocation_metadata() or ()).get(CLIENT_ID_HEADER)
        for batch in requests:
            try:
                if not batch.vm_id:
                    raise ValueError("batch has no vm_id")
                if self.token_check is not None and batch.vm_id != client_id:
                    # The token vouches for the client id; it may only speak for itself.
                    raise ValueError(f"client {client_id!r} may not send for {batch.vm_id!r}")
                n, m = len(batch.samples), len(batch.metrics)
                seqs = np.fromiter((s.seq for s in batch.samples), dtype=np.int64, count=n)
                ts = np.fromiter((s.timestamp for s in batch.samples), dtype=np.float64,
                                 count=n)
                rows = [list(s.values) for s in batch.samples]
                if any(len(r) != m for r in rows):
                    raise ValueError(f"a sample does not have one value per metric ({m})")
                values = np.array(rows, dtype=np.float32).reshape(n, m)
                if not np.all(np.isfinite(values)):
                    raise ValueError("batch holds a NaN or infinite metric value")
                verdicts = [(v.timestamp, v.score, v.anomalous, v.model_version,
                             tuple(v.contributions)) for v in batch.verdicts]
                result = self.core.ingest(batch.vm_id, tuple(batch.metrics), seqs, ts, values,
                                          verdicts=verdicts,
                                          labels=labels_from_messages(batch.labels))
            except ValueError as error:
                self.bad_batches += 1
                log.warning("bad telemetry batch from %r: %s", batch.vm_id, error)
                yield telemetry_pb2.Ack(batch_id=batch.batch_id, error=f"bad batch: {error}",
                                        acked_seq=max(0, self.store.acked(batch.vm_id) or 0))
                continue
            yield telemetry_pb2.Ack(batch_id=batch.batch_id, acked_seq=max(0, result.acked),
                                    stored=result.stored, duplicates=result.duplicates,
                                    lost=result.lost)

    def label(self, request: telemetry_pb2.LabelRequest,
              context: grpc.ServicerContext) -> telemetry_pb2.LabelReply:
        try:
            labels = labels_from_messages(request.labels)
            self.core.add_labels(request.vm_id, labels)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad labels: {error}")
        return telemetry_pb2.LabelReply(accepted=len(labels))

    def watch_bundles(self, request: telemetry_pb2.WatchBundlesRequest,
                      context: grpc.ServicerContext) -> Iterator[bundle_pb2.ModelBundle]:
        running = request.running_version
        while context.is_active():
            bundle = self.core.next_bundle(request.vm_id, running, timeout=1.0)
            if bundle is None:
                continue
            running = bundle.metadata.version
            self.core.bundle_sent()
            yield bundle_pb2.ModelBundle(
                version=running, sha256=bundle.metadata.onnx_sha256, onnx=bundle.onnx_bytes,
                metadata_json=bundle.metadata.to_json(),
                vm_id=request.vm_id if bundle is not self.models.pretrained_bundle else "")


def _load_pretrained(config: TrainerConfig) -> Any:
    from vmad.trainer.checkpoint import load_checkpoint, load_default_checkpoint

    if config.model.pretrained is not None:
        return load_checkpoint(config.model.pretrained)
    return load_default_checkpoint()


def serve_from_config(path: Path) -> int:
    from vmad.signals import run_until_signalled

    try:
        config = load_config(path, TrainerConfig)
    except (ConfigError, ValueError) as error:
        print(f"vmad trainer: config error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(config.training.threads)
    try:
        server = TrainerServer(config)
    except Exception as error:
        print(f"vmad trainer: cannot start: {error}", file=sys.stderr)
        return 1
    server.start()
    print(f"vmad trainer: listening on {server.address}, data in {config.data_dir}",
          flush=True)
    run_until_signalled(server.stop)
    return 0
