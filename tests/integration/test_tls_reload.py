"""Hot reload: a new certificate is served on new handshakes on every TLS port, at once, without a
restart; open sessions (an IMAP IDLE) stay; a certificate that fails its checks changes nothing."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.tls import CertificateProblem
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.tls_probe import TLS_SERVICES, served_certificate

USER, PASSWORD = "alice@example.test", "correct horse battery"


def serials(box: BoxHandle) -> dict[str, int]:
    return {s: served_certificate(box.port(s), s).serial_number for s in TLS_SERVICES}


def test_new_certificate_on_every_port_while_idle_session_stays(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    before = serials(box)
    old = box.services.tls.info().serial
    assert set(before.values()) == {old}

    idle = RawImap(box.port("imaps"), box.client_context)
    idle.login(USER, PASSWORD)
    idle.command(b"S", b"SELECT INBOX")
    idle.send(b"I IDLE\r\n")
    assert idle.line().startswith(b"+ ")

    other_ca = trustme.CA()
    leaf = other_ca.issue_cert("localhost", "mail.example.test")
    info = box.services.tls.install(
        b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes(), hostname="localhost")
    assert info.serial != old
    after = serials(box)
    assert set(after.values()) == {info.serial}, after

    # Verified against the new CA for the host name, on every port.
    ctx = ssl.create_default_context()
    other_ca.configure_trust(ctx)
    for service in TLS_SERVICES:
        assert served_certificate(box.port(service), service, ctx).serial_number == info.serial

    # The session opened before the change is still there and still works.
    idle.send(b"DONE\r\n")
    assert idle.until_tagged(b"I")[-1].startswith(b"I OK")
    assert idle.command(b"N", b"NOOP")[-1].startswith(b"N OK")
    idle.close()


def _rsa_pair(ca: trustme.CA, name: str) -> tuple[bytes, bytes]:
    """An RSA leaf signed by `ca` (trustme makes EC keys by default)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_rsa_after_ec_is_what_tls13_clients_get(box: BoxHandle) -> None:
    # The old trap: loading RSA onto the EC context kept both and TLS 1.3 chose the old EC one.
    cert_pem, key_pem = _rsa_pair(box.ca, "localhost")
    info = box.services.tls.install(cert_pem, key_pem, hostname="localhost")
    ctx = box.client_context
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for service in ("imaps", "https", "submission"):
        assert served_certificate(box.port(service), service, ctx).serial_number == info.serial


@pytest.mark.parametrize("service", ["imaps", "imap", "https"])
def test_no_sni_client_gets_the_current_certificate(box: BoxHandle, service: str) -> None:
    cert_pem, key_pem = _rsa_pair(box.ca, "localhost")
    info = box.services.tls.install(cert_pem, key_pem)
    assert served_certificate(box.port(service), service, server_hostname=None).serial_number == info.serial


def test_refused_certificate_changes_nothing(box: BoxHandle) -> None:
    tls = box.services.tls
    before = tls.info().serial
    on_disk = tls.cert_path.read_bytes()
    a = box.ca.issue_cert("localhost")
    b = box.ca.issue_cert("localhost")
    with pytest.raises(CertificateProblem, match="private key does not belong"):
        tls.install(a.cert_chain_pems[0].bytes(), b.private_key_pem.bytes())
    with pytest.raises(CertificateProblem):
        tls.install(b"garbage", b"garbage")
    assert tls.info().serial == before
    assert tls.cert_path.read_bytes() == on_disk
    assert {served_certificate(box.port(s), s).serial_number for s in TLS_SERVICES} == {before}


def test_reload_of_a_broken_file_keeps_the_working_certificate(box: BoxHandle) -> None:
    tls = box.services.tls
    before = tls.info().serial
    tls.key_path.write_bytes(box.ca.issue_cert("localhost").private_key_pem.bytes())  # not the cert's key
    with pytest.raises(CertificateProblem):
        tls.reload()
    assert served_certificate(box.port("imaps"), "imaps").serial_number == before
