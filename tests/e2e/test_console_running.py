"""End to end in headless Chromium (issue 18): the running box as its admin sees it: the status
checklist with problems and all green, the charts over 30 days of mail, and the delivery log.
Screenshots as in test_web_wizard.py (UPDATE_SCREENSHOTS=1 writes docs/screenshots/).
Network checks go to loopback only: a DNS zone, a listening "remote MX", a private rspamd (the content
filter); the clock's state is given."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import shutil
import smtplib
import sqlite3
from pathlib import Path

import pytest

from appliance.status_checks import Probes
from tests.conftest import BoxHandle, require_program
from tests.e2e.test_web_wizard import CHROMIUM_ARGS, screenshot_dir
from tests.integration.test_live_settings import admin_console
from tests.integration.test_status_checks import closed_port, listening, publish_all_records
from tests.support.dns_server import ZoneServer
from tests.support.rspamd import running_rspamd
from tests.support.spam_settings import use_rspamd

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

DOMAIN, HOST, IPV4 = "example.test", "mail.example.test", "192.0.2.25"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery"
ALICE, PASSWORD = f"alice@{DOMAIN}", "alice's long password 9"


def seed_month(db_path: Path) -> None:
    """30 days of delivery-log rows and disk samples, as a month of a family's mail leaves them."""
    rng = random.Random(18)
    today = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    rows = []
    samples = []
    usage = shutil.disk_usage(db_path.parent)  # today's sample is the real one: the month leads up to it
    used_now, total = usage.total - usage.free, usage.total
    for back in range(29, -1, -1):
        day = today - dt.timedelta(days=back)
        for result, direction, n in (("delivered", "in", rng.randint(8, 30)), ("delivered", "out", rng.randint(2, 9)),
                                     ("junk", "in", rng.randint(0, 6)), ("rejected", "in", rng.randint(5, 25))):
            rows += [(int(day.timestamp()) - i * 60, direction, result, "news@shop.example", ALICE, 2048, "INBOX",
                      "", "192.0.2.7", None, None, ALICE if result != "rejected" else "") for i in range(n)]
        samples.append((day.date().isoformat(), used_now - back * 40 * 2**20, total))
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
        db.executemany("INSERT INTO delivery_log (at, direction, result, sender, recipient, size, detail, check_name,"
                       " client, queue_id, message_id, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO disk_samples (day, used, total) VALUES (?, ?, ?)", samples)


def test_status_log_charts_and_events(box: BoxHandle, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import Page, expect, sync_playwright

    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    def shot(page: Page, name: str, *, full_page: bool = True) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=full_page)

    box.add_user(ALICE, PASSWORD)
    with admin_console(box, HOST):
        pass  # the wizard's first step: the admin exists
    for key, value in (("setup_step", "7"), ("setup_done", "1"), ("setup_domain", DOMAIN)):
        box.run(box.services.db.set_setting(key, value))
    seed_month(box.data.db)
    # Real traffic of today: one message in, one unknown recipient refused.
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
        refused = smtp.sendmail("carol@elsewhere.example", [ALICE, f"nobody@{DOMAIN}"],
                                f"From: carol@elsewhere.example\r\nTo: {ALICE}\r\n"
                                "Message-ID: <hello-1@elsewhere.example>\r\nSubject: hello\r\n\r\nHi.\r\n")
    assert list(refused) == [f"nobody@{DOMAIN}"]
    require_program("rspamd")
    require_program("redis-server")
    dead = f"http://127.0.0.1:{closed_port()}"  # the content filter is on, and nothing answers there yet
    use_rspamd(box, dead, dead)
    with ZoneServer(ttl=0) as zone, listening() as mx_port, running_rspamd(tmp_path / "rspamd") as rspamd:
        box.run(box.services.settings.save(dns_resolver=zone.address, public_ipv4=IPV4))
        box.services.status_probes = Probes(port25_target=lambda: "127.0.0.1:9", clock_synchronised=lambda: True)
        https = f"https://localhost:{box.port('https')}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900}).new_page()
            page.goto(f"{https}/login")
            page.fill("#f-name", ADMIN)
            page.fill("#f-password", ADMIN_PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{https}/console")
            page.click("#check-status")
            expect(page.locator("#check-port25 .badge")).to_have_text("problem")
            expect(page.locator("#check-ptr .badge")).to_have_text("problem")
            expect(page.locator("#check-content_filter .badge")).to_have_text("problem")
            expect(page.locator("#charts svg.chart")).to_have_count(2)
            shot(page, "console-status-problems")

            # Fix everything the checklist found, then check again: all green.
            publish_all_records(box, zone, DOMAIN)  # Check now looks every record up again
            box.run(box.services.db.set_setting("backup_last", f'{{"at": {int(dt.datetime.now(dt.UTC).timestamp())}, "ok": true, "text": "ok"}}'))
            box.services.status_probes = Probes(port25_target=lambda: f"127.0.0.1:{mx_port}",
                                                clock_synchronised=lambda: True)
            use_rspamd(box, rspamd.scanner, rspamd.controller)
            page.click("#check-status")
            expect(page.locator("#checklist .badge.found")).to_have_count(10)
            shot(page, "console-status-green")

            page.goto(f"{https}/console/log")
            expect(page.locator("#delivery-log")).to_contain_text("hello-1@elsewhere.example")
            page.fill("#f-address", "nobody@")
            page.click("#log-search button[type=submit]")
            expect(page.locator("#delivery-log tbody tr")).to_have_count(1)
            expect(page.locator("#delivery-log")).to_contain_text("recipient")
            page.goto(f"{https}/console/log")
            shot(page, "console-delivery-log", full_page=False)  # a month of rows: the first screenful

            browser.close()
