"""Graceful shutdown for the long-running services (trainer, controller): block until
SIGTERM or SIGINT, then stop the server, so systemd and Kubernetes stops drain in-flight
calls instead of cutting them."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["run_until_signalled"]


def run_until_signalled(stop: Callable[[], None]) -> None:
    """Block until SIGTERM/SIGINT, then call `stop` (graceful shutdown)."""
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    done.wait()
    stop()
