"""Client autoconfig: Thunderbird's config-v1.1.xml at both URLs, Outlook's autodiscover."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.web import ALICE, DOMAIN, HOSTNAME, WebClient, web_client
from web.clients import AUTODISCOVER_OUTLOOK_NS, autodiscover_address

OUTLOOK_REQUEST = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>{address}</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"""


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.add_user()
        yield client


def servers(xml: bytes) -> list[tuple[str, str, str, str, str]]:
    root = ET.fromstring(xml)
    found = []
    for element in root.iter():
        if element.tag in ("incomingServer", "outgoingServer"):
            found.append((element.get("type") or "", element.findtext("hostname") or "",
                          element.findtext("port") or "", element.findtext("socketType") or "",
                          element.findtext("username") or ""))
    return found


@pytest.mark.parametrize("path", ["/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"])
def test_thunderbird_autoconfig(web: WebClient, path: str) -> None:
    response = web.get(f"{path}?emailaddress={ALICE}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "clientConfig"
    assert root.get("version") == "1.1"
    assert root.find("emailProvider").get("id") == DOMAIN  # type: ignore[union-attr]
    assert root.findtext("emailProvider/domain") == DOMAIN
    assert servers(response.content) == [
        ("imap", HOSTNAME, "993", "SSL", "%EMAILADDRESS%"),
        ("imap", HOSTNAME, "143", "STARTTLS", "%EMAILADDRESS%"),
        ("pop3", HOSTNAME, "995", "SSL", "%EMAILADDRESS%"),
        ("smtp", HOSTNAME, "465", "SSL", "%EMAILADDRESS%"),
        ("smtp", HOSTNAME, "587", "STARTTLS", "%EMAILADDRESS%"),
    ]
    assert "plain" not in response.text.lower().replace("password-cleartext", "")


def test_autoconfig_without_address_uses_the_host_name(web: WebClient) -> None:
    web.add_domain("second.example")
    response = web.client.get("https://autoconfig.second.example/mail/config-v1.1.xml")
    assert response.status_code == 200
    assert b"<domain>second.example</domain>" in response.content
    # Another name, several domains: nothing to say.
    assert web.get("/mail/config-v1.1.xml").status_code == 404


def test_autoconfig_for_a_foreign_domain_is_404(web: WebClient) -> None:
    for address in ("bob@elsewhere.example", "not an address", "@@"):
        response = web.get("/mail/config-v1.1.xml", params={"emailaddress": address})
        assert response.status_code == 404, address


def test_autoconfig_is_open_before_setup(tmp_path: Path) -> None:
    with web_client(tmp_path / "fresh") as fresh:
        fresh.add_domain()
        response = fresh.get(f"/mail/config-v1.1.xml?emailaddress={ALICE}")
        assert response.status_code == 200


@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml",
                                  "/AutoDiscover/AutoDiscover.xml"])
def test_outlook_autodiscover(web: WebClient, path: str) -> None:
    response = web.client.post(path, content=OUTLOOK_REQUEST.format(address=ALICE).encode(),
                               headers={"content-type": "text/xml"})
    assert response.status_code == 200
    root = ET.fromstring(response.content)
    ns = {"o": AUTODISCOVER_OUTLOOK_NS}
    protocols = root.findall("o:Response/o:Account/o:Protocol", ns)
    got = [(p.findtext("o:Type", namespaces=ns), p.findtext("o:Server", namespaces=ns),
            p.findtext("o:Port", namespaces=ns), p.findtext("o:SSL", namespaces=ns),
            p.findtext("o:LoginName", namespaces=ns)) for p in protocols]
    assert got == [("IMAP", HOSTNAME, "993", "on", ALICE), ("SMTP", HOSTNAME, "465", "on", ALICE)]


def test_autodiscover_refuses_bad_requests(web: WebClient) -> None:
    post = web.client.post
    assert post("/autodiscover/autodiscover.xml", content=b"<x/>").status_code == 400
    bob = OUTLOOK_REQUEST.format(address="bob@elsewhere.example").encode()
    assert post("/autodiscover/autodiscover.xml", content=bob).status_code == 404
    huge = OUTLOOK_REQUEST.format(address=ALICE).encode() + b" " * 20_000
    assert post("/autodiscover/autodiscover.xml", content=huge).status_code == 413
    assert web.get("/autodiscover/autodiscover.xml").status_code == 405


def test_autodiscover_address_parsing() -> None:
    assert autodiscover_address(OUTLOOK_REQUEST.format(address=ALICE).encode()) == ALICE
    assert autodiscover_address(b"<a:EMailAddress> bob@example.org </a:EMailAddress>") == "bob@example.org"
    assert autodiscover_address(b"<EMailAddress></EMailAddress>") is None
    assert autodiscover_address(b"<EMailAddress>b\xc3\xa9@example.org</EMailAddress>") is None
    entity_bomb = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><EMailAddress>&a;@example.org</EMailAddress>'
    assert autodiscover_address(entity_bomb) == "&a;@example.org"  # never expanded


def test_acme_http01_answers_from_the_pending_challenges(web: WebClient) -> None:
    assert web.get("/.well-known/acme-challenge/abc_DEF-1").status_code == 404
    web.services.certificates.http01 = {"abc_DEF-1": "abc_DEF-1.thumbprint"}
    response = web.client.get("http://testserver/.well-known/acme-challenge/abc_DEF-1")
    assert response.status_code == 200
    assert response.text == "abc_DEF-1.thumbprint"
    assert web.get("/.well-known/acme-challenge/other").status_code == 404
