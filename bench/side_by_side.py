"""Letterbox side by side with the component standard on this machine (issue 19): Dovecot 2.3 for IMAP,
POP3 and LMTP, Postfix 3.7 for SMTP intake (-> Dovecot LMTP, and -> virtual(8)) and submission (SASL
through Dovecot, the same argon2id cost as Letterbox's), the same client and the same messages.

Every round starts each server afresh on a fresh copy of the same Maildir (bench/corpus.py),
so "cold" means the same for both: Letterbox sees foreign files, Dovecot builds its index. Runs are
interleaved (Letterbox, peer, Letterbox, peer...), each figure is the median of the rounds, and the
ratio is Letterbox's relative performance: above 1 Letterbox is faster (or smaller), below 1 slower.
A command that passes --timeout is stopped there and shown as "> N s" (then that session is closed).
The machine's load (uptime) is printed with the table: other work moves absolute figures, the
interleaving keeps the ratios honest. `--sizes ''` runs only the rows that do not depend on a folder's
size (SMTP, submission, POP3, imaptest stress, with each server's CPU per imaptest command). Before SEARCH BODY each server is given until its
processes are idle (--timeout at most; the wait is printed): the row is about a folder the server had
time to index, and Letterbox's full-text indexing gives way to the deliveries and APPENDs before it.

What Letterbox's MX does in the SMTP rows (SMTP_CHECKS, printed with the table): the peers check nothing.

Usage: python -m bench.side_by_side [--sizes 1000,10000,100000] [--rounds 3] [--timeout 120]
       [--smtp-messages 2000] [--submissions 20] [--deliveries 2000] [--appends 200] [--pop3-mib 50]
       [--stress-secs 10] [--imap-only] [--smtp-only] [--rows thunderbird,fetch,subject,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from appliance.admin import open_admin
from appliance.config import STANDARD_PORTS
from appliance.passwords import hash_password
from bench import corpus
from bench.benchbox import cpu_seconds, free_offset, maildir_count, serving, set_settings
from bench.imap import Client
from bench.peers import BenchDovecot, BenchPostfix, tree_memory
from bench.pop3 import Client as Pop3Client
from tests.support.dns_server import ZoneServer

DOMAIN = "bench.test"
READER, RCPT, SUBMITTER, POPPER, STRESS = (f"{u}@{DOMAIN}" for u in ("reader", "rcpt", "sub", "pop", "stress"))
PASSWORD = "bench password 1234567"
SENDER_DOMAIN = "elsewhere.test"
SENDER_ZONE = {  # what a sender's zone publishes (RFC 7208 SPF, RFC 7489 DMARC), as in bench/smtp.py
    (SENDER_DOMAIN, "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    (f"_dmarc.{SENDER_DOMAIN}", "TXT"): ['"v=DMARC1; p=none"'],
    ("bench.client", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
}
THUNDERBIRD = ("UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date "
               "Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])")
IMAPTEST = Path(os.environ.get("IMAPTEST", "/work/tools/imaptest/bin/imaptest"))
IMAP_ROWS = ("thunderbird", "same-select", "flags", "fetch", "subject", "lmtp", "append", "body")  # --rows
LINEAR_SLACK = 1.25  # per-message cost may grow this much from the smallest to the largest size (noise)


# ---------------------------------------------------------------------------------------------------------
# Results: one Row per line of the table, each server's figure per round.


@dataclass
class Row:
    work: str
    unit: str
    lower_is_better: bool
    peer: str = "Dovecot"
    size: int | None = None
    letterbox: list[float | None] = field(default_factory=list)
    other: list[float | None] = field(default_factory=list)
    note: str = ""
    found: dict[str, set[int]] = field(default_factory=dict)  # a SEARCH's answer size per server

    def median(self, values: list[float | None]) -> float | None:
        """The median of the rounds; a round that timed out counts as the worst figure there is (+inf for a
        time, 0 for a rate). None when there is no round at all."""
        if not values:
            return None
        worst = float("inf") if self.lower_is_better else 0.0
        return statistics.median(worst if v is None else v for v in values)

    def ratio(self) -> float | None:
        lb, peer = self.median(self.letterbox), self.median(self.other)
        if lb is None or peer is None or not (0 < peer < float("inf")) or lb == float("inf"):
            return None
        if self.lower_is_better:
            return peer / lb if lb else None
        return lb / peer


class Results:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rows: dict[tuple[str, int | None, str], Row] = {}
        self.args = args
        self.timeout: float = args.timeout

    def row(self, work: str, unit: str, *, lower_is_better: bool, peer: str = "Dovecot",
            size: int | None = None) -> Row:
        key = (work, size, peer)
        if key not in self.rows:
            self.rows[key] = Row(work, unit, lower_is_better, peer, size)
        return self.rows[key]

    def add(self, work: str, unit: str, server: str, value: float | None, *, lower_is_better: bool,
            peer: str = "Dovecot", size: int | None = None) -> None:
        row = self.row(work, unit, lower_is_better=lower_is_better, peer=peer, size=size)
        (row.letterbox if server == "letterbox" else row.other).append(value)

    def cell(self, row: Row, values: list[float | None]) -> str:
        value = row.median(values)
        if value is None:
            return "n/a"
        if value == float("inf"):
            return f"> {self.timeout:g} s"
        rounds = ", ".join("—" if v is None else _num(v) for v in values)
        return f"{_num(value)} {row.unit}" + (f" ({rounds})" if len(values) > 1 else "")

    def scaling(self, row: Row, values_by_size: dict[int, list[float | None]]) -> str:
        """Per-message cost at the largest size over that at the smallest: <= LINEAR_SLACK is linear or
        better (a time per message that does not grow, or a rate that does not fall)."""
        figures = {s: row.median(v) for s, v in values_by_size.items()}
        usable = sorted(s for s, f in figures.items() if f is not None and 0 < f < float("inf"))
        if len(usable) < 2 or row.unit == "MiB":  # memory: absolute targets, not per message
            return ""
        small, large = usable[0], usable[-1]
        a, b = figures[small] or 0.0, figures[large] or 0.0
        factor = (b / large) / (a / small) if row.lower_is_better else a / b
        verdict = "linear or better" if factor <= LINEAR_SLACK else "WORSE than linear"
        return f"{verdict} (x{factor:.2f} per message, {small:,}→{large:,})"

    @staticmethod
    def found_note(row: Row) -> str:
        """How many messages a SEARCH found: the same on both servers, or both counts when they differ."""
        if not row.found:
            return ""
        counts = {server: ", ".join(map(str, sorted(found))) for server, found in row.found.items()}
        if len(set(counts.values())) == 1:
            return f" (finds {next(iter(counts.values()))})"
        return " (finds: " + "; ".join(f"{server} {count}" for server, count in counts.items()) + ")"

    def print_table(self, out: Callable[[str], None]) -> None:
        out("| work | N | Letterbox | peer | peer figure | ratio (>1: Letterbox better) | Letterbox scaling | "
            "peer scaling |")
        out("|---|---|---|---|---|---|---|---|")
        by_work: dict[tuple[str, str], dict[int, Row]] = {}
        for row in self.rows.values():
            if row.size is not None:
                by_work.setdefault((row.work, row.peer), {})[row.size] = row
        for row in self.rows.values():
            ratio = row.ratio()
            ratio_text = f"{ratio:.2f}×" if ratio is not None else "n/a"
            lb_scale = peer_scale = ""
            sized = by_work.get((row.work, row.peer), {})
            if row.size is not None and row.size == max(sized):
                lb_scale = self.scaling(row, {s: r.letterbox for s, r in sized.items()})
                peer_scale = self.scaling(row, {s: r.other for s, r in sized.items()})
            size = f"{row.size:,}" if row.size is not None else ""
            work = row.work + (f" ({row.note})" if row.note else "") + self.found_note(row)
            out(f"| {work} | {size} | {self.cell(row, row.letterbox)} | {row.peer} | {self.cell(row, row.other)} "
                f"| {ratio_text} | {lb_scale} | {peer_scale} |")


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------------
# The servers: each started afresh per round on fresh copies of the same files.


@dataclass(frozen=True)
class Box:
    pid: int
    offset: int
    data: Path

    def port(self, service: str) -> int:
        return STANDARD_PORTS[service] + self.offset

    def maildir(self, user: str) -> Path:
        return self.data / "mail" / DOMAIN / user.split("@")[0]


@dataclass
class Setup:
    work: Path
    cert: Path
    key: Path
    cert_chain: bytes
    key_pem: bytes
    template: Path  # a Letterbox data dir with the domain and users, copied per round
    args: argparse.Namespace

    @classmethod
    def make(cls, work: Path, args: argparse.Namespace) -> Setup:
        issued = trustme.CA().issue_cert("localhost", "127.0.0.1")
        cert, key = work / "cert.pem", work / "key.pem"
        chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        cert.write_bytes(chain)
        key.write_bytes(issued.private_key_pem.bytes())
        template = work / "letterbox-template"
        asyncio.run(make_template(template))
        return cls(work, cert, key, chain, issued.private_key_pem.bytes(), template, args)

    @contextlib.contextmanager
    def letterbox(self, folders: dict[str, Path], settings: dict[str, str] | None = None, *,
                  code: Path | None = None) -> Iterator[Box]:
        """A fresh box whose users' INBOXes are copies of `folders`; `code`: a checkout whose `appliance`
        runs instead of this one (benchbox.code_env)."""
        run = Path(tempfile.mkdtemp(prefix="lb-", dir=self.work))
        data = run / "data"
        shutil.copytree(self.template, data)
        for user, folder in folders.items():
            corpus.maildir_copy(folder, data / "mail" / DOMAIN / user.split("@")[0])
        set_settings(data, {"queue_hold": "1", **(settings or {})})
        try:
            with self._serving(data, run / "serve.log", code) as box:
                yield box
        finally:
            shutil.rmtree(run, ignore_errors=True)

    @staticmethod
    @contextlib.contextmanager
    def _serving(data: Path, log: Path, code: Path | None = None) -> Iterator[Box]:
        """`letterbox serve` at a random free port block, another one if a port was taken meanwhile (other
        benchmarks and tests on this machine pick blocks too)."""
        for attempt in range(5):
            offset = free_offset(31000 + random.randrange(20) * 1009)  # 11000..30999: the tests (conftest)
            started = False
            try:
                # Minutes, not benchbox's 60 s: a 100k folder's box started on a machine at load 20+.
                with serving(data, log, offset, hostname=DOMAIN, ready_timeout=600, code=code) as proc:
                    started = True
                    yield Box(proc.pid, offset, data)
                    return
            except SystemExit as exc:
                if started or "address already in use" not in str(exc).lower() or attempt == 4:
                    raise

    @contextlib.contextmanager
    def dovecot(self, folders: dict[str, Path]) -> Iterator[BenchDovecot]:
        # Dovecot's SASL for Postfix's submission checks the same argon2id hash Letterbox stores.
        secrets = dict.fromkeys((READER, POPPER, STRESS, "in@lmtp.test"), PASSWORD)
        secrets[SUBMITTER] = "{ARGON2ID}" + hash_password(PASSWORD)
        server = BenchDovecot(secrets, (self.cert, self.key))
        try:
            for user, folder in folders.items():
                corpus.maildir_copy(folder, server.maildir(user))
            server.start()
            yield server
        finally:
            server.cleanup()


async def make_template(data: Path) -> None:
    """The domain and users, through the same application functions the CLI calls (one process: each CLI
    run costs seconds of interpreter start on a loaded machine)."""
    async with open_admin(data) as admin:
        await admin.add_domain(DOMAIN)
        for user in (READER, RCPT, SUBMITTER, POPPER, STRESS):
            await admin.create_mailbox(user, PASSWORD)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # both servers' certificates are throwaway ones, on loopback
    return context


def memory(results: Results, work: str, server: str, pid: int, size: int | None) -> None:
    # Both servers get the same few seconds to let go of what closed sessions held (Letterbox unloads an
    # unused folder index 2 s after its last use).
    time.sleep(results.args.settle)
    rss, pss, _ = tree_memory(pid)
    results.add(f"{work}: RSS, all processes", "MiB", server, rss / 1024, lower_is_better=True, size=size)
    results.add(f"{work}: PSS, all processes", "MiB", server, pss / 1024, lower_is_better=True, size=size)


# ---------------------------------------------------------------------------------------------------------
# IMAP rows, the same client code for both servers.


class Session(Client):
    """bench.imap's client with a deadline per command; after a timeout the session is unusable."""

    timeout: float = 120.0
    broken: bool = False

    async def timed(self, text: str) -> tuple[float | None, int]:
        if self.broken:
            return None, 0
        started = time.perf_counter()
        try:
            count, _ = await asyncio.wait_for(self.command(text), self.timeout)
        except TimeoutError:
            self.broken = True
            return None, 0
        return time.perf_counter() - started, count

    async def append(self, mailbox: str, data: bytes) -> None:
        """APPEND with a synchronizing literal (RFC 3501 section 7.5: wait for the continuation)."""
        self.tag += 1
        tag = f"a{self.tag}".encode()
        self.writer.write(tag + f" APPEND {mailbox} {{{len(data)}}}\r\n".encode())
        line = await self.reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"APPEND: {line!r}")
        self.writer.write(data + b"\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"APPEND: {line!r}")
                return

    async def search(self, criteria: str) -> tuple[float | None, int]:
        """A SEARCH's time and the number of messages it found."""
        if self.broken:
            return None, 0
        self.tag += 1
        tag = f"s{self.tag}".encode()
        started = time.perf_counter()
        self.writer.write(tag + b" " + criteria.encode() + b"\r\n")
        found = 0
        try:
            async with asyncio.timeout(self.timeout):
                while not (line := await self.reader.readline()).startswith(tag + b" "):
                    if not line:
                        raise ConnectionError("closed")
                    if line.startswith(b"* SEARCH"):
                        found += len(line.split()) - 2
        except TimeoutError:
            self.broken = True
            return None, 0
        if not line.startswith(tag + b" OK"):
            raise RuntimeError(f"{criteria}: {line!r}")
        return time.perf_counter() - started, found


async def open_session(port: int, user: str, deadline: float) -> Session:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(), limit=1 << 24)
    session = Session(reader, writer)
    session.timeout = deadline
    await reader.readline()
    await session.command(f'LOGIN "{user}" "{PASSWORD}"')
    return session


async def close_session(session: Session) -> None:
    if not session.broken:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.command("LOGOUT")
    await session.close()


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


class ImapRound:
    """The IMAP rows of one round on one server. A command that times out leaves its session unusable:
    the next row opens a new session (and SELECTs, untimed) rather than reporting a timeout it never had."""

    def __init__(self, results: Results, server: str, imaps: int, size: int, pid: int | None = None) -> None:
        self.results, self.server, self.imaps, self.size, self.pid = results, server, imaps, size, pid
        self.current: Session | None = None

    async def session(self, *, select: bool = True) -> Session:
        if self.current is None or self.current.broken:
            if self.current is not None:
                await self.current.close()
            self.current = await open_session(self.imaps, READER, self.results.timeout)
            if select:
                await self.current.command("SELECT INBOX")
        return self.current

    async def end_session(self) -> None:
        if self.current is not None:
            await close_session(self.current)
            self.current = None

    def add(self, work: str, seconds: float | None, count: int = -1, found: int = -1) -> None:
        # At least one untagged line per message: Dovecot adds "* OK" progress notes to long commands.
        if count >= 0 and seconds is not None and count < self.size:
            raise RuntimeError(f"{self.server}: {work} answered {count} messages, not {self.size}")
        self.results.add(work, "ms", self.server, ms(seconds), lower_is_better=True, size=self.size)
        if found >= 0 and seconds is not None:
            row = self.results.row(work, "ms", lower_is_better=True, size=self.size)
            row.found.setdefault("Letterbox" if self.server == "letterbox" else "Dovecot", set()).add(found)

    async def fetch(self, work: str, command: str) -> None:
        self.add(work, *(await (await self.session()).timed(command)))

    async def search(self, work: str, command: str) -> None:
        seconds, found = await (await self.session()).search(command)
        self.add(work, seconds, found=found)

    def wanted(self, row: str) -> bool:
        """Whether --rows asks for this IMAP row (all when it is not given)."""
        rows = self.results.args.rows
        return rows is None or row in rows

    async def run(self, lmtp: int) -> None:
        """In an order where each "cold" is really the first time the server sees the files. The cold
        SELECT always runs (the rows after it are about a folder the server has opened); --rows
        leaves out the others that are not asked for."""
        first = await self.session(select=False)
        self.add("IMAP SELECT, cold (first open)", (await first.timed("SELECT INBOX"))[0])
        if self.wanted("thunderbird"):
            await self.fetch("Thunderbird's first header fetch, cold", THUNDERBIRD)
        if self.wanted("same-select"):
            again = sorted([(await (await self.session()).timed("SELECT INBOX"))[0] or float("inf") for _ in range(5)])
            self.add("IMAP SELECT, same session (median of 5)", again[2] if again[2] != float("inf") else None)
        if self.wanted("flags"):
            await self.fetch("UID FETCH 1:* (FLAGS)", "UID FETCH 1:* (FLAGS)")
        await self.end_session()

        if self.wanted("fetch"):
            await self.fetch("FETCH 1:* (ENVELOPE BODYSTRUCTURE), second session", "FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
        if self.wanted("subject"):
            await self.search("SEARCH SUBJECT", f"SEARCH SUBJECT {corpus.SUBJECT_WORD}")
        await self.end_session()

        args = self.results.args
        if self.wanted("lmtp"):
            elapsed = await lmtp_load(lmtp, READER, self.size, args.deliveries)
            self.results.add(f"LMTP delivery of {args.deliveries} into the folder, 10 sessions", "msg/s", self.server,
                             args.deliveries / elapsed, lower_is_better=False, size=self.size)

        if self.wanted("append"):
            appender = await self.session(select=False)
            started = time.perf_counter()
            for n in range(args.appends):
                await appender.append("INBOX", corpus.message(self.size + args.deliveries + n, READER))
            self.results.add(f"IMAP APPEND into the folder, one session ({args.appends} messages)", "msg/s",
                             self.server, args.appends / (time.perf_counter() - started), lower_is_better=False,
                             size=self.size)
            await self.end_session()

        if not self.wanted("body"):
            return
        # Last: a timed-out search may go on inside the server until it is stopped. The row is about a
        # folder the server has had time to index: Letterbox's full-text index of the folder copied in
        # and of the new mail gives way to deliveries and APPENDs (imap/fts.py), so both servers first
        # get until their processes are idle (Dovecot, without an FTS plugin, is idle at once).
        if self.pid is not None:
            waited = await settle_cpu(self.pid, self.results.timeout)
            print(f"# {self.server} idle after {waited:.1f} s before SEARCH BODY ({self.size:,} messages)",
                  file=sys.stderr, flush=True)
        await self.search("SEARCH BODY", f"SEARCH BODY {corpus.BODY_WORD}")
        await self.end_session()


IDLE_CPU = 0.05  # CPU seconds per IDLE_INTERVAL, all of a server's processes, below which it is idle
IDLE_INTERVAL = 1.0


async def settle_cpu(pid: int, limit: float) -> float:
    """Wait until the server's process tree used less than IDLE_CPU in each of two IDLE_INTERVALs in a
    row, `limit` seconds at most; returns the seconds waited."""
    started = time.perf_counter()
    quiet = 0
    before = cpu_seconds(pid)
    while quiet < 2 and time.perf_counter() - started < limit:
        await asyncio.sleep(IDLE_INTERVAL)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - before < IDLE_CPU else 0
        before = now
    return time.perf_counter() - started


async def lmtp_load(port: int, user: str, start: int, count: int, sessions: int = 10) -> float:
    """`count` messages over `sessions` LMTP connections (RFC 2033), each acknowledged after delivery."""
    todo = iter(range(start, start + count))

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply(expect: str) -> None:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("LMTP closed")
                if line[3:4] != b"-":
                    if not line.startswith(expect.encode()):
                        raise RuntimeError(f"LMTP: {line!r}")
                    return

        await reply("220")
        writer.write(b"LHLO bench.client\r\n")
        await reply("250")
        for n in todo:
            data = corpus.message(n, user).replace(b"\r\n.", b"\r\n..")
            writer.write(f"MAIL FROM:<sender@{SENDER_DOMAIN}>\r\nRCPT TO:<{user}>\r\nDATA\r\n".encode())
            await reply("250")
            await reply("250")
            await reply("354")
            writer.write(data + b".\r\n")
            await reply("250")
        writer.write(b"QUIT\r\n")
        await reply("221")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sessions)))
    return time.perf_counter() - started


def imap_round(setup: Setup, results: Results, folder: Path, size: int) -> None:
    """Letterbox, then Dovecot. A server that fails a command (a NO, a dropped connection) loses the rest of
    its rows for this round, said on stderr with its log's errors, and the benchmark goes on."""
    for server in ("letterbox", "dovecot"):
        try:
            if server == "letterbox":
                with setup.letterbox({READER: folder}) as box:
                    try:
                        asyncio.run(ImapRound(results, server, box.port("imaps"), size, box.pid).run(box.port("lmtp")))
                    except (RuntimeError, ConnectionError, OSError):
                        log = (box.data.parent / "serve.log").read_text(errors="replace").splitlines()
                        print("\n".join(line for line in log if " ERROR " in line or "Error" in line)[-4000:],
                              file=sys.stderr)
                        raise
                    memory(results, "after the IMAP runs, sessions closed", server, box.pid, size)
            else:
                with setup.dovecot({READER: folder}) as dovecot:
                    try:
                        asyncio.run(ImapRound(results, server, dovecot.tls_port, size, dovecot.master()).run(
                            dovecot.lmtp_port))
                    except (RuntimeError, ConnectionError, OSError):
                        print(dovecot.log()[-4000:], file=sys.stderr)
                        raise
                    memory(results, "after the IMAP runs, sessions closed", server, dovecot.master(), size)
        except (RuntimeError, ConnectionError, OSError) as exc:
            print(f"# {server} failed this round at {size:,} messages: {exc}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# SMTP, submission, POP3, imaptest stress: not about folder size, one set of rounds.


def smtp_source(port: int, rcpt: str, maildir: Path, messages: int, deadline: float) -> float | None:
    """Postfix's smtp-source: `messages` of 1 KiB over 10 sessions; msg/s until all are in the Maildir."""
    before = maildir_count(maildir)
    started = time.perf_counter()
    result = subprocess.run(["smtp-source", "-s", "10", "-m", str(messages), "-l", "1024", "-M", "bench.client",
                             "-f", f"sender@{SENDER_DOMAIN}", "-t", rcpt, f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=deadline, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source: {result.stdout} {result.stderr}")
    while maildir_count(maildir) < before + messages:
        if time.perf_counter() - started > deadline:
            return None
        time.sleep(0.01)
    return messages / (time.perf_counter() - started)


def submissions(port: int, count: int, rcpt: str) -> float:
    """A new connection, STARTTLS and AUTH PLAIN per message, as a phone sending now and then: msg/s."""
    context = client_context()
    started = time.perf_counter()
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.starttls(context=context)
            client.login(SUBMITTER, PASSWORD)
            message = (f"From: <{SUBMITTER}>\r\nTo: <{rcpt}>\r\nSubject: submitted {n}\r\n"
                       f"Message-ID: <sub{n}.{time.time_ns()}@{DOMAIN}>\r\n\r\nHello.\r\n")
            refused = client.sendmail(SUBMITTER, [rcpt], message)
            if refused:
                raise RuntimeError(f"submission refused: {refused}")
    return count / (time.perf_counter() - started)


def pop3_retr(port: int, octets: int) -> float:
    """RETR of the maildrop's one big message over POP3S: MB/s of the message's size."""
    client = Pop3Client(port, client_context())
    client.command(f"USER {POPPER}")
    client.command(f"PASS {PASSWORD}")
    started = time.perf_counter()
    client.multiline("RETR 1")
    elapsed = time.perf_counter() - started
    client.quit()
    return octets / 1e6 / elapsed


def imaptest_stress(imaps: int, mbox: Path, secs: int) -> dict[str, int] | None:
    """imaptest's stress mode, 5 clients, logout=0: its totals per command (None: not built)."""
    if not IMAPTEST.exists():
        return None
    result = subprocess.run([str(IMAPTEST), "host=127.0.0.1", f"port={imaps}", "ssl=any-cert", f"user={STRESS}",
                             f"pass={PASSWORD}", f"mbox={mbox}", "clients=5", "logout=0", f"secs={secs}"],
                            capture_output=True, text=True, errors="replace", timeout=secs + 120, check=False)
    totals = parse_imaptest_totals(result.stdout)
    if not totals:
        raise RuntimeError(f"imaptest gave no totals: {result.stdout[-2000:]} {result.stderr[-2000:]}")
    return totals


def parse_imaptest_totals(output: str) -> dict[str, int]:
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Totals:" and i + 1 < len(lines):
            names = lines[i + 1].split()
            for candidate in lines[i + 2:]:
                values = candidate.split()
                if len(values) == len(names) and all(v.isdigit() for v in values):
                    return dict(zip(names, map(int, values), strict=True))
    return {}


@dataclass
class Fixed:
    """The files every SMTP round starts from: the big POP3 message and imaptest's mbox."""

    pop_folder: Path
    pop_octets: int
    stress_folder: Path
    mbox: Path


def make_fixed(work: Path, pop_mib: int) -> Fixed:
    pop_folder = work / "corpus-pop"
    octets = corpus.write_big_message(pop_folder, pop_mib, POPPER)
    stress_folder = work / "corpus-stress"
    corpus.make_maildir(stress_folder)
    mbox = work / "stress.mbox"
    corpus.write_mbox(mbox, 200, STRESS)
    mbox.chmod(0o644)
    return Fixed(pop_folder, octets, stress_folder, mbox)


def smtp_round(setup: Setup, results: Results, fixed: Fixed, zone_address: str) -> None:
    """One round of the rows that do not depend on a folder's size, Letterbox and its peer alternating."""
    folders = {POPPER: fixed.pop_folder, STRESS: fixed.stress_folder}
    virtual_rcpt = "rcpt@virtual.test"
    with setup.dovecot(folders) as dovecot:
        memory(results, "idle after start", "dovecot", dovecot.master(), None)
        postfix = BenchPostfix(dovecot.lmtp_port, dovecot.auth_socket, [virtual_rcpt], setup.cert_chain, setup.key_pem)
        try:
            postfix.start()
            peer_pids = tuple(pid for pid in (postfix.master_pid(), dovecot.master()) if pid is not None)
            with setup.letterbox(folders, {"dns_resolver": zone_address, "inbound_auth": "on"}) as box:
                memory(results, "idle after start", "letterbox", box.pid, None)
                for peer, target, maildir in (
                    ("Postfix → Dovecot LMTP", "in@lmtp.test", dovecot.maildir("in@lmtp.test")),
                    ("Postfix → virtual(8)", virtual_rcpt, postfix.maildir(virtual_rcpt)),
                ):
                    smtp_pair(results, "checks on", peer, box, (postfix.port, target, maildir), peer_pids)
                if not setup.args.smtp_only:
                    other_rows(setup, results, fixed, box, dovecot, postfix, virtual_rcpt)
            with setup.letterbox({}, {"inbound_auth": "off"}) as box:
                smtp_pair(results, "Letterbox's checks off", "Postfix → virtual(8)", box,
                          (postfix.port, virtual_rcpt, postfix.maildir(virtual_rcpt)), peer_pids)
        finally:
            postfix.stop()


def other_rows(setup: Setup, results: Results, fixed: Fixed, box: Box, dovecot: BenchDovecot, postfix: BenchPostfix,
               virtual_rcpt: str) -> None:
    """Submission, POP3 RETR and imaptest stress, on the servers of an SMTP round."""
    sub = "submission, new connection + STARTTLS + AUTH per message"
    peer = "Postfix + Dovecot SASL"
    count = setup.args.submissions
    results.add(sub, "msg/s", "letterbox", submissions(box.port("submission"), count, RCPT),
                lower_is_better=False, peer=peer)
    results.add(sub, "msg/s", "peer", submissions(postfix.submission_port, count, virtual_rcpt),
                lower_is_better=False, peer=peer)
    pop = f"POP3 RETR, one {setup.args.pop3_mib} MiB message, over TLS"
    results.add(pop, "MB/s", "letterbox", pop3_retr(box.port("pop3s"), fixed.pop_octets),
                lower_is_better=False)
    results.add(pop, "MB/s", "dovecot", pop3_retr(dovecot.pop3s_port, fixed.pop_octets),
                lower_is_better=False)
    stress_rows(results, "letterbox", box.port("imaps"), fixed.mbox, (box.pid,))
    stress_rows(results, "dovecot", dovecot.tls_port, fixed.mbox, (dovecot.master(),))


def smtp_pair(results: Results, how: str, peer: str, box: Box, target: tuple[int, str, Path],
              peer_pids: tuple[int, ...]) -> None:
    """smtp-source into Letterbox's MX, then into Postfix (port, recipient, the Maildir it ends in);
    with each rate the servers' CPU per message (Letterbox's process, Postfix's and Dovecot's
    process trees): on a shared machine the one-process box and the many-process peer get different
    shares of the cores, and CPU time is what the load moves least."""
    count = results.args.smtp_messages
    work = f"SMTP in, smtp-source {count} × 1 KiB, 10 sessions, until all are in the Maildir, {how}"
    cpu_work = f"SMTP in, {how}: server CPU per message (all its processes)"
    deadline = results.timeout * 5
    runs: list[tuple[str, tuple[int, ...], Callable[[], float | None]]] = [
        ("letterbox", (box.pid,), lambda: smtp_source(box.port("smtp"), RCPT, box.maildir(RCPT), count, deadline)),
        ("peer", peer_pids, lambda: smtp_source(*target, count, deadline)),
    ]
    for server, pids, run in runs:
        before = sum(cpu_seconds(pid) for pid in pids)
        rate = run()
        cpu = sum(cpu_seconds(pid) for pid in pids) - before
        results.add(work, "msg/s", server, rate, lower_is_better=False, peer=peer)
        results.add(cpu_work, "ms", server, 1000 * cpu / count if rate is not None else None,
                    lower_is_better=True, peer=peer)


def stress_rows(results: Results, server: str, imaps: int, mbox: Path, pids: tuple[int, ...]) -> None:
    """The stress rows, with the server's CPU per imaptest command (all its processes: Dovecot's imap
    process per client, Letterbox's one process and its CPU pool worker): both share the machine's two
    cores with imaptest and whatever else runs, so the rate moves with the load, the CPU a command
    costs much less (issue 19)."""
    secs = results.args.stress_secs
    before = sum(cpu_seconds(pid) for pid in pids)
    totals = imaptest_stress(imaps, mbox, secs) or {}
    cpu = sum(cpu_seconds(pid) for pid in pids) - before
    figures = {  # row: (unit, value)
        "logins/s": ("/s", totals.get("Logi", 0) / secs),
        "fetches/s": ("/s", (totals.get("Fetc", 0) + totals.get("Fet2", 0)) / secs),
        "server CPU per command (all its processes)": ("ms", 1000 * cpu / max(1, sum(totals.values()))),
    }
    for what, (unit, value) in figures.items():
        row = results.row(f"imaptest stress, 5 clients, logout=0, {secs} s: {what}", unit, lower_is_better=unit == "ms")
        if not totals:
            row.note = f"not built: no {IMAPTEST}"
            continue
        (row.letterbox if server == "letterbox" else row.other).append(value)


# ---------------------------------------------------------------------------------------------------------


# The defaults as shipped, on a box where only the inbound checks' DNS is given (the loopback zone
# above); said with the table, so nobody reads the SMTP ratios as a like-for-like without checks.
SMTP_CHECKS = (
    "Letterbox's MX in the 'checks on' SMTP rows: SPF (MAIL FROM and HELO), DKIM and DMARC on every message, "
    "DNS from a loopback zone through the box's TTL cache; the content filter on as shipped (rspamd is not "
    "running here, as under `make run`: every message is marked unchecked, and rspamd is asked again 2 s after "
    "each refused connection); DNSBL, greylisting "
    "and the greeting delay skip loopback clients (their shipped skip_networks); the delivery log on. "
    "'checks off' switches SPF/DKIM/DMARC off only. The peers check nothing."
)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run(args: argparse.Namespace, out: Callable[[str], None]) -> Results:
    results = Results(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="letterbox-side-by-side-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Dovecot's and Postfix's processes read the corpus and mbox as other users
        setup = Setup.make(work, args)
        fixed = make_fixed(work, args.pop3_mib)
        zone = ZoneServer(SENDER_ZONE, ttl=3600, negative_ttl=900)
        zone_port = zone.start()
        try:
            for n in range(0 if args.imap_only else args.rounds):
                out(f"# SMTP/POP3/stress round {n + 1}/{args.rounds}   {uptime()}")
                smtp_round(setup, results, fixed, f"127.0.0.1:{zone_port}")
                results.print_table(out)  # so far: an interrupted run still shows what it measured
        finally:
            zone.stop()
        for size in args.sizes:
            folder = work / f"corpus-{size}"
            corpus.write_folder(folder, size, READER)
            for n in range(args.rounds):
                out(f"# IMAP {size:,} messages, round {n + 1}/{args.rounds}   {uptime()}")
                imap_round(setup, results, folder, size)
                results.print_table(out)
            shutil.rmtree(folder)
    out(f"# done in {time.monotonic() - started:.0f} s   {uptime()}")
    return results


def _rows(text: str) -> frozenset[str]:
    """--rows: names from IMAP_ROWS; a name mistyped would otherwise leave its row out unsaid."""
    rows = frozenset(text.split(","))
    if rows - set(IMAP_ROWS):
        raise argparse.ArgumentTypeError(f"unknown rows {','.join(sorted(rows - set(IMAP_ROWS)))}"
                                         f" (known: {','.join(IMAP_ROWS)})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000",
                        type=lambda text: [int(s) for s in text.split(",") if s])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before each memory reading")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per IMAP command")
    parser.add_argument("--smtp-messages", type=int, default=2000)
    parser.add_argument("--submissions", type=int, default=20)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--pop3-mib", type=int, default=50)
    parser.add_argument("--stress-secs", type=int, default=10)
    parser.add_argument("--imap-only", action="store_true", help="only the rows that depend on the folder size")
    parser.add_argument("--rows", default=None, type=_rows,
                        help="IMAP rows besides the cold SELECT (all by default): " + ",".join(IMAP_ROWS))
    parser.add_argument("--smtp-only", action="store_true",
                        help="of the rows that do not depend on a folder's size, only SMTP intake")
    args = parser.parse_args(argv)

    # SIGTERM (a killed `make bench`) unwinds like an error, so the private servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def out(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run(args, out)
    print(f"Letterbox vs Postfix + Dovecot, medians of {args.rounds} interleaved rounds (each round's figures in "
          f"brackets); {uptime()}")
    results.print_table(print)
    if args.rounds and not args.imap_only:
        print(SMTP_CHECKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
