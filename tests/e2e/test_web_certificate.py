"""End to end in headless Chromium: a person goes through the wizard to step 4, chooses an ACME CA
(pebble, standing in for Let's Encrypt), watches the progress, ends with the issued certificate, which
every TLS port then serves, verified against pebble's root. Screenshots as in test_web_wizard.py."""

from __future__ import annotations

import contextlib
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import ServedBox, require_program
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.support.pebble import Pebble, running_pebble
from tests.support.polling import wait_until
from tests.support.tls_probe import TLS_SERVICES, served_certificate
from tests.support.web import setup_code

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

HOST, DOMAIN = "mail.example.test", "example.test"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery staple"


@pytest.fixture
def served(tmp_path: Path, ca: trustme.CA) -> Iterator[ServedBox]:
    box = ServedBox(tmp_path, ca)
    box.hostname = HOST
    # The box starts self-signed, as a fresh one does (ServedBox installs a test CA's certificate).
    for name in ("cert.pem", "key.pem"):
        (box.data.tls / name).unlink()
    box.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
def pebble(served: ServedBox, tmp_path: Path) -> Iterator[Pebble]:
    with running_pebble(tmp_path / "pebble", served.port("http"), served.port("https")) as p:
        yield p


def write_settings(served: ServedBox, settings: dict[str, str]) -> None:
    """Into the running box's db (it reads these settings when it uses them). Plain sqlite3: Playwright's
    sync API keeps an event loop running in this thread."""
    with contextlib.closing(sqlite3.connect(served.data.db, timeout=10)) as db, db:
        db.executemany("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                       "excluded.value", list(settings.items()))


def test_wizard_step4_orders_from_pebble(served: ServedBox, pebble: Pebble, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    https = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(30_000)

        page.goto(f"{https}/setup/1")
        page.fill("#f-code", setup_code(served.data.root))
        page.fill("#f-name", ADMIN)
        page.fill("#f-password", ADMIN_PASSWORD)
        page.fill("#f-password2", ADMIN_PASSWORD)
        page.fill("#f-hostname", HOST)
        page.click("text=Continue")
        expect(page).to_have_url(f"{https}/setup/2")
        page.click("text=Continue")
        expect(page).to_have_url(f"{https}/setup/3")
        page.fill("#f-ipv4", "192.0.32.7")
        page.click("button[value=continue]")
        expect(page).to_have_url(f"{https}/setup/4")

        # The box's view of the world for this test: names resolve through pebble's DNS, where every
        # name is 127.0.0.1 (the wizard refuses a loopback public address, so it is set here), and the
        # CA's own HTTPS is trusted through its test CA file.
        write_settings(served, {"dns_resolver": pebble.dns, "public_ipv4": "127.0.0.1",
                                "acme_ca_file": str(pebble.listener_ca)})

        expect(page.locator("#cert-letsencrypt")).to_contain_text("Port 80 is open on your router")
        page.screenshot(path=str(shots / "setup-4-certificate-choices.png"), full_page=True)
        page.select_option("#f-ca", "custom")
        page.fill("#f-directory", pebble.directory)
        page.fill("#f-email", "admin@example.test")
        page.click("#cert-order")
        expect(page).to_have_url(f"{https}/setup/4")
        expect(page.locator("#cert-progress")).to_be_visible()
        page.screenshot(path=str(shots / "setup-4-certificate-progress.png"), full_page=True)
        def finished() -> bool:
            if page.locator("#cert-progress").get_attribute("data-phase") not in ("pending", "validating"):
                return True
            page.wait_for_timeout(500)
            page.reload()
            return False

        wait_until(finished, seconds=60, interval=0, what="the order finished")
        expect(page.locator("#cert-progress")).to_have_attribute("data-phase", "issued")
        expect(page.locator("#cert-status")).to_contain_text("Pebble Intermediate")
        expect(page.locator("#cert-status .badge.found")).to_have_text("trusted")
        page.screenshot(path=str(shots / "setup-4-certificate-issued.png"), full_page=True)

        # Every TLS port serves it now, verified against pebble's root for the host name.
        verify = ssl.create_default_context(cafile=str(pebble.issuer_root))
        serials = {served_certificate(served.port(s), s, verify, server_hostname=HOST).serial_number
                   for s in TLS_SERVICES}
        assert len(serials) == 1

        page.click("#tls-continue")
        expect(page).to_have_url(f"{https}/setup/5")

        # The console's Certificate page shows the same.
        page.goto(f"{https}/console/certificate")
        expect(page.locator("#cert-status")).to_contain_text("automatic")
        page.screenshot(path=str(shots / "console-certificate.png"), full_page=True)
        browser.close()
