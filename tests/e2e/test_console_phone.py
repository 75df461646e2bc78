"""The console and the account pages on a phone-sized screen (360 px wide) in headless Chromium: nothing
runs off the right edge. The top bar pushed "Log out" off the screen and every page scrolled sideways;
wide tables (Domains, Mailboxes, Events) spilled out of their cards, and the DNS records' values and
their Copy buttons were off to the right. On the account page the mail program settings' Port and Security
columns were off to the right too, to be scrolled to inside the table by the owner setting up that phone, as
were Junk's Not spam button and the mail log's recipients and results (tables marked .stack). On the status
page the checklist's DKIM record name and the Storage card's public IPv6 address and content filter's URL
were cut off at the card's edge."""

from __future__ import annotations

import imaplib
import smtplib
from pathlib import Path

import pytest

from appliance.status_checks import Probes
from tests.conftest import BoxHandle, require_program
from tests.e2e.test_web_wizard import CHROMIUM_ARGS
from tests.integration.test_live_settings import ADMIN, ADMIN_PASSWORD, admin_console
from tests.support.dns_server import ZoneServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow(seconds=15), pytest.mark.timeout(300)]

ALICE, ALICE_PASSWORD = "alice@example.test", "alice's long mail password"
PHONE_WIDTH = 360
CONSOLE_PAGES = ["/console", "/console/domains", "/console/domains/example.test", "/console/mailboxes",
                 f"/console/mailboxes/{ALICE}", "/console/aliases", "/console/sending", "/console/events",
                 "/console/log", "/console/spam", "/console/backups", "/console/certificate", "/console/updates", "/console/settings",
                 "/console/password"]
ACCOUNT_PAGES = ["/account", "/account/log", "/account/junk"]
# What a phone's owner reads or presses in a table: the mail program settings, Junk's rows, the mail log's rows.
STACKED = "table.settings td, table#junk td, table#delivery-log td"
# Elements that stick out past the screen's right edge (a mobile browser widens its layout to fit them), other than inside a box that scrolls sideways.
OFF_SCREEN = """(width) => [...document.querySelectorAll('body *')].filter(e => {
    if (e.getBoundingClientRect().right <= width + 0.5) return false;
    for (let p = e.parentElement; p; p = p.parentElement)
        if (['auto', 'scroll'].includes(getComputedStyle(p).overflowX) && p.getBoundingClientRect().right <= width + 0.5) return false;
    return true;
}).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : ''))"""
# Cards whose text runs past their edge (a card scrolls sideways for a wide table only).
CUT_OFF_CARDS = """() => [...document.querySelectorAll('.card')].filter(c => !c.querySelector('table') && c.scrollWidth > c.clientWidth + 1)
    .map(c => 'card ' + (c.querySelector('h1, h2') || c).innerText.slice(0, 30))"""
# A home connection's public IPv6 address (SLAAC): one word of 38 characters.
IPV6 = "2a02:8070:a184:3f00:9cd1:2ff:fe4c:71a2"


def test_no_page_runs_off_a_phone_screen(box: BoxHandle, tmp_path: Path) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import Browser, Page, sync_playwright

    shots = tmp_path / "screenshots"  # to look at; the README shows the desktop ones
    shots.mkdir()
    box.add_user(ALICE, ALICE_PASSWORD)
    with admin_console(box):
        pass  # the wizard's first step: the admin exists
    for key, value in (("setup_step", "7"), ("setup_done", "1"), ("setup_domain", "example.test")):
        box.run(box.services.db.set_setting(key, value))
    https = f"https://localhost:{box.port('https')}"
    # A row in the mail log and a message in Junk, so their tables have something to lay out.
    with smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), context=box.client_context, timeout=30) as smtp:
        smtp.login(ALICE, ALICE_PASSWORD)
        smtp.sendmail(ALICE, [ALICE], f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: a note to self\r\n\r\nHi.\r\n")
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
        imap.login(ALICE, ALICE_PASSWORD)
        imap.append("Junk", None, None, b"From: seller@example.net\r\nSubject: cheap watches\r\n\r\nBuy.\r\n")
    box.run(box.services.delivery_log.settle())

    def log_in(browser: Browser, name: str, password: str) -> Page:
        page = browser.new_context(ignore_https_errors=True, viewport={"width": PHONE_WIDTH, "height": 740}, is_mobile=True).new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{https}/login")
        page.fill("#f-name", name)
        page.fill("#f-password", password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/login" not in url)
        return page

    # The status checks ask a DNS zone of our own (empty: every record missing) and probe nothing outside.
    with ZoneServer(ttl=0) as zone:
        box.run(box.services.settings.save(dns_resolver=zone.address, public_ipv4="192.0.32.7", public_ipv6=IPV6))
        box.services.status_probes = Probes(port25_target=lambda: "127.0.0.1:9", clock_synchronised=lambda: True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            problems: dict[str, object] = {}
            for name, password, pages in ((ADMIN, ADMIN_PASSWORD, CONSOLE_PAGES), (ALICE, ALICE_PASSWORD, ACCOUNT_PAGES)):
                page = log_in(browser, name, password)
                if name == ADMIN:  # the checklist filled in, as after the box's first run of it
                    page.goto(https + "/console")
                    page.click("#check-status")
                    page.wait_for_selector("#checklist li.check")
                for path in pages:
                    response = page.goto(https + path)
                    assert response is not None, path
                    assert response.status == 200, path
                    if path in ("/account/junk", "/account/log", "/console/log"):
                        assert page.locator(f"{STACKED} >> text=example").count(), path  # rows to lay out
                    page.screenshot(path=str(shots / f"phone{path.replace('/', '-')}.png"), full_page=True)
                    width = page.evaluate("document.documentElement.scrollWidth")
                    logout = page.locator("header button", has_text="Log out").bounding_box()
                    off = page.evaluate(OFF_SCREEN, PHONE_WIDTH)
                    # The DNS records' Copy buttons are what the page is for: on the screen, not scrolled to.
                    off += [f"copy button at {box['x']:.0f}" for box in page.locator("button.copy").evaluate_all(
                        "buttons => buttons.map(b => b.getBoundingClientRect().toJSON())") if box["right"] > PHONE_WIDTH]
                    # So is each value of a stacked table (the mail program settings, Junk's Not spam, the mail log).
                    off += [f"cell {cell['text']!r} at {cell['x']:.0f}" for cell in page.locator(STACKED).evaluate_all(
                        "cells => cells.map(c => ({...c.getBoundingClientRect().toJSON(), text: c.innerText}))") if cell["right"] > PHONE_WIDTH]
                    off += page.evaluate(CUT_OFF_CARDS)
                    if width > PHONE_WIDTH or off or logout is None or logout["x"] + logout["width"] > PHONE_WIDTH:
                        problems[path] = (width, logout, off[:5])
            browser.close()
    assert not problems, problems
