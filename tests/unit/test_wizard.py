"""Each first-run wizard step as a pure function: what is refused (with the error on the right field),
what passes, and where it leads."""

from __future__ import annotations

import pytest

from appliance.queue.smarthost import Smarthost
from web import wizard
from web.wizard import Done, Form, Next

GOOD_PASSWORD = "correct horse battery"


def admin_values(**changes: str) -> dict[str, str]:
    values = {"name": "admin", "password": GOOD_PASSWORD, "password2": GOOD_PASSWORD, "hostname": "mail.example.org"}
    values.update(changes)
    return values


# --- step 1 -------------------------------------------------------------------------------------------

def test_admin_step_accepts_and_leads_to_the_domain_step() -> None:
    result = wizard.admin_step(admin_values(name=" Admin ", hostname="Mail.Example.ORG."))
    assert result == Next(2, {"hostname": "mail.example.org", "name": "admin", "password": GOOD_PASSWORD})


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"name": ""}, "name", "choose a name"),
    ({"name": "ad min"}, "name", "letters, digits"),
    ({"name": "admin@example.org"}, "name", "no @"),
    ({"name": "a" * 65}, "name", "at most 64"),
    ({"password": "short", "password2": "short"}, "password", "too short"),
    ({"password": "password123", "password2": "password123"}, "password", "too common"),
    ({"password": "aaaaaaaaaaaa", "password2": "aaaaaaaaaaaa"}, "password", "repeats"),
    ({"password2": "something else entirely"}, "password2", "differ"),
    ({"hostname": ""}, "hostname", "enter the name"),
    ({"hostname": "mail"}, "hostname", "fully qualified"),
    ({"hostname": "192.0.2.1"}, "hostname", "not an address"),
    ({"hostname": "mail.local"}, "hostname", "private"),
    ({"hostname": "mail..example.org"}, "hostname", "empty label"),
    ({"hostname": "mail_box.example.org"}, "hostname", "letters, digits"),
    ({"hostname": "mail.example.123"}, "hostname", "number"),
])
def test_admin_step_puts_each_error_next_to_its_field(changes: dict[str, str], field: str, words: str) -> None:
    result = wizard.admin_step(admin_values(**changes))
    assert isinstance(result, Form)
    assert field in result.errors, result.errors
    assert words in result.errors[field]


def test_admin_step_never_echoes_passwords_back() -> None:
    result = wizard.admin_step(admin_values(password2="does not match at all"))
    assert isinstance(result, Form)
    assert "password" not in result.values
    assert "password2" not in result.values
    assert result.values["hostname"] == "mail.example.org"


def test_admin_step_after_the_admin_exists_only_changes_the_hostname() -> None:
    result = wizard.admin_step({"hostname": "box.example.net"}, admin_exists=True)
    assert result == Next(2, {"hostname": "box.example.net"})


def test_international_hostname_becomes_an_a_label() -> None:
    result = wizard.admin_step(admin_values(hostname="mail.bücher.example"))
    assert isinstance(result, Next)
    assert result.data["hostname"] == "mail.xn--bcher-kva.example"


# --- step 2 -------------------------------------------------------------------------------------------

def test_domain_step() -> None:
    assert wizard.domain_step({"domain": " Example.ORG "}) == Next(3, {"domain": "example.org"})
    for text, words in (("", "enter a domain"), ("alice@example.org", "after the @"), ("localhost", "one dot"),
                        ("exa mple.org", "not a valid domain"), ("[192.0.2.1]", "address literal")):
        result = wizard.domain_step({"domain": text})
        assert isinstance(result, Form), text
        assert words in result.errors["domain"], (text, result.errors)


def test_suggested_domain_is_the_hostnames_parent() -> None:
    assert wizard.suggest_domain("mail.example.org") == "example.org"
    assert wizard.suggest_domain("example.org") == "example.org"


# --- step 3 -------------------------------------------------------------------------------------------

def test_dns_step_actions() -> None:
    assert wizard.dns_step({"ipv4": "192.0.32.7", "action": "check"}) == Next(
        3, {"ipv4": "192.0.32.7", "ipv6": ""}, "check")
    assert wizard.dns_step({"ipv4": "192.0.32.7", "ipv6": "2620:0:2D0::7", "action": "continue"}) == Next(
        4, {"ipv4": "192.0.32.7", "ipv6": "2620:0:2d0::7"}, "continue")
    assert wizard.dns_step({"ipv6": "2620:0:2d0::7"}) == Next(3, {"ipv4": "", "ipv6": "2620:0:2d0::7"}, "save")


@pytest.mark.parametrize(("values", "field", "words"), [
    ({}, "ipv4", "public address"),
    ({"ipv4": "not an address"}, "ipv4", "not an IPv4"),
    ({"ipv4": "2001:db8::1"}, "ipv4", "not an IPv4"),
    ({"ipv6": "192.0.2.1"}, "ipv6", "not an IPv6"),
    ({"ipv4": "127.0.0.1"}, "ipv4", "this machine itself"),
    ({"ipv4": "0.0.0.0"}, "ipv4", "this machine itself"),
    ({"ipv6": "fe80::1"}, "ipv6", "link-local"),
    ({"ipv4": "169.254.1.1"}, "ipv4", "link-local"),
    ({"ipv4": "192.168.1.5"}, "ipv4", "private address"),  # issue 10 item 7
    ({"ipv4": "100.64.0.9"}, "ipv4", "carrier-grade NAT"),
    ({"ipv4": "198.51.100.7"}, "ipv4", "documentation"),
    ({"ipv6": "fd00::5"}, "ipv6", "unique local"),
])
def test_dns_step_refuses_addresses_that_cannot_be_the_boxs(values: dict[str, str], field: str, words: str) -> None:
    result = wizard.dns_step(values)
    assert isinstance(result, Form)
    assert words in result.errors[field], result.errors


def test_dns_step_unknown_action() -> None:
    result = wizard.dns_step({"ipv4": "192.0.32.7", "action": "drop tables"})
    assert isinstance(result, Form)
    assert "" in result.errors


# --- step 4 -------------------------------------------------------------------------------------------

def test_tls_step_keeps_the_certificate() -> None:
    assert wizard.tls_step({}) == Next(5, {}, "keep")


# --- step 5: sending mail -----------------------------------------------------------------------------

RELAY_PASSWORD = "relay pass 5ecret!"


def relay_values(**changes: str) -> dict[str, str]:
    values = {"mode": "relay", "relay_host": "SMTP.Provider.Example", "relay_port": "", "relay_tls": "starttls",
              "relay_user": "me@provider.example", "relay_password": RELAY_PASSWORD, "action": "save",
              "save_untested": "on"}
    values.update(changes)
    return values


def test_saving_an_untested_relay_needs_the_second_confirmation() -> None:
    """Issue 10 item 9: Continue saved a relay that was never tested (or whose test failed)."""
    result = wizard.sending_step(relay_values(save_untested=""))
    assert isinstance(result, Form)
    assert "has not passed a test" in result.errors["save_untested"]
    assert "save_untested" not in result.values  # the box is never ticked for the person
    result = wizard.sending_step(relay_values(save_untested="on"))
    assert isinstance(result, Next)
    assert result.relay is not None
    assert result.action == "save"
    # The relay already stored (saved by a test that worked) needs no second yes; nor does a test.
    stored = Smarthost("smtp.provider.example", 587, "starttls", "me@provider.example", RELAY_PASSWORD)
    assert isinstance(wizard.sending_step(relay_values(save_untested="", relay_password=""), stored=stored), Next)
    assert isinstance(wizard.sending_step(relay_values(save_untested="", action="test")), Next)
    assert isinstance(wizard.sending_step({"mode": "direct", "action": "save"}, stored=stored), Next)


def test_sending_step_direct_is_the_default_and_leads_to_the_mailboxes() -> None:
    assert wizard.sending_step({"mode": "direct"}) == Next(6, {}, "save", None)
    assert wizard.sending_step({"mode": "direct", "relay_host": "ignored", "action": "save"}) == Next(6, {}, "save")


def test_sending_step_relay_with_the_tls_modes_default_port() -> None:
    result = wizard.sending_step(relay_values())
    assert isinstance(result, Next)
    assert (result.step, result.action) == (6, "save")
    assert result.relay == Smarthost("smtp.provider.example", 587, "starttls", "me@provider.example", RELAY_PASSWORD)
    result = wizard.sending_step(relay_values(relay_tls="implicit", action="test"), ca_file="/etc/ca.pem")
    assert isinstance(result, Next)
    assert (result.step, result.action) == (5, "test")
    assert result.relay is not None
    assert (result.relay.port, result.relay.tls) == (465, "implicit")
    assert result.relay.ca_file == "/etc/ca.pem"
    result = wizard.sending_step(relay_values(relay_port="2525", relay_host="192.0.2.25"))
    assert isinstance(result, Next)
    assert result.relay is not None
    assert (result.relay.host, result.relay.port) == ("192.0.2.25", 2525)


def test_sending_step_relay_without_a_login() -> None:
    result = wizard.sending_step(relay_values(relay_user="", relay_password=""))
    assert isinstance(result, Next)
    assert result.relay is not None
    assert result.relay.login is None


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"mode": ""}, "mode", "choose how"),
    ({"mode": "carrier pigeon"}, "mode", "choose how"),
    ({"mode": "direct", "action": "test"}, "mode", "to test one"),
    ({"relay_host": ""}, "relay_host", "enter the relay"),
    ({"relay_host": "smtp provider.example"}, "relay_host", "not a valid domain"),
    ({"relay_port": "0"}, "relay_port", "between 1 and 65535"),
    ({"relay_port": "65536"}, "relay_port", "between 1 and 65535"),
    ({"relay_port": "smtp"}, "relay_port", "between 1 and 65535"),
    ({"relay_tls": "none"}, "relay_tls", "STARTTLS or implicit"),
    ({"relay_password": ""}, "relay_password", "enter the password"),
    ({"relay_user": ""}, "relay_user", "goes with the password"),
    ({"relay_user": "me\x07"}, "relay_user", "control character"),
    ({"action": "drop tables"}, "", "unknown action"),
])
def test_sending_step_errors_next_to_their_field(changes: dict[str, str], field: str, words: str) -> None:
    result = wizard.sending_step(relay_values(**changes))
    assert isinstance(result, Form)
    assert words in result.errors[field], result.errors
    assert RELAY_PASSWORD not in result.values.values()
    assert "relay_password" not in result.values


def test_sending_step_keeps_the_stored_password_only_for_the_same_user_and_host() -> None:
    stored = Smarthost("smtp.provider.example", 587, "starttls", "me@provider.example", "stored secret")
    result = wizard.sending_step(relay_values(relay_password="", relay_tls="implicit"), stored=stored)
    assert isinstance(result, Next)
    assert result.relay is not None
    assert (result.relay.password, result.relay.port) == ("stored secret", 465)
    for changes in ({"relay_user": "someone@provider.example"}, {"relay_host": "smtp.elsewhere.example"}):
        result = wizard.sending_step(relay_values(relay_password="", **changes), stored=stored)
        assert isinstance(result, Form)
        assert "another user or host" in result.errors["relay_password"]
    result = wizard.sending_step(relay_values(relay_password="a new one"), stored=stored)
    assert isinstance(result, Next)
    assert result.relay is not None
    assert result.relay.password == "a new one"


def test_sending_step_shows_the_typed_values_back_but_never_the_password() -> None:
    result = wizard.sending_step(relay_values(relay_port="99999"))
    assert isinstance(result, Form)
    assert result.values == {"mode": "relay", "relay_host": "SMTP.Provider.Example", "relay_port": "99999",
                             "relay_tls": "starttls", "relay_user": "me@provider.example"}


# --- steps 6 and 7 ------------------------------------------------------------------------------------


def mailbox_values(**changes: str) -> dict[str, str]:
    values = {"action": "add", "local": "Alice", "domain": "example.org", "name": "Alice Example",
              "password": "alice's long password", "password2": "alice's long password"}
    values.update(changes)
    return values


def test_mailbox_step_adds_and_stays_on_the_step() -> None:
    result = wizard.mailbox_step(mailbox_values(), domains=("example.org",))
    assert result == Next(6, {"address": "alice@example.org", "name": "Alice Example",
                              "password": "alice's long password"}, "add")


def test_mailbox_step_continue() -> None:
    assert wizard.mailbox_step({"action": "continue"}, domains=()) == Next(7, {}, "continue")


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"local": ""}, "local", "before the @"),
    ({"local": "alice@example.org"}, "local", "only the part before"),
    ({"local": "al/ice"}, "local", "letters, digits"),
    ({"domain": "other.org"}, "domain", "box's domains"),
    ({"name": "bad\x07name"}, "name", "control character"),
    ({"password": "alice@example.org", "password2": "alice@example.org"}, "password", "must not be the address"),
    ({"password2": "different"}, "password2", "differ"),
])
def test_mailbox_step_errors(changes: dict[str, str], field: str, words: str) -> None:
    result = wizard.mailbox_step(mailbox_values(**changes), domains=("example.org",))
    assert isinstance(result, Form)
    assert words in result.errors[field], result.errors
    assert "password" not in result.values


def test_done_step() -> None:
    assert wizard.done_step({}) == Done()


def test_steps_are_numbered_one_to_seven() -> None:
    assert [n for n, _ in wizard.STEPS] == [1, 2, 3, 4, 5, 6, 7]
    assert dict(wizard.STEPS)[5] == "Sending mail"
    assert dict(wizard.STEPS)[6] == "Mailboxes"
    assert (wizard.FIRST_STEP, wizard.LAST_STEP) == (1, 7)


def test_overlong_input_is_cut_before_validation() -> None:
    result = wizard.domain_step({"domain": "a" * 100_000})
    assert isinstance(result, Form)
    assert len(result.values["domain"]) <= wizard.MAX_FIELD
