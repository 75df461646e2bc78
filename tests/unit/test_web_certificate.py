"""The console's Certificate page: status, uploads refused with their reason (the old certificate kept),
a good upload installed, back to self-signed; the wizard's step 4 offers the same choices."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.web import ADMIN, ADMIN_PASSWORD, HOSTNAME, WebClient, web_client


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.add_admin()
        client.login(ADMIN, ADMIN_PASSWORD)
        yield client


@pytest.fixture(scope="module")
def pems() -> dict[str, str]:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    good = intermediate.issue_cert(HOSTNAME)
    now = dt.datetime.now(dt.UTC)
    expired = intermediate.issue_cert(HOSTNAME, not_before=now - dt.timedelta(days=90), not_after=now - dt.timedelta(days=1))
    wrong = intermediate.issue_cert("other.example.test")
    return {
        "leaf": good.cert_chain_pems[0].bytes().decode(), "key": good.private_key_pem.bytes().decode(),
        "chain": intermediate.cert_pem.bytes().decode(),
        "other_key": intermediate.issue_cert(HOSTNAME).private_key_pem.bytes().decode(),
        "stranger": trustme.CA().cert_pem.bytes().decode(),
        "expired": expired.cert_chain_pems[0].bytes().decode(), "expired_key": expired.private_key_pem.bytes().decode(),
        "wrong": wrong.cert_chain_pems[0].bytes().decode(), "wrong_key": wrong.private_key_pem.bytes().decode(),
    }


def upload(web: WebClient, cert: str, key: str, chain: str = "") -> str:
    response = web.post("/console/certificate/upload", {"cert": cert, "key": key, "chain": chain},
                        token_from="/console/certificate")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/certificate"
    return html.unescape(web.get("/console/certificate").text)


def test_page_shows_status_and_choices(web: WebClient) -> None:
    page = web.get("/console/certificate")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert "self-signed" in text
    assert "Get a certificate from Let's Encrypt" in text
    assert "Use your own certificate" in text
    assert "Port 80 is open on your router" in text
    assert 'href="/console/certificate"' in text  # in the console's menu


@pytest.mark.parametrize(("cert", "key", "chain", "message"), [
    ("leaf", "other_key", "chain", "Not installed: The private key does not belong to this certificate."),
    ("leaf", "key", "stranger", "Not installed: The chain does not verify"),
    ("expired", "expired_key", "chain", "Not installed: The certificate expired on"),
    ("wrong", "wrong_key", "chain", f"does not cover the host name {HOSTNAME}"),
    ("garbage", "key", "", "Not installed: The certificate is not a PEM certificate"),
])
def test_upload_refused(web: WebClient, pems: dict[str, str], cert: str, key: str, chain: str, message: str) -> None:
    before = web.services.tls.info().serial
    text = upload(web, pems.get(cert, "garbage"), pems[key], pems.get(chain, ""))
    assert message in text
    assert web.services.tls.info().serial == before


def test_good_upload_then_self_signed(web: WebClient, pems: dict[str, str]) -> None:
    text = upload(web, pems["leaf"], pems["key"], pems["chain"])
    assert f"Installed: the certificate for {HOSTNAME} is served from now on." in text
    info = web.services.tls.info()
    assert not info.self_signed
    assert "trusted" in text
    assert "yours to renew" in text
    response = web.post("/console/certificate/self-signed", {}, token_from="/console/certificate")
    assert response.status_code == 303
    assert web.services.tls.info().self_signed


def test_order_refused_when_host_name_does_not_resolve(web: WebClient) -> None:
    web.set_setting("dns_resolver", "127.0.0.1:9")  # nothing answers: the name cannot resolve
    response = web.post("/console/certificate/order", {"ca": "custom", "directory": "https://127.0.0.1:9/dir"},
                        token_from="/console/certificate")
    assert response.status_code == 303
    ctx = web.services.certificates
    assert ctx.running is not None
    task = ctx.running

    async def finished() -> None:
        await task

    web.run(finished)
    text = html.unescape(web.get("/console/certificate").text)
    assert 'data-phase="failed"' in text
    assert f"The host name {HOSTNAME} does not resolve" in text


def test_custom_ca_needs_an_https_url(web: WebClient) -> None:
    web.post("/console/certificate/order", {"ca": "custom", "directory": "ftp://x"}, token_from="/console/certificate")
    assert "Enter the directory URL of your CA" in html.unescape(web.get("/console/certificate").text)


def test_wizard_step4_offers_the_choices(web: WebClient) -> None:
    web.set_setting("setup_step", "4")
    text = html.unescape(web.get("/setup/4").text)
    assert "Get a certificate from Let's Encrypt" in text
    assert 'action="/setup/4/order"' in text
    assert 'action="/setup/4/upload"' in text
    assert "Keep self-signed and continue" in text


def test_check_names_now(web: WebClient) -> None:
    from tests.support.dns_server import ZoneServer

    with ZoneServer({}) as zone:
        zone.set(HOSTNAME, "A", ["192.0.32.7"])
        web.set_setting("dns_resolver", zone.address)
        web.set_setting("public_ipv4", "192.0.32.7")
        web.post("/console/certificate/check", {}, token_from="/console/certificate")
        assert f"Ready: {HOSTNAME} leads to this box." in html.unescape(web.get("/console/certificate").text)
        zone.set(HOSTNAME, "A", ["192.0.32.8"])
        web.post("/console/certificate/check", {}, token_from="/console/certificate")
        text = html.unescape(web.get("/console/certificate").text)
        assert f"Not ready: The host name {HOSTNAME} points at 192.0.32.8, not at this box's public address 192.0.32.7" in text
