"""Validation of the console's forms, pure: values in, (cleaned data, errors by field) out. The services
check again (and may still refuse: a name taken meanwhile); these give the person a message next to
the field before anything is tried."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Mapping

from appliance import sizes
from appliance.account_errors import AccountError
from appliance.accounts import mail_domain, mailbox_address
from appliance.address import parse_address
from appliance.passwords import password_problem
from appliance.queue.smarthost import DEFAULT_PORTS, RELAY_TLS_MODES, Smarthost, SmarthostError

MAX_FIELD = 1024
MAX_TARGETS_TEXT = 16 * 1024

Errors = dict[str, str]


def text(values: Mapping[str, str], name: str, limit: int = MAX_FIELD) -> str:
    return str(values.get(name, ""))[:limit].strip()


def secret(values: Mapping[str, str], name: str) -> str:
    # Passwords are not stripped: a trailing space typed on purpose is part of it.
    return str(values.get(name, ""))[:MAX_FIELD]


def parse_quota(value: str) -> int:
    """'' -> 0 (no limit); otherwise appliance.sizes.parse_size, the rule the CLI uses too
    ('1.5G', '500M', '0'). ValueError with the reason otherwise."""
    if not value.strip():
        return 0
    return sizes.parse_size(value)


def format_quota(size: int) -> str:
    return sizes.format_size(size)


def check_password(password: str, again: str, owner: str | None) -> Errors:
    problem = password_problem(password, address=owner or None)
    if problem:
        return {"password": problem}
    if password != again:
        return {"password2": "the two passwords differ"}
    return {}


def display_name(values: Mapping[str, str]) -> tuple[str, Errors]:
    name = text(values, "name")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return name, {"name": "the name contains a control character"}
    return name, {}


def new_mailbox(values: Mapping[str, str], domains: tuple[str, ...]) -> tuple[dict[str, str], Errors]:
    """Fields local, domain, name, password, password2 (and quota in the console)."""
    errors: Errors = {}
    local = text(values, "local").lower()
    domain = text(values, "domain").lower()
    address = ""
    if domain not in domains:
        errors["domain"] = "choose one of the box's domains"
    if not local:
        errors["local"] = "enter the part before the @, e.g. alice"
    elif "@" in local:
        errors["local"] = "only the part before the @"
    elif "domain" not in errors:
        try:
            address = mailbox_address(f"{local}@{domain}").canonical
        except AccountError as exc:
            errors["local"] = str(exc)
    name, name_errors = display_name(values)
    errors.update(name_errors)
    errors.update(check_password(secret(values, "password"), secret(values, "password2"), address))
    data = {"address": address, "name": name, "password": secret(values, "password")}
    if "quota" in values:
        try:
            data["quota"] = str(parse_quota(text(values, "quota")))
        except ValueError as exc:
            errors["quota"] = str(exc)
    return data, errors


def new_domain(values: Mapping[str, str]) -> tuple[str, Errors]:
    value = text(values, "domain")
    if not value:
        return "", {"domain": "enter a domain, e.g. example.org"}
    if "@" in value:
        return "", {"domain": "only the part after the @, e.g. example.org"}
    try:
        domain = mail_domain(value)
    except AccountError as exc:
        return "", {"domain": str(exc)}
    if "." not in domain:
        return "", {"domain": "a mail domain has at least one dot, e.g. example.org"}
    return domain, {}


def alias_targets(values: Mapping[str, str], *, catch_all: bool) -> tuple[list[str], Errors]:
    """Targets one per line or separated by commas; each an address ('@domain' for a catch-all)."""
    raw = str(values.get("targets", ""))[:MAX_TARGETS_TEXT]
    targets = [t.strip() for t in re.split(r"[,\s]+", raw) if t.strip()]
    if not targets:
        return [], {"targets": "enter at least one address to deliver to"}
    for target in targets:
        if target.startswith("@") and catch_all:
            continue
        try:
            parse_address(target)
        except AccountError as exc:
            return [], {"targets": str(exc)}
    return targets, {}


def new_alias(values: Mapping[str, str], domains: tuple[str, ...]) -> tuple[str, list[str], Errors]:
    """Fields local ('' or '*' = catch-all for the domain), domain, targets."""
    local = text(values, "local").lower()
    domain = text(values, "domain").lower()
    errors: Errors = {}
    if domain not in domains:
        errors["domain"] = "choose one of the box's domains"
    if "@" in local:
        errors["local"] = "only the part before the @ (leave empty for a catch-all)"
    catch_all = local in ("", "*")
    source = f"@{domain}" if catch_all else f"{local}@{domain}"
    if not catch_all and not errors:
        try:
            parse_address(source)
        except AccountError as exc:
            errors["local"] = str(exc)
    targets, target_errors = alias_targets(values, catch_all=catch_all)
    errors.update(target_errors)
    return source, targets, errors


# --- sending: direct delivery or a relay (the wizard's step and the console's Sending page) ----------

SEND_DIRECT, SEND_RELAY = "direct", "relay"
SAVE_UNTESTED = "save_untested"  # the checkbox that confirms saving a relay without a working test
RELAY_SHOWN = ("mode", "relay_host", "relay_port", "relay_tls", "relay_user")  # never relay_password


def relay_values(relay: Smarthost | None) -> dict[str, str]:
    """The form's fields for the relay in force (None: direct delivery). Never the password."""
    if relay is None:
        return {"mode": SEND_DIRECT, "relay_tls": "starttls"}
    return {"mode": SEND_RELAY, "relay_host": relay.host, "relay_port": str(relay.port), "relay_tls": relay.tls,
            "relay_user": relay.user}


def relay_shown(values: Mapping[str, str]) -> dict[str, str]:
    """What the person typed, to fill back in after an error (never the password)."""
    return {name: text(values, name) for name in RELAY_SHOWN}


def _relay_host(value: str) -> tuple[str, str | None]:
    if not value:
        return "", "enter the relay's host name, e.g. smtp.provider.example"
    try:
        return str(ipaddress.ip_address(value.strip("[]"))), None
    except ValueError:
        pass
    try:
        return mail_domain(value), None
    except AccountError as exc:
        return "", str(exc)


def relay_choice(values: Mapping[str, str], stored: Smarthost | None, ca_file: str = "") -> tuple[Smarthost | None, Errors]:  # noqa: C901  one check per relay field plus the stored-password rule; one place for the form's rules
    """Fields mode ('direct' or 'relay'), relay_host, relay_port (empty: the TLS mode's default),
    relay_tls ('starttls' or 'implicit'), relay_user, relay_password. (None, {}) is direct delivery.

    An empty password keeps the stored one, but only for the same user at the same host: a password
    is never sent to a server it was not typed for."""
    mode = text(values, "mode")
    if mode == SEND_DIRECT:
        return None, {}
    if mode != SEND_RELAY:
        return None, {"mode": "choose how this box sends mail"}
    errors: Errors = {}
    host, problem = _relay_host(text(values, "relay_host"))
    if problem:
        errors["relay_host"] = problem
    tls = text(values, "relay_tls").lower()
    if tls not in RELAY_TLS_MODES:
        errors["relay_tls"] = "choose STARTTLS or implicit TLS"
        tls = "starttls"
    port_text = text(values, "relay_port")
    port = DEFAULT_PORTS[tls]
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            errors["relay_port"] = "a port number between 1 and 65535 (usually 587 or 465)"
        else:
            port = int(port_text)
    user = text(values, "relay_user")
    password = secret(values, "relay_password")
    if any(unicodedata.category(ch) == "Cc" for ch in user):
        errors["relay_user"] = "the user name contains a control character"
    if password and not user:
        errors["relay_user"] = "enter the user name that goes with the password"
    if user and not password:
        if stored is not None and stored.password and stored.user == user and stored.host == host:
            password = stored.password
        elif stored is not None and stored.password and not errors.get("relay_host"):
            errors["relay_password"] = "enter the password: the stored one belongs to another user or host"  # noqa: S105  a form error message, not a secret
        else:
            errors["relay_password"] = "enter the password the relay expects for this user"  # noqa: S105  a form error message, not a secret
    if errors:
        return None, errors
    try:
        return Smarthost(host, port, tls, user, password, ca_file), {}  # type: ignore[arg-type]  # tls checked
    except SmarthostError as exc:
        return None, {"": str(exc)}


def sending_form(values: Mapping[str, str], stored: Smarthost | None, ca_file: str = "") -> tuple[str, Smarthost | None, Errors]:
    """The Sending form (wizard step and console page): (action, relay or None for direct, errors).
    action 'save' stores the choice; 'test' tries the relay first, so it needs one. Saving a relay
    other than the stored one without testing it needs the SAVE_UNTESTED box ticked."""
    action = text(values, "action") or "save"
    if action not in ("save", "test"):
        return action, None, {"": "unknown action"}
    relay, errors = relay_choice(values, stored, ca_file)
    if not errors and action == "test" and relay is None:
        errors = {"mode": "choose “Send through a relay” to test one"}
    if not errors and action == "save" and relay is not None and relay != stored \
            and text(values, SAVE_UNTESTED) != "on":
        # A relay is saved by a test that works. Saving one never tested (or whose test failed) would
        # leave every outbound message deferred without a word: it needs a deliberate second yes.
        errors = {SAVE_UNTESTED: "this relay has not passed a test: use “Test the relay” (it is saved when "
                                 "it works), or tick the box to save it anyway"}
    return action, relay, errors
