"""ACME against a real CA: Debian's pebble with pebble-challtestsrv as its DNS.

A fresh box orders through http-01 and through tls-alpn-01, then every TLS port serves the issued
certificate, verified against pebble's root for the host name; renewal serves a new serial on every
port while an IMAP IDLE session opened before stays; failures give plain words and keep the old
certificate."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import certificates
from appliance.acme_terms import AcmeProblem
from appliance.tls import CertificateInfo
from tests.conftest import BoxHandle, require_program
from tests.support.imap_wire import RawImap
from tests.support.pebble import EAB_HMAC, EAB_KID, Pebble, running_pebble
from tests.support.ports import free_port
from tests.support.tls_probe import TLS_SERVICES, served_certificate

HOST = "mail.example.test"
DOMAIN = "example.test"
USER, PASSWORD = f"alice@{DOMAIN}", "correct horse battery"

pytestmark = pytest.mark.e2e


def start_pebble(box: BoxHandle, root: Path, **kwargs: object) -> Pebble:
    require_program("pebble")
    require_program("pebble-challtestsrv")
    pebble = Pebble(root, http_port=box.port("http"), tls_port=box.port("https"), **kwargs)  # type: ignore[arg-type]
    pebble.start()
    return pebble


@pytest.fixture
def pebble(box: BoxHandle, tmp_path: Path) -> Iterator[Pebble]:
    p = start_pebble(box, tmp_path / "pebble")
    try:
        configure(box, p)
        yield p
    finally:
        p.stop()


def configure(box: BoxHandle, pebble: Pebble, **extra: str) -> None:
    settings = {
        "dns_resolver": pebble.dns, "public_ipv4": "127.0.0.1", certificates.CA_FILE: str(pebble.listener_ca),
        certificates.DIRECTORY: pebble.directory, **extra,
    }

    async def write() -> None:
        for key, value in settings.items():
            await box.services.db.set_setting(key, value)

    box.run(write())


def pebble_context(pebble: Pebble) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pebble.issuer_root))


def order(box: BoxHandle, **kwargs: str) -> CertificateInfo:
    info, _ = box.run(certificates.request(box.services.certificates, [DOMAIN], **kwargs), timeout=120)
    return info


def assert_served_everywhere(box: BoxHandle, pebble: Pebble, serial: int) -> None:
    ctx = pebble_context(pebble)
    for service in TLS_SERVICES:
        cert = served_certificate(box.port(service), service, ctx, server_hostname=HOST)
        assert cert.serial_number == serial, service


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_fresh_box_orders_and_serves_on_every_port(box: BoxHandle, pebble: Pebble, challenge: str) -> None:
    box.run(box.services.accounts.add_domain(DOMAIN))
    info = order(box, challenge=challenge)
    assert HOST in info.names
    assert f"autoconfig.{DOMAIN}" in info.names
    assert f"autodiscover.{DOMAIN}" in info.names
    assert not info.self_signed
    assert_served_everywhere(box, pebble, info.serial)
    status = box.run(certificates.status(box.services.certificates))
    assert status.source == "acme"
    assert status.trusted
    assert status.order.phase == "issued"
    assert status.next_renewal is not None
    key = box.data.tls / "acme" / "account-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    events = [text for _, kind, text in box.run(box.services.events.recent()) if kind == "certificate"]
    assert any("certificate ordered" in t for t in events)


def test_names_that_do_not_lead_here_are_left_out(box: BoxHandle, pebble: Pebble) -> None:
    box.run(box.services.accounts.add_domain(DOMAIN))
    pebble.set_a(f"autodiscover.{DOMAIN}", "127.0.0.9")
    info, names = box.run(certificates.request(box.services.certificates, [DOMAIN]), timeout=120)
    assert f"autodiscover.{DOMAIN}" not in info.names
    assert names.left_out == [f"autodiscover.{DOMAIN}: points at 127.0.0.9, not at this box"]


def test_host_name_pointing_elsewhere_is_refused_before_ordering(box: BoxHandle, pebble: Pebble) -> None:
    before = box.services.tls.info().serial
    pebble.set_a(HOST, "127.0.0.9")
    with pytest.raises(AcmeProblem, match=r"points at 127\.0\.0\.9, not at this box's public address 127\.0\.0\.1"):
        order(box)
    assert box.services.tls.info().serial == before


def test_renewal_new_serial_on_every_port_while_idle_stays(box: BoxHandle, pebble: Pebble) -> None:
    box.add_user(USER, PASSWORD)
    first = order(box)
    verify_ca_only = pebble_context(pebble)
    verify_ca_only.check_hostname = False  # RawImap asks for "localhost"; the names are checked below
    idle = RawImap(box.port("imaps"), verify_ca_only)
    idle.login(USER, PASSWORD)
    idle.command(b"S", b"SELECT INBOX")
    idle.send(b"I IDLE\r\n")
    assert idle.line().startswith(b"+ ")

    ctx = box.services.certificates
    # Not due yet: the renewer leaves it alone.
    assert box.run(certificates.renew(ctx, [DOMAIN])) is None
    # The renewer with its clock moved to when a third of the lifetime is left renews.
    ctx.clock = lambda: first.not_after - first.lifetime / 4
    renewer = certificates.Renewer(ctx, _domains, _no_warning)
    box.run(renewer.check(), timeout=120)
    second = box.services.tls.info()
    assert second.serial != first.serial
    assert_served_everywhere(box, pebble, second.serial)

    idle.send(b"DONE\r\n")
    assert idle.until_tagged(b"I")[-1].startswith(b"I OK")
    assert idle.command(b"N", b"NOOP")[-1].startswith(b"N OK")
    idle.close()


async def _domains() -> list[str]:
    return [DOMAIN]


async def _no_warning(subject: str, text: str) -> None:
    raise AssertionError("no warning expected")


def test_challenge_fails_connection_refused_keeps_old_certificate(box: BoxHandle, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: the CA's connection is refused
    with running_pebble(tmp_path / "pebble", closed, closed) as p:
        configure(box, p)
        before = box.services.tls.info().serial
        with pytest.raises(AcmeProblem, match=r"could not connect to mail\.example\.test on port 80 \(connection refused\)"):
            order(box)
        status = box.run(certificates.status(box.services.certificates))
        assert status.order.phase == "failed"
        assert status.last_error
        assert "connection refused" in status.last_error
        assert {served_certificate(box.port(s), s).serial_number for s in TLS_SERVICES} == {before}


def test_ca_unreachable(box: BoxHandle, pebble: Pebble) -> None:
    before = box.services.tls.info().serial
    with pytest.raises(AcmeProblem, match=r"certificate authority at https://127\.0\.0\.1:\d+/dir cannot be reached"):
        order(box, directory=f"https://127.0.0.1:{free_port()}/dir")
    status = box.run(certificates.status(box.services.certificates))
    assert status.order.phase == "failed"
    assert status.last_error
    assert "cannot be reached" in status.last_error
    assert box.services.tls.info().serial == before


def test_acme_error_document(box: BoxHandle, pebble: Pebble) -> None:
    # Pebble refuses a name that is not a valid domain name with an ACME problem document (RFC 8555 6.7).
    with pytest.raises(AcmeProblem, match=r"certificate authority .*(rejectedIdentifier|malformed)"):
        box.run(certificates._order(box.services.certificates, box.run(certificates.acme_settings(box.services.db)),
                                    ["bad_name!.test"], reason="test"), timeout=60)


def test_wrong_eab(box: BoxHandle, tmp_path: Path) -> None:
    p = start_pebble(box, tmp_path / "pebble", eab=True)
    try:
        configure(box, p)
        before = box.services.tls.info().serial
        with pytest.raises(AcmeProblem, match="External Account Binding"):
            order(box)  # none given
        with pytest.raises(AcmeProblem, match="External Account Binding"):
            order(box, eab_kid=EAB_KID, eab_hmac_key="AAAA" + EAB_HMAC[4:])
        assert box.services.tls.info().serial == before
        info = order(box, eab_kid=EAB_KID, eab_hmac_key=EAB_HMAC)
        assert info.serial != before
    finally:
        p.stop()


def test_bad_nonces_retried(box: BoxHandle, tmp_path: Path) -> None:
    p = start_pebble(box, tmp_path / "pebble", nonce_reject=30)
    try:
        configure(box, p)
        for _ in range(3):
            info = order(box)
            assert box.services.tls.info().serial == info.serial
    finally:
        p.stop()


def test_account_forgotten_by_restarted_ca_is_registered_again(box: BoxHandle, pebble: Pebble) -> None:
    first = order(box)
    pebble.restart()  # same directory URL; the saved account URL now names an account pebble forgot
    second = order(box)
    assert second.serial != first.serial
    assert box.services.tls.info().serial == second.serial
