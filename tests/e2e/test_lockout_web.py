"""A lockout end to end in headless Chromium (issue 18): wrong passwords over IMAP until the owner's
account is locked for that client address; the owner's web login then says plainly to wait (not
"wrong password"); the admin's Events page lists the lockout with its Unlock button; a click lifts
it, and the owner's IMAP login and web login work again. Screenshots as in test_web_wizard.py
(UPDATE_SCREENSHOTS=1 writes docs/screenshots/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.auth import Throttle
from tests.conftest import BoxHandle, require_program
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.integration.test_live_settings import ADMIN, ADMIN_PASSWORD, admin_console
from tests.integration.test_lockout import ALICE, LOCKOUT, PASSWORD, WRONG, imap_login

pytestmark = [pytest.mark.e2e, pytest.mark.slow(seconds=30), pytest.mark.timeout(300)]


def test_imap_lockout_seen_by_the_owner_and_lifted_by_the_admin(box: BoxHandle, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import Page, expect, sync_playwright

    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    def shot(page: Page, name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    box.add_user(ALICE, PASSWORD)
    with admin_console(box):
        pass  # the wizard's first step: the admin exists
    for key, value in (("setup_step", "7"), ("setup_done", "1"), ("setup_domain", "example.test")):
        box.run(box.services.db.set_setting(key, value))
    # Three failures of one account from one client lock that pair (the policy's numbers, made small).
    box.services.auth.throttle = Throttle(LOCKOUT)
    for _ in range(3):
        assert "[AUTHENTICATIONFAILED]" in imap_login(box, WRONG)
    assert "[UNAVAILABLE]" in imap_login(box, PASSWORD)  # the right password: "try later", not "wrong"

    https = f"https://localhost:{box.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

        def log_in(name: str, password: str) -> Page:
            page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{https}/login")
            page.fill("#f-name", name)
            page.fill("#f-password", password)
            page.click("button[type=submit]")
            return page

        owner = log_in(ALICE, PASSWORD)
        expect(owner.locator("main")).to_contain_text("Too many failed logins from your address: try again in 15 minutes")
        expect(owner.locator("main")).not_to_contain_text("Wrong name or password")
        expect(owner).to_have_url(f"{https}/login")

        admin = log_in(ADMIN, ADMIN_PASSWORD)
        expect(admin).to_have_url(f"{https}/console")
        admin.goto(f"{https}/console/events")
        lockouts = admin.locator("#lockouts tbody tr")
        expect(lockouts).to_have_count(1)
        expect(lockouts).to_contain_text(ALICE)
        expect(lockouts).to_contain_text("127.0.0.1")
        events = admin.locator("table.events")
        expect(events).to_contain_text(f"locked out {ALICE} from 127.0.0.1 for 15 minutes after repeated failed logins (imap)")
        expect(events).to_contain_text(f"failed login for {ALICE} from 127.0.0.1 (imap)")
        shot(admin, "console-events-lockout")

        lockouts.locator("button.unlock").click()
        expect(admin.locator("body")).to_contain_text("Lockout lifted: that client can log in again.")
        expect(admin.locator("#lockouts")).to_have_count(0)
        expect(admin.locator("table.events")).to_contain_text(f"unlocked {ALICE} from 127.0.0.1 (by {ADMIN})")

        assert imap_login(box, PASSWORD) == "OK"
        owner = log_in(ALICE, PASSWORD)
        expect(owner).to_have_url(f"{https}/account")
        browser.close()
