"""The first-run wizard as pure functions: each step takes what the person typed (and what the box
already knows) and returns Form (show the step again, with an error next to each field), Next (the
cleaned values to apply, and the step to go to) or Done.

No I/O here: web/routes/setup.py applies a Next (creates the admin, the domain, ...), which is where
the database can still refuse (a name taken meanwhile) and turn it back into a Form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance import time_zone
from appliance.account_errors import AccountError
from appliance.accounts import admin_name_problem, mail_domain
from appliance.dns_records import valid_public_address
from appliance.queue.smarthost import Smarthost
from web import forms

STEPS: tuple[tuple[int, str], ...] = (
    (1, "Administrator and host name"),
    (2, "Mail domain"),
    (3, "DNS records"),
    (4, "Certificate"),
    (5, "Sending mail"),
    (6, "Mailboxes"),
    (7, "Done"),
)
FIRST_STEP, LAST_STEP = STEPS[0][0], STEPS[-1][0]
MAX_FIELD = 1024  # longer input is cut before validation (forms never need more)
SETUP_CODE_MISSING = "enter the setup code this box printed when it started (also in its data folder, file setup-code)"
SETUP_CODE_WRONG = "this is not the setup code of this box (or too many attempts: wait a minute)"


@dataclass(frozen=True)
class Form:
    """Show the step again. `errors` maps a field name ('' for the whole form) to one line."""

    errors: Mapping[str, str]
    values: Mapping[str, str] = field(default_factory=dict)  # what to fill back in (never passwords)


@dataclass(frozen=True)
class Next:
    step: int
    data: Mapping[str, str] = field(default_factory=dict)  # cleaned values for the route to apply
    action: str = ""  # what the route should do, for steps with several buttons
    relay: Smarthost | None = None  # step 5: the relay chosen (None: direct delivery)


@dataclass(frozen=True)
class Done:
    pass


StepResult = Form | Next | Done


def _field(values: Mapping[str, str], name: str) -> str:
    return str(values.get(name, ""))[:MAX_FIELD].strip()


def _secret(values: Mapping[str, str], name: str) -> str:
    # Passwords are not stripped: a trailing space typed on purpose is part of it.
    return str(values.get(name, ""))[:MAX_FIELD]


def check_admin_name(text: str) -> str | None:
    return admin_name_problem(text)  # the rule Accounts enforces, so the form can say it first


def check_hostname(text: str) -> tuple[str | None, str | None]:
    """(canonical host name, None) or (None, why it cannot be the box's name)."""
    if not text:
        return None, "enter the name of this box, e.g. mail.example.org"
    try:
        ipaddress.ip_address(text)
        return None, "enter a name, not an address"
    except ValueError:
        pass
    try:
        name = mail_domain(text)
    except AccountError as exc:
        return None, str(exc)
    labels = name.split(".")
    if labels[0] == "localhost":
        return None, "'localhost' is this machine's name for itself: enter the name the internet will know it by"
    if len(labels) < 2:
        return None, "a full name with a dot is needed (a fully qualified domain name), e.g. mail.example.org"
    if labels[-1].isdigit():
        return None, "the last part of a host name cannot be a number"
    if labels[-1] in ("local", "localhost", "localdomain", "internal", "lan", "home"):
        return None, f"'.{labels[-1]}' names are private: other mail servers cannot find this box by it"
    return name, None


# --- step 1: administrator and host name ------------------------------------------------------------------

def admin_step(values: Mapping[str, str], *, admin_exists: bool = False) -> StepResult:
    """Fields: code (checked by the route, before this), name, password, password2, hostname, time_zone. Once the
    admin exists (the person came back to step 1), only the host name can change."""
    hostname, host_error = check_hostname(_field(values, "hostname"))
    errors: dict[str, str] = {}
    data: dict[str, str] = {}
    if host_error:
        errors["hostname"] = host_error
    else:
        assert hostname is not None
        data["hostname"] = hostname
    if _field(values, "time_zone"):  # absent (a script, an older page): the zone stays as it is
        zone, zone_error = time_zone.check(_field(values, "time_zone"))
        if zone_error:
            errors["time_zone"] = zone_error
        else:
            assert zone is not None
            data["time_zone"] = zone
    if not admin_exists:
        name = _field(values, "name").lower()
        name_error = check_admin_name(name)
        if name_error:
            errors["name"] = name_error
        errors.update(forms.check_password(_secret(values, "password"), _secret(values, "password2"), name))
        data["name"] = name
        data["password"] = _secret(values, "password")
    if errors:
        shown = {"name": _field(values, "name"), "hostname": _field(values, "hostname"),
                 "time_zone": _field(values, "time_zone")}
        if not admin_exists:
            shown["code"] = _field(values, "code")  # already checked: not asked again for a typo elsewhere
        return Form(errors, shown)
    return Next(2, data)


# --- step 2: first domain -------------------------------------------------------------------------------

def suggest_domain(hostname: str) -> str:
    """mail.example.org -> example.org: the usual layout, the box named inside the domain it serves."""
    labels = hostname.split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else hostname


def domain_step(values: Mapping[str, str]) -> StepResult:
    domain, errors = forms.new_domain(values)
    if errors:
        return Form(errors, {"domain": _field(values, "domain")})
    return Next(3, {"domain": domain})


# --- step 3: DNS records --------------------------------------------------------------------------------

def dns_step(values: Mapping[str, str]) -> StepResult:
    """Fields: ipv4, ipv6 (at least one), action: 'save', 'check' or 'continue'. Publishing the records
    is up to the person and can take hours to be visible: continuing never waits for the checks."""
    action = _field(values, "action") or "save"
    if action not in ("save", "check", "continue"):
        return Form({"": "unknown action"}, dict(values))
    errors: dict[str, str] = {}
    data: dict[str, str] = {}
    for name, version in (("ipv4", 4), ("ipv6", 6)):
        text = _field(values, name)
        if not text:
            data[name] = ""
            continue
        try:
            data[name] = valid_public_address(text, version)
        except ValueError as exc:
            errors[name] = str(exc)
    if not errors and not data["ipv4"] and not data["ipv6"]:
        errors["ipv4"] = "enter the public address of this box (or of your router, if it forwards the ports)"
    if errors:
        return Form(errors, {"ipv4": _field(values, "ipv4"), "ipv6": _field(values, "ipv6")})
    return Next(4 if action == "continue" else 3, data, action)


# --- step 4: certificate --------------------------------------------------------------------------------

def tls_step(values: Mapping[str, str]) -> StepResult:
    """Nothing to choose yet: the box keeps its self-signed certificate (Let's Encrypt comes later)."""
    return Next(5, {}, "keep")


# --- step 5: sending mail -------------------------------------------------------------------------------

def sending_step(values: Mapping[str, str], *, stored: Smarthost | None = None, ca_file: str = "") -> StepResult:
    """Direct delivery, or a relay (the console's Sending page has the same form: forms.sending_form).
    action 'save' (Continue) goes on to the mailboxes; 'test' tries the relay and stays here. An empty
    password keeps the stored one (same user, same host)."""
    action, relay, errors = forms.sending_form(values, stored, ca_file)
    if errors:
        return Form(errors, forms.relay_shown(values))
    return Next(6 if action == "save" else 5, {}, action, relay)


# --- step 6: mailboxes ----------------------------------------------------------------------------------

def mailbox_step(values: Mapping[str, str], *, domains: tuple[str, ...]) -> StepResult:
    """action 'add' with fields local, domain, name, password, password2; or action 'continue'."""
    if _field(values, "action") == "continue":
        return Next(7, {}, "continue")
    data, errors = forms.new_mailbox({k: v for k, v in values.items() if k != "quota"}, domains)
    if errors:
        return Form(errors, {name: _field(values, name) for name in ("local", "domain", "name")})
    return Next(6, data, "add")


# --- step 7 -----------------------------------------------------------------------------------------

def done_step(values: Mapping[str, str]) -> StepResult:
    return Done()
