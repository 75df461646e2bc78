"""Issue 14 end to end in headless Chromium: an administrator makes the backup key (the emergency kit
downloads), makes a backup in the console and downloads it; a second, fresh box is restored from the
wizard's first screen ("Restore from a backup", with its setup code); `letterbox serve` switches over
and restarts on the restored data, and the restored mailbox logs in over IMAP and sees its mail."""

from __future__ import annotations

import imaplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import (
    DOMAIN,
    add_admin_and_domain,
    log_in_admin,
    send,
)
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.support.polling import retry

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

JONH = f"jonh@{DOMAIN}"
PASSWORD = "a long mailbox password"


@pytest.fixture
def boxes(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[ServedBox, ServedBox]]:
    first = ServedBox(tmp_path / "first", ca)
    add_admin_and_domain(first)
    second = ServedBox(tmp_path / "second", ca)
    first.start()
    try:
        second.start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def subjects(served: ServedBox, timeout: float = 60) -> list[bytes]:
    """The INBOX's subjects over IMAP, once the box answers with the restored accounts."""
    def read() -> list[bytes]:
        imap = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=10)
        try:
            imap.login(JONH, PASSWORD)
            imap.select("INBOX", readonly=True)
            _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            return sorted(bytes(part[1]).strip() for part in data if isinstance(part, tuple))
        finally:
            imap.logout()

    return retry(read, retry_on=(OSError, imaplib.IMAP4.error), seconds=timeout, interval=0.2)


def test_backup_in_the_console_and_restore_from_the_wizard(boxes: tuple[ServedBox, ServedBox], tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    first, second = boxes
    first.add_user(JONH, PASSWORD)
    send(first, JONH, "first letter", "hello")
    send(first, JONH, "second letter", "hello again")
    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    one = f"https://localhost:{first.port('https')}"
    two = f"https://localhost:{second.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True, accept_downloads=True).new_page()
            page.set_default_timeout(60_000)
            log_in_admin(page, one)
            page.goto(f"{one}/console/backups")
            with page.expect_download() as kit_download:
                page.click("#make-key")
            kit = tmp_path / "kit.txt"
            kit_download.value.save_as(kit)
            assert "AGE-SECRET-KEY-" in kit.read_text()
            page.goto(f"{one}/console/backups")
            page.click("#create-backup")
            expect(page.locator("#backup-job")).to_contain_text("Backup made", timeout=60_000)
            # The last backup is named from the data directory, as the page names its folder: its full
            # path (here pytest's temporary one) was in the README's screenshot.
            expect(page.locator("#backup-schedule")).to_contain_text("Backup made: backups/letterbox-")
            assert str(first.data.root) not in page.locator("main").inner_text()
            page.screenshot(path=str(shots / "console-backups.png"), full_page=True)
            with page.expect_download() as backup_download:
                page.click("#backup-list a")
            file = tmp_path / backup_download.value.suggested_filename
            backup_download.value.save_as(file)
            assert file.name.startswith("letterbox-")
            assert file.name.endswith(".tar.zst.age")
            expect(page.locator("#download-progress")).to_contain_text("done")

            # The same file uploaded back for one mailbox: its manifest first, then the restore with
            # its progress (the page polls), nothing doubled since the mail is still there.
            page.goto(f"{one}/console/backups")
            upload = page.locator("#backup-upload")
            upload.locator("input[name=backup]").set_input_files(str(file))
            upload.locator("input[name=what][value=mailbox]").check()
            upload.locator("input[name=address]").fill(JONH)
            page.screenshot(path=str(shots / "console-backups-upload.png"), full_page=True)  # before the kit
            upload.locator("textarea[name=secret]").fill(kit.read_text())
            upload.locator("#upload-backup").click()
            expect(page.locator("#backup-manifest")).to_contain_text(JONH)
            page.screenshot(path=str(shots / "console-backup-confirm.png"), full_page=True)
            page.click("#confirm-restore")
            expect(page.locator("#backup-job")).to_contain_text(f"Restored 0 messages into {JONH}", timeout=60_000)

            # The second box is fresh: its wizard's first screen offers the restore.
            code = (second.data.root / "setup-code").read_text().strip()
            page.goto(f"{two}/setup/1")
            page.screenshot(path=str(shots / "setup-1-restore-choice.png"), full_page=True)
            page.click("#restore-link")
            page.fill("#code", code)
            page.set_input_files("#backup", str(file))
            page.screenshot(path=str(shots / "setup-restore.png"), full_page=True)  # before the kit is pasted
            page.fill("#secret", kit.read_text())
            page.click("button[type=submit]")
            # The upload goes by XMLHttpRequest (for its progress); the answer is the restore's progress.
            expect(page.locator("#restore-job")).to_be_visible(timeout=60_000)
        finally:
            browser.close()
    assert subjects(second) == [b"Subject: first letter", b"Subject: second letter"]
    assert "restoring: switching the data directory over" in second.log_path.read_text()
    assert list(second.data.root.parent.glob("data.before-restore-*"))
