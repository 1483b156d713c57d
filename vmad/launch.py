"""Start vmad components as real subprocesses and wait until they serve.

The demo and the integration tests both run the controller, the trainer and agents as
separate processes on loopback, the way an operator runs them; this module is how.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Process", "free_port", "start", "wait_serving"]


def free_port() -> int:
    """A TCP port free on loopback right now (another process could take it before use,
    which on a test machine is rare enough; callers retry start-up on failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful: servers drain and flush), then SIGKILL after `timeout`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to the others."""
        if self.alive():
            self.popen.kill()
            self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def start(name: str, args: list[str], log_dir: str | Path,
          env: dict[str, str] | None = None) -> Process:
    """Run `vmad ARGS...` with this interpreter; stdout and stderr go to LOG_DIR/NAME.log."""
    log_path = Path(log_dir) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - closed by Process.stop/kill
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen([sys.executable, "-m", "vmad.cli", *args], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
    return Process(name, popen, log_path, log)


def wait_serving(address: str, timeout: float = 60.0, *, process: Process | None = None,
                 credentials: object | None = None, service: str = "") -> None:
    """Block until the gRPC health service at `address` says SERVING.

    Raises RuntimeError (with the process's log tail) if `process` exits first or the
    time runs out.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n"
                               f"{process.log_text()[-3000:]}")
        channel = (grpc.secure_channel(address, credentials) if credentials is not None
                   else grpc.insecure_channel(address))
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = f"status {reply.status}"
        except grpc.RpcError as error:
            last = str(error.code())
        finally:
            channel.close()
        time.sleep(0.2)
    tail = process.log_text()[-3000:] if process is not None else ""
    raise RuntimeError(f"{address} not serving after {timeout:.0f} s ({last})\n{tail}")
