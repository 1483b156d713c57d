"""vmad/security.py against real gRPC servers on 127.0.0.1 port 0: tokens, mTLS,
message size limits, health."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vmad import security
from vmad.protos.vmad.v1 import telemetry_pb2, telemetry_pb2_grpc
from vmad.security import SecurityConfig


class LabelOnly(telemetry_pb2_grpc.TelemetryServiceServicer):
    def Label(self, request: telemetry_pb2.LabelRequest,
              context: grpc.ServicerContext) -> telemetry_pb2.LabelReply:
        return telemetry_pb2.LabelReply(accepted=len(request.labels))


def serve(config: SecurityConfig) -> tuple[grpc.Server, int, security.TokenInterceptor | None]:
    server, token_check = security.make_server(config, max_workers=4)
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(LabelOnly(), server)
    security.add_health(server, ["vmad.v1.TelemetryService"])
    port = security.add_port(server, "127.0.0.1:0", config)
    server.start()
    return server, port, token_check


@pytest.fixture
def token_server() -> Iterator[tuple[int, security.TokenInterceptor]]:
    server, port, token_check = serve(SecurityConfig(insecure=True, tokens={"vm-1": "good"}))
    assert token_check is not None
    yield port, token_check
    server.stop(None)


def label(port: int, client: SecurityConfig, labels: int = 1, size: int = 0) -> int:
    with security.open_channel(f"127.0.0.1:{port}", client) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        request = telemetry_pb2.LabelRequest(
            vm_id="x" * size or "vm-1",
            labels=[telemetry_pb2.LabelInterval(start=0, end=1)] * labels)
        reply = stub.Label(request, timeout=5, metadata=security.call_metadata(client))
        return reply.accepted


def test_right_token_accepted_others_refused_and_counted(token_server) -> None:
    port, token_check = token_server
    assert label(port, SecurityConfig(insecure=True, client_id="vm-1", token="good"), 3) == 3
    for client in (SecurityConfig(insecure=True, client_id="vm-1", token="bad"),
                   SecurityConfig(insecure=True, client_id="vm-1"),
                   SecurityConfig(insecure=True, client_id="vm-2", token="good")):
        with pytest.raises(grpc.RpcError) as info:
            label(port, client)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert token_check.refused_total == 3


def test_health_needs_no_token(token_server) -> None:
    port, _ = token_server
    with security.open_channel(f"127.0.0.1:{port}", SecurityConfig(insecure=True)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="vmad.v1.TelemetryService"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_refused_other_client_unharmed(token_server) -> None:
    port, _ = token_server
    client = SecurityConfig(insecure=True, client_id="vm-1", token="good")
    with pytest.raises(grpc.RpcError) as info:
        label(port, client, size=security.MAX_MESSAGE_BYTES + 1024)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert label(port, client, 2) == 2  # the server still serves everyone else


def test_mtls_round_trip_and_plain_client_refused(tmp_path: Path) -> None:
    paths = security.make_certs(tmp_path)
    assert oct(paths["server-key"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        security.make_certs(tmp_path)
    server_config = SecurityConfig(ca=paths["ca"], cert=paths["server"], key=paths["server-key"],
                                   tokens={"vm-1": "good"})
    server, port, _ = serve(server_config)
    try:
        client = SecurityConfig(ca=paths["ca"], cert=paths["client"], key=paths["client-key"],
                                client_id="vm-1", token="good", server_name="localhost")
        assert label(port, client) == 1
        with pytest.raises(grpc.RpcError) as info:
            label(port, SecurityConfig(insecure=True, client_id="vm-1", token="good"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_missing_certificate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"security\.key is required"):
        security.server_credentials(SecurityConfig())


def test_group_token_accepts_any_name_with_the_token_only() -> None:
    from types import SimpleNamespace

    check = security.TokenCheck({"*": "group-secret", "vm-1": "own-secret"})

    def call(client: str, token: str) -> str | None:
        metadata = ((security.CLIENT_ID_HEADER, client),
                    (security.AUTH_HEADER, f"Bearer {token}"))
        return check.reason_to_refuse(SimpleNamespace(method="/vmad.v1.ControlService/Report",
                                                      invocation_metadata=metadata))

    assert call("node-7", "group-secret") is None
    assert call("node-7", "own-secret") == "wrong token for 'node-7'"
    # A name with a token of its own is held to it, not to the group's.
    assert call("vm-1", "group-secret") == "wrong token for 'vm-1'"
    assert call("vm-1", "own-secret") is None
