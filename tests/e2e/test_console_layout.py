"""What a new administrator saw of the console in Chromium, measured rather than looked at: the delivery
log broke addresses anywhere (anna@smithf / amily.ne / t) and wrapped its search onto two rows, the Backups page's forms were bare inline
inputs without the console's field layout, the Spam page's greylist card touched the card above it, and the
Certificate page's "Check the names now" button the label below it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import DOMAIN, PASSWORD, log_in_admin, send, served
from tests.e2e.test_web_wizard import CHROMIUM_ARGS

__all__ = ["served"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

ANNA = f"anna.maria@{DOMAIN}"

# For each address in the log's From and To cells: how many lines each side of its @ takes.
ADDRESS_LINES = """() => [...document.querySelectorAll("#delivery-log tbody td code")].map((code) => {
  const lines = (node) => { const range = document.createRange(); range.selectNodeContents(node);
                            return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size; };
  return [code.textContent, [...code.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map(lines)];
})"""
# The delivery log's search controls: each one's top, bottom and left edge.
SEARCH_CONTROLS = """() => [...document.querySelectorAll("#log-search input, #log-search select, #log-search button")]
  .map((el) => { const r = el.getBoundingClientRect(); return [el.name || el.textContent, r.top, r.bottom, r.left]; })"""
# Every field a person fills in on the page: (its name, whether it sits in a .field with its own label).
FIELDS = """() => [...document.querySelectorAll("main form input, main form select, main form textarea")]
  .filter((el) => !["hidden", "checkbox", "radio"].includes(el.type))
  .map((el) => [el.name, Boolean(el.closest(".field")) && el.labels.length === 1])"""


def test_log_addresses_backup_forms_and_spam_cards(served: ServedBox, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import expect, sync_playwright

    served.add_user(ANNA, PASSWORD)
    send(served, ANNA, "hello", "a first letter")
    base = f"https://localhost:{served.port('https')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860}).new_page()
            page.set_default_timeout(60_000)
            log_in_admin(page, base)

            page.goto(f"{base}/console/log")
            expect(page.locator("#delivery-log")).to_contain_text(ANNA)
            cells = page.evaluate(ADDRESS_LINES)
            assert ["carol@elsewhere.example", [1, 1]] in cells
            assert [ANNA, [1, 1]] in cells
            # Its search fields and button share one row at 1280 px (two fields and the button wrapped
            # onto a second), left to right, their edges level.
            controls = page.evaluate(SEARCH_CONTROLS)
            assert [name for name, *_ in controls] == ["address", "text", "result", "since", "until", "Search"]
            assert max(top for _, top, _, _ in controls) - min(top for _, top, _, _ in controls) <= 1, controls
            assert max(bottom for _, _, bottom, _ in controls) - min(bottom for _, _, bottom, _ in controls) <= 1, controls
            lefts = [left for *_, left in controls]
            assert lefts == sorted(lefts), controls

            page.goto(f"{base}/console/backups")
            fields = page.evaluate(FIELDS)
            assert {name for name, _ in fields} >= {"keep", "passphrase", "hour", "target", "repo", "password",
                                                    "backup", "secret", "address", "folder"}
            assert [name for name, framed in fields if not framed] == []
            expect(page.locator("#backup-schedule")).to_contain_text("Daily backups are off.")
            page.goto(f"{base}/console/updates")
            assert page.evaluate(FIELDS) == [["bundle", True]]

            page.goto(f"{base}/console/certificate")
            check = page.locator("#cert-check").bounding_box()
            label = page.locator("label[for=f-ca]").bounding_box()
            assert check
            assert label
            assert label["y"] - (check["y"] + check["height"]) >= 8

            page.goto(f"{base}/console/spam")
            suspended = page.locator("#suspended").bounding_box()
            greylist = page.locator("#greylist").bounding_box()
            assert suspended
            assert greylist
            assert greylist["y"] - (suspended["y"] + suspended["height"]) >= 12
        finally:
            browser.close()
