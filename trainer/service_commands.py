"""`vmad trainer --config trainer.yaml`: the per-node transfer training service.

Kept apart from trainer/commands.py (offline pretraining and benchmarks); torch and grpc
are imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any, bench: Any) -> None:
    trainer = commands.add_parser(
        "trainer", help="run the transfer training service for this node's agents")
    trainer.add_argument("--config", required=True, type=Path, help="trainer.yaml")
    trainer.set_defaults(run=run_trainer)


def run_trainer(args: argparse.Namespace) -> int:
    from vmad.trainer.service import serve_from_config

    return serve_from_config(args.config)
