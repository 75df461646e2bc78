"""Trace and submission headers: Received, Return-Path, Delivered-To, Date, Message-ID; Bcc: removed at
submission. Pure functions.

Messages are handled as bytes and never re-serialised: headers are only ever added in front of the
message or at the end of its header section (and Bcc: lines cut out whole), so a signed message
stays byte-for-byte what was sent.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

# The header section a message may have (Postfix's header_size_limit is 100 KB): every check that
# reads header fields (DMARC's From:, the submission From:/Sender: rule) sees all of it.
MAX_HEADER_OCTETS = 256 * 1024
MAX_HELO_SHOWN = 100  # how much of the client's HELO name a Received header repeats
MAX_TRACE_ADDRESS = 300

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 2.2 field-name ":"
# header_section_end's lines in one C loop, for a message whose line ends are CRLF already.
_FIELD_LINES = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_BCC = re.compile(rb"^(?:resent-)?bcc[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SPACED_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]+:", re.MULTILINE)  # RFC 5322 4.5.1 obs-optional
_UNSAFE_IN_COMMENT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")  # ctext minus space, RFC 5322 3.2.2


def normalise_line_ends(data: bytes) -> bytes:
    """Every bare LF and bare CR becomes CRLF (as Postfix's smtpd_forbid_bare_newline=normalize).
    aiosmtpd only ends DATA at CRLF.CRLF, so `\\n.\\n` and `\\r.\\n` were content; normalising them keeps
    any later SMTP hop (which dot-stuffs CRLF lines) from seeing an end of data there."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf == data.count(b"\n"):
        return data  # every line ends in CRLF already
    # Three passes in C, not _LINE_END.sub: a regex substitution keeps every line's text as its own
    # object until its join, 600 MB for 36 MiB of short lines, and 1.2 s of CPU for 20 MB.
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def header_section_end(data: bytes) -> int:
    """Offset just past the last header line (RFC 5322 2.1, 2.2): where the empty line, or the first
    line that is not a header field or a continuation, starts. A message without an empty line after
    its fields is all header; one that starts with a non-field line has no header section."""
    pos, end, in_field = 0, len(data), False
    while pos < end:
        eol = data.find(b"\r\n", pos)
        line = data[pos:] if eol < 0 else data[pos:eol]
        if not line:
            return pos
        if _FIELD_START.match(line) or (in_field and line[:1] in (b" ", b"\t")):
            in_field = True
            pos = end if eol < 0 else eol + 2
            continue
        return pos
    return end


def body_separated(data: bytes, limit: int = MAX_HEADER_OCTETS) -> bytes:
    """`data` with an empty line where its header section ends at a line that is neither a field nor
    empty, as Postfix's cleanup inserts it (RFC 5322 2.1: the body, optional, follows an empty line). A
    report sent with its text straight after the fields was one header section as long as the whole
    text (refused past MAX_HEADER_OCTETS); and every later reader (the checks below, IMAP's FETCH, a
    mail client) now splits the message at the same place. `data`'s line ends are CRLF (normalise_line_ends).
    Only the first `limit` octets are looked at: fields past them are too large."""
    found = _FIELD_LINES.match(data, 0, limit)
    end = found.end() if found else 0
    if data.startswith(b"\r\n", end) or data.find(b"\r\n", end, limit) < 0:
        return data  # an empty line there already, all header, or the fields run past `limit`
    return data[:end] + b"\r\n" + data[end:]


def header_section_too_large(data: bytes, limit: int = MAX_HEADER_OCTETS) -> bool:
    """True when no empty line ends the header section within `limit` octets (and there is more):
    after body_separated, when its fields run past `limit`."""
    return len(data) > limit and data.find(b"\r\n\r\n", 0, limit + 4) < 0


def raw_fields(data: bytes, limit: int = MAX_HEADER_OCTETS) -> list[tuple[str, str]]:
    """Every (lower-case name, unfolded value) up to the first empty line, as a mail client may read
    them: a malformed line (no colon, a control character in the name) is skipped, not taken as the
    end of the header section, so a field hidden behind one is still seen; `From :` (space before the
    colon, RFC 5322 4.5 obsolete syntax) counts as `From`. Bounded by `limit` bytes. Used where a
    check must see what a reader will see (DMARC's From:, the submission From:/Sender: rule)."""
    end = data.find(b"\r\n\r\n", 0, limit)
    head = data[: limit if end < 0 else end]
    fields: list[tuple[str, list[bytes]]] = []
    in_field = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if in_field:
                fields[-1][1].append(line)
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")
        in_field = bool(colon and name and all(0x21 <= c <= 0x7E for c in name))
        if in_field:
            fields.append((name.decode("ascii").lower(), [value]))
    return [(name, b"".join(parts).decode("utf-8", "replace").strip()) for name, parts in fields]


def header_names(data: bytes) -> frozenset[str]:
    """Lower-case names of the fields in the header section (stdlib parser, read only)."""
    section = data[: header_section_end(data)]
    parsed = BytesHeaderParser(policy=compat32).parsebytes(section)
    return frozenset(name.lower() for name in parsed)


def delivered_to_values(data: bytes) -> frozenset[str]:
    """The Delivered-To: addresses of the header section, lower-case (where the box forwarded it from)."""
    return frozenset(value.strip().lower() for name, value in raw_fields(data) if name == "delivered-to")


def count_received(data: bytes) -> int:
    return len(_RECEIVED.findall(data, 0, header_section_end(data)))


def rfc5322_date(when: datetime | None = None) -> str:
    if when is not None:
        return email.utils.format_datetime(when)
    return _date_of_second(int(time.time()))


@functools.lru_cache(maxsize=2)
def _date_of_second(second: int) -> str:
    """Now's date, made once per second (it shows no fractions): a Received: field per message copy
    formatted it afresh, 1 % of the MX's event loop under smtp-source (issue 19). The local offset
    is looked up for each second, so a change of summer time shows at once."""
    return email.utils.format_datetime(datetime.fromtimestamp(second).astimezone())


def add_submission_headers(data: bytes, hostname: str, when: datetime | None = None) -> bytes:
    """RFC 6409 8.2/8.3: a submission server may add a missing Date: and Message-ID:. They go at the end
    of the header section, as Postfix does, so anything the client signed keeps its place."""
    names = header_names(data)
    extra = b""
    if "date" not in names:
        extra += f"Date: {rfc5322_date(when)}\r\n".encode("ascii")
    if "message-id" not in names:
        extra += f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n".encode("ascii")
    if not extra:
        return data
    end = header_section_end(data)
    if end == len(data):
        # All header (or empty): the last line may lack its CRLF, and the empty line is added.
        head = data if not data or data.endswith(b"\r\n") else data + b"\r\n"
        return head + extra + b"\r\n"
    return data[:end] + extra + data[end:]


def mended_for_submission(data: bytes) -> bytes:
    """What submission makes of a client's message before any copy of it: its Bcc: and Resent-Bcc:
    fields dropped (_without_bcc), and white space before a field's colon taken out (`X-Foo : bar` ->
    `X-Foo: bar`). That is RFC 5322's obsolete syntax, which a receiver must read but a sender must
    not make; dkimpy refuses to sign a message holding it, so such a message left unsigned and failed
    DMARC at its receiver. An MSA may mend what its client sends (RFC 6409 8). Nothing else moves: a
    message with neither is returned as it came."""
    end = header_section_end(data)
    head = data[:end]
    mended = _without_bcc(head)
    if _SPACED_NAME.search(mended) is not None:
        mended = _SPACED_NAME.sub(rb"\1:", mended)
    return data if mended is head else mended + data[end:]


def without_bcc(data: bytes) -> bytes:
    """A message received (MX, LMTP) without its Bcc: and Resent-Bcc: fields (_without_bcc), as Postfix's
    cleanup treats all mail; returned as it came when it has neither."""
    end = header_section_end(data)
    head = data[:end]
    kept = _without_bcc(head)
    return data if kept is head else kept + data[end:]


def _without_bcc(head: bytes) -> bytes:
    """A header section without its Bcc: and Resent-Bcc: fields, continuation lines and all, as Postfix's
    cleanup drops them from every message (message_drop_headers): every recipient gets the same copy,
    so a Bcc: left in would tell each of them who else got a blind copy. Only these fields go; every
    other byte stays where it was, so a signature the client made over other fields still holds."""
    if _BCC.search(head) is None:
        return head
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = _BCC.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept)


def address_safe(text: str) -> str:
    """An address inside a trace field: printable (UTF-8 allowed, RFC 6532), nothing that could end
    the angle brackets or a comment, bounded."""
    return "".join("?" if not ch.isprintable() or ch in "()<>\\ " else ch for ch in text[:MAX_TRACE_ADDRESS])


def comment_safe(text: str, limit: int = MAX_HELO_SHOWN) -> str:
    """Client-supplied text inside a Received comment or clause: printable ASCII, no parentheses or
    backslashes (they would end or escape the comment), bounded."""
    return _UNSAFE_IN_COMMENT.sub("?", text[:limit]) or "?"


@dataclass(frozen=True)
class TlsFacts:
    version: str  # 'TLSv1.3'
    cipher: str
    bits: int


@dataclass(frozen=True)
class ReceivedFacts:
    """What a Received: header says about one SMTP transaction (RFC 5321 4.4). Never a password."""

    helo: str
    peer_ip: str
    hostname: str
    protocol: str  # RFC 3848 / RFC 6531 'with' keyword: ESMTP, ESMTPSA, UTF8SMTPS, LMTP ...
    queue_id: str
    tls: TlsFacts | None = None
    auth_user: str | None = None


def with_keyword(*, lmtp: bool, extended: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    """RFC 3848 (ESMTPS, ESMTPA, ESMTPSA, LMTPS ...) and RFC 6531 3.7.3 (UTF8SMTP ...)."""
    if utf8:
        base = "UTF8LMTP" if lmtp else "UTF8SMTP"
    elif lmtp:
        base = "LMTP"
    else:
        base = "ESMTP" if extended else "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    if base == "SMTP" and suffix:
        base = "ESMTP"  # TLS and AUTH are ESMTP extensions; a HELO client can have neither
    return base + suffix


def received_header(facts: ReceivedFacts, *, for_rcpt: str | None, when: datetime | None = None) -> bytes:
    """One Received: field, folded, CRLF-terminated. `for` names the recipient only when the copy is
    for that recipient alone (RFC 5321 4.4 leaves it optional; it would reveal Bcc otherwise)."""
    peer = f"[IPv6:{facts.peer_ip}]" if ":" in facts.peer_ip else f"[{facts.peer_ip}]"
    lines = [f"Received: from {comment_safe(facts.helo)} ({peer})"]
    if facts.tls is not None:
        lines.append(
            f"\t(using {comment_safe(facts.tls.version)} with cipher {comment_safe(facts.tls.cipher)}"
            f" ({facts.tls.bits}/{facts.tls.bits} bits))"
        )
    if facts.auth_user:
        lines.append(f"\t(Authenticated sender: {address_safe(facts.auth_user)})")
    lines.append(f"\tby {facts.hostname} (Letterbox) with {facts.protocol} id {facts.queue_id}")
    last = f"\tfor <{address_safe(for_rcpt)}>; " if for_rcpt else "\t"
    lines.append(last + rfc5322_date(when))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def return_path(sender: str) -> bytes:
    """RFC 5321 4.4: added by the final delivery; `<>` for the null sender."""
    return f"Return-Path: <{sender}>\r\n".encode()


def delivered_to(address: str) -> bytes:
    """The address this copy was delivered for (plus tag kept); what Postfix and Dovecot write, and
    what loop detection and filters read."""
    return f"Delivered-To: {address}\r\n".encode()
