"""Issue 10 item 1 end to end: in headless Chromium an administrator creates a mailbox in the console,
it receives mail over SMTP, is deleted in the console, and another mailbox (and one with the same name)
is created: IMAP shows each an empty INBOX, and mail to them is accepted (250) and arrives. Before the
fix the new mailbox inherited the deleted one's database id, so IMAP showed the old owner's message and
every delivery failed with 451 (a foreign-key error) until a restart.

The administrator is made with the application function before the box starts (no wizard), so this test
does not depend on how the first-run wizard authenticates its first step."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

from tests.conftest import ServedBox, preset_settings, require_program
from tests.e2e.test_web_wizard import CHROMIUM_ARGS

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

DOMAIN = "example.test"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery staple"
JONH, DAVE = f"jonh@{DOMAIN}", f"dave@{DOMAIN}"
PASSWORD = "a long mailbox password"
SECRET = "jonh's private letter"


def add_admin_and_domain(served: ServedBox) -> None:
    """A box past its wizard: the administrator and the domain, by the functions the wizard calls."""
    from appliance.accounts import Accounts
    from appliance.db import Database

    async def make() -> None:
        db = await Database.open(served.data.db)
        try:
            accounts = Accounts(db, data=served.data)
            await accounts.add_admin(ADMIN, ADMIN_PASSWORD)
            await accounts.add_domain(DOMAIN)
        finally:
            await db.close()

    asyncio.run(make())
    preset_settings(served.data, {"setup_step": "7", "setup_done": "1", "setup_domain": DOMAIN})


@pytest.fixture
def served(tmp_path: Path, ca: trustme.CA) -> Iterator[ServedBox]:
    box = ServedBox(tmp_path, ca)
    add_admin_and_domain(box)
    box.start()
    try:
        yield box
    finally:
        box.stop()


def send(served: ServedBox, recipient: str, subject: str, body: str) -> None:
    """Over the MX; smtplib raises unless every recipient got 250."""
    with smtplib.SMTP("localhost", served.port("smtp"), timeout=30) as smtp:
        refused = smtp.sendmail("carol@elsewhere.example", [recipient],
                                f"From: carol@elsewhere.example\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\n"
                                f"{body}\r\n".encode())
    assert refused == {}


def inbox(served: ServedBox, address: str) -> list[bytes]:
    """Every message in the INBOX, as IMAP shows them after a fresh login."""
    imap = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=30)
    try:
        imap.login(address, PASSWORD)
        status, data = imap.select("INBOX", readonly=True)
        assert status == "OK"
        count = int(data[0] or b"0")
        messages = []
        for n in range(1, count + 1):
            status, parts = imap.fetch(str(n), "(BODY.PEEK[])")
            assert status == "OK"
            messages.append(bytes(parts[0][1]))  # type: ignore[index]
        return messages
    finally:
        imap.logout()


def log_in_admin(page: Page, base: str) -> None:
    """The console's login form, as ADMIN; lands on the console."""
    from playwright.sync_api import expect

    page.goto(f"{base}/login")
    page.fill("#f-name", ADMIN)
    page.fill("#f-password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/console")


def test_deleted_mailbox_mail_never_reaches_a_new_mailbox(served: ServedBox) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    https = f"https://localhost:{served.port('https')}"

    def create_mailbox(page: Page, local: str) -> None:
        page.goto(f"{https}/console/mailboxes")
        page.fill("#f-local", local)
        page.select_option("#f-domain", DOMAIN)
        page.fill("#f-password", PASSWORD)
        page.fill("#f-password2", PASSWORD)
        page.click("text=Create mailbox")
        expect(page.locator(".flash")).to_contain_text(f"Mailbox {local}@{DOMAIN} created.")

    def delete_mailbox(page: Page, address: str) -> None:
        page.goto(f"{https}/console/mailboxes")
        page.click(f"tr:has-text('{address}') >> text=Delete")
        expect(page.locator("h1")).to_contain_text(f"Delete the mailbox {address}?")
        expect(page.locator("main")).to_contain_text("starts empty")
        page.click("text=Yes, delete")
        expect(page.locator(".flash")).to_contain_text(f"Mailbox {address} deleted.")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(30_000)
            log_in_admin(page, https)

            create_mailbox(page, "jonh")
            send(served, JONH, "private", SECRET)
            [message] = inbox(served, JONH)
            assert SECRET.encode() in message

            delete_mailbox(page, JONH)
            create_mailbox(page, "dave")
            assert inbox(served, DAVE) == []  # before the fix: jonh's letter
            send(served, DAVE, "welcome dave", "hello dave")  # before the fix: 451
            [message] = inbox(served, DAVE)
            assert b"hello dave" in message
            assert SECRET.encode() not in message

            create_mailbox(page, "jonh")  # the same address again starts empty too
            assert inbox(served, JONH) == []
            send(served, JONH, "welcome back", "hello again")
            [message] = inbox(served, JONH)
            assert b"hello again" in message
            assert SECRET.encode() not in message
        finally:
            browser.close()

    # The old letter is kept aside, out of every mailbox, for the administrator.
    [entry] = served.data.deleted.iterdir()
    assert entry.name.endswith(f"-mailbox-{JONH}")
    assert any(SECRET.encode() in p.read_bytes() for p in (entry / "mail").rglob("*") if p.is_file()
               and p.parent.name in ("new", "cur"))


def test_served_data_is_private_to_the_box(served: ServedBox) -> None:
    """Issue 11 item 6: the db (password hashes, the relay password) and its -wal/-shm are 0600, and the
    data directory and every directory of secrets or mail 0700, while `letterbox serve` runs."""
    data = served.data
    for path in (data.db, data.db.with_name("letterbox.db-wal"), data.db.with_name("letterbox.db-shm"),
                 *data.tls.glob("*.key"), *data.tls.glob("*key*.pem")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (data.root, data.mail, data.spool, data.tls, data.dkim, data.backups, data.deleted):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
