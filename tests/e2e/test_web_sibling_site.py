"""A sibling site in headless Chromium: blog.example.test, beside the box at mail.example.test (both names
resolve to loopback; the blog's pages are answered by the test), does what a browser lets a same-site page
do against the console. It plants a session cookie for the whole domain (Domain=example.test) holding the
attacker's own logged-in session: the box reads only __Host-letterbox_session over HTTPS, and Chromium takes
no such cookie with a Domain. It posts a console form with the administrator's token (as if that leaked):
Chromium marks it Sec-Fetch-Site: same-site and sends the SameSite=Lax cookie with it; the box refuses it."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ServedBox, require_program
from tests.e2e.test_console_mailbox_recreate import log_in_admin, served
from tests.e2e.test_web_wizard import CHROMIUM_ARGS
from tests.integration.test_web_cross_site import MALLORY, MALLORY_PASSWORD, _token

__all__ = ["served"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def _attackers_session(served: ServedBox) -> str:
    """Mallory logs in to her own mailbox from her own machine: the cookie's value is what she plants."""
    with httpx.Client(base_url=f"https://localhost:{served.port('https')}", verify=served.client_context) as own:
        response = own.post("/login", data={"csrf": _token(own, "/login"), "name": MALLORY,
                                            "password": MALLORY_PASSWORD})
        assert response.headers["location"] == "/account"
        return next(value for name, value in own.cookies.items() if name.endswith("letterbox_session"))


def test_a_sibling_site_neither_plants_a_session_nor_posts_a_form(served: ServedBox) -> None:
    chromium = require_program("chromium")
    from playwright.sync_api import Route, expect, sync_playwright

    served.add_user(MALLORY, MALLORY_PASSWORD)
    planted = _attackers_session(served)
    port = served.port("https")
    box, blog = f"https://mail.example.test:{port}", f"https://blog.example.test:{port}"
    blog_pages: dict[str, str] = {}

    def answer_as_the_blog(route: Route) -> None:
        path = "/" + route.request.url.split("/", 3)[3]
        route.fulfill(status=200, content_type="text/html", body=blog_pages.get(path, "<!doctype html><p>blog"))

    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP mail.example.test 127.0.0.1, MAP blog.example.test 127.0.0.1"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            context = browser.new_context(ignore_https_errors=True)
            context.route(f"{blog}/**", answer_as_the_blog)
            page = context.new_page()
            page.set_default_timeout(60_000)
            log_in_admin(page, box)
            token = page.locator("input[name=csrf]").first.get_attribute("value")
            assert token

            blog_pages["/plant"] = (
                "<!doctype html><script>"
                f'document.cookie = "letterbox_session={planted}; Domain=example.test; Path=/; Secure";'
                f'document.cookie = "__Host-letterbox_session={planted}; Domain=example.test; Path=/; Secure";'
                "</script><p>planted")
            page.goto(f"{blog}/plant")
            expect(page.locator("p")).to_have_text("planted")
            jar = {(c["name"], c["domain"]) for c in context.cookies()}
            assert ("letterbox_session", ".example.test") in jar  # the sibling may set this one...
            assert ("__Host-letterbox_session", ".example.test") not in jar  # ...never the box's
            page.goto(f"{box}/")
            expect(page).to_have_url(f"{box}/console")  # still the administrator, not Mallory's mailbox

            blog_pages["/post"] = (
                f'<!doctype html><form method="post" action="{box}/console/domains">'
                f'<input name="csrf" value="{token}"><input name="domain" value="evil.example"></form>'
                "<script>document.forms[0].submit()</script>")
            page.goto(f"{blog}/post")
            expect(page.locator("body")).to_contain_text("came from another site")
            page.goto(f"{box}/console/domains")
            expect(page.locator("body")).not_to_contain_text("evil.example")

            # A visitor not logged in, with the planted cookie: not in Mallory's mailbox either.
            stranger = browser.new_context(ignore_https_errors=True)
            stranger.route(f"{blog}/**", answer_as_the_blog)
            visit = stranger.new_page()
            visit.goto(f"{blog}/plant")
            visit.goto(f"{box}/account")
            expect(visit).to_have_url(f"{box}/login?next=/account")
        finally:
            browser.close()
