"""The controller's gRPC service (protos/vmad/v1/control.proto): `Report` (a VM state ->
a decision) and `Fleet`.

The logic is in controller/core.py. Serves the standard gRPC health service. Bad
requests are answered with INVALID_ARGUMENT naming the problem and never stop the
process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import grpc

from vmad.certs import authorize
from vmad.config import ConfigError, load_config
from vmad.controller.budget import BUDGET_FACT, BudgetGuard
from vmad.controller.config import ControllerConfig
from vmad.controller.core import ControlCore
from vmad.controller.fleet_page import open_fleet_page
from vmad.controller.metrics import ControllerMetrics
from vmad.controller.policy import Policy, RulePolicy
from vmad.controller.registry import Registry
from vmad.controller.reward import reward
from vmad.http_endpoint import HttpEndpoint
from vmad.protos.vmad.v1 import control_pb2, control_pb2_grpc
from vmad.security import add_health, add_port, call_metadata, make_server, open_channel
from vmad.signals import run_until_signalled
from vmad.wire import (
    BadStateReport,
    decision_from_message,
    decision_to_message,
    state_from_message,
    state_to_message,
)

__all__ = ["CONTROL_SERVICE", "ControllerServer", "fetch_fleet", "serve_from_config"]

log = logging.getLogger("vmad.controller")

CONTROL_SERVICE = "vmad.v1.ControlService"


class _Servicer(control_pb2_grpc.ControlServiceServicer):
    def __init__(self, owner: ControllerServer) -> None:
        self.owner = owner

    def Report(self, request: control_pb2.StateReport,
               context: grpc.ServicerContext) -> control_pb2.Decision:
        return self.owner.report(request, context)

    def Fleet(self, request: control_pb2.FleetRequest,
              context: grpc.ServicerContext) -> control_pb2.FleetReply:
        return self.owner.fleet(request, context)


class ControllerServer:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.registry = Registry(config.database)
        try:
            policy = make_policy(config, self.registry)
        except Exception:
            self.registry.close()
            raise
        self.core = ControlCore(self.registry, policy,
                                reward_of=lambda d, s: reward(d, s, config.reward),
                                budget=BudgetGuard(config.budget))
        self.registry.put_fact(BUDGET_FACT, config.budget.model_dump())
        self.server, self.token_check = make_server(config.security, max_workers=16)
        self.metrics = ControllerMetrics(self.registry, config.database, self.token_check,
                                         self.core)
        self.fleet_page: HttpEndpoint | None = None
        control_pb2_grpc.add_ControlServiceServicer_to_server(_Servicer(self), self.server)
        self.health = add_health(self.server, [CONTROL_SERVICE], serving=False)
        self.port = add_port(self.server, config.listen, config.security)
        host = config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        self.health.set_serving(True)
        self.metrics.serve(self.config.metrics.listen)
        self.fleet_page = open_fleet_page(self.registry, self.config.fleet)

    def stop(self, grace: float = 5.0) -> None:
        self.health.set_serving(False)
        self.metrics.close()
        if self.fleet_page is not None:
            self.fleet_page.close()
        self.server.stop(grace).wait()
        self.core.policy.close()
        self.registry.close()

    def report(self, request: control_pb2.StateReport,
               context: grpc.ServicerContext) -> control_pb2.Decision:
        problem = authorize(context, "trainer", request.trainer_id,
                            self.token_check is not None) if request.trainer_id else None
        if problem:  # a trainer reports only as itself
            log.warning("state report refused: %s", problem)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        try:
            if not request.trainer_id:
                raise BadStateReport("missing_trainer_id", "state report has no trainer_id")
            state = state_from_message(request.state)
        except BadStateReport as error:
            log.warning("state report from trainer %r refused: %s", request.trainer_id[:100],
                        error)
            self.metrics.reports_refused.labels(error.reason).inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad state report: {error}")
        decision_id, decision = self.core.report(request.trainer_id, state, request.address)
        self.metrics.decided(decision)
        return decision_to_message(decision, decision_id)

    def fleet(self, request: control_pb2.FleetRequest,
              context: grpc.ServicerContext) -> control_pb2.FleetReply:
        reply = control_pb2.FleetReply(
            trainers=[t.trainer_id for t in self.registry.trainers()])
        for vm in self.registry.vms():
            entry = reply.vms.add(vm_id=vm.vm_id, trainer_id=vm.trainer_id,
                                  last_report=vm.last_seen)
            if vm.state is not None:
                entry.state.CopyFrom(state_to_message(vm.state))
            last = self.registry.decisions(vm.vm_id, limit=1)
            if last:
                entry.last_decision.CopyFrom(
                    decision_to_message(last[0].decision, last[0].decision_id))
        for d in self.registry.decisions(limit=min(int(request.decisions), 10_000)):
            reply.decisions.add(timestamp=d.at, vm_id=d.vm_id,
                                decision=decision_to_message(d.decision, d.decision_id))
        return reply


def make_policy(config: ControllerConfig, registry: Registry) -> Policy:
    """The configured policy. For `dqn` and `shadow`: the DQN going on from the learning
    state its registry checkpointed (controller/dqn.py's build_dqn_policy), else from
    the configured or shipped initial weights; the rules when there is no policy file
    at all. PyTorch is imported only here."""
    rules = RulePolicy(config.policy.rules)
    if config.policy.kind == "rules":
        return rules
    from vmad.controller.dqn import build_dqn_policy
    from vmad.controller.shadow import ShadowPolicy

    dqn = build_dqn_policy(config.policy.dqn, gamma=config.reward.gamma, store=registry,
                           fallback=rules)
    if dqn is None:
        return rules
    if config.policy.kind == "shadow":
        return ShadowPolicy(rules, dqn, registry, config.policy.shadow, config.reward)
    return dqn


def fetch_fleet(config_path: Path, decisions: int = 10, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the controller configured in `config_path` for its fleet, as the plain data
    `vmad status` prints. Counts of decisions and actions cover the decisions returned
    (the Fleet message carries no totals)."""

    config = load_config(config_path, ControllerConfig)
    # An operator's `vmad status` presents the controller's own identity and token.
    with open_channel(config.listen, config.security) as channel:
        reply = control_pb2_grpc.ControlServiceStub(channel).Fleet(
            control_pb2.FleetRequest(decisions=decisions), timeout=timeout,
            metadata=call_metadata(config.security))
    vms, actions = [], {}
    for vm in reply.vms:
        state = state_from_message(vm.state) if vm.state.vm_id else None
        last = decision_from_message(vm.last_decision) if vm.HasField("last_decision") \
            else None
        vms.append({"vm_id": vm.vm_id, "trainer_id": vm.trainer_id,
                    "last_seen": vm.last_report, "reports": "",
                    "model_version": state.model_version if state else "",
                    "last_action": last.action.value if last else "",
                    "last_reason": last.reason if last else "",
                    "state": state.to_dict() if state else None})
    records = []
    for d in reply.decisions:
        decision = decision_from_message(d.decision)
        actions[decision.action.value] = actions.get(decision.action.value, 0) + 1
        records.append({"decision_id": d.decision.decision_id, "at": d.timestamp,
                        "vm_id": d.vm_id, "action": decision.action.value,
                        "batches": decision.batches, "reason": decision.reason,
                        "policy": ""})
    last_seen = max((v["last_seen"] for v in vms), default=0.0)
    return {"trainers": [{"trainer_id": t, "address": "", "last_seen": last_seen}
                         for t in reply.trainers],
            "vms": vms, "decisions": records, "actions": actions,
            "counts": {"trainers": len(reply.trainers), "vms": len(vms),
                       "decisions": len(records)}}


def serve_from_config(path: Path) -> int:

    try:
        config = load_config(path, ControllerConfig)
    except (ConfigError, ValueError) as error:
        print(f"vmad controller: config error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from vmad.controller.dqn import PolicyFileError

    try:
        server = ControllerServer(config)
    except PolicyFileError as error:
        print(f"vmad controller: policy error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # unreadable certificates, a port in use
        print(f"vmad controller: cannot start: {error}", file=sys.stderr)
        return 2
    server.start()
    print(f"vmad controller: listening on {server.address}, registry {config.database}",
          flush=True)
    run_until_signalled(server.stop)
    return 0
