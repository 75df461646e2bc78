"""How names are shown to people: an international domain in Unicode, with the A-label (the `xn--`
form stored and published in DNS) beside it, as RFC 5891 section 5 recommends for display; and a
download's file name in its Content-Disposition header."""

from __future__ import annotations

import re
from urllib.parse import quote

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


_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._+-]")


def attachment(filename: str) -> str:
    """A Content-Disposition value for a download named `filename` (RFC 6266): a plain ASCII name, and
    the name itself in filename* (RFC 8187) when it has other characters. The names come from files
    and certificates: a quote or a line break in one made the header malformed, a letter outside
    Latin-1 a 500 (starlette encodes headers as Latin-1)."""
    plain = _UNSAFE_IN_FILENAME.sub("_", filename) or "download"
    if plain == filename:
        return f'attachment; filename="{plain}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"
