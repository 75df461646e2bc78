"""End to end in headless Chromium (Debian's chromium, driven by Playwright for Python): from an empty
data directory a person completes the wizard by clicking and typing, copies the DNS records into their
(loopback) DNS server and checks them, creates a mailbox in the console, and that mailbox then logs in
over IMAP and receives a message sent over SMTP. Every wizard step and console page is saved as a
screenshot in docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import imaplib
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import REPO, ServedBox, preset_settings, require_program
from tests.support.dns_server import ZoneServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HOST, DOMAIN, PUBLIC_IP = "mail.example.test", "example.test", "198.51.100.7"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery staple"
ALICE, ALICE_PASSWORD = "alice@example.test", "alice's long mail password"
BOB_PASSWORD = "bob's long mail password"
TXT_CHUNK = 255  # one character-string of a TXT record (RFC 1035 3.3)


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer({}) as server:
        yield server


@pytest.fixture
def served(tmp_path: Path, ca: trustme.CA, zone: ZoneServer) -> Iterator[ServedBox]:
    box = ServedBox(tmp_path, ca)
    preset_settings(box.data, {"dns_resolver": zone.address})  # DNS checks ask only the loopback server
    box.start()
    try:
        yield box
    finally:
        box.stop()


def zone_value(rdtype: str, value: str) -> str:
    if rdtype != "TXT":
        return value
    return " ".join(f'"{value[i:i + TXT_CHUNK]}"' for i in range(0, len(value), TXT_CHUNK))


def test_wizard_console_and_first_mail(served: ServedBox, zone: ZoneServer) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import Page, expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)

    def shot(page: Page, name: str) -> None:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    https = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(30_000)

        # A person types the box's plain-HTTP address: redirected to HTTPS, and to the wizard.
        page.goto(f"http://localhost:{served.port('http')}/")
        expect(page).to_have_url(f"{https}/setup/1")
        expect(page.locator("h1")).to_have_text("Welcome to Letterbox")

        # 1: administrator and host name; a mistake first, shown next to its field.
        page.fill("#f-name", ADMIN)
        page.fill("#f-password", ADMIN_PASSWORD)
        page.fill("#f-password2", "not the same")
        page.fill("#f-hostname", HOST)
        page.click("text=Continue")
        expect(page.locator("#e-password2")).to_have_text("the two passwords differ")
        shot(page, "setup-1-admin-error")
        page.fill("#f-password", ADMIN_PASSWORD)
        page.fill("#f-password2", ADMIN_PASSWORD)
        shot(page, "setup-1-admin")
        page.click("text=Continue")

        # 2: the domain, suggested from the host name.
        expect(page).to_have_url(f"{https}/setup/2")
        expect(page.locator("#f-domain")).to_have_value(DOMAIN)
        shot(page, "setup-2-domain")
        page.click("text=Continue")

        # 3: DNS. Publish the MX and a wrong A record first, then copy every record from the table.
        expect(page).to_have_url(f"{https}/setup/3")
        page.fill("#f-ipv4", PUBLIC_IP)
        zone.set(DOMAIN, "MX", [f"10 {HOST}."])
        zone.set(HOST, "A", ["203.0.113.99"])
        page.click("#check-now")
        expect(page.locator("#dns-mx .badge")).to_have_text("found")
        expect(page.locator("#dns-a .badge")).to_have_text("wrong")
        expect(page.locator("#dns-spf .badge")).to_have_text("missing")
        shot(page, "setup-3-dns-first-check")
        rows = page.locator("table.dns tbody tr")
        for i in range(rows.count()):
            row = rows.nth(i)
            rdtype = row.locator("td.type").inner_text().strip()
            name = row.locator("td.name button.copy").get_attribute("data-copy")
            value = row.locator("td.value button.copy").get_attribute("data-copy")
            assert name and value, f"row {i} has nothing to copy"
            zone.set(name, rdtype, [zone_value(rdtype, value)])
        record_count = rows.count()
        page.click("#check-now")
        expect(page.locator("table.dns .badge.found")).to_have_count(record_count)
        shot(page, "setup-3-dns-all-found")
        page.click("button[value=continue]")

        # 4: the certificate is kept.
        expect(page).to_have_url(f"{https}/setup/4")
        shot(page, "setup-4-certificate")
        page.click("text=Keep this certificate and continue")

        # 5: a first mailbox.
        expect(page).to_have_url(f"{https}/setup/5")
        page.fill("#f-local", "bob")
        page.fill("#f-name", "Bob Example")
        page.fill("#f-password", BOB_PASSWORD)
        page.fill("#f-password2", BOB_PASSWORD)
        page.click("button[value=add]")
        expect(page.locator(".flash")).to_have_text("Mailbox bob@example.test created.")
        shot(page, "setup-5-mailboxes")
        page.click("button[value=continue]")

        # 6: done.
        expect(page).to_have_url(f"{https}/setup/6")
        expect(page.locator("h1")).to_have_text("Your box is ready")
        shot(page, "setup-6-done")

        # A reload resumes where the wizard is, and now it is finished: the console.
        page.goto(f"{https}/setup")
        expect(page).to_have_url(f"{https}/console")
        shot(page, "console-status")

        page.click(".sidebar >> text=Domains")
        expect(page.locator("h1")).to_have_text("Domains")
        shot(page, "console-domains")
        page.click(f"table >> text={DOMAIN}")
        expect(page.locator("h1")).to_have_text(f"DNS records for {DOMAIN}")
        shot(page, "console-domain-dns")

        # The mailbox the test will receive mail in, created in the console.
        page.click(".sidebar >> text=Mailboxes")
        page.fill("#f-local", "alice")
        page.fill("#f-name", "Alice Example")
        page.fill("#f-quota", "2G")
        page.fill("#f-password", ALICE_PASSWORD)
        page.fill("#f-password2", ALICE_PASSWORD)
        page.click("#new-mailbox button[type=submit]")
        expect(page.locator(".flash")).to_have_text(f"Mailbox {ALICE} created.")
        shot(page, "console-mailboxes")
        page.click(f"table >> text={ALICE}")
        expect(page.locator("h1")).to_have_text(ALICE)
        shot(page, "console-mailbox")
        page.click("text=Delete this mailbox")
        expect(page.locator("h1")).to_have_text(f"Delete the mailbox {ALICE}?")
        shot(page, "console-mailbox-delete-confirm")
        page.click("text=Cancel")

        page.click(".sidebar >> text=Aliases")
        page.fill("#f-local", "info")
        page.fill("#f-targets", f"{ALICE}\nbob@example.test")
        page.click("text=Create alias")
        expect(page.locator(".flash")).to_have_text(f"Alias info@{DOMAIN} created.")
        shot(page, "console-aliases")

        page.click(".sidebar >> text=Events")
        expect(page.locator("table.events")).to_contain_text(f"mailbox {ALICE} created")
        shot(page, "console-events")
        page.click(".sidebar >> text=Status")
        expect(page.locator("body")).to_contain_text(f"{record_count} found")
        shot(page, "console-status")

        # The mailbox owner's own page, in a separate browser session.
        user = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860}).new_page()
        user.goto(f"{https}/console")
        expect(user).to_have_url(f"{https}/login?next=/console")
        shot(user, "login")
        user.fill("#f-name", ALICE)
        user.fill("#f-password", ALICE_PASSWORD)
        user.click("button[type=submit]")
        expect(user).to_have_url(f"{https}/account")  # not the console asked for: that is for admins
        expect(user.locator("h1")).to_have_text(ALICE)
        shot(user, "account")
        browser.close()

    # The mailbox made in the console works: IMAP login, and mail sent over SMTP arrives.
    with smtplib.SMTP("localhost", served.port("smtp"), timeout=30) as smtp:
        smtp.sendmail("carol@elsewhere.example", [ALICE],
                      b"From: carol@elsewhere.example\r\nTo: alice@example.test\r\nSubject: hello from the e2e\r\n"
                      b"\r\nWelcome to your new box.\r\n")
    imap = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=30)
    try:
        imap.login(ALICE, ALICE_PASSWORD)
        deadline = time.monotonic() + 30
        while True:
            imap.select("INBOX")
            status, data = imap.search(None, "SUBJECT", '"hello from the e2e"')
            if status == "OK" and data[0].split():
                break
            assert time.monotonic() < deadline, "the message did not arrive"
            time.sleep(0.3)
        _, fetched = imap.fetch(data[0].split()[0], "(BODY[TEXT])")
        assert b"Welcome to your new box." in fetched[0][1]  # type: ignore[index]
    finally:
        imap.logout()
