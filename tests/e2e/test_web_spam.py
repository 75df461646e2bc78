"""Issue 16 in headless Chromium, with a real rspamd + Redis: the administrator's Spam page (filter on,
learned counts, Junk per mailbox, the settings), and a mailbox owner's Junk page, where "Not spam"
moves a message into the inbox and rspamd learns it as ham. Screenshots: console-spam, account-junk."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import ServedBox, preset_settings, require_program
from tests.e2e.test_console_mailbox_recreate import DOMAIN, add_admin_and_domain, log_in_admin
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.support.rspamd import RspamdPeer, running_rspamd

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

JONH = f"jonh@{DOMAIN}"
PASSWORD = "a long mailbox password"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture
def spam_box(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[ServedBox, RspamdPeer]]:
    require_program("rspamd")
    require_program("redis-server")
    with running_rspamd(tmp_path / "rspamd") as peer:
        box = ServedBox(tmp_path, ca)
        add_admin_and_domain(box)
        # A message without a Message-ID gets rspamd's MISSING_MID (2.5): Junk at 2.
        preset_settings(box.data, {"spam_content_filter": "on", "spam_rspamd_url": peer.scanner,
                                   "spam_rspamd_controller_url": peer.controller, "spam_junk_score": "2",
                                   "spam_reject_score": "15"})
        box.start()
        try:
            yield box, peer
        finally:
            box.stop()


def send(served: ServedBox, subject: str, body: str, *, message_id: bool = True) -> int:
    mid = f"Message-ID: <{abs(hash(subject))}@elsewhere.example>\r\n" if message_id else ""
    data = (f"From: Carol <carol@elsewhere.example>\r\nTo: {JONH}\r\nSubject: {subject}\r\n{mid}"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()
    with smtplib.SMTP("localhost", served.port("smtp"), timeout=60) as smtp:
        smtp.ehlo("mx.elsewhere.example")
        smtp.mail("carol@elsewhere.example")
        smtp.rcpt(JONH)
        code, _ = smtp.data(data)
    return code


def test_spam_page_and_releasing_from_junk(spam_box: tuple[ServedBox, RspamdPeer], tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    served, _peer = spam_box
    served.add_user(JONH, PASSWORD)
    assert send(served, "Our garden party", "Bring the folding chairs on Sunday, the barbecue starts at noon.") == 250
    assert send(served, "Cheap watches", "Best replica watches from our factory, every famous brand at a tenth of the price; order now "
                "while stocks last, free shipping to every country, discreet packaging guaranteed.", message_id=False) == 250
    assert send(served, "Test pattern", GTUBE) == 554
    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    base = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            admin = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860}).new_page()
            admin.set_default_timeout(30_000)
            log_in_admin(admin, base)
            expect(admin.locator("#content-filter-status")).to_contain_text("content filtering is on")
            admin.click(".sidebar >> text=Spam")
            expect(admin.locator("#content-filter")).to_contain_text("content filtering is on (rspamd)")
            expect(admin.locator("#junk-counts")).to_contain_text(f"{JONH}1")
            gtube = admin.locator("#decisions tr", has_text="Gtube pattern")
            expect(gtube).to_contain_text(re.compile(r"reject\s*15\.00"))
            expect(admin.locator("#decisions tr", has_text="MISSING_MID(2.50)")).to_contain_text("junk")
            admin.screenshot(path=str(shots / "console-spam.png"), full_page=True)

            user = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860}).new_page()
            user.set_default_timeout(30_000)
            user.goto(f"{base}/login")
            user.fill("#f-name", JONH)
            user.fill("#f-password", PASSWORD)
            user.click("button[type=submit]")
            expect(user.locator("#junk-link")).to_have_text("1 message in Junk")
            user.click("#junk-link")
            expect(user.locator("#junk")).to_contain_text("Cheap watches")
            user.screenshot(path=str(shots / "account-junk.png"), full_page=True)
            user.click("#junk >> text=Not spam")
            expect(user.locator(".flash")).to_contain_text("moved to your inbox")
            expect(user.locator("#junk")).to_contain_text("Your Junk folder is empty")

            admin.reload()
            expect(admin.locator("#content-filter")).to_contain_text("1 not spam")
        finally:
            browser.close()
