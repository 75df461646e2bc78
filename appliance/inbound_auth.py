"""Who really sent this? SPF (RFC 7208) for MAIL FROM and HELO, DKIM (RFC 6376) and DMARC (RFC 7489)
for mail arriving on the MX, summed up in an Authentication-Results header (RFC 8601).

`check_message(...)` is the pure-ish core: message bytes and SMTP facts in, `AuthResults` out, all
DNS through the resolver it is given. `InboundAuthenticator` is the MX's hook (the `InboundCheck` seam
of appliance/smtp/inbound.py): it reads the settings, runs the checks and turns a DMARC p=reject
failure into a 550 when the `dmarc_reject` setting allows (the default).

Libraries do the protocols: pyspf evaluates SPF, dkimpy verifies signatures, authres writes the
header, publicsuffixlist finds organizational domains. DMARC itself (record discovery, alignment,
policy choice) is the short RFC 7489 6.6 procedure, written out here.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import ipaddress
import logging
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import authres
import authres.dmarc
import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from appliance.address import UnreadableAddresses, header_addresses
from appliance.queue.resolver import make_resolver
from appliance.smtp import headers
from appliance.smtp.inbound import InboundFacts, InboundVerdict

if TYPE_CHECKING:
    from appliance.services import Services
    from appliance.settings import Settings

log = logging.getLogger("letterbox.inbound_auth")

SPF_QUERY_TIME = 20.0  # RFC 7208 4.6.4: at least 20 seconds for the whole SPF evaluation
DNS_TIMEOUT = 5.0  # seconds for one lookup (DKIM key, DMARC record)
MAX_DKIM_SIGNATURES = 5  # verify at most this many signatures per message (each costs a lookup)
# An SPF record longer than this is a permerror, not evaluated: pyspf spends ~1.5 ms of CPU per KB
# (measured: a 62 KB record of ip4: terms, 96 ms a message; each of 10 includes may be one), which a
# sender's own domain could make every message of theirs cost, holding the GIL. RFC 7208 3.4 asks
# for records that fit in one 512-octet UDP answer; this is eight times that.
MAX_SPF_RECORD_OCTETS = 4096
# An RSA key a DKIM signature names is refused (permerror) past these: dkimpy verifies in Python,
# pow(signature, e, n), which a sender's own key with a 16384-bit modulus and exponent made 23 s of
# CPU holding the GIL (the whole box stopped) per signature. RFC 8301 3.2: keys of 1024 to 4096
# bits; OpenSSL allows an exponent of 64 bits at most past 3072-bit moduli (e is 65537 in practice).
MAX_DKIM_KEY_BITS = 4096
MAX_DKIM_EXPONENT_BITS = 64
# Checked on the event loop when every DNS answer is cached (check_message): up to this size the
# DKIM body hash and parsing take well under a millisecond.
INLINE_MAX_OCTETS = 64 * 1024
MAX_HEADER_BYTES = headers.MAX_HEADER_OCTETS  # the MX refuses a longer header section before we run
# RFC 3463 4.7.0: the sender's policy could not be evaluated now; the sender retries later.
CHECKS_FAILED_REPLY = "451 4.7.0 Message authentication checks could not be completed, try again later"
DMARC_REJECT_REPLY = "550 5.7.1 Message rejected: it fails the DMARC policy of {domain}"
# RFC 7489 6.6.1: a message whose author cannot be determined may be rejected; it never will be, so
# a 4xx would only have the sender retry it for days.
UNREADABLE_AUTHOR_REPLY = "550 5.7.1 Message rejected: its From: field cannot be read"
# Each author domain costs DMARC lookups (5 s each at most): a From: of 1000 addresses at domains
# whose DNS answers slowly held a thread for hours. More distinct domains than this is refused, as a
# spoof could hide behind the ones not checked (RFC 7489 6.6.1 leaves such a message to the receiver).
MAX_AUTHOR_DOMAINS = 5
TOO_MANY_AUTHORS_REPLY = f"550 5.7.1 Message rejected: its From: names more than {MAX_AUTHOR_DOMAINS} domains"

_SAFE_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+$")
_COMMENT_UNSAFE = re.compile(r"[()\\\x00-\x1f\x7f]+")


# --- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpfResult:
    result: str  # pass | fail | softfail | neutral | none | temperror | permerror
    identity: str  # the address (MAIL FROM) or host name (HELO) that was checked
    domain: str  # the domain whose policy decided
    explanation: str = ""


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass | fail | neutral | temperror | permerror
    domain: str  # d=
    selector: str  # s=
    signature: str = ""  # the first characters of b=, to tell signatures apart (RFC 6008)
    reason: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass | fail | none | temperror | permerror
    from_domain: str  # the RFC 5322.From domain ('' when there is none usable)
    policy: str = ""  # none | quarantine | reject: the policy that applies to this domain
    disposition: str = ""  # what the policy asks for this message (after pct sampling)
    reason: str = ""
    could_not_run: bool = False  # the evaluation itself failed: the policy is unknown, so defer
    unreadable_author: bool = False  # a From: the address parser cannot read: no author, ever: refuse
    too_many_authors: bool = False  # more author domains than MAX_AUTHOR_DOMAINS: refuse


@dataclass(frozen=True)
class AuthResults:
    spf_mailfrom: SpfResult
    spf_helo: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult

    @property
    def dmarc_reject(self) -> bool:
        """The sender domain asks for this message to be rejected (RFC 7489 6.6.4)."""
        return self.dmarc.result == "fail" and self.dmarc.disposition == "reject"

    def sender_authenticated(self, mail_from: str) -> bool:
        """May a delivery report go to `mail_from`? Only when this message proves the address is
        not forged: SPF passed for it, or DMARC passed for a From: domain aligned with it."""
        if not mail_from:
            return False
        if self.spf_mailfrom.result == "pass":
            return True
        domain = mail_from.rpartition("@")[2]
        return self.dmarc.result == "pass" and aligned(self.dmarc.from_domain, domain, "r")

    def header(self, authserv_id: str) -> bytes:
        """The Authentication-Results field (RFC 8601 2.2), folded one method per line."""
        return _results_field(self, authserv_id)


# A sender's messages mostly have the same results: the field was 2 % of the MX's CPU (issue 19).
# At most 256 fields of a few hundred octets (their texts are bounded) are kept.
@functools.lru_cache(maxsize=256)
def _results_field(verdicts: AuthResults, authserv_id: str) -> bytes:
    """AuthResults.header: equal (frozen) results give the same field."""
    results: list[Any] = []
    mailfrom = verdicts.spf_mailfrom
    results.append(authres.SPFAuthenticationResult(
        result=mailfrom.result, result_comment=_comment(mailfrom.explanation),
        smtp_mailfrom=_mailfrom_value(mailfrom.identity),
    ))
    if verdicts.spf_helo.identity:
        results.append(authres.SPFAuthenticationResult(
            result=verdicts.spf_helo.result, smtp_helo=verdicts.spf_helo.identity,
        ))
    for sig in verdicts.dkim or (DkimResult("none", "", ""),):
        properties = [authres.AuthenticationResultProperty("header", "b", sig.signature)] if sig.signature else []
        results.append(authres.DKIMAuthenticationResult(
            result=sig.result, result_comment=_comment(sig.reason), header_d=sig.domain or None,
            header_s=sig.selector or None, properties=properties,
        ))
    dmarc_result = verdicts.dmarc
    results.append(authres.dmarc.DMARCAuthenticationResult(
        result=dmarc_result.result, result_comment=_comment(dmarc_result.reason),
        header_from=dmarc_result.from_domain or None,
        policy=dmarc_result.disposition or None,
        policy_comment=f"p={dmarc_result.policy}" if dmarc_result.policy else None,
    ))
    body = "".join(f";\r\n\t{result}" for result in results)
    return f"Authentication-Results: {authserv_id}{body}\r\n".encode()


def _comment(text: str) -> str | None:
    cleaned = _COMMENT_UNSAFE.sub(" ", text).strip()[:200]
    return cleaned or None


def _mailfrom_value(identity: str) -> str:
    """RFC 8601 2.7.2: the address when it is a plain one, else just its domain."""
    if _SAFE_ADDRESS.match(identity):
        return identity
    return identity.rpartition("@")[2] or "unknown"


# --- DNS for the libraries --------------------------------------------------------------------------

class _DnsTemporary(Exception):
    """A lookup failed for a reason that may pass (timeout, SERVFAIL): the result is temperror."""


class _KeyRefused(Exception):
    """A DKIM key too costly to verify with (MAX_DKIM_KEY_BITS, MAX_DKIM_EXPONENT_BITS): permerror."""


def _check_key_cost(name: str, record: bytes) -> None:
    """Raise _KeyRefused for an RSA key past the bounds; anything else is dkimpy's to judge."""
    try:
        tags = dkim.util.parse_tag_value(record)
        if tags.get(b"k", b"rsa").strip().lower() != b"rsa" or not tags.get(b"p"):
            return
        der = base64.b64decode(re.sub(rb"\s+", b"", tags[b"p"]))
        bits = _rsa_key_bits(der)
        if bits is None:  # not the usual DER: dkimpy's own reading (70 us, where the walk takes 3)
            key = dkim.crypto.parse_public_key(der)
            bits = key["modulus"].bit_length(), key["publicExponent"].bit_length()
    except Exception:  # noqa: BLE001  a record dkimpy will refuse itself, with its own words
        return
    if bits[0] > MAX_DKIM_KEY_BITS or bits[1] > MAX_DKIM_EXPONENT_BITS:
        raise _KeyRefused(f"the key at {name} is over {MAX_DKIM_KEY_BITS} bits or its exponent over"
                          f" {MAX_DKIM_EXPONENT_BITS} bits")


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where its value starts, where it ends) of the DER item at `at`."""
    tag, size = data[at], data[at + 1]
    at += 2
    if size & 0x80:
        count = size & 0x7F
        size = int.from_bytes(data[at:at + count], "big")
        at += count
    return tag, at, at + size


def _rsa_key_bits(der: bytes) -> tuple[int, int] | None:
    """(modulus bits, exponent bits) of a DER RSAPublicKey, bare or in a SubjectPublicKeyInfo (RFC
    6376 3.6.1 allows both); None when it is not laid out so."""
    try:
        tag, start, _ = _der_item(der, 0)
        if tag != 0x30:
            return None
        tag, value, end = _der_item(der, start)
        if tag == 0x30:  # SubjectPublicKeyInfo: the algorithm, then a BIT STRING holding the key
            tag, value, _ = _der_item(der, end)
            if tag != 0x03:
                return None
            tag, start, _ = _der_item(der, value + 1)  # after the BIT STRING's unused-bits octet
            if tag != 0x30:
                return None
            tag, value, end = _der_item(der, start)
        next_tag, value2, end2 = _der_item(der, end)
        if tag != 0x02 or next_tag != 0x02 or end2 > len(der):
            return None
        return int.from_bytes(der[value:end], "big").bit_length(), int.from_bytes(der[value2:end2], "big").bit_length()
    except IndexError:
        return None


_SPF_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "letterbox_spf_resolver", default=None
)


def _spf_lookup(name: str, qtype: str, strict: bool = True, timeout: float = DNS_TIMEOUT) -> list[Any]:
    """pyspf's lookup hook (the shape of its DNSLookup_dnspython), with our resolver instead of the
    system's and without dnspython's deprecated query()."""
    resolver = _SPF_RESOLVER.get() or make_resolver(None)
    try:
        answer = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime), raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    found: list[Any] = []
    for rdata in answer.rrset or ():
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            if sum(map(len, rdata.strings)) > MAX_SPF_RECORD_OCTETS and \
                    b"".join(rdata.strings[:7])[:7].lower() in (b"v=spf1", b"v=spf1 "):
                raise spf.PermError(f"the SPF record of {name} is over {MAX_SPF_RECORD_OCTETS} octets")
            found.append(((name, qtype), rdata.strings))
    return found


# pyspf looks its DNS function up as a module global on every query: point it at ours, which reads
# the resolver of the check in progress from a context variable (set on the checking thread).
spf.DNSLookup = _spf_lookup


def _select_headers(headers: list[tuple[bytes, bytes]], include_headers: list[bytes]) -> list[tuple[bytes, bytes]]:
    """dkimpy's select_headers (RFC 6376 5.4.2: each name of h= takes the last instance of that
    field not yet taken), in linear time: dkimpy scanned every header field for each name, so a
    signature whose h= named 8000 fields absent from a message of 8000 short fields (95 KB) took
    11 s of CPU holding the GIL, and a sender could make every message of theirs cost that."""
    where: dict[bytes, list[int]] = {}
    for index, (name, _) in enumerate(headers):
        where.setdefault(name.lower(), []).append(index)
    selected = []
    for name in include_headers:
        found = where.get(name)
        if found:
            selected.append(headers[found.pop()])
    return selected


# dkimpy's hash_headers looks select_headers up as a module global: ours serves verification.
dkim.select_headers = _select_headers


def _str2int(data: bytes | bytearray) -> int:
    """dkimpy's str2int (a signature's b= as a number), in linear time: its loop shifted the whole
    number at each octet, so a b= of 96 KB (a header field the MX takes) cost 3.9 s of CPU holding
    the GIL before the RSA step, per signature."""
    return int.from_bytes(data, "big")


# dkimpy's rsa_encrypt looks str2int up as a module global of dkim.crypto.
dkim.crypto.str2int = _str2int

_LINE_END = re.compile(rb"\r?\n")
_HEADER_END = re.compile(rb"\n\r?\n")  # dkimpy's first empty line (after the first line)


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's rfc822_parse (its reading of a message: header fields as [name, value], the body),
    in linear time: it added each continuation line to the field's value with +=, a copy of the
    value so far each time, so one field folded over 60000 lines (234 KB, under the MX's header
    limit) cost 1 s of CPU holding the GIL for any message with a DKIM-Signature. Only the header
    section is split into lines: dkimpy split the body too and joined it again with CRLF, 1 s of
    CPU holding the GIL for a 30 MB message; a body with CRLF ends only is taken as it is."""
    split_end = _HEADER_END.search(message)
    if message.startswith((b"\n", b"\r\n")) or split_end is None:
        return _rfc822_parse_lines(_LINE_END.split(message))
    headers, _ = _rfc822_parse_lines(_LINE_END.split(message[:split_end.start() + 1]))
    body = message[split_end.end():]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = _LINE_END.sub(b"\r\n", body)
    return headers, body


def _rfc822_parse_lines(lines: list[bytes]) -> tuple[list[list[bytes]], bytes]:
    headers: list[list[bytes]] = []
    pieces: list[list[bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
            break
        if line[0] in (0x09, 0x20):
            pieces[-1].append(line + b"\r\n")  # (an IndexError before any field, as dkimpy's)
        else:
            field = _DKIMPY_FIELD.match(line)
            if field is not None:
                pieces.append([line[field.end(0):] + b"\r\n"])
                headers.append([field.group(1), b""])
            elif not line.startswith(b"From "):
                raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
        i += 1
    for header, parts in zip(headers, pieces, strict=True):
        header[1] = b"".join(parts)
    return headers, b"\r\n".join(lines[i:])


# dkimpy's DKIM looks rfc822_parse up as a module global when it reads a message.
dkim.rfc822_parse = _rfc822_parse


def _txt_function(resolver: dns.resolver.Resolver, missing: set[str]) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc: the first TXT record at `name`; records names without one in `missing`."""

    def get_txt(name: bytes | str, timeout: float = DNS_TIMEOUT) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=min(timeout, resolver.lifetime))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            missing.add(text.rstrip(".").lower())
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise _DnsTemporary(str(exc)) from exc
        for rdata in answer:
            record = b"".join(rdata.strings)
            _check_key_cost(text.rstrip("."), record)
            return record
        return None

    return get_txt


# --- SPF --------------------------------------------------------------------------------------------

def _is_domain(name: str) -> bool:
    if "." not in name or name.startswith("[") or len(name) > 253:
        return False
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return True


def _spf(ip: str, sender: str, helo: str) -> tuple[str, str]:
    try:
        result, _code, explanation = spf.query(i=ip, s=sender, h=helo, querytime=SPF_QUERY_TIME).check()
    except spf.TempError as exc:
        return "temperror", str(exc)
    except spf.PermError as exc:  # e.g. a client address pyspf cannot parse
        return "permerror", str(exc)
    return str(result), str(explanation)


def check_spf(resolver: dns.resolver.Resolver, ip: str, sender: str, helo: str) -> tuple[SpfResult, SpfResult]:
    """(MAIL FROM result, HELO result). Blocking. RFC 7208 2.4: a null sender is checked as
    postmaster@HELO; RFC 7208 2.3: the HELO identity only when it is a domain name."""
    token = _SPF_RESOLVER.set(resolver)
    try:
        helo_domain = helo.strip().rstrip(".").lower()
        if _is_domain(helo_domain):
            h_result, h_expl = _spf(ip, "", helo_domain)
            helo_result = SpfResult(h_result, helo_domain, helo_domain, h_expl)
        else:
            helo_result = SpfResult("none", helo.strip()[:100], "", "HELO is not a domain name")
        if not sender:
            identity = f"postmaster@{helo_domain}" if _is_domain(helo_domain) else ""
            mailfrom = SpfResult(helo_result.result, identity, helo_result.domain, helo_result.explanation)
        else:
            m_result, m_expl = _spf(ip, sender, helo_domain or "unknown")
            mailfrom = SpfResult(m_result, sender, sender.rpartition("@")[2].lower(), m_expl)
        return mailfrom, helo_result
    finally:
        _SPF_RESOLVER.reset(token)


# --- DKIM -------------------------------------------------------------------------------------------

# What dkimpy's rfc822_parse takes as the start of a header field: the name is the shortest run of
# printable characters before a colon.
_DKIMPY_FIELD = re.compile(rb"([\x21-\x7e]+?):")


def unsigned_as_dkimpy_reads_it(data: bytes) -> bool:
    """True when dkimpy would read the header section without error and find no DKIM-Signature in
    it, by dkimpy's own rules (rfc822_parse: lines split at CRLF or LF, the section ends at the
    first empty line, a line is a continuation, a field, or an mbox "From " line): then there is
    nothing to verify and its parse of the whole message (a split and a join of every line of
    the body) can be skipped, 4 % of the MX's event loop under smtp-source (issue 19). False
    whenever unsure: dkimpy then reads the message as before."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    if head.count(b"\n") != head.count(b"\r\n"):
        return False  # a bare LF: dkimpy splits there too, but this one does not
    fields = False
    for line in head.split(b"\r\n"):
        if not line:
            return True
        if line[0] in (0x09, 0x20):
            if not fields:
                return False  # dkimpy fails on a continuation with no field before it (an mbox From line is none)
            continue
        field = _DKIMPY_FIELD.match(line)
        if field is None:
            if not line.startswith(b"From "):
                return False  # dkimpy's MessageFormatError (a permerror), below
        elif field.group(1).lower() == b"dkim-signature":
            return False
        else:
            fields = True
    return True


# The canonical body of the message check_dkim is verifying, per canonicalization (this thread's).
_canonical_bodies = threading.local()
_dkimpy_canonicalize_body = dkim.canonicalization.CanonicalizationPolicy.canonicalize_body
RELAXED_SLICE = 1 << 20  # octets of body one regular-expression pass of the relaxed canonicalization takes


def relaxed_body(body: bytes, slice_octets: int = RELAXED_SLICE) -> bytes:
    """dkimpy's relaxed body canonicalization (RFC 6376 3.4.4), its own steps, over slices of the body
    that each end after a line feed (no match of its patterns crosses one): each pass holds the GIL
    for one slice (~30 ms), not for the whole body (0.9 s for 30 MB, the event loop stalled meanwhile)."""
    canon = dkim.canonicalization
    parts: list[bytes] = []
    start = 0
    while start < len(body):
        cut = body.find(b"\n", start + slice_octets)
        cut = len(body) if cut < 0 else cut + 1
        parts.append(canon.compress_whitespace(canon.strip_trailing_whitespace(body[start:cut])))
        start = cut
    return bytes(canon.correct_empty_body(canon.strip_trailing_lines(b"".join(parts))))


def _canonicalize_body(policy: Any, body: bytes) -> bytes:
    """dkimpy's body canonicalization, made once per message and canonicalization: dkimpy made it again
    for each signature (about 0.9 s of CPU for 30 MB), so five signatures cost 6 s. Each signature
    still hashes the body with its own l= and a=."""
    relaxed = policy.body_algorithm is dkim.canonicalization.Relaxed
    memo: dict[bool, tuple[bytes, bytes]] | None = getattr(_canonical_bodies, "memo", None)
    kept = memo.get(relaxed) if memo is not None else None
    if kept is None or kept[0] is not body:
        kept = (body, relaxed_body(body) if relaxed else bytes(_dkimpy_canonicalize_body(policy, body)))
        if memo is not None:
            memo[relaxed] = kept
    return kept[1]


# dkimpy's verify calls it through the class.
dkim.canonicalization.CanonicalizationPolicy.canonicalize_body = _canonicalize_body


def check_dkim(resolver: dns.resolver.Resolver, data: bytes) -> tuple[DkimResult, ...]:
    """Verify each DKIM-Signature (at most MAX_DKIM_SIGNATURES). Blocking."""
    if unsigned_as_dkimpy_reads_it(data):
        return ()
    _canonical_bodies.memo = {}
    try:
        return _check_dkim(resolver, data)
    finally:
        _canonical_bodies.memo = None


def _check_dkim(resolver: dns.resolver.Resolver, data: bytes) -> tuple[DkimResult, ...]:
    try:
        verifier = dkim.DKIM(data, logger=log, timeout=int(DNS_TIMEOUT))
    except dkim.MessageFormatError as exc:
        # A header line dkimpy cannot read (no colon, a control character, `Name :`): no signature
        # can be verified, which is a permanent error of the message (RFC 8601 2.7.1), never a reason
        # to skip the checks that follow (issue 11 item 1).
        return (DkimResult("permerror", "", "", reason=f"malformed header section: {exc}"),)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    results: list[DkimResult] = []
    for index in range(min(count, MAX_DKIM_SIGNATURES)):
        missing: set[str] = set()
        domain = selector = signature = ""
        try:
            tags = dkim.util.parse_tag_value(
                [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
            )
            domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
            selector = tags.get(b"s", b"").decode("ascii", "replace")
            signature = re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
        except Exception:  # noqa: BLE001, S110  the verifier below reports the syntax problem properly
            pass
        try:
            ok = verifier.verify(idx=index, dnsfunc=_txt_function(resolver, missing))
        except _DnsTemporary as exc:
            results.append(DkimResult("temperror", domain, selector, signature, f"key lookup failed: {exc}"))
            continue
        except _KeyRefused as exc:
            results.append(DkimResult("permerror", domain, selector, signature, str(exc)))
            continue
        except dkim.ValidationError as exc:
            verdict = "fail" if "body hash" in str(exc) else "permerror"
            results.append(DkimResult(verdict, domain, selector, signature, str(exc)))
            continue
        except dkim.DKIMException as exc:
            results.append(DkimResult("neutral", domain, selector, signature, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001  a library failure on hostile input: this signature did not verify
            log.warning("DKIM verification of d=%s raised %s", domain or "?", type(exc).__name__)
            results.append(DkimResult("permerror", domain, selector, signature, "signature could not be verified"))
            continue
        if ok:
            results.append(DkimResult("pass", domain, selector, signature))
        elif missing:
            results.append(DkimResult("permerror", domain, selector, signature, "no key for signature"))
        else:
            results.append(DkimResult("fail", domain, selector, signature, "signature verification failed"))
    return tuple(results)


# --- DMARC ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def public_suffixes() -> PublicSuffixList:
    """The Public Suffix List shipped with publicsuffixlist (loaded once: it takes a moment)."""
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registered domain (one label below the public suffix)."""
    domain = domain.lower().rstrip(".")
    # Empty labels (`a..bank.example`) are no name DNS holds, but a reader still sees bank.example.
    labels = ".".join(label for label in domain.split(".") if label)
    return public_suffixes().privatesuffix(labels) or labels


def aligned(from_domain: str, other: str, mode: str) -> bool:
    """RFC 7489 3.1: strict = the same name; relaxed = the same organizational domain."""
    if not other:
        return False
    a, b = from_domain.lower().rstrip("."), other.lower().rstrip(".")
    if a == b:
        return True
    return mode != "s" and organizational_domain(a) == organizational_domain(b)


def parse_dmarc_record(text: str) -> dict[str, str] | None:
    """RFC 7489 6.3 tag=value list; None unless it starts with v=DMARC1 and has a valid p=."""
    parts = [part.strip() for part in text.split(";") if part.strip()]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":  # 'v' must come first, exactly so
        return None
    tags: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        return None  # RFC 7489 6.6.3: a record without a valid p= is ignored (no rua fallback here)
    return tags


def _dmarc_record(resolver: dns.resolver.Resolver, domain: str) -> dict[str, str] | None:
    """The one DMARC record at _dmarc.<domain>, or None (zero or several: RFC 7489 6.6.3)."""
    try:
        answer = resolver.resolve(f"_dmarc.{domain}", "TXT", lifetime=min(DNS_TIMEOUT, resolver.lifetime))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise _DnsTemporary(str(exc)) from exc
    except (dns.exception.SyntaxError, dns.exception.FormError, UnicodeError, ValueError):
        # Not a name DNS can hold (a label over 63 octets, an empty label): no record here, but the
        # organizational domain's record still applies (its p= or sp=), so such an author under a
        # p=reject domain cannot slip past it.
        return None
    records = [parse_dmarc_record(b"".join(r.strings).decode("utf-8", "replace")) for r in answer]
    valid = [r for r in records if r is not None]
    return valid[0] if len(valid) == 1 else None


def from_domains(data: bytes) -> tuple[str, ...]:
    """Every RFC 5322.From domain, in order, without repeats. RFC 7489 6.6.1 leaves a message with
    several From: fields or several authors to the receiver: here each domain is checked and the
    strictest outcome applies, so a second From: (or one hidden behind a malformed line, which mail
    clients still show) cannot take a spoof past a p=reject domain. Raises UnreadableAddresses for a
    From: nested past the address parser's reach."""
    found: dict[str, None] = {}
    for name, value in headers.raw_fields(data, MAX_HEADER_BYTES):
        if name != "from":
            continue
        for addr in header_addresses(value):
            domain = addr.rpartition("@")[2].strip().lower().rstrip(".") if "@" in addr else ""
            if domain:
                found.setdefault(domain)
    return tuple(found)


def check_dmarc(
    resolver: dns.resolver.Resolver,
    data: bytes,
    spf_result: SpfResult,
    dkim_results: tuple[DkimResult, ...],
    rng: random.Random | None = None,
) -> DmarcResult:
    """RFC 7489 6.6 for each author domain; the strictest result stands for the message. Blocking."""
    try:
        domains = from_domains(data)
    except UnreadableAddresses:
        return DmarcResult("permerror", "", reason="From: field cannot be read", unreadable_author=True)
    if len(domains) > MAX_AUTHOR_DOMAINS:
        return DmarcResult("permerror", domains[0], reason=f"From: names {len(domains)} domains",
                           too_many_authors=True)
    if not domains:
        return DmarcResult("permerror", "", reason="no From: domain")
    recording = resolver.recording if isinstance(resolver, _CacheOnlyResolver) else None
    key = (domains, spf_result, dkim_results)
    if recording is not None and (known := _DMARC_MEMO.get(recording.cache, key)) is not None:
        return known
    seen = len(recording.seen) if recording is not None else 0
    results = [_dmarc_for(resolver, domain, spf_result, dkim_results, rng) for domain in domains]
    result = min(results, key=_leniency)
    # Only answers found in the cache count, and only results that no pct= sampling (RFC 7489
    # 6.6.4) may have decided: a failure is evaluated every time.
    if recording is not None and not getattr(resolver, "missed", True) and result.result != "fail":
        _DMARC_MEMO.put(recording.cache, key, result, tuple(recording.seen[seen:]))
    return result


def _leniency(result: DmarcResult) -> int:
    """Lower is stricter: a reject beats a quarantine beats any other failure beats an error..."""
    if result.result == "fail":
        return {"reject": 0, "quarantine": 1}.get(result.disposition, 2)
    return {"temperror": 3, "permerror": 4, "none": 5}.get(result.result, 6)


def _dmarc_for(
    resolver: dns.resolver.Resolver,
    domain: str,
    spf_result: SpfResult,
    dkim_results: tuple[DkimResult, ...],
    rng: random.Random | None,
) -> DmarcResult:
    """RFC 7489 6.6: discover the policy, check identifier alignment, pick the disposition."""
    try:
        record = _dmarc_record(resolver, domain)
        found_at = domain
        if record is None:
            # RFC 7489 6.6.3: only now is the organizational domain needed (the public suffix
            # list, which takes a moment and megabytes to load, stays unloaded while every
            # author domain publishes its own record and aligns exactly).
            organization = organizational_domain(domain)
            if organization != domain:
                record = _dmarc_record(resolver, organization)
                found_at = organization
    except _DnsTemporary as exc:
        return DmarcResult("temperror", domain, reason=f"DMARC record lookup failed: {exc}")
    if record is None:
        return DmarcResult("none", domain)
    policy = record["p"].lower()
    if found_at != domain and record.get("sp", "").lower() in ("none", "quarantine", "reject"):
        policy = record["sp"].lower()  # RFC 7489 6.3 sp=: the policy for subdomains
    spf_ok = spf_result.result == "pass" and aligned(domain, spf_result.domain, record.get("aspf", "r").lower())
    dkim_ok = any(
        d.result == "pass" and aligned(domain, d.domain, record.get("adkim", "r").lower()) for d in dkim_results
    )
    if spf_ok or dkim_ok:
        how = "aligned " + " and ".join(n for n, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        return DmarcResult("pass", domain, policy, "none", how)
    disposition = policy
    try:
        pct = max(0, min(100, int(record.get("pct", "100"))))
    except ValueError:
        pct = 100
    if pct < 100 and (rng or random.Random()).randrange(100) >= pct:  # noqa: S311  DMARC pct sampling (RFC 7489 6.6.4), not a secret
        # RFC 7489 6.6.4: outside the sampled percentage, apply the next less strict policy.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcResult("fail", domain, policy, disposition, "neither SPF nor DKIM aligned and passing")


# --- the whole check --------------------------------------------------------------------------------

def _spf_or_temperror(resolver: dns.resolver.Resolver, peer_ip: str, mail_from: str, helo: str
                      ) -> tuple[SpfResult, SpfResult]:
    try:
        return check_spf(resolver, peer_ip, mail_from, helo)
    except Exception as exc:  # noqa: BLE001  a check that cannot run is temperror for its part only (issue 11)
        log.warning("SPF check could not run: %s", type(exc).__name__)
        sender_domain = mail_from.rpartition("@")[2].lower()
        return (SpfResult("temperror", mail_from, sender_domain, "SPF check could not run"),
                SpfResult("temperror", helo.strip()[:100], "", "SPF check could not run"))


def evaluate(
    resolver: dns.resolver.Resolver,
    data: bytes,
    *,
    peer_ip: str,
    helo: str,
    mail_from: str,
    rng: random.Random | None = None,
    spf: tuple[SpfResult, SpfResult] | None = None,
) -> AuthResults:
    """Every check, blocking (DNS and RSA); `check_message` runs it off the event loop (or on it,
    from the DNS cache). `spf`: the SPF results already known for these facts (_LookupMemo).

    A check that cannot run fails closed for its own part only (issue 11 item 1): SPF and DKIM become
    errors, which never count as an aligned pass, and DMARC is still evaluated on what remains; a
    DMARC evaluation that cannot run marks the result `could_not_run` and the MX defers the message."""
    spf_mailfrom, spf_helo = spf or _spf_or_temperror(resolver, peer_ip, mail_from, helo)
    try:
        dkim_results = check_dkim(resolver, data)
    except Exception as exc:  # noqa: BLE001  as for SPF above
        log.warning("DKIM check could not run: %s", type(exc).__name__)
        dkim_results = (DkimResult("temperror", "", "", reason="DKIM check could not run"),)
    # RFC 7489 4.1: SPF's identity is MAIL FROM, or the HELO name for the null sender (check_spf
    # already gave that result to spf_mailfrom).
    try:
        dmarc_result = check_dmarc(resolver, data, spf_mailfrom, dkim_results, rng)
    except Exception as exc:  # noqa: BLE001  as for SPF above; the MX then defers the message
        log.warning("DMARC check could not run: %s", type(exc).__name__)
        dmarc_result = DmarcResult("temperror", "", reason="DMARC check could not run", could_not_run=True)
    return AuthResults(spf_mailfrom, spf_helo, dkim_results, dmarc_result)


class _NotCached(dns.exception.Timeout):
    """A question the DNS cache cannot answer, in an evaluation that may not wait for the network.
    A Timeout, so every check takes it as the temporary failure it already handles quietly; the
    resolver notes it and the evaluation is done again, properly, on a thread."""


class _RecordingCache:
    """The DNS cache as dnspython's resolver sees it (get/put/flush), noting what each question found:
    the answers an SPF result was computed from (_LookupMemo)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.seen: list[tuple[Hashable, Any]] = []

    def get(self, key: Hashable) -> Any:
        value = self.cache.get(key)
        self.seen.append((key, value))
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self.cache.put(key, value)

    def flush(self, key: Hashable | None = None) -> None:
        self.cache.flush(key)

    def __bool__(self) -> bool:
        return True


class _CacheOnlyResolver(dns.resolver.Resolver):
    """The box's resolver answering from its cache alone (appliance/queue/dns_cache.py), so the checks
    of a message from a sender seen within the TTLs run on the event loop without a thread handoff."""

    missed = False
    recording: _RecordingCache | None = None

    @classmethod
    def of(cls, resolver: dns.resolver.Resolver) -> _CacheOnlyResolver:
        # Without __init__ (its reset() was 2 % of the MX's CPU under smtp-source, issue 19): every
        # attribute it would set comes from the box's resolver, the same servers, options and cache.
        twin = cls.__new__(cls)
        twin.__dict__.update(resolver.__dict__)
        if resolver.cache is not None:
            twin.recording = _RecordingCache(resolver.cache)
            twin.cache = twin.recording  # the cache interface (get, put, flush), duck-typed as dnspython uses it
        return twin

    def resolve(self, qname: dns.name.Name | str, rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
                rdclass: dns.rdataclass.RdataClass | str = dns.rdataclass.IN, tcp: bool = False,
                source: str | None = None, raise_on_no_answer: bool = True, source_port: int = 0,
                lifetime: float | None = None, search: bool | None = None) -> dns.resolver.Answer:
        # dnspython's own first step of resolve(): the cache's answer, or its NXDOMAIN / NoAnswer.
        resolution = dns.resolver._Resolution(self, qname, rdtype, rdclass, tcp, raise_on_no_answer, search)
        _request, answer = resolution.next_request()
        if answer is None:
            self.missed = True
            raise _NotCached(f"{qname} not in the cache")  # type: ignore[no-untyped-call]  # dnspython leaves DNSException.__init__ unannotated
        return answer


MAX_MEMO_RESULTS = 512  # results kept per memo, each with its few lookups: well under 1 MB

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _LookupMemo(Generic[K, V]):
    """Results by (DNS cache, their other inputs), each with the cache's answers it was computed
    from, reused while the cache still holds every one of them (the very same answer objects:
    nothing expired, nothing replaced). SPF (RFC 7208 4) and DMARC (RFC 7489 6.6) results depend
    on those inputs and those answers alone, so a reused one is what would be computed again; the
    evaluations were most of the inbound checks' CPU per message (issue 19). Event loop only."""

    def __init__(self, max_entries: int = MAX_MEMO_RESULTS) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[Any, K], tuple[V, tuple[tuple[Hashable, Any], ...]]] = OrderedDict()
        self.hits = 0

    def get(self, cache: Any, key: K) -> V | None:
        entry = self._entries.get((cache, key))
        if entry is None:
            return None
        result, lookups = entry
        if any(cache.get(question) is not answer for question, answer in lookups):
            del self._entries[(cache, key)]  # an answer expired or changed: evaluate again
            return None
        self._entries.move_to_end((cache, key))
        self.hits += 1
        return result

    def put(self, cache: Any, key: K, result: V, lookups: tuple[tuple[Hashable, Any], ...]) -> None:
        self._entries[(cache, key)] = (result, lookups)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


# SPF by (client address, MAIL FROM, HELO); DMARC by (author domains, SPF result, DKIM results).
_SPF_MEMO: _LookupMemo[tuple[str, str, str], tuple[SpfResult, SpfResult]] = _LookupMemo()
_DMARC_MEMO: _LookupMemo[tuple[tuple[str, ...], SpfResult, tuple[DkimResult, ...]], DmarcResult] = _LookupMemo()


def _evaluate_from_cache(resolver: dns.resolver.Resolver, data: bytes, *, peer_ip: str, helo: str, mail_from: str,
                         rng: random.Random | None) -> AuthResults | None:
    """`evaluate` on this thread with the answers the DNS cache holds (and SPF's result remembered
    for these facts), or None when it needed an answer the cache lacks."""
    cached = _CacheOnlyResolver.of(resolver)
    spf = None if cached.recording is None else _SPF_MEMO.get(resolver.cache, (peer_ip, mail_from, helo))
    remember = spf is None and cached.recording is not None
    if spf is None:
        spf = _spf_or_temperror(cached, peer_ip, mail_from, helo)
    lookups = tuple(cached.recording.seen) if cached.recording is not None else ()
    results = evaluate(cached, data, peer_ip=peer_ip, helo=helo, mail_from=mail_from, rng=rng, spf=spf)
    if cached.missed:
        return None  # nothing of this attempt counts (its verdict had a temperror in it)
    if remember:
        _SPF_MEMO.put(resolver.cache, (peer_ip, mail_from, helo), spf, lookups)
    return results


async def check_message(
    data: bytes,
    *,
    peer_ip: str,
    helo: str,
    mail_from: str,
    resolver: dns.resolver.Resolver,
    rng: random.Random | None = None,
) -> AuthResults:
    """SPF, DKIM and DMARC for one received message (CRLF line ends, before our own headers).

    A message up to INLINE_MAX_OCTETS whose every DNS answer is in the cache (a sender seen within
    the TTLs: a burst, a mailing list, a busy correspondent) is checked right here, on the event
    loop: it holds the GIL for the same time a thread would, without the two thread handoffs and
    event-loop wakeup per message that cost most on a loaded box (issue 19). Anything else (a
    lookup to make, a large body to hash for DKIM) runs on a thread as before."""
    if len(data) <= INLINE_MAX_OCTETS:
        results = _evaluate_from_cache(resolver, data, peer_ip=peer_ip, helo=helo, mail_from=mail_from, rng=rng)
        if results is not None:
            return results
    return await asyncio.to_thread(
        evaluate, resolver, data, peer_ip=peer_ip, helo=helo, mail_from=mail_from, rng=rng
    )


# --- forged results ---------------------------------------------------------------------------------

_RESULTS_FIELD = re.compile(rb"^authentication-results[ \t]*:[ \t\r\n]*([^;\s]+)", re.IGNORECASE)


def remove_forged_results(data: bytes, authserv_id: str) -> bytes:
    """RFC 8601 5: drop Authentication-Results fields that claim to be ours before adding our own.
    Works on the raw header section so every other byte (and any DKIM signature) is untouched."""
    end = data.find(b"\r\n\r\n")
    head_end = len(data) if end < 0 else end + 2
    fields: list[bytes] = []
    for line in data[:head_end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line  # a folded continuation belongs to the field above
        else:
            fields.append(line)
    ours = authserv_id.lower().encode("utf-8", "replace")
    kept = [f for f in fields if not ((m := _RESULTS_FIELD.match(f)) and m.group(1).lower() == ours)]
    if len(kept) == len(fields):
        return data
    return b"".join(kept) + data[head_end:]


# --- the MX hook ------------------------------------------------------------------------------------

class InboundAuthenticator:
    """The `InboundCheck` the MX calls after DATA (appliance/smtp/inbound.py)."""

    def __init__(self, settings: Settings, authserv_id: Callable[[], str], *, rng: random.Random | None = None) -> None:
        self._settings = settings
        # Read at every message, never copied: the wizard renames the box while it runs, and a forged
        # header naming the new host must go at once (issue 10 item 3).
        self._authserv_id = authserv_id
        self._rng = rng
        self._resolver_key: str | None = None
        self._resolver: dns.resolver.Resolver | None = None

    def _current_resolver(self, setting: str | None) -> dns.resolver.Resolver:
        if self._resolver is None or setting != self._resolver_key:
            self._resolver, self._resolver_key = make_resolver(setting), setting
        return self._resolver

    async def __call__(self, facts: InboundFacts, data: bytes) -> InboundVerdict:
        # Whatever else happens, a header claiming our verdict must not reach a mail client (RFC 8601 5).
        authserv_id = self._authserv_id()
        cleaned = remove_forged_results(data, authserv_id)
        settings = await self._settings.fresh()
        if not settings.inbound_auth:
            return InboundVerdict(message=cleaned, sender_authenticated=None)
        try:
            results = await check_message(
                data, peer_ip=facts.peer_ip, helo=facts.helo, mail_from=facts.sender,
                resolver=self._current_resolver(settings.dns_resolver), rng=self._rng,
            )
        except Exception:
            # Never "deliver without checks": that would let any input that trips a bug past a
            # p=reject policy (issue 11 item 1). A 451 keeps the mail with the sender, who retries.
            log.exception("inbound authentication checks failed; deferring the message")
            return InboundVerdict(reject=CHECKS_FAILED_REPLY)
        log.info("auth: ip=%s spf=%s helo-spf=%s dkim=%s dmarc=%s (%s)", facts.peer_ip,
                 results.spf_mailfrom.result, results.spf_helo.result,
                 ",".join(f"{d.result}:{d.domain}" for d in results.dkim) or "none",
                 results.dmarc.result, results.dmarc.from_domain or "-")
        if results.dmarc.could_not_run:
            return InboundVerdict(reject=CHECKS_FAILED_REPLY)
        if results.dmarc.too_many_authors:
            return InboundVerdict(reject=TOO_MANY_AUTHORS_REPLY)
        if results.dmarc.unreadable_author:
            return InboundVerdict(reject=UNREADABLE_AUTHOR_REPLY)
        if results.dmarc_reject and settings.dmarc_reject:
            return InboundVerdict(reject=DMARC_REJECT_REPLY.format(domain=results.dmarc.from_domain))
        dkim_words = [d.result for d in results.dkim]
        return InboundVerdict(headers=results.header(authserv_id), message=cleaned,
                              sender_authenticated=results.sender_authenticated(facts.sender),
                              spf=results.spf_mailfrom.result,
                              dkim="pass" if "pass" in dkim_words else (dkim_words or ["none"])[0],
                              dmarc=results.dmarc.result, dmarc_policy=results.dmarc.disposition)

    async def stop(self) -> None:
        """Background-service shape (app.py): nothing runs between messages."""


async def start_inbound_auth(services: Services) -> InboundAuthenticator:
    """The composition root's hook: install the checks on the MX (services.inbound_check)."""
    checker = InboundAuthenticator(services.settings, lambda: services.hostname)
    services.inbound_check = checker
    return checker
