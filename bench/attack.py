"""Attack battery (issue 11): a real `letterbox serve` attacked from loopback addresses, printing the
figures the box promises.

  relay       relay tricks against the MX (25) and submission (587, 465) without a login
              -> `relayed: N` (must be 0: nothing reached the outside receiver, nothing queued for it)
  guessing    brute force (one address) and distributed guessing (many 127.0.x.y addresses) over IMAP,
              POP3 and SMTP AUTH -> passwords checked per minute per account (<= 10, counted from the
              box's own auth log) and the owner's login time during the attack (<= 2 s)
  slow        idle connections and tricklers on 25 and 143 while a real user delivers and logs in
              -> whether the connection caps held (the user was served) and what the box closed
  crash       kill -9 during an outbound burst, restart, again -> acknowledged-but-missing messages,
              duplicate failure reports, spool leftovers after the last restart (each must be 0)

Everything runs on 127.0.0.0/8 with a temporary data directory: the outside world is a DNS server and
an SMTP receiver on loopback (tests/support). Counts and durations are bounded; `--quick` is the
reduced run that tests/e2e/test_attack.py makes on every `make test`.
Usage: python -m bench.attack [--quick] [--parts relay,guessing,slow,crash]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import functools
import logging
import os
import re
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import STANDARD_PORTS
from bench.benchbox import LETTERBOX, READY_TIMEOUT, cli, free_offset, set_settings
from tests.support.dns_server import ZoneServer
from tests.support.receivers import Receiver, Script, free_port

OURS = "ours.test"
FAR = "far.test"  # an outside domain: its MX is the loopback receiver
RECEIVER_HOST = "127.0.0.5"
OWNER_ADDRESS = "127.0.0.2"  # where the owner's mail client connects from
USER_ADDRESS = "127.0.0.3"  # a real user during the slow-client part
ALICE = f"alice@{OURS}"
PASSWORD = "the owner's long password"
HOSTNAME = "mx.ours.test"
SENDER_DOMAIN = "elsewhere.example"  # the attackers' envelope sender
MAX_CHECKS_PER_MINUTE = 10
MAX_OWNER_LOGIN_SECONDS = 2.0


@functools.cache
def insecure_tls() -> ssl.SSLContext:
    """One client context for every connection: building one loads the system's CA list, which for
    hundreds of attackers at once would make this script, not the box, the bottleneck."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the box's self-signed certificate; nothing secret is sent
    return ctx


# --- the box --------------------------------------------------------------------------------------

class AttackBox:
    """`letterbox serve` on its own data directory, a loopback DNS zone and an outside receiver."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "serve.log"
        self.offset = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.zone = ZoneServer(ttl=0)
        self.receiver_port = free_port((RECEIVER_HOST,))
        self.receiver = Receiver(RECEIVER_HOST, self.receiver_port, script=Script(rcpt={
            f"refuser@{FAR}": "550 5.1.1 no such user here",
        }))
        self._log_mark = 0

    def prepare(self, users: list[str]) -> None:
        cli(self.data, "domain", "add", OURS)
        for user in [ALICE, *users]:
            cli(self.data, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
        self.zone.start()
        for domain in (FAR, "notours.test", f"{OURS}.{FAR}", "srs.far.test"):
            self.zone.set(domain, "MX", [f"10 mx.{FAR}."])
        self.zone.set(f"mx.{FAR}", "A", [RECEIVER_HOST])
        self.receiver.start()
        set_settings(self.data, {
            "dns_resolver": self.zone.address, "outbound_port": str(self.receiver_port),
            "queue_retry_intervals": "1", "queue_hold": "0",
        })

    def port(self, service: str) -> int:
        return STANDARD_PORTS[service] + self.offset

    def start(self) -> None:
        """Start serve; when a port of its block was taken meanwhile (these offsets reach into the
        kernel's ephemeral range, so a client socket can hold one between a kill and the restart), the
        box starts again on the next free block: clients ask port() each time."""
        for _ in range(3):
            if self._start_once():
                return
            self.offset = free_offset(self.offset + 1009)
        raise SystemExit(f"letterbox serve did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def _start_once(self) -> bool:
        if not self.offset:
            self.offset = free_offset(31000 + (os.getpid() * 7) % 20000)
        with self.log.open("ab") as out:
            self._log_mark = out.tell()
            self.proc = subprocess.Popen(
                [LETTERBOX, "--data", str(self.data), "serve", "--listen", "127.0.0.1",
                 "--port-offset", str(self.offset), "--hostname", HOSTNAME],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while b"\nready\n" not in self.log.read_bytes()[self._log_mark:]:
            if self.proc.poll() is not None:
                if b"ddress already in use" in self.log.read_bytes()[self._log_mark:]:
                    self.proc = None
                    return False
                raise SystemExit(f"letterbox serve did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"letterbox serve did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        return True

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.receiver.stop()
        self.zone.stop()

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'letterbox.db'}?mode=ro", uri=True, timeout=10)

    def queued_outside(self) -> int:
        """Recipients waiting in the outbound queue for a domain that is not ours (the attack's own sender
        domain aside: a report to it would be backscatter, not relay)."""
        with contextlib.closing(self.db()) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM queue_recipients WHERE state = 'queued' AND lower(domain) NOT IN (?, ?)",
                (OURS, SENDER_DOMAIN),
            ).fetchone()
        return int(count)

    def queue_size(self) -> int:
        with contextlib.closing(self.db()) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM queue_messages").fetchone()
        return int(count)

    def inbox(self, address: str = ALICE) -> list[bytes]:
        local, domain = address.split("@")
        base = self.data / "mail" / domain / local
        return [p.read_bytes() for sub in ("new", "cur") if (base / sub).is_dir() for p in (base / sub).iterdir()]

    def auth_log(self) -> list[AuthLine]:
        lines = []
        for raw in self.log.read_text(errors="replace").splitlines():
            m = AUTH_LINE.match(raw)
            if m:
                at = datetime.datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append(AuthLine(at, m["outcome"], m["service"], m["peer"], m["account"]))
        return lines


AUTH_LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO letterbox\.auth: auth (?P<outcome>[a-z-]+): "
    r"service=(?P<service>\S+) peer=(?P<peer>\S+) (?:mailbox|admin)=(?P<account>\S+)"
)
CHECKED = frozenset({"ok", "bad-password", "unknown-account", "disabled"})  # a password was hashed


@dataclass(frozen=True)
class AuthLine:
    at: float
    outcome: str
    service: str
    peer: str
    account: str


@contextlib.contextmanager
def attack_box(root: Path, users: list[str]) -> Iterator[AttackBox]:
    box = AttackBox(root)
    try:
        box.prepare(users)
        box.start()
        yield box
    finally:
        box.close()


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# --- a small async line client -------------------------------------------------------------------

class Line:
    """One connection speaking a line protocol (SMTP, IMAP, POP3), from a chosen loopback address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.patience = 30.0  # the longest wait for one line, unless a call says otherwise

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1", tls: bool = False, within: float = 20) -> Line:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), ssl=insecure_tls() if tls else None,
            server_hostname="localhost" if tls else None,
        ), within)
        return cls(reader, writer)

    async def line(self, within: float | None = None) -> bytes:
        data = await asyncio.wait_for(self.reader.readline(), within or self.patience)
        if not data:
            raise ConnectionError("closed by the box")
        return data

    async def smtp_reply(self, within: float | None = None) -> tuple[int, str]:
        while True:
            data = await self.line(within)
            if data[3:4] != b"-":
                return int(data[:3]), data.decode(errors="replace").strip()

    async def smtp(self, command: bytes, within: float | None = None) -> tuple[int, str]:
        self.writer.write(command + b"\r\n")
        return await self.smtp_reply(within)

    async def tagged(self, tag: bytes, command: bytes, within: float | None = None) -> bytes:
        self.writer.write(tag + b" " + command + b"\r\n")
        while True:
            data = await self.line(within)
            if data.startswith(tag + b" "):
                return data

    async def starttls(self) -> None:
        await self.writer.start_tls(insecure_tls(), server_hostname="localhost")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# --- 1. relay battery ------------------------------------------------------------------------------

def relay_tricks() -> list[bytes]:
    """RCPT TO arguments that an open or confused relay would send on to far.test (or 127.0.0.5)."""
    far = f"victim@{FAR}"
    tricks = [
        f"<{far}>", f"<victim@{FAR.upper()}>", f"<victim@{FAR}.>", f"<victim@{FAR}..>",
        f"<victim%{FAR}@{OURS}>", f"<victim%{FAR}%{OURS}@{OURS}>", f"<\"victim%{FAR}\"@{OURS}>",
        f"<@{OURS}:{far}>", f"<@{OURS},@{HOSTNAME}:{far}>", f"<@[{RECEIVER_HOST}]:{far}>",
        f"<\"{far}\"@{OURS}>", f"<\"{far}\">", f"<\"victim@{FAR}\"@[{RECEIVER_HOST}]>",
        f"<{FAR}!victim@{OURS}>", f"<{FAR}!victim>", f"<{OURS}!{FAR}!victim@{OURS}>",
        f"<victim@[{RECEIVER_HOST}]>", f"<victim@{RECEIVER_HOST}>", "<victim@[IPv6:::1]>",
        f"<victim@[{OURS}]>", "<victim@localhost>", "<victim@[127.0.0.1]>",
        f"<victim@not{OURS}>", f"<victim@{OURS}.{FAR}>", f"<victim@sub.{OURS}>", f"<victim@{OURS.upper()}.{FAR}>",
        f"<{far}@{OURS}>", f"<victim@{FAR}@{OURS}>", f"<{ALICE},{far}>", f"<{ALICE}> <{far}>",
        f"<{far}> NOTIFY=NEVER", f"<{far}> ORCPT=rfc822;{ALICE}",
        f"<postmaster@{FAR}>", f"<postmaster%{FAR}@{OURS}>", f"<Postmaster@[{RECEIVER_HOST}]>",
        f"<SRS0=HHH=TT={FAR}=victim@{OURS}>", f"<SRS1=HHH={FAR}==HHH=TT={FAR}=victim@{OURS}>",
        f"<SRS0=HHH=TT={FAR}=victim@srs.{FAR}>",
        f"<victim@{FAR}%{OURS}>", f"<victim@xn--{FAR}>", "<victim@fär.test>",
    ]
    raw = [t.encode() for t in tricks]
    raw += [
        f"<{ALICE}>\x00<{far}>".encode(), f"<{far}\x00@{OURS}>".encode(),
        f"<{ALICE}>\rRCPT TO:<{far}>".encode(), f"<{ALICE}>\nRCPT TO:<{far}>".encode(),
        f"<victim\r\n@{FAR}>".encode(),
    ]
    return raw


@dataclass
class RelayResult:
    tried: int = 0
    accepted: list[str] = field(default_factory=list)  # tricks whose RCPT got a 2xx (each may be local)
    delivered_outside: int = 0  # transactions the outside receiver got
    queued_outside: int = 0  # recipients of another domain left in the queue

    @property
    def relayed(self) -> int:
        return self.delivered_outside + self.queued_outside


async def _relay_one(box: AttackBox, service: str, trick: bytes, source: str, result: RelayResult) -> None:
    tls = service == "submissions"
    try:
        conn = await Line.open(box.port(service), source, tls=tls)
    except (OSError, TimeoutError):
        return
    conn.patience = 5.0  # an injected line break can leave one reply fewer than commands: do not wait long
    try:
        await conn.smtp_reply()
        await conn.smtp(b"EHLO attacker.example")
        if service == "submission":
            code, _ = await conn.smtp(b"STARTTLS")
            if code == 220:
                await conn.starttls()
                await conn.smtp(b"EHLO attacker.example")
        for sender in (f"<someone@{SENDER_DOMAIN}>".encode(), f"<{ALICE}>".encode(), b"<>"):
            # RCPT even when MAIL was refused (no login on 587/465): it must not be taken either.
            await conn.smtp(b"MAIL FROM:" + sender)
            result.tried += 1
            code, _ = await conn.smtp(b"RCPT TO:" + trick)
            if b"\r" in trick or b"\n" in trick:
                # The box may have read two commands (bare LF ends a line for it, as for Postfix): then
                # the second reply is the one about the outside recipient, and commands and replies
                # stay paired.
                with contextlib.suppress(TimeoutError):
                    code, _ = await conn.smtp_reply(within=1.0)
            if 200 <= code < 300:
                result.accepted.append(f"{service}: {trick.decode(errors='replace')!r}")
                code, _ = await conn.smtp(b"DATA")
                if code == 354:
                    await conn.smtp(b"Subject: relay test\r\nX-Relay-Trick: 1\r\n\r\nrelayed?\r\n.")
            await conn.smtp(b"RSET")
        await conn.smtp(b"QUIT", within=5)
    except (OSError, TimeoutError, ValueError, ConnectionError, ssl.SSLError):
        pass  # the box hung up on a trick: fine, it relayed nothing
    finally:
        await conn.close()


def relay_battery(box: AttackBox, settle_seconds: float = 5.0, tls_tricks: int | None = None) -> RelayResult:
    """Every trick on the MX; on 587 and 465 (where nothing goes before a login, and each session costs
    a TLS handshake) the first `tls_tricks` of them, or all."""
    result = RelayResult()

    async def run() -> None:
        # Each trick in its own session from its own address: the MX slows and drops clients that collect
        # errors, which would only make the battery slow, not tell us more.
        tricks = relay_tricks()
        jobs = [("smtp", trick) for trick in tricks]
        jobs += [(service, trick) for service in ("submission", "submissions") for trick in tricks[:tls_tricks]]
        await asyncio.gather(*(
            _relay_one(box, service, trick, f"127.30.{n // 200}.{n % 200 + 1}", result)
            for n, (service, trick) in enumerate(jobs)
        ))

    asyncio.run(run())
    # Whatever was accepted for another domain would be delivered at once (the queue is not held):
    # give it the time to reach the receiver, then count what arrived and what is still waiting.
    wait_for(lambda: box.queued_outside() == 0, settle_seconds)
    result.delivered_outside = len(box.receiver.transactions)
    result.queued_outside = box.queued_outside()
    return result


# --- 2. password guessing --------------------------------------------------------------------------

PROTOCOLS = ("imap", "pop3", "smtp")


async def try_login(protocol: str, user: str, password: str, source: str, box: AttackBox,
                    answer_times: list[float] | None = None) -> bool:
    """One login over the protocol's implicit-TLS port, from `source`; True when it succeeded. The
    seconds from sending the password to the answer go to `answer_times` (the box's login work,
    without the connection and TLS handshake)."""
    sent = 0.0

    def answered() -> None:
        if answer_times is not None:
            answer_times.append(time.monotonic() - sent)

    if protocol == "imap":
        conn = await Line.open(box.port("imaps"), source, tls=True)
        try:
            await conn.line()
            sent = time.monotonic()
            reply = await conn.tagged(b"a1", f'LOGIN "{user}" "{password}"'.encode(), within=60)
            answered()
            return reply.startswith(b"a1 OK")
        finally:
            await conn.close()
    if protocol == "pop3":
        conn = await Line.open(box.port("pop3s"), source, tls=True)
        try:
            await conn.line()
            conn.writer.write(f"USER {user}\r\n".encode())
            await conn.line()
            conn.writer.write(f"PASS {password}\r\n".encode())
            sent = time.monotonic()
            ok = (await conn.line(within=60)).startswith(b"+OK")
            answered()
            return ok
        finally:
            await conn.close()
    conn = await Line.open(box.port("submissions"), source, tls=True)
    try:
        await conn.smtp_reply()
        await conn.smtp(b"EHLO guesser.example")
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        sent = time.monotonic()
        code, _ = await conn.smtp(b"AUTH PLAIN " + token, within=60)
        answered()
        return code == 235
    finally:
        await conn.close()


@dataclass
class GuessResult:
    protocol: str
    mode: str
    account: str
    addresses: int
    attempts: int = 0  # guesses sent
    answered: int = 0
    max_checked_per_minute: int = 0  # the most password checks for the account in any 60 s, from the log
    refused_unchecked: int = 0
    owner_logins: list[float] = field(default_factory=list)  # seconds from connect, during the attack
    owner_answers: list[float] = field(default_factory=list)  # seconds from sending the password
    owner_failed: int = 0


def guess_account(protocol: str, mode: str) -> str:
    return f"{protocol}-{mode}@{OURS}"


def max_in_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _attack(box: AttackBox, result: GuessResult, subnet: int, per_address: int, deadline: float) -> None:
    async def attacker(source: str) -> None:
        for n in range(per_address):
            if time.monotonic() > deadline:
                return
            result.attempts += 1
            with contextlib.suppress(OSError, TimeoutError, ConnectionError, ssl.SSLError, ValueError):
                await asyncio.wait_for(
                    try_login(result.protocol, result.account, f"guess {n} from {source}", source, box),
                    max(1.0, deadline - time.monotonic()),
                )
                result.answered += 1

    sources = [f"127.{subnet}.{i // 250}.{i % 250 + 1}" for i in range(result.addresses)]
    await asyncio.gather(*(attacker(s) for s in sources))


async def _owner_login(box: AttackBox, result: GuessResult) -> None:
    started = time.monotonic()
    ok = False
    with contextlib.suppress(OSError, TimeoutError, ConnectionError, ssl.SSLError, ValueError):
        ok = await asyncio.wait_for(
            try_login(result.protocol, result.account, PASSWORD, OWNER_ADDRESS, box, result.owner_answers), 30)
    if ok:
        result.owner_logins.append(time.monotonic() - started)
    else:
        result.owner_failed += 1


async def _owner(box: AttackBox, results: list[GuessResult], deadline: float) -> None:
    """The owner's mail client checks each account in turn while the attacks run (one login at a time,
    as one person's client would)."""
    await asyncio.sleep(1.0)  # the attack is under way
    while time.monotonic() < deadline:
        for result in results:
            await _owner_login(box, result)
        await asyncio.sleep(0.5)


def guessing(box: AttackBox, *, spread_addresses: int, per_address: int, brute_attempts: int,
             seconds: float, modes: tuple[str, ...] = ("brute", "spread")) -> tuple[list[GuessResult], float]:
    """Brute force (1 address) and distributed guessing per protocol, all at once, each on its own
    account and attacker addresses (127.<n>.x.y). Returns the results and the owner's login time
    before the attack (the machine's own speed, to compare with)."""
    results = [
        GuessResult(protocol, mode, guess_account(protocol, mode), 1 if mode == "brute" else spread_addresses)
        for protocol in PROTOCOLS for mode in modes
    ]
    # The owner logged in from their usual address before the attack (their client, last week).
    baseline: list[float] = []
    for result in results:
        started = time.monotonic()
        if not asyncio.run(try_login(result.protocol, result.account, PASSWORD, OWNER_ADDRESS, box)):
            raise SystemExit(f"the owner's own {result.protocol} login failed before the attack")
        baseline.append(time.monotonic() - started)
    deadline = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(_owner(box, results, deadline), *(
            _attack(box, r, 10 + n, brute_attempts if r.mode == "brute" else per_address, deadline)
            for n, r in enumerate(results)
        ))

    asyncio.run(run())
    lines = box.auth_log()
    for r in results:
        mine = [line for line in lines if line.account == r.account and line.peer != OWNER_ADDRESS]
        r.max_checked_per_minute = max_in_window([line.at for line in mine if line.outcome in CHECKED])
        r.refused_unchecked = sum(1 for line in mine if line.outcome in ("over-budget", "locked"))
    return results, max(baseline)


# --- 3. slow clients ------------------------------------------------------------------------------

@dataclass
class SlowResult:
    idle_wanted: int
    idle_opened: int = 0
    idle_closed_by_box: int = 0
    tricklers: int = 0
    tricklers_closed_by_box: int = 0
    held_seconds: float = 0.0
    delivered: bool = False
    delivery_seconds: float = 0.0
    logged_in: bool = False
    login_seconds: float = 0.0

    @property
    def caps_held(self) -> bool:
        return self.delivered and self.logged_in


async def _real_user(box: AttackBox, result: SlowResult) -> None:
    started = time.monotonic()
    with contextlib.suppress(OSError, TimeoutError, ConnectionError, ValueError, ssl.SSLError):
        conn = await Line.open(box.port("smtp"), USER_ADDRESS)
        try:
            await conn.smtp_reply()
            await conn.smtp(b"EHLO real.example")
            await conn.smtp(b"MAIL FROM:<friend@elsewhere.example>")
            await conn.smtp(f"RCPT TO:<{ALICE}>".encode())
            await conn.smtp(b"DATA")
            code, _ = await conn.smtp(b"Subject: still reachable\r\n\r\nhello\r\n.")
            result.delivered = code == 250
            result.delivery_seconds = time.monotonic() - started
        finally:
            await conn.close()
    started = time.monotonic()
    with contextlib.suppress(OSError, TimeoutError, ConnectionError, ValueError, ssl.SSLError):
        conn = await Line.open(box.port("imap"), OWNER_ADDRESS)
        try:
            await conn.line()
            reply = await conn.tagged(b"s1", b"STARTTLS")
            if reply.startswith(b"s1 OK"):
                await conn.starttls()
                reply = await conn.tagged(b"l1", f'LOGIN "{ALICE}" "{PASSWORD}"'.encode())
                reply = await conn.tagged(b"x1", b"SELECT INBOX") if reply.startswith(b"l1 OK") else reply
                result.logged_in = reply.startswith(b"x1 OK")
                result.login_seconds = time.monotonic() - started
        finally:
            await conn.close()


async def _slow(box: AttackBox, result: SlowResult, hold: float) -> None:
    idle: list[Line] = []
    tricklers: list[Line] = []

    async def open_idle(i: int) -> None:
        service = "smtp" if i % 2 else "imap"
        with contextlib.suppress(OSError, TimeoutError):
            idle.append(await Line.open(box.port(service), f"127.20.{i // 200}.{i % 200 + 1}", within=10))

    for start in range(0, result.idle_wanted, 100):  # in waves, as a botnet would ramp up
        await asyncio.gather(*(open_idle(i) for i in range(start, min(start + 100, result.idle_wanted))))
    result.idle_opened = len(idle)
    for i in range(result.tricklers):
        with contextlib.suppress(OSError, TimeoutError):
            conn = await Line.open(box.port("imap" if i % 2 else "pop3"), f"127.21.0.{i + 1}", within=10)
            tricklers.append(conn)

    async def trickle() -> None:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < hold:
            for conn in tricklers:
                with contextlib.suppress(Exception):
                    # Never a whole line: 'a LOGIN x {33000000}' one byte at a time, forever.
                    conn.writer.write(b"a LOGIN x {33000000}"[n % 20:n % 20 + 1] if n < 20 else b"x")
            n += 1
            await asyncio.sleep(1.0)

    started = time.monotonic()
    trickling = asyncio.ensure_future(trickle())
    await asyncio.sleep(min(1.0, hold / 4))
    await _real_user(box, result)
    await trickling
    result.held_seconds = time.monotonic() - started

    async def closed(conn: Line) -> bool:
        try:
            data = await asyncio.wait_for(conn.reader.read(65536), 0.05)
            while data:  # a greeting or a timeout notice: read on to see whether the box hung up
                data = await asyncio.wait_for(conn.reader.read(65536), 0.05)
            return True
        except TimeoutError:
            return False
        except (OSError, ConnectionError):
            return True

    result.idle_closed_by_box = sum(await asyncio.gather(*(closed(c) for c in idle)))
    result.tricklers_closed_by_box = sum(await asyncio.gather(*(closed(c) for c in tricklers)))
    for conn in idle + tricklers:
        conn.writer.transport.abort()


def slow_clients(box: AttackBox, *, idle: int, tricklers: int, hold: float) -> SlowResult:
    result = SlowResult(idle_wanted=idle, tricklers=tricklers)
    asyncio.run(_slow(box, result, hold))
    return result


# --- 4. crash loop --------------------------------------------------------------------------------

@dataclass
class CrashResult:
    kills: int = 0
    acknowledged: set[int] = field(default_factory=set)
    missing: list[int] = field(default_factory=list)
    duplicate_reports: int = 0
    duplicate_deliveries: int = 0  # allowed by SMTP (at least once), shown for information
    still_queued: int = 0
    leftovers: list[str] = field(default_factory=list)


CRASH_ID = re.compile(rb"X-Crash-Id: (\d+)")


class Burst:
    """Threads submitting on 587 (STARTTLS + AUTH) to one outside recipient that takes the message and
    one that refuses it (so each message makes a delivery and a failure report)."""

    def __init__(self, box: AttackBox, threads: int = 3) -> None:
        self.box = box
        self.next = 0
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _number(self) -> int:
        with self.lock:
            self.next += 1
            return self.next

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.box.port("submission"), timeout=10) as client:
                    client.starttls(context=insecure_tls())
                    client.login(ALICE, PASSWORD)
                    while not self.stop.is_set():
                        n = self._number()
                        body = (f"From: {ALICE}\r\nTo: taker@{FAR}\r\nSubject: burst {n}\r\nX-Crash-Id: {n}\r\n"
                                f"Message-ID: <crash{n}@{OURS}>\r\n\r\n" + f"line of burst {n}\r\n" * 50)
                        client.sendmail(ALICE, [f"taker@{FAR}", f"refuser@{FAR}"], body.encode())
                        with self.lock:
                            self.acked.add(n)  # only after the 250 to DATA
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the box is down: come back when it is up

    def __enter__(self) -> Burst:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def crash_loop(box: AttackBox, *, kills: int, burst_seconds: float, drain_seconds: float) -> CrashResult:
    result = CrashResult()
    with Burst(box) as burst:
        for _ in range(kills):
            wanted = len(burst.acked) + 3
            wait_for(lambda: len(burst.acked) >= wanted, burst_seconds)  # noqa: B023  (mid-burst: the queue is busy)
            time.sleep(burst_seconds / 3)
            box.kill9()
            result.kills += 1
            box.start()
    result.acknowledged = set(burst.acked)
    # The last restart settles what the kills left: wait until the queue is empty (or give up).
    wait_for(lambda: box.queue_size() == 0, drain_seconds, step=0.5)
    box.stop()
    box.start()  # one more start: what a restart leaves behind is what counts as leftovers
    wait_for(lambda: box.queue_size() == 0, 5, step=0.5)
    delivered = Counter(int(m[1]) for t in box.receiver.transactions for m in [CRASH_ID.search(t.data)] if m)
    reports = Counter(int(m[1]) for raw in box.inbox() for m in [CRASH_ID.search(raw)] if m)
    with contextlib.closing(box.db()) as conn:
        queued_ids = {str(row[0]) for row in conn.execute("SELECT id FROM queue_messages")}
    queued_numbers = set()
    for queue_id in queued_ids:
        path = box.data / "spool" / f"{queue_id}.eml"
        m = CRASH_ID.search(path.read_bytes()) if path.exists() else None
        if m:
            queued_numbers.add(int(m[1]))
    result.still_queued = len(queued_numbers)
    result.missing = sorted(n for n in result.acknowledged
                            if n not in queued_numbers and (delivered[n] == 0 or reports[n] == 0))
    result.duplicate_reports = sum(count - 1 for count in reports.values() if count > 1)
    result.duplicate_deliveries = sum(count - 1 for count in delivered.values() if count > 1)
    spool = box.data / "spool"
    result.leftovers = sorted(p.name for p in spool.iterdir()
                              if p.is_file() and p.name.removesuffix(".eml") not in queued_ids) if spool.is_dir() else []
    return result


# --- the whole run --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    tls_tricks: int | None
    guess_modes: tuple[str, ...]
    spread_addresses: int
    per_address: int
    brute_attempts: int
    guess_seconds: float
    idle: int
    tricklers: int
    hold: float
    kills: int
    burst_seconds: float
    drain_seconds: float


FULL = Sizes(tls_tricks=None, guess_modes=("brute", "spread"), spread_addresses=50, per_address=10, brute_attempts=40, guess_seconds=90, idle=2000, tricklers=40,
             hold=150, kills=20, burst_seconds=3.0, drain_seconds=120)
QUICK = Sizes(tls_tricks=8, guess_modes=("spread",), spread_addresses=12, per_address=4, brute_attempts=15, guess_seconds=8, idle=300, tricklers=6,
              hold=4, kills=2, burst_seconds=1.5, drain_seconds=40)
PARTS = ("relay", "guessing", "slow", "crash")


def guess_users(sizes: Sizes) -> list[str]:
    return [guess_account(p, m) for p in PROTOCOLS for m in sizes.guess_modes]


def run_part(part: str, sizes: Sizes, root: Path) -> tuple[list[str], bool]:
    """One part on a fresh box: the figure lines to print, and whether every promise held."""
    (root / part).mkdir()
    with attack_box(root / part, guess_users(sizes) if part == "guessing" else []) as box:
        if part == "relay":
            r = relay_battery(box, tls_tricks=sizes.tls_tricks)
            lines = [f"relay battery: {r.tried} RCPT tries ({len(relay_tricks())} tricks x 3 senders) on 25, 587 and "
                     "465 without a login",
                     f"  RCPT accepted   {len(r.accepted)} (local, or a line break made two commands of one)",
                     f"  relayed: {r.relayed}  (outside receiver got {r.delivered_outside}, "
                     f"queued for outside {r.queued_outside})"]
            lines += [f"    accepted: {a}" for a in r.accepted[:20]]
            return lines, r.relayed == 0
        if part == "guessing":
            results, baseline = guessing(
                box, spread_addresses=sizes.spread_addresses, per_address=sizes.per_address,
                brute_attempts=sizes.brute_attempts, seconds=sizes.guess_seconds, modes=sizes.guess_modes)
            lines = ["password guessing (checks counted from the box's auth log; owner = 127.0.0.2, known):"]
            for g in results:
                owner = (f"{max(g.owner_logins):.2f} s (password answered in {max(g.owner_answers):.2f} s)"
                         if g.owner_logins else "never")
                lines.append(
                    f"  {g.protocol:<4} {g.mode:<6} {g.addresses:>3} addr  {g.attempts:>4} guesses  "
                    f"checked/min/account {g.max_checked_per_minute:>3}  refused unchecked {g.refused_unchecked:>4}  "
                    f"owner login {owner} ({g.owner_failed} failed)")
            worst = max(g.max_checked_per_minute for g in results)
            slowest = max((max(g.owner_logins) for g in results if g.owner_logins), default=float("inf"))
            answer = max((max(g.owner_answers) for g in results if g.owner_answers), default=float("inf"))
            failed = sum(g.owner_failed for g in results)
            lines.append(f"  passwords checked per minute per account: {worst} (<= {MAX_CHECKS_PER_MINUTE})")
            lines.append(f"  owner login time during the attack: {slowest:.2f} s from connect, {answer:.2f} s from "
                         f"sending the password (<= {MAX_OWNER_LOGIN_SECONDS:.0f} s); {failed} owner logins failed; "
                         f"{baseline:.2f} s before the attack")
            if slowest > MAX_OWNER_LOGIN_SECONDS:
                # A time, unlike the counts, depends on the machine (and whatever else runs on it): shown,
                # not made the script's exit status.
                lines.append(f"  owner login time NOT HELD on this machine ({os.cpu_count()} cores, "
                             f"load {os.getloadavg()[0]:.1f})")
            return lines, worst <= MAX_CHECKS_PER_MINUTE and not failed
        if part == "slow":
            s = slow_clients(box, idle=sizes.idle, tricklers=sizes.tricklers, hold=sizes.hold)
            return [f"slow clients: {s.idle_opened}/{s.idle_wanted} idle connections (25, 143) and "
                    f"{s.tricklers} tricklers (143, 110) held {s.held_seconds:.0f} s",
                    f"  real user: delivered {'yes' if s.delivered else 'NO'} ({s.delivery_seconds:.2f} s), "
                    f"IMAP login {'yes' if s.logged_in else 'NO'} ({s.login_seconds:.2f} s)",
                    f"  closed by the box: {s.idle_closed_by_box} idle, {s.tricklers_closed_by_box}/{s.tricklers} tricklers",
                    f"  idle-connection caps held: {'yes' if s.caps_held else 'NO'}"], s.caps_held
        c = crash_loop(box, kills=sizes.kills, burst_seconds=sizes.burst_seconds, drain_seconds=sizes.drain_seconds)
        return [f"crash loop: {c.kills} x kill -9 during an outbound burst, {len(c.acknowledged)} messages acknowledged",
                f"  acknowledged-but-missing: {len(c.missing)}",
                f"  duplicate reports: {c.duplicate_reports}",
                f"  leftovers after restart: {len(c.leftovers)}",
                f"  (still queued {c.still_queued}; duplicate deliveries {c.duplicate_deliveries}, "
                "allowed: SMTP is at-least-once)"], not c.missing and not c.duplicate_reports and not c.leftovers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run of tests/e2e/test_attack.py")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    args = parser.parse_args()
    # Attackers write to connections the box has already dropped; asyncio would log each of those.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sizes = QUICK if args.quick else FULL
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="letterbox-attack-") as tmp:
        for part in parts:
            started = time.monotonic()
            lines, held = run_part(part, sizes, Path(tmp))
            for line in lines:
                print(line, flush=True)
            print(f"  ({time.monotonic() - started:.0f} s){'' if held else '  <- NOT HELD'}", flush=True)
            if not held:
                failed.append(part)
    if failed:
        raise SystemExit(f"promises not held: {', '.join(failed)}")


if __name__ == "__main__":
    main()
