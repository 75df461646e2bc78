"""The console's Updates page in headless Chromium against `letterbox serve`: the running version, and a
newer bundle chosen in the file field and uploaded (multipart, CSRF) until it waits for letterbox-update
as DATA/updates/incoming.tar. Takes docs/screenshots/console-updates.png under UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.bundle import write_bundle
from appliance.update import running_version
from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import log_in_admin, served
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.support.releases import build_wheel

__all__ = ["served"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def test_upload_a_newer_version_in_the_console(served: ServedBox, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    build_wheel(tmp_path / "wheels", "99.0.0")
    bundle = write_bundle(tmp_path / "wheels", tmp_path)
    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    base = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(60_000)
            log_in_admin(page, base)
            expect(page.locator("footer.version")).to_have_text(f"Letterbox {running_version()}")
            page.goto(f"{base}/console/updates")
            expect(page.locator("#running-version")).to_have_text(f"Letterbox {running_version()}")
            page.set_input_files("input[name=bundle]", str(bundle))
            page.screenshot(path=str(shots / "console-updates.png"), full_page=True)
            page.click("#upload-update")
            expect(page.locator("#update-job")).to_contain_text("Installing")
            expect(page.locator("body")).to_contain_text("Letterbox 99.0.0 is being installed")
        finally:
            browser.close()
    incoming = served.data.root / "updates" / "incoming.tar"
    assert incoming.read_bytes() == bundle.read_bytes()
