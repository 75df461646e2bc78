"""A mailbox owner accepting the box's self-signed certificate: the account page gave nothing to check it
against (a mail program shows a fingerprint and asks to accept it), and nothing for a program that trusts
such a certificate only from a file (mbsync's CertificateFile, which refused the box: "self-signed
certificate"). The page now shows the fingerprint every TLS port presents, and the file to trust."""

from __future__ import annotations

import hashlib
import imaplib
import re
import ssl

import httpx

from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console

ALICE, PASSWORD = "alice@example.test", "alice's long password 9"


def test_the_account_page_gives_the_fingerprint_and_the_file_of_a_self_signed_certificate(box: BoxHandle) -> None:
    box.add_user(ALICE, PASSWORD)
    with admin_console(box):
        pass  # the wizard's first step: the login page is there only after it
    box.services.tls.install_self_signed("localhost")
    served = ssl.get_server_certificate(("127.0.0.1", box.port("imaps")))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(served)).hexdigest().upper()
    browser = ssl.create_default_context(cadata=served)  # the browser accepted it once, as the owner did
    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=browser) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text)
        assert token
        web.post("/login", data={"csrf": token.group(1), "name": ALICE, "password": PASSWORD})
        page = web.get("/account").text
        shown = re.search(r'id="cert-fingerprint">([0-9A-F:]+)<', page)
        assert shown, page
        assert shown.group(1).replace(":", "") == digest  # what mutt and Thunderbird show when they ask
        download = web.get("/account/certificate.crt")
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/x-x509-ca-cert"
        pem = download.text
    # What mbsync does with it (CertificateFile): trust that file alone, and check the name.
    trusted = ssl.create_default_context(cadata=pem)
    with imaplib.IMAP4_SSL("localhost", box.port("imaps"), ssl_context=trusted, timeout=30) as imap:
        assert imap.login(ALICE, PASSWORD)[0] == "OK"


def test_the_certificate_file_needs_a_login(box: BoxHandle) -> None:
    with admin_console(box):
        pass
    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as web:
        response = web.get("/account/certificate.crt")
        assert response.status_code in (302, 303)
        assert "/login" in response.headers["location"]
