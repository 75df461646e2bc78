"""SIGKILL the box again and again while every kind of write flows, and check after each restart that
nothing acknowledged was lost (`python -m bench.crash_loop DIR --rounds 30`; not part of `make test`,
whose crash tests place a handful of kills: tests/e2e/test_*_crash.py).

Traffic, one thread each, every message marked `X-Crash: <id>` and ending in `END <id>`:
- MX: one message to alice, the alias team@ (bob, carol) and dave;
- submission (erin, AUTH): to alice and to an outside address (the queue keeps it: no DNS answers);
- IMAP: alice APPENDs to Keep (APPENDUID noted); bob MOVEs between INBOX and Other and COPYs to
  Copies; carol changes flags and UID EXPUNGEs; erin makes a folder, APPENDs, RENAMEs, DELETEs it;
- POP3: dave RETRs, DELEs everything, QUITs.
After each kill and start, with the box serving again:
- the database passes PRAGMA integrity_check, no tmp/ holds a file, every message file is complete;
- each acknowledged message is where it must be exactly once (MOVE: in INBOX or Other, once), an
  acknowledged expunge or POP3 deletion stays done (a kill is not a power cut), an unacknowledged one
  is there at most once; the outside copy is queued with its spool file;
- every folder's SELECT count equals its files, UIDVALIDITY never changes, a UID never names another
  message than the one it named before, APPENDUIDs name their message, UIDNEXT never goes back.
Prints one line per round and exits 1 at the first round whose checks fail (the data is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import itertools
import poplib
import random
import re
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.benchbox import LETTERBOX, cli, code_env, free_offset, set_settings
from bench.soak import insecure

DOMAIN = "crash.test"
USERS = ("alice", "bob", "carol", "dave", "erin")
MARK = re.compile(rb"X-Crash: (\S+)")
APPENDUID = re.compile(rb"APPENDUID (\d+) (\d+)")
FETCHED = re.compile(rb"UID (\d+)")
PORTS = {"smtp": 25, "submission": 587, "imaps": 993, "pop3s": 995}
Errors = (OSError, EOFError, imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException, ssl.SSLError)


def address(user: str) -> str:
    return f"{user}@{DOMAIN}"


def password(user: str) -> str:
    return f"crash-loop-{user}-password"


class Ledger:
    """What was acknowledged and what was in flight at a kill, per (user, folder) and marker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.exact: dict[tuple[str, str], set[str]] = {}  # must be there exactly once
        self.maybe: dict[tuple[str, str], set[str]] = {}  # at most once (unacknowledged)
        self.gone: dict[tuple[str, str], set[str]] = {}  # must not be there (acknowledged removal)
        self.moved: dict[str, str] = {}  # bob's marker -> folder its last acknowledged MOVE left it in
        self.moving: set[str] = set()  # bob's markers whose MOVE was in flight at a kill
        self.copies: Counter[str] = Counter()  # bob's Copies: acknowledged copies per marker
        self.copying: Counter[str] = Counter()  # in flight
        self.appenduid: dict[str, tuple[int, int]] = {}  # alice's Keep: marker -> (UIDVALIDITY, UID)
        self.queued: set[str] = set()  # markers acknowledged with an outside recipient
        self.renamed: dict[str, str] = {}  # erin's folder marker -> folder it must be in (acknowledged)
        self.folder_maybe: dict[str, set[str]] = {}  # -> folders it may be in (a step in flight)
        self.counts: Counter[str] = Counter()
        self.removing: set[tuple[tuple[str, str], str]] = set()  # a POP3 QUIT's or an EXPUNGE's, in flight

    def new(self, prefix: str) -> str:
        with self.lock:
            return f"{prefix}{next(self.ids)}"

    def add(self, kind: str, where: tuple[str, str], marker: str) -> None:
        with self.lock:
            getattr(self, kind).setdefault(where, set()).add(marker)

    def move_to(self, kind: str, where: tuple[str, str], marker: str) -> None:
        """`marker` leaves every other state of `where` for `kind`."""
        with self.lock:
            for other in ("exact", "maybe", "gone"):
                getattr(self, other).get(where, set()).discard(marker)
            getattr(self, kind).setdefault(where, set()).add(marker)

    def acked(self, where: tuple[str, str], marker: str) -> None:
        """A delivery's 250 or an APPEND's OK: there exactly once from now on, unless another session
        removed it meanwhile (or is removing it): a POP3 QUIT or an EXPUNGE can come before the 250 does."""
        with self.lock:
            if marker in self.maybe.get(where, set()) and (where, marker) not in self.removing:
                self.maybe[where].discard(marker)
                self.exact.setdefault(where, set()).add(marker)

    def removing_now(self, where: tuple[str, str], markers: list[str], done: bool | None) -> None:
        """A removal of `markers` sent (done None), acknowledged (True) or not known to be (False)."""
        with self.lock:
            for marker in markers:
                if done is None:
                    self.removing.add((where, marker))
                    continue
                self.removing.discard((where, marker))
                for kind in ("exact", "maybe", "gone"):
                    getattr(self, kind).get(where, set()).discard(marker)
                getattr(self, "gone" if done else "maybe").setdefault(where, set()).add(marker)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def message(marker: str, size: int = 600, sender: str = f"loop@{DOMAIN}") -> bytes:
    body = (f"{marker} " * 12 + "\r\n").encode() * max(1, size // 80)
    return (f"From: <{sender}>\r\nSubject: crash {marker}\r\nX-Crash: {marker}\r\n\r\n").encode() + body + \
        f"END {marker}\r\n".encode()


class Box:
    def __init__(self, root: Path, code: Path | None) -> None:
        self.root, self.code = root, code
        self.data = root / "data"
        self.log = root / "serve.log"
        self.offset = free_offset()
        self.proc: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        self.data.mkdir(parents=True)
        cli(self.data, "domain", "add", DOMAIN, code=self.code)
        for user in USERS:
            cli(self.data, "user", "add", "--password-stdin", address(user), stdin=password(user) + "\n", code=self.code)
        cli(self.data, "alias", "add", address("team"), address("bob"), address("carol"), code=self.code)
        set_settings(self.data, {"queue_hold": "0", "dns_resolver": "127.0.0.1:9", "inbound_auth": "off",
                                 "status_checks": "off", "spam_content_filter": "off", "port25_probe": "127.0.0.1:9",
                                 "spam_outbound_messages_per_hour": "0", "spam_outbound_recipients_per_hour": "0",
                                 "spam_outbound_reject_burst": "0"})

    def port(self, name: str) -> int:
        return PORTS[name] + self.offset

    def start(self) -> float:
        began = time.monotonic()
        size = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [LETTERBOX, "--data", str(self.data), "serve", "--listen", "127.0.0.1", "--port-offset",
                 str(self.offset), "--hostname", "localhost"], stdout=out, stderr=subprocess.STDOUT,
                env=code_env(self.code))
        while True:
            with self.log.open("rb") as f:
                f.seek(size)
                if b"\nready\n" in f.read():
                    return time.monotonic() - began
            if self.proc.poll() is not None or time.monotonic() > began + 90:
                raise SystemExit("serve did not start: " + self.log.read_text()[-3000:])
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def imap(self, user: str) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"), ssl_context=insecure(), timeout=20)
        try:
            client.login(address(user), password(user))
        except BaseException:
            with contextlib.suppress(OSError):
                client.shutdown()
            raise
        return client


class Traffic:
    """The workers of one round; each records what was acknowledged, and what it had in flight."""

    def __init__(self, box: Box, ledger: Ledger, rng: random.Random) -> None:
        self.box, self.ledger, self.rng = box, ledger, rng
        self.stop = threading.Event()

    def run(self, work: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                work()
            except Errors as exc:
                if not self.stop.is_set():
                    self.ledger.count(f"error {work.__name__} {type(exc).__name__}")
                time.sleep(0.05)

    # --- SMTP
    def mx(self) -> None:
        led = self.ledger
        rcpts = {"alice": "INBOX", "bob": "INBOX", "carol": "INBOX", "dave": "INBOX"}
        with smtplib.SMTP("127.0.0.1", self.box.port("smtp"), timeout=20) as client:
            client.ehlo("outside.example")
            while not self.stop.is_set():
                marker = led.new("s")
                for user, folder in rcpts.items():
                    led.add("maybe", (user, folder), marker)
                client.sendmail("sender@outside.example", [address("alice"), address("team"), address("dave")],
                                message(marker))
                for user, folder in rcpts.items():
                    led.acked((user, folder), marker)
                led.count("mx")

    def submission(self) -> None:
        led = self.ledger
        with smtplib.SMTP("127.0.0.1", self.box.port("submission"), timeout=20) as client:
            client.starttls(context=insecure())
            client.login(address("erin"), password("erin"))
            while not self.stop.is_set():
                marker = led.new("u")
                led.add("maybe", ("alice", "INBOX"), marker)
                client.sendmail(address("erin"), [address("alice"), f"{marker}@remote.example"],
                                message(marker, sender=address("erin")))
                led.acked(("alice", "INBOX"), marker)
                with led.lock:
                    led.queued.add(marker)
                led.count("submission")

    # --- IMAP
    def append(self) -> None:
        led = self.ledger
        client = self.box.imap("alice")
        try:
            client.create("Keep")
            while not self.stop.is_set():
                marker = led.new("a")
                led.add("maybe", ("alice", "Keep"), marker)
                typ, data = client.append("Keep", self.rng.choice(["()", "(\\Seen)", "($Label1)"]), None, message(marker))
                found = APPENDUID.search(data[0] or b"")
                if typ != "OK" or found is None:
                    raise imaplib.IMAP4.error(f"APPEND {typ} {data}")
                led.move_to("exact", ("alice", "Keep"), marker)
                with led.lock:
                    led.appenduid[marker] = (int(found.group(1)), int(found.group(2)))
                led.count("append")
        finally:
            with contextlib.suppress(*Errors):
                client.shutdown()

    def pick(self, client: imaplib.IMAP4) -> tuple[int, str] | None:
        """(UID, marker) of a message of the selected folder, at random; None (after a pause) for none."""
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Crash)])")
        found = [(int(FETCHED.search(item[0]).group(1)), MARK.search(item[1]).group(1).decode())  # type: ignore[union-attr]
                 for item in data if isinstance(item, tuple) and MARK.search(item[1])]
        if not found:
            client.noop()
            time.sleep(0.05)
            return None
        return self.rng.choice(found)

    def mover(self) -> None:
        """bob: MOVE between INBOX and Other (the message in one of them, once), COPY to Copies."""
        led = self.ledger
        client = self.box.imap("bob")
        try:
            client.create("Other")
            client.create("Copies")
            while not self.stop.is_set():
                source = self.rng.choice(["INBOX", "Other"])
                client.select(source)
                picked = self.pick(client)
                if picked is None:
                    continue
                uid, marker = picked
                if self.rng.random() < 0.3:
                    with led.lock:
                        led.copying[marker] += 1
                    ok = client.uid("COPY", str(uid), "Copies")[0] == "OK"
                    with led.lock:
                        led.copying[marker] -= 1
                        if ok:
                            led.copies[marker] += 1
                    led.count("copy")
                    continue
                target = "Other" if source == "INBOX" else "INBOX"
                with led.lock:
                    led.moving.add(marker)
                ok = client.uid("MOVE", str(uid), target)[0] == "OK"
                with led.lock:
                    led.moving.discard(marker)
                    if ok:
                        led.moved[marker] = target
                led.count("move")
        finally:
            with contextlib.suppress(*Errors):
                client.shutdown()

    def flagger(self) -> None:
        """carol: flag changes and UID EXPUNGEs in INBOX."""
        led = self.ledger
        client = self.box.imap("carol")
        try:
            client.select("INBOX")
            while not self.stop.is_set():
                picked = self.pick(client)
                if picked is None:
                    continue
                uid, marker = picked
                if self.rng.random() < 0.25:
                    led.removing_now(("carol", "INBOX"), [marker], None)
                    expunged = False
                    try:
                        if client.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK":
                            expunged = client.uid("EXPUNGE", str(uid))[0] == "OK"
                    finally:  # a kill mid-way: the expunge made or not
                        led.removing_now(("carol", "INBOX"), [marker], expunged)
                    led.count("expunge")
                else:
                    flags = " ".join(f for f in ("\\Seen", "\\Flagged", "$Work") if self.rng.random() < 0.5)
                    client.uid("STORE", str(uid), "FLAGS.SILENT", f"({flags})")
                    led.count("store")
        finally:
            with contextlib.suppress(*Errors):
                client.shutdown()

    def folders(self) -> None:
        """erin: a folder made, a message appended, the folder renamed, then deleted."""
        led = self.ledger
        client = self.box.imap("erin")
        try:
            while not self.stop.is_set():
                marker = led.new("f")
                first, second = f"F-{marker}", f"G-{marker}"
                with led.lock:
                    led.folder_maybe[marker] = {first}
                if client.create(first)[0] != "OK":
                    continue
                led.add("maybe", ("erin", first), marker)
                if client.append(first, "()", None, message(marker))[0] != "OK":
                    continue
                led.move_to("exact", ("erin", first), marker)
                with led.lock:
                    led.renamed[marker] = first
                    led.folder_maybe[marker] = {first, second}
                ok = client.rename(first, second)[0] == "OK"
                with led.lock:
                    if ok:
                        led.renamed[marker] = second
                        led.folder_maybe[marker] = {second}
                led.count("rename")
                if self.rng.random() < 0.5:
                    with led.lock:
                        led.folder_maybe[marker] = {second, ""}
                    if client.delete(second)[0] == "OK":
                        with led.lock:
                            led.renamed[marker] = ""
                            led.folder_maybe[marker] = {""}
                    led.count("delete")
        finally:
            with contextlib.suppress(*Errors):
                client.shutdown()

    # --- POP3
    def pop3(self) -> None:
        """dave: RETR each message, DELE it, QUIT: gone once QUIT's +OK came, all there otherwise."""
        led = self.ledger
        client = poplib.POP3_SSL("127.0.0.1", self.box.port("pop3s"), context=insecure(), timeout=20)
        try:
            client.user(address("dave"))
            client.pass_(password("dave"))
            _, listing, _ = client.list()
            doomed = []
            for line in listing[:20]:
                number = int(line.split()[0])
                _, lines, _ = client.retr(number)
                found = MARK.search(b"\r\n".join(lines))
                if found:
                    client.dele(number)
                    doomed.append(found.group(1).decode())
            led.removing_now(("dave", "INBOX"), doomed, None)
            try:
                client.quit()
            except BaseException:
                led.removing_now(("dave", "INBOX"), doomed, False)
                raise
            led.removing_now(("dave", "INBOX"), doomed, True)
            led.count("pop3")
        finally:
            with contextlib.suppress(*Errors):
                client.close()
        time.sleep(0.2)


class Checker:
    """The invariants, with what earlier rounds saw (UIDVALIDITY, UIDs, UIDNEXT) kept across rounds."""

    def __init__(self, box: Box, ledger: Ledger) -> None:
        self.box, self.ledger = box, ledger
        self.validity: dict[tuple[str, str], int] = {}
        self.uid_names: dict[tuple[str, str, int, int], str] = {}  # (user, folder, UIDVALIDITY, UID) -> marker
        self.uidnext: dict[tuple[str, str, int], int] = {}
        self.problems: list[str] = []

    def check(self) -> list[str]:
        self.problems = []
        queued, folder_rows = self.database()
        on_disk = self.disk()
        for user, folder in folder_rows:
            if (user, folder) not in on_disk:
                self.problems.append(f"{user}/{folder}: a folder row without its directory")
        with self.ledger.lock:
            self.exact_ones(on_disk)
            self.moves(on_disk)
            self.renames(on_disk)
            self.queue(queued)
            appenduid = dict(self.ledger.appenduid)
        for user in USERS:
            self.imap(user, on_disk, appenduid)
        return self.problems

    def database(self) -> tuple[dict[str, str], set[tuple[str, str]]]:
        """integrity_check; the outside recipients queued (-> queue id); (user, folder) of each folder row."""
        conn = sqlite3.connect(f"file:{self.box.data / 'letterbox.db'}?mode=ro", uri=True, timeout=30)
        try:
            [(verdict,)] = conn.execute("PRAGMA integrity_check").fetchall()
            if verdict != "ok":
                self.problems.append(f"integrity_check: {verdict}")
            queued = dict(conn.execute(
                "SELECT recipient, message_id FROM queue_recipients WHERE recipient LIKE '%@remote.example'").fetchall())
            rows = {(str(u), str(f)) for u, f in conn.execute(
                "SELECT m.local_part, f.name FROM folders f JOIN mailboxes m ON m.id = f.mailbox_id")}
        finally:
            conn.close()
        return queued, rows

    def disk(self) -> dict[tuple[str, str], Counter[str]]:
        """Markers per (user, folder) in new/ and cur/; a file that is not a whole message, or one left in
        tmp/ after the start, is a problem."""
        on_disk: dict[tuple[str, str], Counter[str]] = {}
        for user in USERS:
            home = self.box.data / "mail" / DOMAIN / user
            if not home.is_dir():
                continue
            dirs = {"INBOX": home, **{d.name[1:]: d for d in home.iterdir()
                                      if d.name.startswith(".") and (d / "cur").is_dir()}}
            for folder, path in dirs.items():
                self.problems += [f"{user}/{folder}: tmp/{stray.name} left after the start" for stray in (path / "tmp").iterdir()]
                counts: Counter[str] = Counter()
                for sub in ("new", "cur"):
                    for f in (path / sub).iterdir():
                        raw = f.read_bytes()
                        m = MARK.search(raw)
                        if m is None or not raw.endswith(b"END " + m.group(1) + b"\r\n"):
                            self.problems.append(f"{user}/{folder}: {sub}/{f.name} is not a whole message")
                            continue
                        counts[m.group(1).decode()] += 1
                on_disk[(user, folder)] = counts
        return on_disk

    def exact_ones(self, on_disk: dict[tuple[str, str], Counter[str]]) -> None:
        led = self.ledger
        for (user, folder), markers in led.exact.items():
            if (user, folder) == ("bob", "INBOX") or user == "erin":
                continue  # checked by MOVE's rule and by RENAME's
            for marker in markers:
                n = on_disk.get((user, folder), Counter())[marker]
                if n != 1:
                    self.problems.append(f"{user}/{folder}: acknowledged {marker} found {n} times")
        for (user, folder), markers in led.maybe.items():
            for marker in markers:
                n = on_disk.get((user, folder), Counter())[marker]
                if user not in ("bob", "erin") and n > 1:
                    self.problems.append(f"{user}/{folder}: unacknowledged {marker} found {n} times")
        for (user, folder), markers in led.gone.items():
            for marker in markers:
                if n := on_disk.get((user, folder), Counter())[marker]:
                    self.problems.append(f"{user}/{folder}: {marker}'s acknowledged removal undone ({n} there)")

    def moves(self, on_disk: dict[tuple[str, str], Counter[str]]) -> None:
        """bob: every message delivered to him is in INBOX or Other, once; Copies holds the acknowledged COPYs."""
        led = self.ledger
        for marker in led.exact.get(("bob", "INBOX"), set()) | led.maybe.get(("bob", "INBOX"), set()):
            where = [f for f in ("INBOX", "Other") for _ in range(on_disk.get(("bob", f), Counter())[marker])]
            acked = marker in led.exact.get(("bob", "INBOX"), set())
            if len(where) > 1 or (acked and not where):
                self.problems.append(f"bob: {marker} in {where or 'no folder'} (MOVE)")
            elif where and marker in led.moved and marker not in led.moving and where[0] != led.moved[marker]:
                self.problems.append(f"bob: {marker} in {where[0]}, its acknowledged MOVE took it to {led.moved[marker]}")
        copies = on_disk.get(("bob", "Copies"), Counter())
        for marker, n in led.copies.items():
            if not n <= copies[marker] <= n + led.copying[marker]:
                self.problems.append(f"bob/Copies: {marker} {copies[marker]} times, {n} COPYs acknowledged")

    def renames(self, on_disk: dict[tuple[str, str], Counter[str]]) -> None:
        """erin: a folder's message is where the last acknowledged step left it (or the one in flight)."""
        led = self.ledger
        for marker, folder in led.renamed.items():
            allowed = led.folder_maybe.get(marker, {folder})
            places = [f for (u, f), c in on_disk.items() if u == "erin" and c[marker]]
            if len(places) > 1 or any(on_disk[("erin", f)][marker] > 1 for f in places):
                self.problems.append(f"erin: {marker} in {places} (twice)")
            elif places and places[0] not in allowed:
                self.problems.append(f"erin: {marker} in {places[0]}, expected one of {sorted(allowed)}")
            elif not places and "" not in allowed and folder:
                self.problems.append(f"erin: {marker} lost (expected in {sorted(allowed)})")

    def queue(self, queued: dict[str, str]) -> None:
        for marker in self.ledger.queued:
            rcpt = f"{marker}@remote.example"
            if rcpt not in queued:
                self.problems.append(f"queue: acknowledged {rcpt} not queued")
            elif not (self.box.data / "spool" / f"{queued[rcpt]}.eml").exists():
                self.problems.append(f"queue: {rcpt}'s spool file is missing")

    def imap(self, user: str, on_disk: dict[tuple[str, str], Counter[str]], appenduid: dict[str, tuple[int, int]]) -> None:
        client = self.box.imap(user)
        try:
            _, listed = client.list()
            for line in listed:
                if isinstance(line, bytes):
                    folder = re.sub(rb'^\(.*?\) "?[./]"? ', b"", line).strip(b'"').decode()
                    self.folder(client, user, folder, sum(on_disk.get((user, folder), Counter()).values()), appenduid)
        finally:
            with contextlib.suppress(*Errors):
                client.logout()

    def folder(self, client: imaplib.IMAP4, user: str, folder: str, files: int,
               appenduid: dict[str, tuple[int, int]]) -> None:
        """SELECT's count is the files'; UIDVALIDITY kept (but for erin's renamed folders), UIDNEXT never
        back, no UID at or above it, a UID never names another message, APPENDUIDs name theirs."""
        typ, data = client.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            self.problems.append(f"{user}/{folder}: SELECT {typ} {data}")
            return
        exists = int(data[0] or 0)
        validity = int(client.untagged_responses["UIDVALIDITY"][0])  # type: ignore[arg-type]
        uidnext = int(client.untagged_responses["UIDNEXT"][0])  # type: ignore[arg-type]
        if exists != files:
            self.problems.append(f"{user}/{folder}: SELECT says {exists}, {files} files")
        if not folder.startswith(("F-", "G-")) and self.validity.setdefault((user, folder), validity) != validity:
            self.problems.append(f"{user}/{folder}: UIDVALIDITY {self.validity[(user, folder)]} -> {validity}")
        if uidnext < self.uidnext.get((user, folder, validity), 0):
            self.problems.append(f"{user}/{folder}: UIDNEXT went back {self.uidnext[(user, folder, validity)]} -> {uidnext}")
        self.uidnext[(user, folder, validity)] = uidnext
        if not exists:
            return
        _, fetched = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Crash)])")
        for item in fetched:
            if not isinstance(item, tuple):
                continue
            uid = int(FETCHED.search(item[0]).group(1))  # type: ignore[union-attr]
            m = MARK.search(item[1])
            marker = m.group(1).decode() if m else "?"
            if uid >= uidnext:
                self.problems.append(f"{user}/{folder}: UID {uid} at or above UIDNEXT {uidnext}")
            named = self.uid_names.setdefault((user, folder, validity, uid), marker)
            if named != marker:
                self.problems.append(f"{user}/{folder}: UID {uid} named {named}, now {marker}")
            if (user, folder) == ("alice", "Keep") and marker in appenduid and appenduid[marker] != (validity, uid):
                self.problems.append(f"alice/Keep: {marker} APPENDUID {appenduid[marker]}, now {(validity, uid)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="an empty or missing directory for the box")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--min-run", type=float, default=0.3, help="seconds of traffic before a kill, at least")
    parser.add_argument("--max-run", type=float, default=3.0)
    parser.add_argument("--code", type=Path, help="a checkout whose appliance runs instead of this one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    box = Box(args.root, args.code)
    box.prepare()
    ledger = Ledger()
    checker = Checker(box, ledger)
    box.start()
    try:
        for round_number in range(1, args.rounds + 1):
            traffic = Traffic(box, ledger, random.Random(rng.random()))
            workers = [traffic.mx, traffic.submission, traffic.append, traffic.mover, traffic.flagger,
                       traffic.folders, traffic.pop3]
            threads = [threading.Thread(target=traffic.run, args=(w,), daemon=True) for w in workers]
            for t in threads:
                t.start()
            ran = rng.uniform(args.min_run, args.max_run)
            time.sleep(ran)
            box.kill()
            traffic.stop.set()
            for t in threads:
                t.join(60)
            took = box.start()
            problems = checker.check()
            with ledger.lock:
                counts = dict(ledger.counts)
            print(f"round {round_number}: killed after {ran:.2f} s, start {took:.1f} s, {counts}, "
                  f"{len(problems)} problems", flush=True)
            for p in problems[:40]:
                print("  " + p, flush=True)
            if problems:
                sys.exit(1)
    finally:
        box.stop()


if __name__ == "__main__":
    main()
