"""`vmad agent`, `vmad inject`, `vmad label` and `vmad bench agent-overhead`.

Registered by edge_agent/commands.py. Imports of grpc, onnxruntime and psutil happen
inside the run functions only.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

__all__ = ["register"]


def register(commands: Any, bench: Any) -> None:
    agent = commands.add_parser("agent", help="run the edge agent on this VM")
    agent.add_argument("--config", required=True, help="agent.yaml")
    agent.add_argument("--duration", type=float, default=None,
                       help="stop after this many seconds (default: run until signalled)")
    agent.add_argument("--log-level", default="INFO")
    agent.set_defaults(run=_run_agent)

    from vmad.edge_agent.inject import FAULTS

    inject = commands.add_parser("inject", help="really cause a fault on this machine and "
                                 "record it as a labelled interval")
    inject.add_argument("fault", choices=FAULTS)
    inject.add_argument("--duration", type=float, required=True, help="seconds")
    inject.add_argument("--intensity", type=float, default=0.5, help="in (0, 1] of the cap")
    inject.add_argument("--config", default=None,
                        help="agent.yaml: labels file, VM id and caps come from it")
    inject.add_argument("--labels-file", default=None, help="overrides the config's")
    inject.set_defaults(run=_run_inject)

    label = commands.add_parser("label", help="mark an interval anomalous or normal")
    label.add_argument("--vm", required=True, help="VM id")
    label.add_argument("--start", type=float, required=True, help="Unix seconds")
    label.add_argument("--end", type=float, required=True, help="Unix seconds")
    which = label.add_mutually_exclusive_group(required=True)
    which.add_argument("--anomalous", action="store_true")
    which.add_argument("--normal", action="store_true")
    label.add_argument("--kind", default="operator", help="free text shown with the label")
    label.add_argument("--config", default=None,
                       help="agent.yaml: send to its trainer with its security settings")
    label.add_argument("--trainer", default=None, help="trainer host:port (overrides config)")
    label.add_argument("--insecure", action="store_true",
                       help="plaintext, no token (only when calling --trainer without --config)")
    label.add_argument("--labels-file", default=None,
                       help="append to this agent labels file instead of calling a trainer")
    label.set_defaults(run=_run_label)

    overhead = bench.add_parser("agent-overhead",
                                help="RSS, CPU share and inference latency of the real agent")
    overhead.add_argument("--quick", action="store_true", help="about 20 s instead of 2 min")
    overhead.add_argument("--duration", type=float, default=None)
    overhead.add_argument("--interval", type=float, default=None,
                          help="the agent's sampling interval (default 5 s; 0.5 s scores "
                               "windows within a minute, so RSS includes scoring)")
    overhead.add_argument("--own-metrics", nargs="*", default=[], metavar="NAME",
                          help="the agent also samples these (agent.yaml's own_metrics; "
                               "`all`: every one it knows)")
    overhead.set_defaults(run=_run_overhead)


def _load(path: str) -> Any:
    from vmad.config import ConfigError, load_config
    from vmad.edge_agent.config import AgentConfig
    from vmad.errors import UsageError

    try:
        return load_config(path, AgentConfig)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _load(args.config)
    from vmad.edge_agent.agent import Agent
    from vmad.errors import UsageError

    if config.trainer.address and not config.security.insecure:
        from vmad.security import channel_credentials

        try:  # a missing or unreadable TLS file is a one-line error now, not a dead thread
            channel_credentials(config.security)
        except ValueError as error:
            raise UsageError(f"{args.config}: {error}") from None
    agent = Agent(config)
    # SIGTERM (systemd, Kubernetes) stops as cleanly as Ctrl-C: spool closed, calls ended.
    signal.signal(signal.SIGTERM, lambda *_: agent.stop_event.set())
    agent.run(args.duration)
    return 0


def _run_inject(args: argparse.Namespace) -> int:
    from vmad.edge_agent.config import InjectSettings
    from vmad.edge_agent.inject import inject
    from vmad.errors import UsageError

    settings, vm_id = InjectSettings(), None
    if args.config:
        config = _load(args.config)
        settings, vm_id = config.inject, config.vm_id
    labels_file = args.labels_file or settings.labels_file
    try:
        label = inject(args.fault, args.duration, args.intensity, labels_file,
                       settings.max_memory_share, settings.max_disk_share,
                       settings.max_disk_bytes, vm_id)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(json.dumps(label))
    return 0


def _run_label(args: argparse.Namespace) -> int:
    from vmad.errors import UsageError

    if args.end <= args.start:
        raise UsageError("--end must be after --start")
    anomalous = bool(args.anomalous)
    if args.labels_file:
        from vmad.edge_agent.inject import append_label

        item = append_label(args.labels_file, args.start, args.end, anomalous, args.kind,
                            "operator", args.vm)
        print(json.dumps(item))
        return 0
    import uuid

    from vmad import security
    from vmad.protos.vmad.v1 import telemetry_pb2, telemetry_pb2_grpc

    config = _load(args.config) if args.config else None
    address = args.trainer or (config.trainer.address if config else None)
    if not address:
        raise UsageError("give --trainer, --config with trainer.address, or --labels-file")
    if config is None and not args.insecure:
        raise UsageError("give --config (certificates and token) or --insecure")
    sec = config.security if config else security.SecurityConfig(insecure=True)
    request = telemetry_pb2.LabelRequest(vm_id=args.vm, labels=[telemetry_pb2.LabelInterval(
        start=args.start, end=args.end, anomalous=anomalous, kind=args.kind,
        source=telemetry_pb2.LABEL_SOURCE_OPERATOR, id=uuid.uuid4().hex)])
    import grpc

    with security.open_channel(address, sec) as channel:
        try:
            reply = telemetry_pb2_grpc.TelemetryServiceStub(channel).Label(
                request, timeout=10, metadata=security.call_metadata(sec))
        except grpc.RpcError as error:
            print(f"vmad label: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"accepted {reply.accepted} label(s) for {args.vm} at {time.strftime('%X')}")
    return 0


def _run_overhead(args: argparse.Namespace) -> int:
    from vmad.edge_agent.overhead import main

    argv = ["--quick"] if args.quick else []
    if args.duration:
        argv += ["--duration", str(args.duration)]
    if args.interval:
        argv += ["--interval", str(args.interval)]
    if args.own_metrics:
        argv += ["--own-metrics", *args.own_metrics]
    return main(argv)
