"""The plaintext HTTP side of every vmad process: `/metrics` for Prometheus, `/healthz`
and `/readyz` for probes, and any read-only pages a process adds (the controller's fleet
page).

Why a separate plaintext port: the gRPC ports require a client certificate (mTLS), which
neither a Prometheus scrape nor a kubelet probe presents. Nothing here accepts input or
reveals a secret; the fleet page, which names VMs, is served from its own listener
(loopback by default).

- `MetricsSettings`: the `metrics:` config section (`listen: host:port`, null = off).
- `process_registry()`: a CollectorRegistry with the process, platform and GC collectors
  (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...).
- `HttpEndpoint(listen, registry, ...)`: a threaded WSGI server in a daemon thread.
  `/healthz` answers 200 while `alive()` is true, `/readyz` while `ready()` is true
  (503 otherwise); `pages` maps further paths to page functions.
- `token_refusals(interceptor)`: its refusal counts under bounded labels (the raw
  reasons name the client, which must not become a label value).
- `open_endpoint(...)`: the same, or None with an error logged when the port cannot be
  bound: the data path (gRPC) matters more than its metrics, and Prometheus's `up == 0`
  (the VmadTargetDown alert) makes the missing endpoint visible.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from pydantic import Field

from vmad.config import StrictModel

__all__ = ["HttpEndpoint", "MetricsSettings", "Page", "ServedMetrics", "counts_by",
           "open_endpoint", "process_registry", "token_refusals"]

log = logging.getLogger("vmad.http")

# (status code, content type, body)
Page = Callable[[], tuple[int, str, bytes]]


class MetricsSettings(StrictModel):
    """Where a process serves /metrics, /healthz and /readyz (plaintext HTTP)."""

    listen: str | None = Field(None, description="host:port; port 0 = any; null = off")


def process_registry() -> CollectorRegistry:
    """A registry of the process's own: resident memory, CPU seconds, open files, start
    time (Linux), Python version and garbage-collector counts."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _QuietHandler(WSGIRequestHandler):
    """Every scrape and probe would otherwise write an access-log line to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _always() -> bool:
    return True


class HttpEndpoint:
    def __init__(self, listen: str, registry: CollectorRegistry | None, *,
                 alive: Callable[[], bool] = _always, ready: Callable[[], bool] = _always,
                 pages: dict[str, Page] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self._metrics = make_wsgi_app(registry) if registry is not None else None
        self._alive = alive
        self._ready = ready
        self._pages = dict(pages or {})
        self._server = make_server(host or "0.0.0.0", int(port), self._app,
                                   server_class=ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self.address = f"{host or '0.0.0.0'}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()

    def _app(self, environ: dict[str, Any],
             start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics" and self._metrics is not None:
            return self._metrics(environ, start_response)
        if path in ("/healthz", "/readyz"):
            check = self._alive if path == "/healthz" else self._ready
            try:
                ok = bool(check())
            except Exception as error:  # a failing check means "not ok", never a crash
                log.warning("%s check failed: %s", path, error)
                ok = False
            status, body = (200, b"ok\n") if ok else (503, b"not ready\n")
            return _reply(start_response, status, "text/plain; charset=utf-8", body)
        page = self._pages.get(path)
        if page is None:
            return _reply(start_response, 404, "text/plain; charset=utf-8",
                          b"not found\n")
        try:
            status, content_type, body = page()
        except Exception:
            log.exception("page %s failed", path)
            status, content_type, body = 500, "text/plain; charset=utf-8", b"error\n"
        return _reply(start_response, status, content_type, body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _reply(start_response: Callable[..., Any], status: int, content_type: str,
           body: bytes) -> list[bytes]:
    start_response(f"{status} {_REASONS.get(status, 'Unknown')}",
                   [("Content-Type", content_type), ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store")])
    return [body]


def open_endpoint(listen: str | None, registry: CollectorRegistry | None, *,
                  what: str = "metrics",
                  **kwargs: Any) -> HttpEndpoint | None:
    """`HttpEndpoint(listen, registry, **kwargs)`; None when `listen` is None or taken."""
    if not listen:
        return None
    try:
        endpoint = HttpEndpoint(listen, registry, **kwargs)
    except (OSError, ValueError) as error:
        log.error("%s: cannot listen on %s (%s); running without it", what, listen, error)
        return None
    log.info("%s on http://%s/", what, endpoint.address)
    return endpoint


def token_refusals(interceptor: Any | None) -> dict[str, int]:
    """A TokenInterceptor's refusals by `missing_token` / `unknown_client` /
    `wrong_token` (empty for None)."""
    totals: dict[str, int] = {}
    if interceptor is None:
        return totals
    # One C-level copy under the GIL: safe against the interceptor's inserts.
    for reason, n in list(interceptor.refused.items()):
        label = "other"
        for prefix, name in (("missing", "missing_token"), ("unknown client", "unknown_client"),
                             ("wrong token", "wrong_token")):
            if reason.startswith(prefix):
                label = name
        totals[label] = totals.get(label, 0) + n
    return totals


def counts_by(name: str, documentation: str, label: str,
              counts: Mapping[str, float]) -> CounterMetricFamily:
    """A counter family with one sample per key of `counts` (sorted), labelled `label`:
    counts a process already keeps, exported at scrape time."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family


class ServedMetrics:
    """A process's own metrics registry (process collectors included) and the endpoint
    that serves it: `serve(listen)` starts /metrics, /healthz and /readyz (None: metrics
    off, still ready); /readyz answers 200 from then until `close()`."""

    def __init__(self) -> None:
        self.registry = process_registry()
        self.ready = False
        self.endpoint: HttpEndpoint | None = None

    def serve(self, listen: str | None) -> None:
        self.endpoint = open_endpoint(listen, self.registry, ready=lambda: self.ready)
        self.ready = True

    def close(self) -> None:
        self.ready = False
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
