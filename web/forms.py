"""Validation of the console's forms, pure: values in, (cleaned data, errors by field) out. The services
check again (and may still refuse: a name taken meanwhile); these give the person a message next to
the field before anything is tried."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from appliance.account_errors import AccountError
from appliance.accounts import mail_domain, mailbox_address
from appliance.address import parse_address
from appliance.passwords import password_problem

MAX_FIELD = 1024
MAX_TARGETS_TEXT = 16 * 1024
_SIZE = re.compile(r"^(\d{1,7})\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)

Errors = dict[str, str]


def text(values: Mapping[str, str], name: str, limit: int = MAX_FIELD) -> str:
    return str(values.get(name, ""))[:limit].strip()


def secret(values: Mapping[str, str], name: str) -> str:
    # Passwords are not stripped: a trailing space typed on purpose is part of it.
    return str(values.get(name, ""))[:MAX_FIELD]


def parse_quota(value: str) -> int:
    """'' or '0' -> 0 (no limit); '500M', '2G', '1024K' -> bytes (binary units). ValueError otherwise."""
    value = value.strip()
    if not value:
        return 0
    m = _SIZE.match(value)
    if not m:
        raise ValueError("a size like 500M or 2G; 0 or empty for no limit")
    return int(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower())


def format_quota(size: int) -> str:
    if size == 0:
        return ""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


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
