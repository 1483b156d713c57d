"""Authorization per VM over real mTLS on loopback: certificates issued per agent and per
trainer, every call checked against the caller's identity, a client without a
certificate refused, a trainer's certificate good for calling the controller, a label
resent stored once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from vmad.protos.vmad.v1 import telemetry_pb2 as pb
from vmad.protos.vmad.v1 import telemetry_pb2_grpc
from vmad.schema import DEFAULT_METRICS

ROOT = Path(__file__).resolve().parents[1]


def vmad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmad.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    for args in (["init"], ["issue", "--vm", "vm-a"], ["issue", "--vm", "vm-b"],
                 ["issue", "--trainer", "node-1"]):
        done = vmad("certs", *args, "--dir", str(folder))
        assert done.returncode == 0, done.stderr
    return folder


def test_issued_certificates_have_the_right_usages(pki):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    def usages(path: Path) -> set:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert usages(pki / "vms" / "vm-a.pem") == {EKU.CLIENT_AUTH}
    assert usages(pki / "trainers" / "node-1.pem") == {EKU.SERVER_AUTH, EKU.CLIENT_AUTH}
    assert usages(pki / "server.pem") == {EKU.SERVER_AUTH, EKU.CLIENT_AUTH}
    refused = vmad("certs", "issue", "--vm", "../evil", "--dir", str(pki))
    assert refused.returncode == 2 and "vm id" in refused.stderr


def _trainer(tmp_path: Path, pki: Path, small_checkpoint, **security):
    from vmad.trainer.config import TrainerConfig
    from vmad.trainer.service import TrainerServer

    config = TrainerConfig.model_validate({
        "trainer_id": "node-1", "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
        "security": {"ca": str(pki / "ca.pem"), "cert": str(pki / "trainers" / "node-1.pem"),
                     "key": str(pki / "trainers" / "node-1-key.pem"), **security}})
    server = TrainerServer(config, small_checkpoint)
    server.start()
    return server


def _channel(address: str, pki: Path, who: str | None) -> grpc.Channel:
    port = address.rsplit(":", 1)[1]
    if who is None:  # TLS, but no client certificate
        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    else:
        credentials = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(), (pki / "vms" / f"{who}-key.pem").read_bytes(),
            (pki / "vms" / f"{who}.pem").read_bytes())
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _batch(vm: str) -> pb.TelemetryBatch:
    return pb.TelemetryBatch(vm_id=vm, metrics=list(DEFAULT_METRICS), batch_id=1, samples=[
        pb.Sample(seq=1, timestamp=time.time(), values=[1.0, 2.0, 3.0, 4.0])])


def test_an_agent_acts_only_for_its_own_vm(tmp_path, pki, small_checkpoint):
    server = _trainer(tmp_path, pki, small_checkpoint)
    try:
        with _channel(server.address, pki, "vm-a") as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            (ack,) = stub.Stream(iter([_batch("vm-a")]), timeout=10)
            assert (ack.error, ack.acked_seq) == ("", 1)
            calls = {
                "Stream": lambda: list(stub.Stream(iter([_batch("vm-b")]), timeout=10)),
                "Label": lambda: stub.Label(pb.LabelRequest(vm_id="vm-b", labels=[
                    pb.LabelInterval(start=1, end=2, anomalous=True)]), timeout=10),
                "WatchBundles": lambda: next(stub.WatchBundles(
                    pb.WatchBundlesRequest(vm_id="vm-b"), timeout=10)),
                "Label (no id)": lambda: stub.Label(pb.LabelRequest(vm_id=""), timeout=10),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as denied:
                    call()
                expected = (grpc.StatusCode.INVALID_ARGUMENT if "no id" in name
                            else grpc.StatusCode.PERMISSION_DENIED)
                assert denied.value.code() is expected, name
            assert "vm-a" in denied.value.details() or "vm_id" in denied.value.details()
            assert next(stub.WatchBundles(pb.WatchBundlesRequest(vm_id="vm-a"),
                                          timeout=10)).version
        assert server.store.counters("vm-b") is None
        assert server.stats.calls_refused["not own VM"] == 3
    finally:
        server.stop(0)


def test_client_without_a_certificate_is_refused(tmp_path, pki, small_checkpoint):
    server = _trainer(tmp_path, pki, small_checkpoint)
    try:
        with _channel(server.address, pki, None) as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Stream(iter([_batch("vm-a")]), timeout=5))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.store.counters("vm-a") is None
    finally:
        server.stop(0)


def test_token_must_match_the_certificate(tmp_path, pki, small_checkpoint):
    server = _trainer(tmp_path, pki, small_checkpoint,
                      tokens={"vm-a": "token-a", "vm-b": "token-b"})
    try:
        with _channel(server.address, pki, "vm-a") as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            (ack,) = stub.Stream(iter([_batch("vm-a")]), timeout=10, metadata=(
                ("vmad-client-id", "vm-a"), ("authorization", "Bearer token-a")))
            assert ack.acked_seq == 1
            with pytest.raises(grpc.RpcError) as denied:  # vm-b's token, vm-a's certificate
                list(stub.Stream(iter([_batch("vm-b")]), timeout=10, metadata=(
                    ("vmad-client-id", "vm-b"), ("authorization", "Bearer token-b"))))
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(0)


def test_trainer_certificate_calls_a_server_that_requires_client_certificates(pki):
    """The trainer -> controller leg: `certs issue --trainer` (and `certs init`'s
    server.pem) carry the client usage the controller's TLS requires."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vmad import security

    server_side = security.SecurityConfig(ca=pki / "ca.pem", cert=pki / "server.pem",
                                          key=pki / "server-key.pem")
    server, _ = security.make_server(server_side, max_workers=2)
    security.add_health(server)
    port = security.add_port(server, "127.0.0.1:0", server_side)
    server.start()
    try:
        for cert in ("trainers/node-1", "server"):
            client = security.SecurityConfig(ca=pki / "ca.pem", cert=pki / f"{cert}.pem",
                                             key=pki / f"{cert}-key.pem")
            with security.open_channel(f"localhost:{port}", client) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, cert
    finally:
        server.stop(None)


def test_resent_label_is_stored_once(tmp_path):
    from vmad.labels import LabelInterval
    from vmad.trainer.store import TelemetryStore

    store = TelemetryStore(tmp_path / "s.sqlite")
    label = LabelInterval(1.0, 2.0, True, "operator", "label-1")
    store.add_labels("vm", [label])
    store.add_labels("vm", [label])  # the ack was lost; the agent resends it
    store.add_labels("vm", [LabelInterval(3.0, 4.0, False, "operator")])
    store.add_labels("vm", [LabelInterval(3.0, 4.0, False, "operator")])  # no id: kept
    assert len(store.label_intervals("vm")) == 3
    store.close()


def test_a_trainer_reports_only_as_itself(tmp_path):
    from vmad.controller.config import ControllerConfig
    from vmad.controller.service import ControllerServer
    from vmad.protos.vmad.v1 import control_pb2, control_pb2_grpc

    config = ControllerConfig.model_validate({
        "listen": "127.0.0.1:0", "database": str(tmp_path / "registry.sqlite"),
        "policy": {"kind": "rules"},
        "security": {"insecure": True, "tokens": {"node-1": "t1", "node-2": "t2"}}})
    server = ControllerServer(config)
    server.start()
    metadata = (("vmad-client-id", "node-1"), ("authorization", "Bearer t1"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            state = control_pb2.VMState(vm_id="vm-1", timestamp=time.time())
            stub.Report(control_pb2.StateReport(trainer_id="node-1", state=state),
                        timeout=10, metadata=metadata)
            with pytest.raises(grpc.RpcError) as denied:
                stub.Report(control_pb2.StateReport(trainer_id="node-2", state=state),
                            timeout=10, metadata=metadata)
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "node-2" in denied.value.details()
        assert [t.trainer_id for t in server.registry.trainers()] == ["node-1"]
    finally:
        server.stop(0)
