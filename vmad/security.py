"""Transport security and limits shared by every vmad gRPC server and channel.

What each process uses (trainer, controller, agent, tools):

- `SecurityConfig`: the `security:` section of every component config. mTLS by default:
  `ca`, `cert`, `key` are PEM files (make them with `vmad certs init --dir DIR`).
  `insecure: true` runs plaintext and logs a warning (demo and tests only).
  `client_id` + `token` are what this process presents when it calls a server;
  `tokens` (client id -> token) is what a server accepts. Token values usually come
  from the environment: `token: ${VMAD_AGENT_TOKEN}` (vmad/config.py substitutes).
- `server_options()` / `channel_options()`: explicit max message sizes and keepalive,
  the same numbers everywhere (`MAX_MESSAGE_BYTES`, `KEEPALIVE_*`).
- `make_server(config, ...)` / `add_port(server, address, config)`: a grpc.Server with
  those options, the token interceptor (when `tokens` is set), secure or plaintext port.
- `open_channel(address, config)`: a channel with those options and credentials.
- `call_metadata(config)`: metadata to pass on every call (`authorization: Bearer <token>`
  and `vmad-client-id: <id>`); the interceptor checks the token against `tokens[id]`.
- `TokenInterceptor` / `AsyncTokenInterceptor`: refuses with UNAUTHENTICATED (and counts
  it) a call whose token is missing or wrong. The health service is exempt so probes need no token.
- `make_aio_server(config)`: the same for grpc.aio (no thread per open call).
- `add_health(server, services)`: standard grpc.health.v1 service (threaded or aio).
- `make_certs(dir)`: CA + server + client certificates for localhost/127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field

from vmad.certs import host_names
from vmad.config import StrictModel

__all__ = [
    "AUTH_HEADER",
    "CLIENT_ID_HEADER",
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "MAX_MESSAGE_BYTES",
    "AsyncTokenInterceptor",
    "DecodeGuard",
    "Health",
    "SecurityConfig",
    "TokenCheck",
    "TokenInterceptor",
    "add_health",
    "add_port",
    "call_metadata",
    "channel_options",
    "make_aio_server",
    "make_certs",
    "make_server",
    "open_channel",
    "server_options",
]

log = logging.getLogger(__name__)

# A telemetry batch is tens of kB and a bundle under 1 MB; 16 MB leaves room and still
# refuses a runaway client before it costs the server memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Agents sit behind NATs that drop idle flows after minutes: ping every 30 s.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
AUTH_HEADER = "authorization"
CLIENT_ID_HEADER = "vmad-client-id"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class SecurityConfig(StrictModel):
    """The `security:` section of a component config (every key optional)."""

    insecure: bool = Field(False, description="plaintext gRPC, no certificates (demo only)")
    ca: Path | None = Field(None, description="PEM CA certificate that signs peers")
    cert: Path | None = Field(None, description="this process's PEM certificate")
    key: Path | None = Field(None, description="this process's PEM private key")
    server_name: str | None = Field(
        None, description="expected name in the server certificate (default: the host)")
    client_id: str | None = Field(None, description="id presented to servers (the VM id)")
    token: str | None = Field(None, description="token presented to servers")
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description="server side: client id -> accepted token (\"*\": a token shared by a "
                    "group, any client id); empty = no token check")


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Clients ping every KEEPALIVE_TIME_MS; allow it rather than GOAWAY them.
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(server_name: str | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise ValueError(f"security.{what} is required unless security.insecure is true")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"security.{what}: cannot read {path}: {error.strerror}") from None


def _warn_insecure(role: str) -> None:
    log.warning("security.insecure is true: %s runs plaintext gRPC without certificates", role)


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """mTLS credentials (client certificates required), or None when insecure."""
    if config.insecure:
        _warn_insecure("server")
        return None
    return grpc.ssl_server_credentials(
        [(_read(config.key, "key"), _read(config.cert, "cert"))],
        root_certificates=_read(config.ca, "ca"),
        require_client_auth=True,
    )


def channel_credentials(config: SecurityConfig) -> grpc.ChannelCredentials | None:
    if config.insecure:
        _warn_insecure("client")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.ca, "ca"),
        private_key=_read(config.key, "key"),
        certificate_chain=_read(config.cert, "cert"),
    )


def add_port(server: grpc.Server, address: str, config: SecurityConfig) -> int:
    """Bind `address` (host:port, port 0 = any) secure or plaintext; return the port."""
    credentials = server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def open_channel(address: str, config: SecurityConfig) -> grpc.Channel:
    credentials = channel_credentials(config)
    options = channel_options(config.server_name)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def call_metadata(config: SecurityConfig) -> tuple[tuple[str, str], ...]:
    """Metadata for every call: who this client is and its token (empty if none)."""
    metadata: list[tuple[str, str]] = []
    if config.client_id:
        metadata.append((CLIENT_ID_HEADER, config.client_id))
    if config.token:
        metadata.append((AUTH_HEADER, f"Bearer {config.token}"))
    return tuple(metadata)


class TokenCheck:
    """Accept a call only if `authorization: Bearer <t>` matches `tokens[vmad-client-id]`
(or `tokens["*"]`, a token shared by a group whose members name themselves).

    Refusals end the call with UNAUTHENTICATED before any handler runs (so a refused
    client costs no service work) and are counted in `refused` by reason. Services that
    need to know the caller read the `vmad-client-id` metadata, which this check has
    vouched for; a service should check that a batch's vm_id equals it.
    """

    def __init__(self, tokens: dict[str, str],
                 exempt: Callable[[str], bool] = lambda m: m.startswith(HEALTH_PREFIX)):
        self._tokens = {k: v.encode() for k, v in tokens.items()}
        self._exempt = exempt
        self._lock = threading.Lock()
        self.refused: Counter[str] = Counter()

    def reason_to_refuse(self, details: grpc.HandlerCallDetails) -> str | None:
        """None when the call may go on; otherwise why not (counted)."""
        if self._exempt(details.method):
            return None
        metadata = dict(details.invocation_metadata or ())
        client = metadata.get(CLIENT_ID_HEADER)
        header = metadata.get(AUTH_HEADER, "")
        expected = self._tokens.get(client or "")
        if expected is None and client:
            # "*": one token shared by a group (a DaemonSet's trainers): whoever holds it
            # may use any client id, which then names the caller for authorization.
            expected = self._tokens.get("*")
        if not header.startswith("Bearer "):
            reason = "missing bearer token"
        elif expected is None:
            reason = f"unknown client id {client!r}"
        elif not hmac.compare_digest(header[len("Bearer "):].encode(), expected):
            reason = f"wrong token for {client!r}"
        else:
            return None
        with self._lock:
            self.refused[reason] += 1
        log.warning("call %s refused: %s", details.method, reason)
        return reason

    @property
    def refused_total(self) -> int:
        with self._lock:
            return sum(self.refused.values())


class TokenInterceptor(grpc.ServerInterceptor):
    """`TokenCheck` for the threaded grpc.Server."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.check = TokenCheck(tokens)
        self.refused = self.check.refused

    def intercept_service(self, continuation: Callable[..., Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        reason = self.check.reason_to_refuse(handler_call_details)
        if reason is None:
            return continuation(handler_call_details)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        # A unary-unary refusal works for every call shape: the status is sent before any
        # message is read or written.
        return grpc.unary_unary_rpc_method_handler(deny)

    @property
    def refused_total(self) -> int:
        return self.check.refused_total


class AsyncTokenInterceptor(grpc.aio.ServerInterceptor):
    """`TokenCheck` for grpc.aio servers."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.check = TokenCheck(tokens)
        self.refused = self.check.refused

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        reason = self.check.reason_to_refuse(handler_call_details)
        if reason is None:
            return await continuation(handler_call_details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return grpc.unary_unary_rpc_method_handler(deny)

    @property
    def refused_total(self) -> int:
        return self.check.refused_total


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


class DecodeGuard(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request message end the call with
    INVALID_ARGUMENT, a log line and a count (`refused`), instead of gRPC's own INTERNAL
    "Exception deserializing request!" with a traceback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.refused = 0

    def _deny(self, context: grpc.ServicerContext, method: str, bad: _Undecodable) -> None:
        with self._lock:
            self.refused += 1
        log.warning("call %s refused: request is not a valid message (%s)", method,
                    str(bad.error)[:200])
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid message")

    def intercept_service(self, continuation: Callable[..., Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def safe(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # protobuf's DecodeError and friends
                return _Undecodable(error)

        def one(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    self._deny(context, method, request)
                return behavior(request, context)
            return guarded

        def many(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(requests: Any, context: grpc.ServicerContext) -> Any:
                def checked() -> Any:
                    for request in requests:
                        if isinstance(request, _Undecodable):
                            self._deny(context, method, request)
                        yield request
                return behavior(checked(), context)
            return guarded

        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, one),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, one),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, many),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, many))
        for attribute, make, wrap in kinds:
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make(wrap(behavior), request_deserializer=safe,
                            response_serializer=handler.response_serializer)
        return handler


def make_server(config: SecurityConfig, max_workers: int = 16,
                interceptors: Sequence[grpc.ServerInterceptor] = ()
                ) -> tuple[grpc.Server, TokenInterceptor | None]:
    """A grpc.Server with the standard options and, when `tokens` is set, the token
    interceptor (returned so the caller can export its refusal count)."""
    token_check = TokenInterceptor(config.tokens) if config.tokens else None
    chain = [token_check, *interceptors] if token_check else list(interceptors)
    chain.append(DecodeGuard())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=chain, options=server_options())
    return server, token_check


def make_aio_server(config: SecurityConfig, *, max_concurrent_rpcs: int | None = None,
                    ) -> tuple[grpc.aio.Server, AsyncTokenInterceptor | None]:
    """A grpc.aio.Server (calls are coroutines on one event loop: an open stream costs no
    thread) with the standard options and, when `tokens` is set, the token interceptor.
    Create it with the event loop that will run it current."""
    token_check = AsyncTokenInterceptor(config.tokens) if config.tokens else None
    server = grpc.aio.server(interceptors=[token_check] if token_check else None,
                             options=server_options(), maximum_concurrent_rpcs=max_concurrent_rpcs)
    return server, token_check


class Health:
    """The standard grpc.health.v1 service for "" and each named service."""

    def __init__(self, servicer: Any, services: Iterable[str]) -> None:
        self.servicer = servicer
        self.services = ("", *services)

    def set_serving(self, serving: bool) -> Any:
        """Report SERVING or NOT_SERVING (while draining). Returns what the servicer's
        `set` returns: a coroutine to await for the aio servicer, None otherwise."""
        from grpc_health.v1 import health_pb2

        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        results = [self.servicer.set(name, status) for name in self.services]
        if results and asyncio.iscoroutine(results[0]):
            return asyncio.gather(*results)
        return None


def add_health(server: grpc.Server | grpc.aio.Server, services: Iterable[str] = (),
               serving: bool = True) -> Health:
    """Serve grpc.health.v1 on `server` (threaded or aio) for "" and each of `services`.

    Threaded servers start SERVING when `serving`; an aio server starts NOT_SERVING until
    `await health.set_serving(True)` (its servicer's `set` is a coroutine).
    """
    from grpc_health.v1 import health, health_pb2_grpc

    if isinstance(server, grpc.aio.Server):
        servicer: Any = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return Health(servicer, services)
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    status = Health(servicer, services)
    status.set_serving(serving)
    return status


def make_certs(directory: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
               days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write a CA and server/client certificates (EC P-256) for `hosts` into `directory`.

    Files: ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, client-key.pem.
    Keys are written mode 0600. Refuses to overwrite existing files unless told to.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = ["ca", "server", "client"]
    paths = {f"{n}{s}": directory / f"{n}{s}.pem" for n in names for s in ("", "-key")}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; use --force (overwrite=True) to replace it")
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmad"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        data = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_bytes(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("vmad CA")).issuer_name(name("vmad CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write_key(ca_key, paths["ca-key"])
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    sans = host_names(hosts)
    # The server certificate is also a client one: a trainer serves agents and calls the
    # controller with the same certificate.
    for role, usages in (("server", [ExtendedKeyUsageOID.SERVER_AUTH,
                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                         ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(f"vmad {role}"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        write_key(key, paths[f"{role}-key"])
        paths[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths
