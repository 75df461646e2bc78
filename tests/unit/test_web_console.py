"""The admin console over HTTP: domains and their DNS, mailboxes, aliases, status, events, password."""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.accounts import AliasInfo, MailboxInfo
from appliance.disk_full import used_percent
from tests.support.dns_server import ZoneServer
from tests.support.web import (
    ADMIN,
    ADMIN_PASSWORD,
    ALICE,
    ALICE_PASSWORD,
    DOMAIN,
    HOSTNAME,
    WebClient,
    web_client,
)
from web.session import SECURE_COOKIE_NAME

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.login(ADMIN, ADMIN_PASSWORD)
        yield client



def user_of(web: WebClient, address: str) -> MailboxInfo:
    info = web.run(web.services.accounts.get_user, address)
    assert info is not None, address
    return info


def alias_of(web: WebClient, address: str) -> AliasInfo:
    info = web.run(web.services.accounts.get_alias, address)
    assert info is not None, address
    return info

def error_of(page: str, field: str) -> str:
    m = re.search(rf'id="e-{field}">([^<]*)<', page)
    assert m, f"no error next to {field}"
    return html.unescape(m.group(1))


# --- status and events -------------------------------------------------------------------------------

def test_status_page(web: WebClient) -> None:
    web.services.listener_status = lambda: {"imaps": ("127.0.0.1", 993, True), "smtp": ("127.0.0.1", 25, False)}
    web.enqueue(["bob@elsewhere.example"], data=b"x" * 2048)
    page = web.get("/console")
    assert page.status_code == 200
    text = page.text
    assert "<code>127.0.0.1:993</code>" in text
    assert ">up<" in text
    assert ">down<" in text
    assert "CN=" + HOSTNAME in text
    assert "self-signed" in text
    assert " days" in text
    assert "Disk free" in text
    # The same share as the checklist's Disk item ("35% used"): it said "(27%)", the free share of the total.
    usage = shutil.disk_usage(web.services.config.data.root)
    assert f"({used_percent(usage.used, usage.free)}% used)</dd>" in text
    assert '<a href="/console/sending">1 message</a>, 2.0 KiB' in text
    assert f'href="/console/domains/{DOMAIN}">{DOMAIN}</a></td><td>never' in text
    assert text.index("smtp") < text.index("imaps")  # the standard order, whatever the dict order


def test_status_accepts_a_plain_listener_dict(web: WebClient) -> None:
    web.services.listener_status = lambda: {"https": ("0.0.0.0", 443, True)}
    assert "0.0.0.0:443" in web.get("/console").text


def test_events_page_shows_recent_events(web: WebClient) -> None:
    web.run(web.services.events.record, "test", "something <happened>")
    text = web.get("/console/events").text
    assert "something &lt;happened&gt;" in text
    assert f"login: {ADMIN}" in text


# --- domains ---------------------------------------------------------------------------------------------

def test_add_domain_then_its_dns_page(web: WebClient) -> None:
    response = web.post("/console/domains", {"domain": "Second.Example"}, token_from="/console/domains")
    assert response.headers["location"] == "/console/domains/second.example"
    assert web.run(web.services.accounts.list_domains) == [DOMAIN, "second.example"]
    page = web.get("/console/domains/second.example").text
    assert "Domain second.example added" in page
    assert "lb" in page
    assert "_domainkey.second.example" in page
    for bad, words in (("", "enter a domain"), ("x@y.org", "after the @"), (DOMAIN, "already exists")):
        response = web.post("/console/domains", {"domain": bad}, token_from="/console/domains")
        assert response.status_code == 400, bad
        assert words in error_of(response.text, "domain"), bad


def test_dns_page_of_unknown_domain_is_404(web: WebClient) -> None:
    response = web.get("/console/domains/nowhere.example")
    assert response.status_code == 404
    assert "not a domain of this box" in response.text


def test_check_now_in_the_console(web: WebClient) -> None:
    with ZoneServer({(DOMAIN, "MX"): [f"10 {HOSTNAME}."]}) as zone:
        web.set_setting("dns_resolver", zone.address)
        response = web.post(f"/console/domains/{DOMAIN}/check", {"ipv4": "192.0.32.7", "ipv6": ""},
                            token_from=f"/console/domains/{DOMAIN}")
        assert response.headers["location"] == f"/console/domains/{DOMAIN}"
    page = web.get(f"/console/domains/{DOMAIN}").text
    assert '<tr id="dns-mx" class="found">' in page
    assert '<tr id="dns-a" class="missing">' in page
    status = web.get("/console").text
    assert "1 found" in status
    assert "missing" in status
    response = web.post(f"/console/domains/{DOMAIN}/check", {"ipv4": "999.1.1.1"},
                        token_from=f"/console/domains/{DOMAIN}")
    assert response.status_code == 400
    assert "not an IPv4" in error_of(response.text, "ipv4")


def test_remove_domain_needs_confirmation_and_an_empty_domain(web: WebClient) -> None:
    web.add_user()
    confirm = web.get(f"/console/domains/{DOMAIN}/delete")
    assert confirm.status_code == 200
    assert f"Remove the domain {DOMAIN}?" in confirm.text
    response = web.post(f"/console/domains/{DOMAIN}/delete", token_from=f"/console/domains/{DOMAIN}/delete")
    assert response.headers["location"] == "/console/domains"
    assert "Not removed" in web.get("/console/domains").text
    web.run(web.services.accounts.remove_user, ALICE)
    web.post(f"/console/domains/{DOMAIN}/delete", token_from=f"/console/domains/{DOMAIN}/delete")
    assert web.run(web.services.accounts.list_domains) == []


# --- mailboxes -----------------------------------------------------------------------------------------

def create_alice(web: WebClient, **changes: str):  # type: ignore[no-untyped-def]
    values = {"local": "alice", "domain": DOMAIN, "name": "Alice Example", "quota": "2G",
              "password": ALICE_PASSWORD, "password2": ALICE_PASSWORD}
    values.update(changes)
    return web.post("/console/mailboxes", values, token_from="/console/mailboxes")


def test_create_mailbox(web: WebClient) -> None:
    response = create_alice(web)
    assert response.headers["location"] == "/console/mailboxes"
    info = web.run(web.services.accounts.get_user, ALICE)
    assert info is not None
    assert (info.display_name, info.quota_bytes, info.enabled) == ("Alice Example", 2 * 1024**3, True)
    page = web.get("/console/mailboxes").text
    assert "Mailbox alice@example.test created." in page
    # What to hand on to its owner (the console said only "created", nothing about where the settings are):
    # the box by its name, not by the Host this administrator came with (testserver here).
    assert f"Tell its owner to log in at https://{HOSTNAME}/ with the address and this password" in page
    assert "Alice Example" in page
    assert "2.0 GiB" in page
    assert web.run(web.services.auth.verify, ALICE, ALICE_PASSWORD, "imap", "127.0.0.1") is not None


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"local": ""}, "local", "before the @"),
    ({"local": "bad/name"}, "local", "letters, digits"),
    ({"domain": "other.example"}, "domain", "box's domains"),
    ({"quota": "lots"}, "quota", "500M or 2G"),
    ({"password": "short", "password2": "short"}, "password", "too short"),
    ({"password2": "not the same"}, "password2", "differ"),
])
def test_create_mailbox_errors_next_to_fields(web: WebClient, changes: dict[str, str], field: str, words: str) -> None:
    response = create_alice(web, **changes)
    assert response.status_code == 400
    assert words in error_of(response.text, field)
    assert web.run(web.services.accounts.get_user, ALICE) is None


def test_create_existing_mailbox(web: WebClient) -> None:
    web.add_user()
    response = create_alice(web)
    assert response.status_code == 400
    assert "already exists" in error_of(response.text, "local")


def test_the_quota_hint_reads_the_same_on_the_create_and_the_edit_form(web: WebClient) -> None:
    """The create form said 'e.g. 2G, 1.5G or 500M (K, M, G, T count in 1024s); empty for no limit', the edit
    form 'e.g. 2G or 500M; empty for no limit': one macro words both, without a '2G' placeholder that
    read, in the empty field of a mailbox without a limit, as its quota."""
    web.add_user()

    def quota_field(page: str) -> str:
        m = re.search(r'<div class="field">\s*<label for="f-quota">.*?</div>', page, re.S)
        assert m, "no quota field"
        return m.group(0)

    created, edited = (quota_field(web.get(url).text) for url in ("/console/mailboxes", f"/console/mailboxes/{ALICE}"))
    hint = "e.g. 2G, 1.5G or 500M (K, M, G, T count in 1024s); empty for no limit"
    for shown in (created, edited):
        assert f'<p class="hint">{hint}</p>' in shown
        assert "placeholder" not in shown
    assert re.sub(r'value="[^"]*"', "", created) == re.sub(r'value="[^"]*"', "", edited)


def test_edit_quota_name_and_disable(web: WebClient) -> None:
    web.add_user()
    page = web.get(f"/console/mailboxes/{ALICE}")
    assert page.status_code == 200
    assert "checked" in page.text
    response = web.post(f"/console/mailboxes/{ALICE}", {"name": "Alice A.", "quota": "500M"},
                        token_from=f"/console/mailboxes/{ALICE}")  # no "enabled": unchecked
    assert response.headers["location"] == f"/console/mailboxes/{ALICE}"
    info = web.run(web.services.accounts.get_user, ALICE)
    assert info is not None
    assert (info.display_name, info.quota_bytes, info.enabled) == ("Alice A.", 500 * 1024**2, False)
    assert web.run(web.services.auth.verify, ALICE, ALICE_PASSWORD, "imap", "127.0.0.1") is None
    assert "disabled" in web.get("/console/mailboxes").text
    web.post(f"/console/mailboxes/{ALICE}", {"name": "Alice A.", "quota": "", "enabled": "on"},
             token_from=f"/console/mailboxes/{ALICE}")
    info = web.run(web.services.accounts.get_user, ALICE)
    assert info is not None
    assert (info.quota_bytes, info.enabled) == (0, True)
    response = web.post(f"/console/mailboxes/{ALICE}", {"name": "x", "quota": "-1"},
                        token_from=f"/console/mailboxes/{ALICE}")
    assert response.status_code == 400
    assert "500M or 2G" in error_of(response.text, "quota")


def test_set_password(web: WebClient) -> None:
    web.add_user()
    path = f"/console/mailboxes/{ALICE}/password"
    response = web.post(path, {"password": "short", "password2": "short"}, token_from=f"/console/mailboxes/{ALICE}")
    assert response.status_code == 400
    assert "too short" in error_of(response.text, "password")
    response = web.post(path, {"password": NEW_PASSWORD, "password2": NEW_PASSWORD},
                        token_from=f"/console/mailboxes/{ALICE}")
    assert response.status_code == 303
    assert web.run(web.services.auth.verify, ALICE, NEW_PASSWORD, "imap", "127.0.0.1") is not None


def test_delete_mailbox_after_confirmation(web: WebClient) -> None:
    web.add_user()
    confirm = web.get(f"/console/mailboxes/{ALICE}/delete")
    assert f"Delete the mailbox {ALICE}?" in confirm.text
    assert "starts empty" in confirm.text
    assert web.run(web.services.accounts.get_user, ALICE) is not None  # GET never deletes
    response = web.post(f"/console/mailboxes/{ALICE}/delete", token_from=f"/console/mailboxes/{ALICE}/delete")
    assert response.headers["location"] == "/console/mailboxes"
    assert web.run(web.services.accounts.get_user, ALICE) is None
    assert web.get(f"/console/mailboxes/{ALICE}").status_code == 404
    assert web.get(f"/console/mailboxes/{ALICE}/delete").status_code == 404


# --- aliases --------------------------------------------------------------------------------------------

def test_aliases_forward_and_catch_all(web: WebClient) -> None:
    web.add_user()
    response = web.post("/console/aliases", {"local": "info", "domain": DOMAIN,
                                             "targets": f"{ALICE}\nsomeone@elsewhere.example"},
                        token_from="/console/aliases")
    assert response.headers["location"] == "/console/aliases"
    response = web.post("/console/aliases", {"local": "", "domain": DOMAIN, "targets": ALICE},
                        token_from="/console/aliases")
    assert response.status_code == 303
    resolution = web.run(web.services.accounts.resolve, f"info@{DOMAIN}")
    assert resolution.mailboxes == (ALICE,)
    assert resolution.forwards == ("someone@elsewhere.example",)
    assert web.run(web.services.accounts.resolve, f"anything@{DOMAIN}").mailboxes == (ALICE,)
    page = web.get("/console/aliases").text
    assert f"@{DOMAIN}" in page
    assert "catch-all" in page
    assert "someone@elsewhere.example" in page
    # edit, then delete after confirmation (the catch-all's URL starts with '@')
    response = web.get(f"/console/aliases/info@{DOMAIN}")
    assert response.status_code == 200
    assert "someone@elsewhere.example" in response.text
    web.post(f"/console/aliases/info@{DOMAIN}", {"targets": ALICE}, token_from=f"/console/aliases/info@{DOMAIN}")
    assert alias_of(web, f"info@{DOMAIN}").targets == (ALICE,)
    response = web.post(f"/console/aliases/info@{DOMAIN}", {"targets": "not an address"},
                        token_from=f"/console/aliases/info@{DOMAIN}")
    assert response.status_code == 400
    assert "not a valid" in error_of(response.text, "targets")
    assert "Delete the alias" in web.get(f"/console/aliases/@{DOMAIN}/delete").text
    web.post(f"/console/aliases/@{DOMAIN}/delete", token_from=f"/console/aliases/@{DOMAIN}/delete")
    assert web.run(web.services.accounts.get_alias, f"@{DOMAIN}") is None
    assert web.get(f"/console/aliases/@{DOMAIN}").status_code == 404


def test_an_alias_to_no_mailbox_says_so(web: WebClient) -> None:
    """An alias whose target on the box's domain is no mailbox (a typo, or not made yet) was made without
    a word, and mail for it then got "No such user here"; the console now says so where it is made."""
    web.add_user()
    web.post("/console/aliases", {"local": "sales", "domain": DOMAIN, "targets": f"alcie@{DOMAIN}"},
             token_from="/console/aliases")
    page = web.get("/console/aliases").text
    assert f"alcie@{DOMAIN} is not a mailbox or alias of this box (yet): mail for sales@{DOMAIN} does not reach it." in page
    web.post(f"/console/aliases/sales@{DOMAIN}", {"targets": f"{ALICE}\nsomeone@elsewhere.example"},
             token_from=f"/console/aliases/sales@{DOMAIN}")
    assert "is not a mailbox or alias of this box" not in web.get("/console/aliases").text


def test_deleting_a_mailbox_an_alias_delivers_to_says_so(web: WebClient) -> None:
    """A catch-all to a deleted mailbox then refused every other address of the domain (an "alias loop"
    in the log), and the console said nothing of it."""
    web.add_user()
    web.run(web.services.accounts.add_alias, f"@{DOMAIN}", [ALICE])
    web.post(f"/console/mailboxes/{ALICE}/delete", token_from=f"/console/mailboxes/{ALICE}/delete")
    page = web.get("/console/mailboxes").text
    assert f"{ALICE} is not a mailbox or alias of this box (yet): mail for @{DOMAIN} does not reach it." in page


@pytest.mark.parametrize(("values", "field", "words"), [
    ({"local": "info", "domain": DOMAIN, "targets": ""}, "targets", "at least one"),
    ({"local": "info", "domain": DOMAIN, "targets": "bad@@address"}, "targets", "not a valid"),
    ({"local": "info", "domain": "other.example", "targets": ALICE}, "domain", "box's domains"),
    ({"local": "a@b", "domain": DOMAIN, "targets": ALICE}, "local", "before the @"),
])
def test_alias_errors(web: WebClient, values: dict[str, str], field: str, words: str) -> None:
    response = web.post("/console/aliases", values, token_from="/console/aliases")
    assert response.status_code == 400
    assert words in error_of(response.text, field)


def test_duplicate_alias(web: WebClient) -> None:
    web.run(web.services.accounts.add_alias, f"info@{DOMAIN}", ["x@elsewhere.example"])
    response = web.post("/console/aliases", {"local": "info", "domain": DOMAIN, "targets": "y@elsewhere.example"},
                        token_from="/console/aliases")
    assert response.status_code == 400
    assert "already exists" in error_of(response.text, "local")


# --- the admin's own password -------------------------------------------------------------------------

def use_cookie(web: WebClient, value: str) -> None:
    web.client.cookies.clear()
    web.client.cookies.set(SECURE_COOKIE_NAME, value)


def test_admin_changes_password_and_other_sessions_end(web: WebClient) -> None:
    other = web.client.cookies.get(SECURE_COOKIE_NAME)
    assert other
    use_cookie(web, other)
    assert web.get("/console").status_code == 200  # the cookie alone is the session
    response = web.post("/console/password", {"current": "wrong password here", "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/console/password")
    assert response.status_code == 400
    assert "not your current password" in error_of(response.text, "current")
    response = web.post("/console/password", {"current": ADMIN_PASSWORD, "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/console/password")
    assert response.headers["location"] == "/console"
    assert web.get("/console").status_code == 200  # this session goes on
    use_cookie(web, other)
    assert web.get("/console").headers["location"].startswith("/login")  # the one from before is over
    assert web.run(web.services.auth.verify_admin, ADMIN, NEW_PASSWORD, "127.0.0.1") is not None


def test_international_domains_are_shown_in_unicode_with_the_a_label(web: WebClient) -> None:
    """Issue 10 item 16: international domains were shown only as xn--."""
    web.add_domain("bücher.example")
    web.add_user("anna@bücher.example", ALICE_PASSWORD)
    both = "bücher.example (xn--bcher-kva.example)"
    assert both in html.unescape(web.get("/console/domains").text)
    assert f"DNS records for {both}" in html.unescape(web.get("/console/domains/xn--bcher-kva.example").text)
    mailboxes = html.unescape(web.get("/console/mailboxes").text)
    assert "anna@bücher.example (anna@xn--bcher-kva.example)" in mailboxes
    assert '<option value="xn--bcher-kva.example">' in mailboxes  # the form still sends the stored name
    # What the console says after a change, and the questions before a removal, name it the same way
    # ("Domain xn--bcher-kva.example added" was the only thing a new domain's page said in xn-- alone).
    added = web.post("/console/domains", {"domain": "straße.example"}, token_from="/console/domains")
    assert "Domain straße.example (xn--strae-oqa.example) added" in html.unescape(web.get(added.headers["location"]).text)
    created = web.post("/console/aliases", {"local": "info", "domain": "xn--bcher-kva.example",
                                            "targets": "anna@xn--bcher-kva.example"}, token_from="/console/aliases")
    info = "info@bücher.example (info@xn--bcher-kva.example)"
    assert f"Alias {info} created." in html.unescape(web.get(created.headers["location"]).text)
    question = html.unescape(web.get("/console/aliases/info@xn--bcher-kva.example/delete").text)
    assert f"Delete the alias {info}?" in question
    assert "no longer reach anna@bücher.example (anna@xn--bcher-kva.example)." in question


# --- issue 11 item 5: every stored address is reachable -------------------------------------------------

@pytest.mark.parametrize("local", ["a/b", "100%", "what?", "x#y", "p+q", "%2F", "a/delete", "{}&=~"])
def test_alias_with_any_storable_character_can_be_opened_edited_and_deleted(web: WebClient, local: str) -> None:
    web.add_user()
    source = f"{local}@{DOMAIN}".lower()  # stored lower-case
    created = web.post("/console/aliases", {"local": local, "domain": DOMAIN, "targets": ALICE},
                       token_from="/console/aliases")
    assert created.status_code == 303, error_of(created.text, "local")
    listing = web.get("/console/aliases").text
    links = {html.unescape(m) for m in re.findall(r'href="(/console/aliases/[^"]+)"', listing)}
    [page_link] = [link for link in links if not link.endswith("/delete")]
    [delete_link] = [link for link in links if link.endswith("/delete")]
    page = web.get(page_link)
    assert page.status_code == 200
    assert f"Alias {html.escape(source)}" in page.text
    edit_action = html.unescape(re.search(r'<form method="post" action="(/console/aliases/[^"]+)"', page.text).group(1))  # type: ignore[union-attr]
    response = web.post(edit_action, {"targets": f"{ALICE}, someone@elsewhere.example"}, token_from=page_link)
    assert response.status_code == 303
    assert alias_of(web, source).targets == (ALICE, "someone@elsewhere.example")
    confirm = web.get(delete_link)
    assert confirm.status_code == 200
    assert "Delete the alias" in confirm.text
    action = html.unescape(re.search(r'<form method="post" action="(/console/aliases/[^"]+)"', confirm.text).group(1))  # type: ignore[union-attr]
    assert web.post(action, token_from=delete_link).status_code == 303
    assert web.run(web.services.accounts.get_alias, source) is None


def test_mailbox_with_plus_and_dots_can_be_opened_and_deleted(web: WebClient) -> None:
    address = f"first.last+x@{DOMAIN}"
    web.add_user(address)
    listing = web.get("/console/mailboxes").text
    links = {html.unescape(m) for m in re.findall(r'href="(/console/mailboxes/[^"]+)"', listing)}
    [delete_link] = [link for link in links if link.endswith("/delete")]
    [page_link] = links - {delete_link}
    assert web.get(page_link).status_code == 200
    response = web.post(page_link, {"name": "F", "quota": "1.5G", "enabled": "on"}, token_from=page_link)
    assert response.status_code == 303
    assert web.get(response.headers["location"]).status_code == 200
    assert user_of(web, address).quota_bytes == 1536 * 1024**2
    assert web.post(delete_link, token_from=delete_link).status_code == 303
    assert web.run(web.services.accounts.get_user, address) is None


# --- issue 10 items 8, 10, 16 in the console --------------------------------------------------------------

@pytest.mark.parametrize("domain", ["10.0.0.1", "2001:db8::1", "1.2.3.4.5"])
def test_console_refuses_an_ip_address_as_domain(web: WebClient, domain: str) -> None:
    response = web.post("/console/domains", {"domain": domain}, token_from="/console/domains")
    assert response.status_code == 400
    assert "IP address" in error_of(response.text, "domain") or "number" in error_of(response.text, "domain")
    assert web.run(web.services.accounts.list_domains) == [DOMAIN]


def test_console_refuses_an_alias_named_like_a_mailbox(web: WebClient) -> None:
    web.add_user()
    form = web.get("/console/aliases").text
    assert "cannot be that of a mailbox" in form  # said before anyone tries
    response = web.post("/console/aliases", {"local": "alice", "domain": DOMAIN, "targets": "eve@elsewhere.example"},
                        token_from="/console/aliases")
    assert response.status_code == 400
    assert "is a mailbox" in error_of(response.text, "local")
    assert web.run(web.services.accounts.resolve, ALICE).mailboxes == (ALICE,)
    web.run(web.services.accounts.add_alias, f"sales@{DOMAIN}", [ALICE])
    assert "already an alias" in web.get("/console/mailboxes").text  # the form's hint
    response = create_alice(web, local="sales")
    assert response.status_code == 400
    assert "already an alias" in error_of(response.text, "local")


def test_console_quota_takes_decimals(web: WebClient) -> None:
    response = create_alice(web, quota="1.5G")
    assert response.status_code == 303
    assert user_of(web, ALICE).quota_bytes == 1536 * 1024**2
    assert 'value="1.5G"' in web.get(f"/console/mailboxes/{ALICE}").text


def test_console_mailbox_delete_moves_mail_aside(web: WebClient) -> None:
    web.add_user()
    web.run(web.services.store.deliver, [ALICE], b"Subject: private\r\n\r\nfor alice\r\n")
    confirm = web.get(f"/console/mailboxes/{ALICE}/delete")
    assert "30 days" in confirm.text
    web.post(f"/console/mailboxes/{ALICE}/delete", token_from=f"/console/mailboxes/{ALICE}/delete")
    data = web.services.config.data
    assert not (data.mail / DOMAIN / "alice").exists()
    [entry] = data.deleted.iterdir()
    assert any(b"for alice" in p.read_bytes() for p in (entry / "mail").rglob("*") if p.is_file() and "new" in p.parts)
    web.add_user()
    assert web.run(web.services.store.snapshot, ALICE, "INBOX").messages == ()
