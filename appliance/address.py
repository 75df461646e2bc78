"""Email address syntax (RFC 5321 4.1.2) and the one normal form the box compares addresses in.

Pure functions, no I/O. Choices this module makes for the whole box:
- An address is `Local-part "@" (Domain / address-literal)`, RFC 5321 4.1.2. The local part is a
  dot-string or a quoted-string; a quoted-string that needs no quotes is unquoted ("minimal quoting",
  RFC 5321 4.1.2 last paragraph), so `"alice"@x` and `alice@x` are the same address.
- Domains are stored and compared as lower-case A-labels (IDNA 2008 with the UTS 46 mapping, via the
  `idna` package), so `Bücher.example` and `xn--bcher-kva.example` are one domain.
- One trailing dot on a domain (`example.com.`, the DNS root) is dropped, as Postfix does, so the
  fully-qualified spelling reaches the same place instead of being an unknown or relayed domain.
- `%` and `!` are ordinary atext: they never mean "relay onwards" (RFC 5321 3.6.1 / 2.3.5); an address
  like `user%other.test@ourdomain` is simply a local part nobody owns.
- Source routes (`<@a,@b:user@c>`) are only accepted by `parse_path`, which drops them as RFC 5321
  4.1.1.3 and Appendix C allow ("SHOULD ignore the routes"); the remaining mailbox is what counts.
- Address literals (`[127.0.0.1]`, `[IPv6:::1]`) are parsed and normalised, but callers never treat them
  as a local domain.
- The addresses of a header field (From:, Sender: ...) are read by `header_addresses` alone, so every
  check of the author (submission, DKIM signing, DMARC on the MX) reads the same ones and meets an
  unreadable field the same way.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

from appliance.account_errors import InvalidAddress

# RFC 5321 4.5.3.1: size limits.
MAX_LOCAL_PART = 64  # 4.5.3.1.1, octets
MAX_DOMAIN = 255  # 4.5.3.1.2, octets
MAX_PATH = 256  # 4.5.3.1.3, octets including the angle brackets
MAX_ADDRESS = MAX_PATH - 2
MAX_LABEL = 63  # RFC 1035 2.3.4
MAX_SHOWN = 80  # how much of bad input an error message repeats

PLUS_SEPARATOR = "+"

# RFC 5321 4.1.2 / RFC 5322 3.2.3: atext.
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*")
# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str]
_SUB_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_IPV4_LITERAL = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


@dataclass(frozen=True)
class Address:
    """A parsed address. `local` keeps the sender's case (in minimal-quoted wire form); `domain` is the
    lower-case A-label, or a normalised literal like '[192.0.2.1]' / '[IPv6:2001:db8::1]'."""

    local: str
    domain: str

    @property
    def canonical(self) -> str:
        """The form the box compares and stores: local part and domain lower-cased."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def is_quoted(self) -> bool:
        return self.local.startswith('"')

    def __str__(self) -> str:
        # RFC 5321 2.4: a remote host's local part may be case-sensitive, so forwards keep this form.
        return f"{self.local}@{self.domain}"


def _shown(text: str) -> str:
    return repr(text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "...")


def _bad_address(text: str, reason: str) -> InvalidAddress:
    return InvalidAddress(f"not a valid email address: {_shown(text)} ({reason})")


def _bad_domain(text: str, reason: str) -> InvalidAddress:
    return InvalidAddress(f"not a valid domain name: {_shown(text)} ({reason})")


# --- domains ------------------------------------------------------------------------------------------

class _Reject(Exception):
    """Internal: why a piece is malformed; the public parsers word the one-line message."""


def parse_domain(text: str) -> str:
    """A domain name (no address literal) in lower-case A-label form; IDN U-labels are converted."""
    try:
        return _normalise_domain(text)
    except _Reject as exc:
        raise _bad_domain(text, str(exc)) from None


def _normalise_domain(text: str) -> str:  # noqa: C901  the domain cases of RFC 5321 4.1.2/4.1.3 (root dot, IDNA, literals) in one place
    name = text
    if name.endswith("."):  # the DNS root: 'example.com.' is 'example.com' (see module docstring)
        name = name[:-1]
    if not name:
        raise _Reject("empty")
    if not name.isascii():
        if any(unicodedata.category(ch).startswith("C") or ch.isspace() for ch in name):
            raise _Reject("contains spaces or control characters")
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise _Reject(f"not a valid international name: {exc}") from None
        if name.endswith("."):  # an ideographic full stop at the end maps to '.'
            name = name[:-1]
    name = name.lower()
    if not name:
        raise _Reject("empty")
    if len(name) > MAX_DOMAIN:
        raise _Reject(f"longer than {MAX_DOMAIN} characters")
    for label in name.split("."):
        if not label:
            raise _Reject("empty label")
        if len(label) > MAX_LABEL:
            raise _Reject(f"a label is longer than {MAX_LABEL} characters")
        if not _SUB_DOMAIN.fullmatch(label):
            raise _Reject("labels are letters, digits and inner hyphens")
        if label.startswith("xn--"):
            _check_a_label(label)
    return name


def _check_a_label(label: str) -> None:
    """An 'xn--' label must be valid IDNA 2008, or at least punycode of printable non-ASCII text:
    deliberately looser, so an existing IDNA 2003 era domain (emoji) can still be a forward target."""
    try:
        idna.decode(label)
        return
    except (idna.IDNAError, UnicodeError):
        pass
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        raise _Reject(f"{label!r} is not valid punycode") from None
    if not decoded or decoded.isascii() or not decoded.isprintable() or any(ch.isspace() for ch in decoded):
        raise _Reject(f"{label!r} is not valid punycode")


def domain_to_unicode(domain: str) -> str:
    """For display only: 'xn--bcher-kva.example' -> 'bücher.example'; a name without an A-label, or one
    that does not decode, as it is."""
    if "xn--" not in domain.lower():
        return domain
    try:
        return str(idna.decode(domain))
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def idn(text: str) -> str:
    """A domain or an address as the console and the CLI name it: an international domain in Unicode
    with the A-label it is stored and published as beside it, 'bücher.example (xn--bcher-kva.example)'
    (RFC 5891 section 5: the U-label for display); plain ASCII names unchanged. '@domain' (a catch-all)
    and 'local@domain' keep their form."""
    text = str(text)
    local, at, domain = text.rpartition("@")
    shown = domain_to_unicode(domain)
    if shown == domain:
        return text
    return f"{local}{at}{shown} ({text})"


def _parse_literal(text: str, literal: str) -> str:
    """RFC 5321 4.1.3: '[' (IPv4 / 'IPv6:' IPv6 / General) ']', normalised."""
    inner = literal[1:-1]
    if _IPV4_LITERAL.fullmatch(inner):
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise _bad_address(text, "bad IPv4 address literal") from None
    tag, sep, rest = inner.partition(":")
    if sep and tag.lower() == "ipv6":
        try:
            ip6 = ipaddress.IPv6Address(rest)
        except ValueError:
            raise _bad_address(text, "bad IPv6 address literal") from None
        if ip6.scope_id:
            raise _bad_address(text, "bad IPv6 address literal")
        return f"[IPv6:{ip6.compressed}]"
    # General-address-literal: no other Standardized-tag is registered with IANA.
    raise _bad_address(text, "unsupported address literal")


# --- local parts --------------------------------------------------------------------------------------

def _utf8_atext_ok(local: str) -> bool:
    """RFC 6531 3.3: atext is extended with any non-ASCII (UTF8-non-ascii) character."""
    return all(ord(ch) > 127 and unicodedata.category(ch)[0] not in "CZ" for ch in local if not ch.isascii())


def _unquote(text: str, quoted: str) -> str:
    """Content of a quoted-string (with the quotes), escapes resolved. RFC 5321 4.1.2 QcontentSMTP."""
    out: list[str] = []
    i = 1
    end = len(quoted) - 1
    while i < end:
        ch = quoted[i]
        if ch == "\\":
            i += 1
            if i >= end:
                raise _bad_address(text, "unfinished escape in quoted local part")
            ch = quoted[i]
            if ch.isascii() and not 32 <= ord(ch) <= 126:
                raise _bad_address(text, "bad escape in quoted local part")
        elif ch == '"':
            raise _bad_address(text, "stray quote in local part")
        elif ch.isascii() and not 32 <= ord(ch) <= 126:
            raise _bad_address(text, "control character in local part")
        out.append(ch)
        i += 1
    return "".join(out)


def _quote(content: str) -> str:
    """Minimal quoting, RFC 5321 4.1.2: bare when the content is a dot-string, else quoted."""
    if content and _DOT_STRING.fullmatch(content):
        return content
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _find_quoted_end(text: str) -> int:
    """Index just past the closing quote of a quoted-string starting at text[0], or -1."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return -1


def _parse_local(text: str, local: str, smtputf8: bool) -> str:
    if not local:
        raise _bad_address(text, "empty local part")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise _bad_address(text, "unterminated quoted local part")
        content = _unquote(text, local)
        if not content.isascii() and not (smtputf8 and _utf8_atext_ok(content)):
            raise _bad_address(text, "non-ASCII local part")
        if smtputf8:
            content = unicodedata.normalize("NFC", content)
        wire = _quote(content)
    else:
        if smtputf8 and not local.isascii():
            if not _utf8_atext_ok(local):
                raise _bad_address(text, "bad character in local part")
            local = unicodedata.normalize("NFC", local)
            check = "".join(ch if ch.isascii() else "a" for ch in local)
        else:
            check = local
        if not check.isascii():
            raise _bad_address(text, "non-ASCII local part")
        if not _DOT_STRING.fullmatch(check):
            if ".." in check or check.startswith(".") or check.endswith("."):
                raise _bad_address(text, "misplaced dot in local part")
            raise _bad_address(text, "bad character in local part")
        wire = local
    if len(wire.encode("utf-8")) > MAX_LOCAL_PART:
        raise _bad_address(text, f"local part longer than {MAX_LOCAL_PART} octets")
    return wire


# --- addresses ----------------------------------------------------------------------------------------

def parse_address(text: str, *, smtputf8: bool = False) -> Address:  # noqa: C901  one check per rule of the RFC 5321 4.1.2 Mailbox grammar, in order
    """Parse `local@domain` (RFC 5321 4.1.2 Mailbox, no angle brackets, no source route).
    Surrounding spaces and tabs are ignored. `smtputf8` allows a UTF-8 local part (RFC 6531)."""
    if not isinstance(text, str):
        raise InvalidAddress("not a valid email address: not text")
    body = text.strip(" \t")
    if not body:
        raise _bad_address(text, "empty")
    if len(body.encode("utf-8", "surrogatepass")) > MAX_ADDRESS * 4:  # cheap bound before any work
        raise _bad_address(text, "too long")
    if body.startswith("@"):
        raise _bad_address(text, "source route or missing local part")
    if body.startswith("<") or body.endswith(">"):
        raise _bad_address(text, "angle brackets")
    if body.startswith('"'):
        end = _find_quoted_end(body)
        if end < 0:
            raise _bad_address(text, "unterminated quoted local part")
        local, rest = body[:end], body[end:]
        if not rest.startswith("@"):
            raise _bad_address(text, "missing @ after quoted local part")
        domain = rest[1:]
    else:
        local, at, domain = body.partition("@")
        if not at:
            raise _bad_address(text, "missing @")
        if "@" in domain:
            raise _bad_address(text, "more than one @")
    wire_local = _parse_local(text, local, smtputf8)
    if not domain:
        raise _bad_address(text, "missing domain")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad_address(text, "unterminated address literal")
        norm_domain = _parse_literal(text, domain)
    else:
        try:
            norm_domain = _normalise_domain(domain)
        except _Reject as exc:
            raise _bad_address(text, f"domain: {exc}") from None
    address = Address(wire_local, norm_domain)
    if len(str(address).encode("utf-8")) > MAX_ADDRESS:
        raise _bad_address(text, f"longer than {MAX_ADDRESS} octets")
    return address


def parse_path(text: str, *, smtputf8: bool = False) -> Address | None:
    """An RFC 5321 4.1.2 Path or Reverse-path: `<>` (the null path) gives None, a source route
    (`<@a,@b:user@c>`) is dropped per 4.1.1.3. Brackets are optional, for servers that pass them off."""
    body = text.strip(" \t")
    if body.startswith("<") and body.endswith(">"):
        body = body[1:-1]
    elif body.startswith("<") or body.endswith(">"):
        raise _bad_address(text, "unbalanced angle brackets")
    if body == "":
        return None
    route, mailbox = split_source_route(body)
    if route is not None:
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise _bad_address(text, "bad source route")
            parse_domain(hop[1:])
    return parse_address(mailbox, smtputf8=smtputf8)


def split_source_route(path: str) -> tuple[str | None, str]:
    """('@a,@b', 'user@c') for '@a,@b:user@c'; (None, path) when there is no route (RFC 5321 4.1.2 A-d-l).
    The SMTP layer can use this to log or refuse routes; parse_path ignores them."""
    if path.startswith("@"):
        route, sep, mailbox = path.partition(":")
        if sep:
            return route, mailbox
    return None, path


def has_source_route(path: str) -> bool:
    return split_source_route(path.strip(" \t").removeprefix("<"))[0] is not None


def relay_syntax(address: Address) -> str | None:
    """Why a local part looks like an old relay trick ('%' hack, '!' UUCP path, quoted '@'), or None.
    These are ordinary characters to the box (they never cause relaying); this is for logging and for
    outbound policy that wants to refuse them."""
    content = address.local
    for char, name in (("%", "percent hack"), ("!", "bang path"), ("@", "quoted @")):
        if char in content:
            return name
    return None


def split_plus(local: str) -> tuple[str, str | None]:
    """Plus-addressing: 'alice+news' -> ('alice', 'news'); 'alice+' -> ('alice', ''); 'alice' and
    '+x' -> (local, None). Split at the first '+'. Quoted local parts are never split."""
    if local.startswith('"'):
        return local, None
    base, sep, tag = local.partition(PLUS_SEPARATOR)
    if not sep or not base:
        return local, None
    return base, tag


def is_dot_atom(text: str) -> bool:
    return bool(_DOT_STRING.fullmatch(text))


class UnreadableAddresses(ValueError):
    """An address header field the parser cannot read at all."""


# The authors' fields read with the stdlib's parser cost ~3 us per character, more for hostile shapes
# (a 256 KiB From: 0.1-0.7 s of a checking thread holding the GIL, per message); a real From: or Sender:
# is well under 1 KiB. Longer ones are read as naming nobody (refused, left unsigned).
MAX_ADDRESS_FIELD = 16 * 1024


def header_addresses(value: str) -> list[str]:
    """The addresses one address field's value names (RFC 5322 3.4; the stdlib's lenient splitter,
    which errs towards more addresses), as written, empty ones left out. Raises UnreadableAddresses
    for groups or comments nested past Python's recursion limit ("g:g:g:...", which RFC 5322 does not
    allow): the splitter recurses once per level, and a mail client shows no author there either;
    and for a value over MAX_ADDRESS_FIELD characters."""
    if len(value) > MAX_ADDRESS_FIELD:
        raise UnreadableAddresses("address field too long to read")
    try:
        pairs = _LinearAddressList(value).addresslist
    except RecursionError:
        raise UnreadableAddresses("address field nested too deep to read") from None
    return [addr for _, addr in pairs if addr]


class _Entries(list[tuple[str, str]]):
    """getaddress's answer. The stdlib's group loop grows its list by `returnlist + getaddress()`, a
    copy per address: a From: of "g: @@@@...;" (one empty address per "@") cost 0.3 s at 16 KiB and
    minutes at the MX's 256 KiB. A list subclass on the right of + is asked first (__radd__), and
    extends the loop's own list in place: the same list, built in linear time."""

    def __radd__(self, other: list[tuple[str, str]]) -> list[tuple[str, str]]:
        other.extend(self)
        return other


class _LinearAddressList(email.utils._AddressList):  # type: ignore[name-defined,misc]  # what getaddresses uses
    """email.utils.getaddresses([value])'s parser, its group loop made linear (_Entries)."""

    def getaddress(self) -> _Entries:
        return _Entries(super().getaddress())


# The stdlib's lenient getaddresses is AddressList(value).addresslist, which _LinearAddressList is in
# linear time, on every Python: the strict mode of newer ones (CVE-2023-27043, `strict=True`, also in
# Debian's 3.11) refuses more around the same quadratic loop, and reading more addresses than a strict
# parser is the safe side for the author checks (each author domain is checked).


__all__ = [
    "MAX_ADDRESS",
    "MAX_ADDRESS_FIELD",
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "PLUS_SEPARATOR",
    "Address",
    "InvalidAddress",
    "UnreadableAddresses",
    "domain_to_unicode",
    "has_source_route",
    "header_addresses",
    "idn",
    "is_dot_atom",
    "parse_address",
    "parse_domain",
    "parse_path",
    "relay_syntax",
    "split_plus",
    "split_source_route",
]
