"""Sub-commands of the edge side: `vmad agent`, `vmad inject`, `vmad label`, and the
operator tools `vmad validate` and `vmad certs init`.

Only argparse at import time: heavy imports (onnxruntime, grpc, psutil) happen inside
the function that runs a command, so `vmad --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def register(commands: Any, bench: Any) -> None:
    validate = commands.add_parser(
        "validate", help="check component config files (agent, trainer, controller, planner)")
    validate.add_argument("configs", nargs="+", metavar="CONFIG")
    validate.add_argument("--component", default=None,
                          help="component the files are for (default: guessed per file)")
    validate.set_defaults(run=_run_validate)

    certs = commands.add_parser("certs", help="mTLS certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = certs_sub.add_parser("init", help="make a CA and server/client certificates")
    init.add_argument("--dir", required=True, help="output folder")
    init.add_argument("--host", action="append", default=None,
                      help="name or IP in the certificates (repeatable; default: "
                           "localhost and 127.0.0.1)")
    init.add_argument("--days", type=int, default=365)
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(run=_run_certs_init)
    issue = certs_sub.add_parser(
        "issue", help="sign a certificate for one agent (--vm) or trainer (--trainer)")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--vm", help="VM id: a client certificate for that VM's agent")
    who.add_argument("--trainer", help="trainer id: server + client certificate")
    issue.add_argument("--dir", required=True, help="the CA folder (vmad certs init --dir)")
    issue.add_argument("--out", default=None, help="output folder (default: DIR/vms or "
                       "DIR/trainers)")
    issue.add_argument("--host", action="append", default=None,
                       help="trainer only: name or IP agents dial (repeatable; default: "
                            "localhost and 127.0.0.1)")
    issue.add_argument("--days", type=int, default=365)
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(run=_run_certs_issue)

    from vmad.edge_agent.agent_commands import register as register_agent

    register_agent(commands, bench)


def _run_validate(args: argparse.Namespace) -> int:
    from vmad.config import ConfigError, validate_file

    failed = 0
    for path in args.configs:
        try:
            component, _ = validate_file(path, args.component)
        except (ConfigError, ValueError) as error:
            print(f"INVALID {error}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok      {path} ({component})")
    return 1 if failed else 0


def _run_certs_init(args: argparse.Namespace) -> int:
    from vmad.errors import UsageError
    from vmad.security import make_certs

    hosts = args.host or ["localhost", "127.0.0.1"]
    try:
        paths = make_certs(args.dir, hosts=hosts, days=args.days, overwrite=args.force)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    for role, path in paths.items():
        print(f"{role:11s} {path}")
    return 0


def _run_certs_issue(args: argparse.Namespace) -> int:
    from vmad.certs import issue_certificate
    from vmad.errors import UsageError

    role, ident = ("vm", args.vm) if args.vm else ("trainer", args.trainer)
    try:
        cert, key = issue_certificate(args.dir, role, ident, args.out,
                                      hosts=args.host or ["localhost", "127.0.0.1"],
                                      days=args.days, overwrite=args.force)
    except (FileExistsError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(f"{role} {ident}: {cert} {key}")
    return 0
