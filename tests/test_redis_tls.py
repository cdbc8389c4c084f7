"""rediss://: pods reach a TLS-only Redis port, verify its certificate, and present a client one."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.brokers import FAST_REDIS
from tests.helpers import closed_with, free_port, join, metric, running_pod, ws_url
from tests.redis_servers import RedisServer, start_redis

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("relay test CA", ca_key, None, ca_key, ca=True)
    files: dict[str, Path] = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"relay test {role}", key, ca.subject, ca_key, ca=False)
        files[role + "_cert"] = directory / f"{role}.crt"
        files[role + "_key"] = directory / f"{role}.key"
        files[role + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[role + "_key"].write_bytes(_key_pem(key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("someone else's CA", other_key, None, other_key, ca=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "other-ca.crt").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return Pki(directory / "ca.crt", other_ca=directory / "other-ca.crt", **files)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Pki]]:
    """A redis-server with a TLS port that requires client certificates (its plain port is only
    for the harness's health check)."""
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    server = start_redis(
        tmp_path / "redis",
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    yield server, tls_port, pki
    server.kill()


async def test_two_pods_relay_through_redis_over_mutual_tls(tls_redis: tuple[RedisServer, int, Pki]) -> None:
    _, port, pki = tls_redis
    tls = {
        "broker_url": f"rediss://localhost:{port}/0",
        "redis_tls_ca_file": str(pki.ca),
        "redis_tls_cert_file": str(pki.client_cert),
        "redis_tls_key_file": str(pki.client_key),
        **FAST_REDIS,
    }
    async with running_pod(pod_id="tls-a", **tls) as a, running_pod(pod_id="tls-b", **tls) as b:
        x, y = await join(ws_url(a, "/g")), await join(ws_url(b, "/g"))
        sent = await x.publish("g", over="tls")
        assert await x.next() == {"message": sent} and await y.next() == {"message": sent}
        direct = await y.direct(x.channel_id, back="tls")
        assert await x.next() == {"message": direct}


async def test_a_redis_certificate_from_an_unknown_ca_is_refused(
    tls_redis: tuple[RedisServer, int, Pki],
) -> None:
    _, port, pki = tls_redis
    failures = metric("relay_redis_link_failures_total", reason="connect_failed")
    async with running_pod(
        broker_url=f"rediss://localhost:{port}/0",
        redis_tls_ca_file=str(pki.other_ca),
        redis_tls_cert_file=str(pki.client_cert),
        redis_tls_key_file=str(pki.client_key),
        **FAST_REDIS,
    ) as pod:
        assert await closed_with(ws_url(pod, "/g")) == 1013  # no broker: come back later
        assert pod.pod.readiness()["broker"] is False
    assert metric("relay_redis_link_failures_total", reason="connect_failed") > failures
