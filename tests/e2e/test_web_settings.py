"""The console's Settings page in headless Chromium against `letterbox serve`: a bad value is shown back
beside its field with the CLI's words and saves nothing; a good one is saved, and `letterbox settings list`
(another process) reads it. Takes docs/screenshots/console-settings.png under UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import log_in_admin, served
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir

__all__ = ["served"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def listed(served: ServedBox) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in served.cli("settings", "list").stdout.splitlines()}


def test_change_settings_in_the_console(served: ServedBox, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    base = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            log_in_admin(page, base)
            page.click("nav.sidebar >> text=Settings")
            expect(page).to_have_url(f"{base}/console/settings")

            page.fill("#f-delivery_log_days", "ten")
            page.click("#save-delivery_log_days")
            error = page.locator("#setting-delivery_log_days .error-text")
            expect(error).to_have_text("delivery_log_days takes a whole number of days from 1 to 3650, not 'ten'; "
                                       "nothing was saved.")
            expect(page.locator("#f-delivery_log_days")).to_have_value("ten")  # to correct
            assert listed(served)["delivery_log_days"] == "30"

            page.fill("#f-delivery_log_days", "90")
            page.click("#save-delivery_log_days")
            expect(page.locator(".flash")).to_contain_text("Saved: delivery_log_days is 90, in force now")
            assert listed(served)["queue_hold"] == "on"  # the tests' box starts with its queue held
            page.select_option("#f-queue_hold", "off")
            page.click("#save-queue_hold")
            expect(page.locator(".flash")).to_contain_text("Saved: queue_hold is off")
            expect(page.locator("#setting-queue_hold .now")).to_have_text("Now: off")
            page.screenshot(path=str(shots / "console-settings.png"), full_page=True)
        finally:
            browser.close()
    assert {k: v for k, v in listed(served).items() if k in ("delivery_log_days", "queue_hold")} == \
        {"delivery_log_days": "90", "queue_hold": "off"}
