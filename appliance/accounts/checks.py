"""The input rules of the accounts layer, pure: what a domain, a mailbox address, an alias, a display
name, a quota or an administrator's name may be, in canonical form. No database here; the wizard and
the console's forms use these same functions, so every door applies one rule.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable

from appliance.account_errors import AccountError, InvalidAddress
from appliance.address import Address, parse_address, parse_domain

MAX_ALIAS_TARGETS = 200
MAX_DISPLAY_NAME = 200
MAX_ADMIN_NAME = 64
# Mailbox local parts name a directory (mail/<domain>/<local>/), so only a path-safe subset of
# RFC 5321 atext: no '/', no quoting, nothing non-ASCII. Dot rules come from the dot-string syntax.
_MAILBOX_LOCAL_PART = re.compile(r"[a-z0-9_][a-z0-9._+-]*")
# Admin names never contain '@': the login form tells admins from mailbox owners by it, so an admin
# named with one could never log in. The one rule for the wizard, the CLI and the console.
_ADMIN_NAME = re.compile(r"[a-z0-9_][a-z0-9._-]*")


def mail_domain(name: str) -> str:
    """A DNS name that can be a mail domain or a host name: A-label, lower-case, its last label not all
    digits; never an address literal or a bare IP address (issue 10 item 8). new_mail_domain() adds
    the rules for a domain of this box."""
    text = name.strip()
    if text.startswith("["):
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (an address literal cannot be a mail domain)")
    if _is_ip_address(text):
        raise InvalidAddress(
            f"not a valid domain name: {name[:80]!r} (an IP address cannot be a mail domain; enter a name like example.org)"
        )
    domain = parse_domain(text)
    labels = domain.split(".")
    # RFC 3696 2: a top-level domain is never all-numeric, so '10.0.0.1' or '1.2.3.4.5' is not a
    # domain name even though each label is valid on its own.
    if labels[-1].isdigit():
        raise InvalidAddress(
            f"not a valid domain name: {name[:80]!r} (the last part cannot be a number; an IP address cannot be a mail domain)"
        )
    return domain

def new_mail_domain(name: str) -> str:
    """The one check of a domain added to the box, whether by the wizard, the console or the CLI (all
    through Accounts.add_domain): mail_domain() and at least two labels, since mail for a one-label
    name ('localhost', 'mail') can never come from outside."""
    domain = mail_domain(name)
    if "." not in domain:
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (a mail domain has at least one dot, e.g. example.org)")
    return domain

def stored_domain(name: str) -> str:
    """The canonical spelling of a domain to look up: lenient where mail_domain is strict, so a
    domain an earlier version accepted (an IP address, one label) can still be found and removed."""
    if name.strip().startswith("["):
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (an address literal cannot be a mail domain)")
    return parse_domain(name.strip())

def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.rstrip("."))
    except ValueError:
        return False
    return True

def mailbox_address(address: str) -> Address:
    """Parse an address meant to be a mailbox of this box, with the stricter local-part rule."""
    addr = parse_address(address)
    if addr.is_literal:
        raise InvalidAddress(f"not a valid mailbox address: {address[:80]!r} (an address literal is never local)")
    local = addr.local.lower()
    if not _MAILBOX_LOCAL_PART.fullmatch(local):
        raise InvalidAddress(
            f"not a valid mailbox address: {address[:80]!r} (mailbox names use letters, digits and . _ + -)"
        )
    return Address(local, addr.domain)

def clean_display_name(text: str) -> str:
    name = text.strip()
    if len(name) > MAX_DISPLAY_NAME:
        raise AccountError(f"the display name is longer than {MAX_DISPLAY_NAME} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise AccountError("the display name contains a control character")
    return name

def clean_quota(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AccountError(f"the quota must be a whole number of bytes, 0 for no limit (got {value!r})")
    return value

def admin_name_problem(username: str) -> str | None:
    """Why this cannot be an administrator's name (None: it can, as username.strip().lower())."""
    name = username.strip().lower()
    if not name:
        return "choose a name to log in with"
    if len(name) > MAX_ADMIN_NAME or not _ADMIN_NAME.fullmatch(name):
        return f"use letters, digits and . _ - only (at most {MAX_ADMIN_NAME}; no @)"
    return None

def admin_name(username: str) -> str:
    problem = admin_name_problem(username)
    if problem:
        raise AccountError(f"not a valid admin name: {username.strip()[:80]!r}: {problem}")
    return username.strip().lower()

def alias_source(source: str) -> tuple[str, str]:
    """(local part, domain) with '' as the local part of a catch-all '@domain'."""
    text = source.strip()
    if text.startswith("@"):
        return "", stored_domain(text[1:])
    addr = parse_address(text)
    if addr.is_literal:
        raise InvalidAddress(f"not a valid alias address: {source[:80]!r} (an address literal is never local)")
    return addr.local.lower(), addr.domain

def source_label(local: str, domain: str) -> str:
    return f"{local}@{domain}"  # '' local part gives '@domain', the catch-all spelling

def alias_targets(targets: Iterable[str], *, catch_all: bool) -> list[str]:
    """Normalised, de-duplicated targets. '@domain' (same local part, other domain) is for catch-alls."""
    if isinstance(targets, str):
        targets = [targets]
    seen: dict[str, str] = {}
    for raw in targets:
        text = raw.strip()
        if text.startswith("@"):
            if not catch_all:
                raise InvalidAddress(
                    f"not a valid alias target: {raw[:80]!r} (a bare @domain target is only for a catch-all)"
                )
            domain = mail_domain(text[1:])
            seen.setdefault(f"@{domain}", f"@{domain}")
            continue
        addr = parse_address(text)
        if addr.is_literal:
            raise InvalidAddress(f"not a valid alias target: {raw[:80]!r} (address literals are not allowed)")
        seen.setdefault(addr.canonical, str(addr))
    if not seen:
        raise AccountError("an alias needs at least one target address")
    if len(seen) > MAX_ALIAS_TARGETS:
        raise AccountError(f"an alias can have at most {MAX_ALIAS_TARGETS} targets")
    return list(seen.values())
