"""`vmad controller --config controller.yaml` and `vmad status`.

Heavy imports (grpc servers) happen inside the run functions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any, bench: Any) -> None:
    controller = commands.add_parser(
        "controller", help="run the central control module (fleet registry + policy)")
    controller.add_argument("--config", required=True, type=Path, help="controller.yaml")
    controller.set_defaults(run=run_controller)

    status = commands.add_parser("status", help="print the fleet as the controller sees it")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path,
                       help="controller.yaml: ask the running controller (its Fleet call)")
    where.add_argument("--database", type=Path,
                       help="read the registry file directly (works while it is stopped)")
    status.add_argument("--decisions", type=int, default=10,
                        help="also list this many recent decisions (default 10)")
    status.set_defaults(run=run_status)

    # `vmad demo` is the distributed demo (vmad/demo.py). An older, offline demo may still
    # be registered by trainer/commands.py; argparse refuses two, so the first one stays
    # until that registration is removed.
    if "demo" not in commands.choices:
        from vmad.demo import register as register_demo

        register_demo(commands)


def run_controller(args: argparse.Namespace) -> int:
    from controller.service import serve_from_config

    return serve_from_config(args.config)


def run_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.database is not None:
        from controller.registry import Registry

        if not args.database.is_file():
            from vmad.cli import UsageError

            raise UsageError(f"{args.database}: no such registry file")
        registry = Registry(args.database)
        try:
            fleet = fleet_from_registry(registry, args.decisions)
        finally:
            registry.close()
    else:
        from controller.service import fetch_fleet

        fleet = fetch_fleet(args.config, args.decisions)
    Console().print(*render_fleet(fleet))
    return 0


def fleet_from_registry(registry: Any, decisions: int) -> dict[str, Any]:
    """The fleet as plain data (what the Fleet call returns too)."""
    return {
        "trainers": [vars(t) for t in registry.trainers()],
        "vms": [{"vm_id": v.vm_id, "trainer_id": v.trainer_id, "last_seen": v.last_seen,
                 "reports": v.reports, "model_version": v.model_version,
                 "last_action": v.last_action.value if v.last_action else "",
                 "last_reason": v.last_reason,
                 "state": v.state.to_dict() if v.state else None} for v in registry.vms()],
        "decisions": [{"decision_id": d.decision_id, "at": d.at, "vm_id": d.vm_id,
                       "action": d.decision.action.value, "batches": d.decision.batches,
                       "reason": d.decision.reason, "policy": d.policy}
                      for d in registry.decisions(limit=decisions)],
        "counts": registry.counts(),
        "actions": registry.action_counts(),
    }


def _ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def render_fleet(fleet: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    vms = Table(title="VMs")
    for column in ("VM", "trainer", "seen", "reports", "model", "labelled", "F1", "accuracy",
                   "drift", "flagged", "last action", "why"):
        vms.add_column(column, justify="right" if column in
                       ("reports", "labelled", "F1", "accuracy", "drift", "flagged") else "left")
    for vm in fleet["vms"]:
        state = vm.get("state") or {}
        vms.add_row(vm["vm_id"], vm["trainer_id"], _ago(vm["last_seen"]), str(vm["reports"]),
                    vm["model_version"], str(state.get("labelled_windows", "")),
                    f"{state.get('f1', 0):.2f}", f"{state.get('accuracy', 0):.2f}",
                    f"{state.get('drift', 0):.2f}", f"{state.get('flagged_share', 0):.2f}",
                    vm["last_action"], vm["last_reason"])
    trainers = Table(title="Trainers")
    for column in ("trainer", "address", "last seen"):
        trainers.add_column(column)
    for trainer in fleet["trainers"]:
        trainers.add_row(trainer["trainer_id"], trainer["address"], _ago(trainer["last_seen"]))
    decisions = Table(title="Recent decisions")
    for column in ("#", "VM", "action", "batches", "why", "policy"):
        decisions.add_column(column)
    for d in fleet["decisions"]:
        decisions.add_row(str(d["decision_id"]), d["vm_id"], d["action"], str(d["batches"]),
                          d["reason"], d["policy"])
    counts = fleet["counts"]
    actions = ", ".join(f"{k} {v}" for k, v in sorted(fleet["actions"].items())) or "none"
    summary = (f"{counts['trainers']} trainers, {counts['vms']} VMs, {counts['decisions']} "
               f"decisions ({actions}), {counts.get('transitions', '?')} transitions")
    return [trainers, vms, decisions, summary]
