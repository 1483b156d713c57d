"""Certificates with an identity: one per agent (`vm:<VM id>`) and per trainer
(`trainer:<trainer id>`), signed by the CA that `vmad certs init` made.

The identity is the certificate's common name, `<role>:<id>`. Servers read it from the
verified TLS peer (`peer_identity`) and check every call against it: an agent acts only
for its own VM, a trainer reports only as itself (docs/security.md). Key usages:
an agent's certificate is for TLS clients only; a trainer's for both server (agents call
it) and client (it calls the controller).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ROLES", "authorize", "host_names", "issue_certificate", "parse_identity",
           "peer_identity"]

ROLES = ("vm", "trainer")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def parse_identity(common_name: str) -> tuple[str, str] | None:
    """(role, id) from a common name `role:id`; None for a certificate without one
    (the fleet-wide ones of `vmad certs init`)."""
    role, sep, ident = common_name.partition(":")
    if not sep or role not in ROLES or not _ID.match(ident):
        return None
    return role, ident


def peer_identity(context: Any) -> tuple[str, str] | None:
    """The verified TLS peer's (role, id), from a grpc ServicerContext; None when the
    peer has no identity certificate (or the call is plaintext)."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    if len(names) != 1:
        return None
    try:
        return parse_identity(names[0].decode())
    except UnicodeDecodeError:
        return None


def host_names(hosts: Sequence[str]) -> list[Any]:
    """The subject alternative names a server certificate carries for `hosts`: an IP
    address where the host is one (agents that dial an address check it as such), else
    a DNS name."""
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_certificate(ca_dir: str | Path, role: str, ident: str,
                      out_dir: str | Path | None = None,
                      hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365,
                      overwrite: bool = False) -> tuple[Path, Path]:
    """Sign a certificate for `role` ("vm" or "trainer") `ident` with the CA in `ca_dir`
    (ca.pem, ca-key.pem); write `<out_dir>/<ident>.pem` and `<ident>-key.pem` (mode 0600;
    out_dir defaults to `<ca_dir>/<role>s`). `hosts` go in a trainer's certificate (the
    names agents dial). Returns (certificate, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if not _ID.match(ident):
        raise ValueError(f"{role} id {ident!r} must be 1 to 128 letters, digits or ._:@- "
                         "and start with a letter or digit")
    ca_dir = Path(ca_dir)
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the CA in {ca_dir} (ca.pem, ca-key.pem; make them "
                         f"with vmad certs init): {error}") from None
    out = Path(out_dir) if out_dir is not None else ca_dir / f"{role}s"
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{ident}.pem", out / f"{ident}-key.pem"
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(f"{cert_path} exists; use --force to replace it")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "trainer":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmad"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{ident}")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if role == "trainer":
        builder = builder.add_extension(x509.SubjectAlternativeName(host_names(hosts)),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def authorize(context: Any, role: str, claimed: str, tokens_on: bool) -> str | None:
    """None when the caller of this gRPC call may act as `role` `claimed`; otherwise why
    not. The identity is the caller's certificate (`role:id`) when it has one, and the
    token's client id when tokens are on (bound to the certificate: both must agree).
    A caller with neither (fleet-wide certificate, no tokens) is trusted fleet-wide."""
    from vmad.security import CLIENT_ID_HEADER

    peer = peer_identity(context)
    client = dict(context.invocation_metadata() or ()).get(CLIENT_ID_HEADER)
    if peer is not None:
        peer_role, peer_id = peer
        if peer_role != role:
            return f"a {peer_role} certificate may not call as a {role}"
        if peer_id != claimed:
            return f"the certificate of {role} {peer_id!r} may not act for {claimed!r}"
        if tokens_on and client != peer_id:
            return f"token client id {client!r} does not match the certificate ({peer_id!r})"
        return None
    if tokens_on and client != claimed:
        return f"client {client!r} may not act for {role} {claimed!r}"
    return None
