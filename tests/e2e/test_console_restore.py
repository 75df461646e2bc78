"""The console's "Restore the whole box" in headless Chromium, as a new administrator does it: the backup
was made before this login, so the restored box has no session for the browser. The page followed the
progress poll's redirect to the login page, could not read it as progress, and showed "Restore running
0 %" for ever; it now reloads to the login page, and the restored box's events say what happened."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import log_in_admin, served
from tests.e2e.test_web_wizard import CHROMIUM_ARGS

__all__ = ["served"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def test_whole_box_restore_from_the_console_ends_at_the_login(served: ServedBox, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    base = f"https://localhost:{served.port('https')}"
    # `make run`'s list of listeners names 10080, which browsers refuse: the address to type is said.
    assert f"Open {base}/ in a web browser." in served.log_path.read_text()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            before = browser.new_context(ignore_https_errors=True, accept_downloads=True).new_page()
            before.set_default_timeout(60_000)
            log_in_admin(before, base)
            before.goto(f"{base}/console/backups")
            with before.expect_download() as kit_download:
                before.click("#make-key")
            kit = tmp_path / "kit.txt"
            kit_download.value.save_as(kit)
            before.goto(f"{base}/console/backups")
            before.click("#create-backup")
            expect(before.locator("#backup-job")).to_contain_text("Backup made", timeout=60_000)

            page = browser.new_context(ignore_https_errors=True).new_page()  # a login after the backup
            page.set_default_timeout(60_000)
            log_in_admin(page, base)
            page.goto(f"{base}/console/backups")
            restore = page.locator("#backup-restore-box")
            restore.locator("textarea[name=secret]").fill(kit.read_text())
            restore.locator("input[name=confirm]").check()
            restore.locator("button[type=submit]").click()
            expect(page).to_have_url(re.compile(r"/login\b"), timeout=90_000)
            expect(page.locator("#restored")).to_contain_text("restored from a backup")  # why the login is asked

            log_in_admin(page, base)
            page.goto(f"{base}/console/events")
            # When the backup was made, as the console shows times (the manifest's ISO time read "T...Z").
            expect(page.locator("main")).to_contain_text(re.compile(r"restored from a backup \(made \d{4}-\d\d-\d\d \d\d:\d\d UTC on "))
            expect(page.locator("main")).to_contain_text(".before-restore-")
        finally:
            browser.close()
    assert list(served.data.root.parent.glob("data.before-restore-*"))
