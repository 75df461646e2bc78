"""Security of the console: CSRF on every form, roles, session cookie, headers, login throttle,
escaping, request limits."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import Route

from appliance.auth import ThrottlePolicy
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, DOMAIN, WebClient, web_client
from web import app as web_app
from web.session import SECURE_COOKIE_NAME

WEB = Path(web_app.__file__).parent
PARAMS = {"step": "1", "domain": DOMAIN, "address": ALICE, "source": f"info@{DOMAIN}",
          "message_id": "0123456789ABCDEF01234567"}
OPEN_POSTS = {"/autodiscover/autodiscover.xml"}  # no session, no form (a route of any letter case)


def all_routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app."""
    found = []
    for route in web_app.every_route():
        if isinstance(route, Route):
            path = route.path
            for name, value in PARAMS.items():
                path = re.sub(r"\{" + name + r"(:\w+)?\}", value, path)
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    found.append((method, path))
    return found


# Forms open only on a box without an administrator: their token check is tested on a fresh box below.
FIRST_RUN_POSTS = {"/setup/restore"}
POSTS = [path for method, path in all_routes()
         if method == "POST" and path not in OPEN_POSTS and path not in FIRST_RUN_POSTS]
ADMIN_GETS = [path for method, path in all_routes() if method == "GET" and path.startswith("/console")]
ADMIN_POSTS = [path for path in POSTS if path.startswith("/console")]
USER_PATHS = [(m, p) for m, p in all_routes() if p.startswith("/account")]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.add_user()
        client.run(client.services.accounts.add_alias, f"info@{DOMAIN}", [ALICE])
        yield client


def test_the_route_list_is_complete() -> None:
    assert len(POSTS) >= 15
    assert len(ADMIN_GETS) >= 10
    assert len(USER_PATHS) == 7  # account, password, Apple profile, certificate, mail log, Junk, release
    assert "/console/mailboxes/alice@example.test/delete" in POSTS


# --- CSRF --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", POSTS)
def test_every_form_without_its_csrf_token_is_refused(web: WebClient, path: str) -> None:
    if path.startswith("/account"):
        web.login(ALICE, ALICE_PASSWORD)
    elif path != "/login":
        web.login(ADMIN, ADMIN_PASSWORD)
    if path.startswith("/setup"):
        web.set_setting("setup_done", "0")
    for token in ("", "forged-token-" + "x" * 40):
        response = web.client.post(path, data={"csrf": token, "name": "x", "domain": "evil.example"},
                                   follow_redirects=False)
        assert response.status_code == 403, (path, response.status_code, response.text[:200])
        assert "expired or came from another site" in response.text
    assert web.run(web.services.accounts.list_domains) == [DOMAIN]
    assert web.run(web.services.accounts.get_user, ALICE) is not None


@pytest.mark.parametrize("path", sorted(FIRST_RUN_POSTS))
def test_first_run_forms_without_their_token_are_refused(tmp_path: Path, path: str) -> None:
    with web_client(tmp_path / "fresh") as fresh:
        fresh.csrf("/setup/1")  # a session, so only the token is missing
        for token in ("", "forged-token-" + "x" * 40):
            response = fresh.client.post(path, data={"csrf": token, "code": "x", "secret": "x"},
                                         files={"file": ("b.tar.zst.age", b"x" * 1024)}, follow_redirects=False)
            assert response.status_code == 403, (path, response.status_code, response.text[:200])
            assert "expired or came from another site" in response.text
        assert not fresh.run(fresh.services.accounts.has_admin)


@pytest.mark.parametrize("path", sorted(FIRST_RUN_POSTS))
def test_first_run_forms_are_closed_once_an_admin_exists(web: WebClient, path: str) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.client.post(path, data={"csrf": web.csrf("/console"), "code": "x", "secret": "x"},
                               files={"file": ("b.tar.zst.age", b"x" * 1024)}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].endswith("/login")
    assert web.run(web.services.accounts.list_domains) == [DOMAIN]


ANOTHER_SITE = ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
                # A sibling name of the box's (SameSite=Lax cookies go with its forms).
                {"Sec-Fetch-Site": "same-site", "Origin": "https://blog.example.test"},
                # A browser without Sec-Fetch-Site: its Origin against the Host asked for.
                {"Origin": "https://evil.example"}, {"Origin": "null"})


UPLOADS = ("/setup/restore", "/console/updates", "/console/backups/upload")


def _refused_from_other_sites(web: WebClient, path: str, token: str) -> None:
    form = {"csrf": token, "name": ADMIN, "password": ADMIN_PASSWORD, "domain": "evil.example"}
    files = {"file": ("b.tar.zst.age", b"x" * 1024)} if path in UPLOADS else None
    for headers in ANOTHER_SITE:
        response = web.client.post(path, data=form, files=files, headers=headers, follow_redirects=False)
        assert response.status_code == 403, (path, headers, response.status_code, response.text[:200])
        assert "came from another site" in response.text


@pytest.mark.parametrize("path", POSTS)
def test_every_form_from_another_site_is_refused_even_with_its_token(web: WebClient, path: str) -> None:
    """The token alone stops a forged form only while no other site holds one: a sibling site can plant
    its own session cookie, whose token it knows, and log the browser in to the attacker's account."""
    owner = path.startswith("/account")
    if path != "/login":
        web.login(ALICE if owner else ADMIN, ALICE_PASSWORD if owner else ADMIN_PASSWORD)
    token = web.csrf("/account" if owner else "/console" if path != "/login" else "/login")
    if path.startswith("/setup"):
        web.set_setting("setup_done", "0")
    _refused_from_other_sites(web, path, token)
    assert web.run(web.services.accounts.list_domains) == [DOMAIN]
    assert web.run(web.services.accounts.get_user, ALICE) is not None


@pytest.mark.parametrize("path", sorted(FIRST_RUN_POSTS))
def test_first_run_forms_from_another_site_are_refused(tmp_path: Path, path: str) -> None:
    with web_client(tmp_path / "fresh") as fresh:
        _refused_from_other_sites(fresh, path, fresh.csrf("/setup/1"))
        assert not fresh.run(fresh.services.accounts.has_admin)
        assert not list(fresh.services.config.data.root.glob("**/*.age"))


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin", "Origin": "https://testserver"},
                                     {"Sec-Fetch-Site": "none"}, {"Origin": "https://testserver"},
                                     {"Origin": "https://TestServer"}, {}])
def test_forms_from_the_boxs_own_pages_pass(web: WebClient, headers: dict[str, str]) -> None:
    response = web.client.post("/login", data={"csrf": web.csrf("/login"), "name": ADMIN, "password": ADMIN_PASSWORD},
                               headers=headers, follow_redirects=False)
    assert response.status_code == 303, response.text[:200]
    assert response.headers["location"] == "/console"


def test_a_token_from_another_session_is_refused(web: WebClient, tmp_path: Path) -> None:
    foreign = web.csrf("/login")
    web.client.cookies.clear()
    web.csrf("/login")  # a new session with its own token
    response = web.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD}, csrf=foreign)
    assert response.status_code == 403


def test_first_setup_step_needs_the_token_too(tmp_path: Path) -> None:
    with web_client(tmp_path / "fresh") as fresh:
        response = fresh.client.post("/setup/1", data={"name": ADMIN, "password": ADMIN_PASSWORD,
                                                       "password2": ADMIN_PASSWORD, "hostname": "mail.example.test"},
                                     follow_redirects=False)
        assert response.status_code == 403
        assert not fresh.run(fresh.services.accounts.has_admin)


# --- roles ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ADMIN_GETS)
def test_a_mailbox_owner_never_reaches_an_admin_page(web: WebClient, path: str) -> None:
    web.login(ALICE, ALICE_PASSWORD)
    response = web.get(path)
    assert response.status_code == 403, path
    assert "administrators" in response.text


@pytest.mark.parametrize("path", ADMIN_POSTS)
def test_a_mailbox_owner_cannot_post_admin_forms(web: WebClient, path: str) -> None:
    web.login(ALICE, ALICE_PASSWORD)
    token = web.csrf("/account")
    response = web.client.post(path, data={"csrf": token, "domain": "evil.example", "local": "eve",
                                           "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD},
                               follow_redirects=False)
    assert response.status_code == 403, path
    assert web.run(web.services.accounts.list_domains) == [DOMAIN]


@pytest.mark.parametrize("path", [*ADMIN_GETS, "/account", "/setup/3"])
def test_anonymous_visitors_are_sent_to_the_login_page(web: WebClient, path: str) -> None:
    response = web.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=/")


@pytest.mark.parametrize(("method", "path"), USER_PATHS)
def test_an_admin_is_not_a_mailbox_owner(web: WebClient, method: str, path: str) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.client.request(method, path, data={"csrf": web.csrf("/console")}, follow_redirects=False)
    assert response.status_code == 403


CONFIRM_PAGES = [path for method, path in all_routes() if method == "GET" and path.endswith("/delete")]


@pytest.mark.parametrize("path", CONFIRM_PAGES)
def test_head_of_a_confirmation_page_is_its_get(web: WebClient, path: str) -> None:
    """Starlette answers HEAD on a GET route: it went to the removal's branch (a 403 for want of a token)."""
    web.login(ADMIN, ADMIN_PASSWORD)
    if "/sending/" in path:
        path = path.replace(PARAMS["message_id"], web.enqueue(["bob@elsewhere.example"]))
    response = web.client.head(path, follow_redirects=False)
    assert response.status_code == 200, (path, response.status_code)
    assert web.get(path).status_code == 200  # still there: nothing removed


def test_setup_pages_are_admin_only_once_an_admin_exists(web: WebClient) -> None:
    web.set_setting("setup_done", "0")
    web.login(ALICE, ALICE_PASSWORD)
    assert web.get("/setup/2").status_code == 403


# --- login --------------------------------------------------------------------------------------------

def test_login_roles_and_redirects(web: WebClient) -> None:
    assert web.login(ADMIN, ADMIN_PASSWORD).headers["location"] == "/console"
    web.logout()
    assert web.login(ALICE, ALICE_PASSWORD).headers["location"] == "/account"
    assert web.get("/login").headers["location"] == "/account"
    web.logout()
    assert web.get("/account").headers["location"] == "/login?next=/account"


def test_wrong_password_and_unknown_names(web: WebClient) -> None:
    for name, password in ((ADMIN, "wrong password!"), (ALICE, "wrong password!"), ("nobody", ADMIN_PASSWORD),
                           ("", ""), (ALICE, ADMIN_PASSWORD)):
        response = web.post("/login", {"name": name, "password": password})
        assert response.status_code == 401, name
        assert "Wrong name or password" in response.text
    assert web.get("/console").status_code == 303


def test_login_goes_back_to_the_page_asked_for_but_never_off_site(web: WebClient) -> None:
    response = web.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD, "next": "/console/aliases"})
    assert response.headers["location"] == "/console/aliases"
    web.logout()
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        response = web.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD, "next": evil})
        assert response.headers["location"] == "/console", evil
        web.logout()


def test_logins_are_throttled_by_the_shared_auth_service(tmp_path: Path) -> None:
    policy = ThrottlePolicy(free_failures=100, peer_free_failures=100, pair_lockout_failures=3,
                            peer_lockout_failures=100, base_delay=0, forgive_seconds=3600)
    with web_client(tmp_path / "throttled", policy=policy) as web:
        web.set_up()
        for _ in range(3):  # exactly the limit, although the buckets leak a little between attempts
            assert web.post("/login", {"name": ADMIN, "password": "guess guess guess"}).status_code == 401
        # Locked out now: even the right password is refused from this client for a while, with
        # "try later" (429), not "wrong password" (issue 18).
        refused = web.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD})
        assert refused.status_code == 429
        assert "Too many failed logins from your address" in refused.text
        assert web.services.auth.throttle.locked_for("testclient", f"admin:{ADMIN}") > 0


def test_a_disabled_mailbox_is_logged_out(web: WebClient) -> None:
    web.login(ALICE, ALICE_PASSWORD)
    assert web.get("/account").status_code == 200
    web.run(web.services.accounts.update_user, ALICE, enabled=False)
    assert web.get("/account").headers["location"].startswith("/login")
    assert web.post("/login", {"name": ALICE, "password": ALICE_PASSWORD}).status_code == 401


def test_logout_ends_the_session(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.post("/logout", token_from="/console")
    assert response.headers["location"] == "/login"
    assert web.get("/console").status_code == 303


# --- session cookie -------------------------------------------------------------------------------------

def test_session_cookie_flags_on_https(web: WebClient) -> None:
    response = web.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD})
    cookie = next(v for v in response.headers.get_list("set-cookie") if v.startswith(f"{SECURE_COOKIE_NAME}="))
    for flag in ("HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age="):
        assert flag in cookie, flag


def test_no_secure_flag_over_plain_http(web: WebClient) -> None:
    response = web.client.get("http://testserver/login")
    assert "Secure" not in response.headers["set-cookie"]
    assert "HttpOnly" in response.headers["set-cookie"]


def test_a_tampered_cookie_is_no_session(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    value = web.client.cookies[SECURE_COOKIE_NAME]
    web.client.cookies.clear()
    web.client.cookies.set(SECURE_COOKIE_NAME, value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert web.get("/console").status_code == 303
    web.client.cookies.set(SECURE_COOKIE_NAME, "x" * 5000)
    assert web.get("/console").status_code == 303


def test_idle_sessions_expire(web: WebClient, monkeypatch: pytest.MonkeyPatch) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    monkeypatch.setattr("web.session.SESSION_IDLE_SECONDS", -1)
    assert web.get("/console").status_code == 303


def test_a_login_ends_after_its_maximum_age(web: WebClient, monkeypatch: pytest.MonkeyPatch) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    assert web.get("/console").status_code == 200
    monkeypatch.setattr("web.pages.LOGIN_MAX_SECONDS", -1)
    assert web.get("/console").status_code == 303


def test_the_secret_is_made_once_and_private(web: WebClient) -> None:
    secret = web.services.config.data.root / "web-session.key"
    assert secret.stat().st_mode & 0o077 == 0
    assert len(secret.read_text().strip()) == 64


# --- headers, escaping, limits ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/login", "/static/style.css", "/nonexistent", "/console"])
def test_security_headers_everywhere(web: WebClient, path: str) -> None:
    response = web.get(path)
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["x-frame-options"] == "DENY"


def test_pages_are_not_cached_but_static_files_are(web: WebClient) -> None:
    assert web.get("/login").headers["cache-control"] == "no-store"
    assert "max-age" in web.get("/static/app.js").headers["cache-control"]


def test_templates_have_no_inline_script_or_style() -> None:
    for template in (WEB / "templates").rglob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template
        assert not re.search(r"\son[a-z]+\s*=", text), template
        assert "style=" not in text, template
        assert "<style" not in text, template


def test_user_input_is_escaped(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    web.run(web.services.accounts.update_user, ALICE, display_name="<script>alert(1)</script>")
    page = web.get("/console/mailboxes").text
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_oversized_requests_are_refused(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.client.post("/console/domains", data={"csrf": web.csrf("/console"), "domain": "x" * 300_000},
                               follow_redirects=False)
    assert response.status_code == 413


def test_file_uploads_are_refused(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.client.post("/console/domains", data={"csrf": web.csrf("/console")},
                               files={"domain": ("x.txt", b"example.net")}, follow_redirects=False)
    assert response.status_code == 400


def test_errors_are_pages_not_tracebacks(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.get("/console/no/such/page")
    assert response.status_code == 404
    assert "Not found" in response.text
    assert "Not Found" not in response.text  # Starlette's phrase under the title said the same again
    assert "There is no page at this address" in response.text
    assert "Traceback" not in response.text
    response = web.client.put("/console", follow_redirects=False)
    assert response.status_code == 405


def test_a_browser_that_logged_in_before_keeps_its_own_budget(tmp_path: Path) -> None:
    """Distributed guessing fills the account's budget of password checks (appliance/auth.py); the
    owner's browser, known by the signed device cookie of its last login, still gets in."""
    policy = ThrottlePolicy(free_failures=100, peer_free_failures=100, pair_lockout_failures=100,
                            peer_lockout_failures=100, base_delay=0, account_budget=3, trusted_budget=3,
                            over_budget_delay=0)
    with web_client(tmp_path / "budget", policy=policy) as web:
        web.set_up()
        web.add_user()
        response = web.login(ALICE, ALICE_PASSWORD)
        cookie = next(v for v in response.headers.get_list("set-cookie") if v.startswith("letterbox_device="))
        assert "path=/login" in cookie.lower()
        assert "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        (stored,) = [c for c in web.client.cookies.jar if c.name == "letterbox_device"]
        device, domain = stored.value, stored.domain
        assert device
        web.logout()  # forgets every cookie: from here on, a browser never seen before
        for _ in range(3):
            assert web.post("/login", {"name": ALICE, "password": "guess guess guess"}).status_code == 401
        # The budget is used up: "try later" (429) without looking at the password, right or wrong.
        assert web.post("/login", {"name": ALICE, "password": "guess guess guess"}).status_code == 429
        assert web.post("/login", {"name": ALICE, "password": ALICE_PASSWORD}).status_code == 429
        # A forged or damaged cookie is no device.
        web.client.cookies.set("letterbox_device", device[:-2] + "00", domain=domain, path="/login")
        assert web.post("/login", {"name": ALICE, "password": ALICE_PASSWORD}).status_code == 429
        web.client.cookies.set("letterbox_device", device, domain=domain, path="/login")
        response = web.post("/login", {"name": ALICE, "password": ALICE_PASSWORD})
        assert response.status_code == 303
        assert web.get("/account").status_code == 200
        # The cookie is renewed (30 more days), for the same device.
        renewed = next(v for v in response.headers.get_list("set-cookie") if v.startswith("letterbox_device="))
        assert device_id(renewed.split(";")[0].split("=", 1)[1]) == device_id(device)


def device_id(token: str) -> str:
    payload = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["d"])
