"""Forms posted by another site's page, over the box's real HTTPS listener: refused on the browser's own
word (Sec-Fetch-Site, else Origin against Host) before the CSRF token is looked at, so a token another
site got hold of buys nothing. The case that needs it: a sibling site of the box's domain plants its own
session cookie (whose token it knows) on the box's name and logs the browser in to the attacker's mailbox
(login CSRF by cookie tossing: SameSite=Lax sends the cookie with a same-site form)."""

from __future__ import annotations

import contextlib
import re

import httpx

from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console

MALLORY, MALLORY_PASSWORD = "mallory@example.test", "mallory's own long password"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
SIBLING = {"Sec-Fetch-Site": "same-site", "Origin": "https://blog.example.test"}
ELSEWHERE = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}


def _token(client: httpx.Client, path: str) -> str:
    found = _CSRF.search(client.get(path, follow_redirects=True).text)
    assert found, path
    return found.group(1)


def test_a_planted_session_cannot_log_the_browser_in_to_another_account(box: BoxHandle) -> None:
    box.run(box.services.accounts.add_admin("admin", "correct horse battery"))  # past the first run
    box.add_user(MALLORY, MALLORY_PASSWORD)
    base = f"https://localhost:{box.port('https')}"
    with httpx.Client(base_url=base, verify=box.client_context) as attacker, \
            httpx.Client(base_url=base, verify=box.client_context) as victim:
        token = _token(attacker, "/login")  # the attacker's own anonymous session, and its token
        victim.cookies.update(attacker.cookies)  # planted by the sibling site (Domain=example.test)
        form = {"csrf": token, "name": MALLORY, "password": MALLORY_PASSWORD}
        for headers in (SIBLING, {"Origin": "https://blog.example.test"}):  # a browser without Sec-Fetch-*
            response = victim.post("/login", data=form, headers=headers)
            assert response.status_code == 403, (headers, response.status_code, response.headers.get("location"))
            assert "came from another site" in response.text
            assert victim.get("/account").headers["location"].startswith("/login")  # not logged in
        # The same form from the box's own login page logs in, as always.
        own = victim.post("/login", data=form, headers={"Sec-Fetch-Site": "same-origin", "Origin": base})
        assert (own.status_code, own.headers["location"]) == (303, "/account")


def test_an_admin_form_with_its_token_is_refused_from_another_site(box: BoxHandle) -> None:
    with admin_console(box, "mail.example.test") as web:
        token = _token(web, "/console/domains")
        for headers in (ELSEWHERE, SIBLING, {"Origin": "null"}):
            response = web.post("/console/domains", data={"csrf": token, "domain": "evil.example"}, headers=headers)
            assert response.status_code == 403, headers
        assert box.run(box.services.accounts.list_domains()) == []
        # An update's upload is refused before its file is read, let alone written.
        response = web.post("/console/updates", data={"csrf": token}, headers=ELSEWHERE,
                            files={"bundle": ("letterbox.bundle", b"x" * 100_000)})
        assert response.status_code == 403
        assert not list(box.data.root.rglob(".upload-*"))
        # From the console's own page (the browser says same-origin; Origin and Host agree): added.
        port = box.port("https")
        for headers, domain in (({"Sec-Fetch-Site": "same-origin"}, "one.example"),
                                ({"Origin": f"https://localhost:{port}"}, "two.example")):
            response = web.post("/console/domains", data={"csrf": token, "domain": domain}, headers=headers)
            assert response.status_code == 303, (headers, response.text[:300])
        assert box.run(box.services.accounts.list_domains()) == ["one.example", "two.example"]


def _session_cookie(client: httpx.Client) -> tuple[str, str]:
    (name, value), = ((n, v) for n, v in client.cookies.items() if n.endswith("letterbox_session"))
    return name, value


def test_a_session_cookie_planted_by_a_sibling_site_is_never_the_session(box: BoxHandle) -> None:
    """Cookie tossing: blog.example.test sets `letterbox_session=<the attacker's logged-in session>;
    Domain=example.test`, and the browser sends it to the box beside (after) its own. A sibling cannot set
    a __Host- cookie (the browser refuses one with a Domain), and the box reads only that name over HTTPS."""
    box.run(box.services.accounts.add_admin("admin", "correct horse battery"))
    box.add_user(MALLORY, MALLORY_PASSWORD)
    base = f"https://localhost:{box.port('https')}"

    set_cookies: list[str] = []

    def logged_in(name: str, password: str) -> httpx.Client:
        client = httpx.Client(base_url=base, verify=box.client_context)
        response = client.post("/login", data={"csrf": _token(client, "/login"), "name": name, "password": password})
        assert response.status_code == 303
        set_cookies.extend(v for v in response.headers.get_list("set-cookie") if "letterbox_session=" in v)
        return client

    with contextlib.closing(logged_in("admin", "correct horse battery")) as victim, \
            contextlib.closing(logged_in(MALLORY, MALLORY_PASSWORD)) as attacker:
        tossed = f"letterbox_session={_session_cookie(attacker)[1]}"
        name, value = _session_cookie(victim)
        with httpx.Client(base_url=base, verify=box.client_context) as browser:
            both = browser.get("/", headers={"Cookie": f"{name}={value}; {tossed}"})
            assert both.headers["location"] == "/setup", both.headers["location"]  # still the admin
            alone = browser.get("/", headers={"Cookie": tossed})
            assert alone.headers["location"] == "/login"  # not Mallory's mailbox
    for set_cookie in set_cookies:
        assert set_cookie.startswith("__Host-letterbox_session=")
        assert "; Path=/;" in set_cookie
        assert "; Secure" in set_cookie
        assert "domain=" not in set_cookie.lower()
