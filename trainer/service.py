"""The trainer's gRPC service: telemetry stream with acks, labels, bundle push; and the
client side that reports VM states to the controller.

Speaks the interim JSON wire (trainer/wire.py) until protos/ land; the logic is in
trainer/core.py. A bad batch is answered with an error message on the stream (counted)
and the stream stays open: one agent's bug never stops the trainer or other agents.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from controller.policy import Action, Decision
from trainer.config import TrainerConfig
from trainer.core import TrainerCore
from trainer.state import VMState
from trainer.store import LabelInterval, TelemetryStore
from trainer.wire import (
    CONTROL_SERVICE,
    TELEMETRY_SERVICE,
    decode,
    encode,
    method,
    server_options,
)

__all__ = ["TrainerServer", "serve_from_config"]

log = logging.getLogger("vmad.trainer")


def _labels(raw: Any) -> list[LabelInterval]:
    return [LabelInterval(float(s), float(e), bool(a), str(src)) for s, e, a, src in raw or ()]


class TrainerServer:
    def __init__(self, config: TrainerConfig, checkpoint: Any | None = None) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from trainer.transfer import VMModels

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
                               config.training.transfer(), seed=config.training.seed)
        self.core = TrainerCore(self.store, self.models)
        self.bad_batches = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                                  options=server_options())
        handlers = {
            "Telemetry": grpc.stream_stream_rpc_method_handler(
                self._telemetry, request_deserializer=decode, response_serializer=encode),
            "Label": grpc.unary_unary_rpc_method_handler(
                self._label, request_deserializer=decode, response_serializer=encode),
            "WatchBundles": grpc.unary_stream_rpc_method_handler(
                self._watch_bundles, request_deserializer=decode, response_serializer=encode),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TELEMETRY_SERVICE, handlers),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(config.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
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
            self._channel = grpc.insecure_channel(link.address, options=server_options())
            call = self._channel.unary_unary(method(CONTROL_SERVICE, "Report"),
                                             request_serializer=encode,
                                             response_deserializer=decode)

            def report(state: VMState) -> Decision:
                answer = call({"trainer_id": self.config.trainer_id, "address": self.address,
                               "state": state.to_dict()}, timeout=link.timeout_s)
                return Decision(Action(answer["action"]), int(answer["batches"]),
                                str(answer.get("reason", "")))

        self.core.start(report, link.report_interval_s)

    def stop(self, grace: float = 5.0) -> None:
        self.health.set("", self._not_serving)
        self.core.stop()
        self.server.stop(grace).wait()
        if self._channel is not None:
            self._channel.close()
        self.store.close()

    # -- handlers ---------------------------------------------------------------------

    def _telemetry(self, requests: Iterator[Any],
                   context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        for batch in requests:
            try:
                vm_id = str(batch["vm_id"])
                samples = batch.get("samples") or []
                seqs = np.array([s[0] for s in samples], dtype=np.int64)
                ts = np.array([s[1] for s in samples], dtype=np.float64)
                values = np.array([s[2] for s in samples], dtype=np.float32).reshape(
                    len(samples), len(batch["metrics"]))
                if not np.all(np.isfinite(values)):
                    raise ValueError("batch holds a NaN or infinite metric value")
                verdicts = [(float(t), float(s), bool(a), str(v))
                            for t, s, a, v in batch.get("verdicts") or ()]
                result = self.core.ingest(vm_id, batch["metrics"], seqs, ts, values,
                                          verdicts=verdicts, labels=_labels(batch.get("labels")))
            except (KeyError, TypeError, ValueError, IndexError) as error:
                self.bad_batches += 1
                log.warning("bad telemetry batch: %s", error)
                yield {"error": f"bad batch: {error}"}
                continue
            yield {"acked": result.acked, "stored": result.stored,
                   "duplicates": result.duplicates, "lost": result.lost}

    def _label(self, request: Any, context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            self.core.add_labels(str(request["vm_id"]), _labels(request["labels"]))
        except (KeyError, TypeError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad labels: {error}")
        return {"ok": True}

    def _watch_bundles(self, request: Any,
                       context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        vm_id = str(request.get("vm_id", ""))
        running = str(request.get("running_version", ""))
        while context.is_active():
            bundle = self.core.next_bundle(vm_id, running, timeout=1.0)
            if bundle is None:
                continue
            running = bundle.metadata.version
            self.core.bundle_sent()
            yield {"version": running, "metadata": bundle.metadata.to_json(),
                   "onnx_b64": base64.b64encode(bundle.onnx_bytes).decode()}


def _load_pretrained(config: TrainerConfig) -> Any:
    from trainer.checkpoint import load_checkpoint, load_default_checkpoint

    if config.model.pretrained is not None:
        return load_checkpoint(config.model.pretrained)
    return load_default_checkpoint()


def serve_from_config(path: Path) -> int:
    from controller.service import run_until_signalled
    from trainer.config_loading import ConfigFileError, load_component_config

    try:
        config = load_component_config(path, TrainerConfig)
    except (ConfigFileError, ValueError) as error:
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
