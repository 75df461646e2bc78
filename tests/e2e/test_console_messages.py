"""The console's messages after an action, in headless Chromium: what was not done is shown as a problem
(red, role=alert), what was done as done (green, role=status). Found by newuser36's walkthrough: every
message was green, so "Not ready: the host name does not resolve" on the certificate page, "Not
installed: ..." and "Not restored: ..." looked like successes.

The administrator is made before the box starts (no wizard), as in test_console_mailbox_recreate.py; the
box asks only a loopback DNS server with no records, so the certificate's names resolve nowhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import ServedBox, preset_settings, require_program
from tests.e2e.test_console_mailbox_recreate import (
    ADMIN,
    ADMIN_PASSWORD,
    DOMAIN,
    add_admin_and_domain,
    log_in_admin,
)
from tests.e2e.test_web_wizard import CHROMIUM_ARGS
from tests.support.dns_server import ZoneServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def served(tmp_path: Path, ca: trustme.CA) -> Iterator[ServedBox]:
    with ZoneServer({}) as zone:
        box = ServedBox(tmp_path, ca)
        add_admin_and_domain(box)
        preset_settings(box.data, {"dns_resolver": zone.address})
        box.start()
        try:
            yield box
        finally:
            box.stop()


def test_a_refused_action_is_shown_as_a_problem_and_a_done_one_as_done(served: ServedBox) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    https = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_context(ignore_https_errors=True).new_page()
        log_in_admin(page, https)

        page.goto(f"{https}/console/certificate")
        page.click("#cert-check")
        shown = page.locator(".flash")
        expect(shown).to_have_count(1)
        expect(shown).to_contain_text("Not ready: The host name")
        expect(shown).to_contain_text("does not resolve")
        expect(shown).to_have_class("flash error")
        expect(shown).to_have_attribute("role", "alert")

        page.click("#cert-upload-button")  # nothing pasted
        expect(shown).to_have_text("Not installed: paste both the certificate and its private key.")
        expect(shown).to_have_class("flash error")

        page.goto(f"{https}/console/aliases")
        page.fill("#f-local", "info")
        # Off the box: a target on its own domains that is no mailbox gets a note too (ea470fa).
        page.fill("#f-targets", "someone@elsewhere.test")
        page.click("button:has-text('Create alias')")
        expect(shown).to_have_text(f"Alias info@{DOMAIN} created.")
        expect(shown).to_have_class("flash")
        expect(shown).to_have_attribute("role", "status")
        browser.close()


def test_a_form_sent_after_the_session_ended_comes_back_to_its_page_after_the_login(served: ServedBox) -> None:
    """The session ended in another tab (Log out there), then Check the names now on the certificate
    page: the login page, and after it the certificate page again. The login led to the form's own
    address, /console/certificate/check, which answers only POST: a "Not allowed" page (405) with nothing
    done (found by newuser36's walkthrough, two tabs, with the status page's Check now)."""
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    https = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        page, other = context.new_page(), context.new_page()
        log_in_admin(page, https)
        page.goto(f"{https}/console/certificate")
        other.goto(f"{https}/console")
        other.click("button:has-text('Log out')")
        expect(other).to_have_url(f"{https}/login")

        page.click("#cert-check")
        expect(page).to_have_url(f"{https}/login?next=/console/certificate")
        page.fill("#f-name", ADMIN)
        page.fill("#f-password", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{https}/console/certificate")
        page.click("#cert-check")  # and the form works from there
        expect(page.locator(".flash")).to_contain_text("Not ready")
        browser.close()
