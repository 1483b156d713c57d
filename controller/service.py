"""The controller's gRPC service: `Report` (a VM state -> a decision) and `Fleet`.

Speaks the interim JSON wire (trainer/wire.py) until protos/ land; the logic is in
controller/core.py. Serves the standard gRPC health service. Bad requests are answered
with INVALID_ARGUMENT naming the problem and never stop the process.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from controller.config import ControllerConfig
from controller.core import ControlCore
from controller.policy import build_policy
from controller.registry import Registry
from controller.reward import reward
from trainer.state import VMState
from trainer.wire import CONTROL_SERVICE, decode, encode, server_options

__all__ = ["ControllerServer", "fetch_fleet", "serve_from_config"]

log = logging.getLogger("vmad.controller")


class ControllerServer:
    def __init__(self, config: ControllerConfig) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self.config = config
        self.registry = Registry(config.database)
        settings = config.reward
        self.core = ControlCore(
            self.registry, build_policy(config.policy.kind, config.policy.rules.settings()),
            reward_of=lambda d, s: reward(d, s, batch_budget=settings.batch_budget,
                                          push_cost=settings.push_cost))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  options=server_options())
        handlers = {
            "Report": grpc.unary_unary_rpc_method_handler(
                self._report, request_deserializer=decode, response_serializer=encode),
            "Fleet": grpc.unary_unary_rpc_method_handler(
                self._fleet, request_deserializer=decode, response_serializer=encode),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(CONTROL_SERVICE, handlers),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(config.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        host = config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    def start(self) -> None:
        self.server.start()
        self.health.set("", self._serving)
        self.health.set(CONTROL_SERVICE, self._serving)

    def stop(self, grace: float = 5.0) -> None:
        self.health.set("", self._not_serving)
        self.server.stop(grace).wait()
        self.registry.close()

    def _report(self, request: Any, context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            trainer_id = str(request["trainer_id"])
            state = VMState.from_dict(request["state"])
        except (KeyError, TypeError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad state report: {error!r}")
        decision_id, decision = self.core.report(trainer_id, state,
                                                 str(request.get("address", "")))
        return {"decision_id": decision_id, "action": decision.action.value,
                "batches": decision.batches, "reason": decision.reason}

    def _fleet(self, request: Any, context: grpc.ServicerContext) -> dict[str, Any]:
        from controller.commands import fleet_from_registry

        limit = int((request or {}).get("decisions", 10))
        return fleet_from_registry(self.registry, max(0, min(limit, 1000)))


def fetch_fleet(config_path: Path, decisions: int = 10, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the controller configured in `config_path` for its fleet."""
    from trainer.config_loading import load_component_config
    from trainer.wire import method

    config = load_component_config(config_path, ControllerConfig)
    with grpc.insecure_channel(config.listen) as channel:
        call = channel.unary_unary(method(CONTROL_SERVICE, "Fleet"),
                                   request_serializer=encode, response_deserializer=decode)
        return call({"decisions": decisions}, timeout=timeout)


def run_until_signalled(stop: Callable[[], None]) -> None:
    """Block until SIGTERM/SIGINT, then call `stop` (graceful shutdown)."""
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    done.wait()
    stop()


def serve_from_config(path: Path) -> int:
    from trainer.config_loading import ConfigFileError, load_component_config

    try:
        config = load_component_config(path, ControllerConfig)
    except (ConfigFileError, ValueError) as error:
        print(f"vmad controller: config error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = ControllerServer(config)
    server.start()
    print(f"vmad controller: listening on {server.address}, registry {config.database}",
          flush=True)
    run_until_signalled(server.stop)
    return 0
