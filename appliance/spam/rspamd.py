"""A small client of rspamd's HTTP protocol (https://rspamd.com/doc/developers/protocol.html).

`check` posts a message to the normal worker's `/checkv2` with the SMTP envelope and what the box
already knows about the sender; `learn` posts one to the controller's `/learnspam` or `/learnham`.
Stdlib http.client in a worker thread: one request per message, no connection pool to keep, no new
dependency; the event loop never waits on a socket. Every failure (refused, timeout, an HTTP error,
a body that is not rspamd's JSON) is one exception, `RspamdUnavailable`, so callers have exactly one
case to handle: the filter is off for this message.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CHECK_TIMEOUT = 15.0  # seconds for one /checkv2, whole: rspamd's own DNS lookups can take a few
LEARN_TIMEOUT = 30.0  # learning is off the client's path; a busy Redis may be slow
PING_TIMEOUT = 5.0  # the status page's question; a Pi busy with a burst (or rspamd loading its maps) answers in seconds, not at once
MAX_REPLY = 4 * 1024 * 1024  # rspamd's JSON reply is a few KiB; anything near this is not rspamd
BOX_CLASSIFIER = "bayes"  # the box-wide Bayes classifier's name in rspamd's statistic.conf
MAX_SYMBOLS = 200  # symbols kept from one reply (rspamd has a few hundred rules in all)


class RspamdUnavailable(Exception):
    """rspamd could not be asked or did not answer usefully; the message says why, in plain words."""


class RspamdUnreachable(RspamdUnavailable):
    """Not even a connection: nothing listens at rspamd's address (refused, unreachable). The
    content filter waits a moment before asking again (content_filter.RETRY_SECONDS)."""


@dataclass(frozen=True)
class Symbol:
    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScanResult:
    score: float
    action: str  # rspamd's own suggestion ('no action', 'add header', 'reject', ...)
    symbols: tuple[Symbol, ...] = ()
    skipped: bool = False  # a pre-result decided without the full scan (GTUBE, a settings rule)
    message: str = ""  # rspamd's smtp_message, if any

    def top_symbols(self, limit: int = 8) -> tuple[Symbol, ...]:
        """The symbols that weighed most, either way: what a person reads in X-Spam-Symbols."""
        ranked = sorted((s for s in self.symbols if s.score), key=lambda s: (-abs(s.score), s.name))
        return tuple(ranked[:limit])


@dataclass(frozen=True)
class Envelope:
    """What the MTA knows: rspamd's request headers (protocol.html, "HTTP request")."""

    ip: str
    helo: str
    sender: str  # '' for the null sender
    recipients: tuple[str, ...]
    hostname: str = ""  # the client's verified reverse name; '' when unknown
    user: str = ""  # the login of an authenticated sender
    queue_id: str = ""
    deliver_to: str = ""  # the mailbox whose statistics apply (per-user Bayes)
    # Symbols to insert, with their multipliers: the SPF/DKIM/DMARC verdicts the box computed
    # (rspamd's own checks are switched off so nothing is looked up twice).
    symbols: Mapping[str, float] = field(default_factory=dict)

    def headers(self) -> list[tuple[str, str]]:
        pairs = [("IP", self.ip), ("Helo", self.helo), ("From", self.sender or "<>")]
        pairs += [("Rcpt", rcpt) for rcpt in self.recipients]
        pairs += [(name, value) for name, value in (
            ("Hostname", self.hostname), ("User", self.user), ("Queue-Id", self.queue_id),
            ("Deliver-To", self.deliver_to),
        ) if value]
        if self.symbols:
            # The settings module applies this as a rule with the highest priority and inserts the
            # symbols (rspamd's plugins/settings.lua, `symbols`).
            pairs.append(("Settings", json.dumps({"symbols": dict(self.symbols)}, sort_keys=True)))
        # A header value must not break the request: no CR/LF (a HELO is the client's own text).
        return [(name, _header_safe(value)) for name, value in pairs]


def _header_safe(value: str) -> str:
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in value)[:998]


def parse_result(body: bytes) -> ScanResult:
    """rspamd's /checkv2 JSON reply; RspamdUnavailable when it is not one."""
    try:
        reply = json.loads(body)
        score = float(reply["score"])
        action = str(reply.get("action", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise RspamdUnavailable(f"rspamd's answer could not be read ({type(exc).__name__})") from None
    if not math.isfinite(score):
        raise RspamdUnavailable("rspamd's answer has no usable score")
    symbols: list[Symbol] = []
    raw_symbols = reply.get("symbols")
    if isinstance(raw_symbols, dict):
        for name, value in list(raw_symbols.items())[:MAX_SYMBOLS]:
            symbols.append(_symbol(str(name), value))
    messages = reply.get("messages")
    message = str(messages.get("smtp_message", "")) if isinstance(messages, dict) else ""
    return ScanResult(score=score, action=action, symbols=tuple(symbols),
                      skipped=bool(reply.get("is_skipped")), message=message[:200])


def _symbol(name: str, value: Any) -> Symbol:
    if not isinstance(value, dict):
        return Symbol(name, 0.0)
    try:
        score = float(value.get("score", 0.0))
    except (TypeError, ValueError):
        score = 0.0
    options = value.get("options")
    opts = tuple(str(o)[:100] for o in options[:5]) if isinstance(options, list) else ()
    return Symbol(name, score if math.isfinite(score) else 0.0, opts)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, default_port: int) -> Endpoint:
        """'http://127.0.0.1:11333' (or 'host:port', or a host); only plain HTTP: rspamd listens on
        loopback (HTTPCrypt is for rspamd on another machine, not needed here)."""
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http://host:port address: {url!r}")
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}") from exc
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _request(endpoint: Endpoint, path: str, body: bytes | None, headers: list[tuple[str, str]],
             timeout: float) -> tuple[int, bytes]:
    """One blocking HTTP/1.1 request (run in a thread): (status, body). A body-less answer (204)
    gives its reason phrase as the body: rspamd says there why it skipped a learn."""
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise RspamdUnreachable(f"rspamd at {endpoint} cannot be reached: {_plain(exc)}") from None
        conn.putrequest("POST" if body is not None else "GET", path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read(MAX_REPLY + 1)
        return response.status, data or response.reason.encode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise RspamdUnavailable(f"rspamd at {endpoint} cannot be reached: {_plain(exc)}") from None
    finally:
        conn.close()


def _plain(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "it did not answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is rspamd running?)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it closed the connection without an answer"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def _call(endpoint: Endpoint, path: str, body: bytes | None, headers: list[tuple[str, str]],
                seconds: float) -> tuple[int, bytes]:
    """`_request` off the event loop."""
    try:
        # The thread's socket timeout bounds each read; wait_for bounds the whole request.
        return await asyncio.wait_for(
            asyncio.to_thread(_request, endpoint, path, body, headers, seconds), seconds + 1)
    except TimeoutError:
        raise RspamdUnavailable(f"rspamd at {endpoint} did not answer within {seconds:.0f} s") from None


class RspamdClient:
    """rspamd's normal worker (`scanner`, port 11333) and controller (`controller`, 11334)."""

    def __init__(self, scanner: Endpoint, controller: Endpoint, *, timeout: float = CHECK_TIMEOUT) -> None:
        self.scanner = scanner
        self.controller = controller
        self.timeout = timeout

    async def check(self, data: bytes, envelope: Envelope) -> ScanResult:
        status, body = await _call(self.scanner, "/checkv2", data, envelope.headers(), self.timeout)
        if status != 200:
            raise RspamdUnavailable(f"rspamd answered HTTP {status}: {_error_text(body)}")
        return parse_result(body)

    async def learn(self, data: bytes, *, spam: bool, deliver_to: str = "") -> str:
        """Teach the Bayes classifier; returns rspamd's word on it ('learned', or why it was skipped:
        already learned, too few tokens). RspamdUnavailable when it could not be taught now."""
        path = "/learnspam" if spam else "/learnham"
        # Without a mailbox only the box-wide classifier learns: the per-mailbox one would file the
        # lesson under its "no mailbox" name, which judges mail to several mailboxes (statistic.conf).
        headers = [("Deliver-To", _header_safe(deliver_to))] if deliver_to else [("Classifier", BOX_CLASSIFIER)]
        status, body = await _call(self.controller, path, data, headers, LEARN_TIMEOUT)
        if status == 200:
            return "learned"
        if status in (204, 208):
            # 208: this message was learned before with the same class; 204: nothing to learn from
            # (too few tokens). Neither is worth trying again.
            return "skipped: " + (_error_text(body) or f"HTTP {status}")
        raise RspamdUnavailable(f"rspamd refused to learn (HTTP {status}): {_error_text(body)}")

    async def ping(self) -> bool:
        try:
            status, body = await _call(self.scanner, "/ping", None, [], PING_TIMEOUT)
        except RspamdUnavailable:
            return False
        return status == 200 and body.strip() == b"pong"

    async def stat(self) -> dict[str, Any]:
        """The controller's /stat (scanned, learned, Bayes statistics); RspamdUnavailable if down."""
        status, body = await _call(self.controller, "/stat", None, [], PING_TIMEOUT)
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if status != 200 or not isinstance(value, dict):
            raise RspamdUnavailable(f"rspamd's controller answered HTTP {status}")
        return value


def _error_text(body: bytes) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(value, dict) and "error" in value:
        return str(value["error"])[:200]
    return ""
