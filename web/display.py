"""How names are shown to people: an international domain in Unicode, with the A-label (the `xn--`
form stored and published in DNS) beside it, as RFC 5891 section 5 recommends for display."""

from __future__ import annotations

import idna


def unicode_domain(name: str) -> str:
    """'xn--bcher-kva.example' -> 'bücher.example'; any name that does not decode is shown as is."""
    if "xn--" not in name.lower():
        return name
    try:
        return idna.decode(name)
    except (idna.IDNAError, UnicodeError, ValueError):
        return name


def idn(text: str) -> str:
    """A domain or an address for display: 'bücher.example (xn--bcher-kva.example)'; unchanged for
    plain ASCII names. '@domain' (a catch-all) and 'local@domain' keep their form."""
    text = str(text)
    local, at, domain = text.rpartition("@")
    shown = unicode_domain(domain)
    if shown == domain:
        return text
    return f"{local}{at}{shown} ({text})"
