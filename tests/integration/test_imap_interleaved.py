"""Several sessions of one folder at once, each APPENDing, COPYing, MOVEing, changing flags and
expunging its own messages, pipelined, while it watches the others' changes (issue 19: STORE, EXPUNGE
and APPEND let the folder lock go for their trips to the database's thread). What each session is
told must stay an IMAP view (RFC 3501 2.3.1.1, 7.4.1; RFC 7162 3.1): a sequence number names the same
UID from one response to the next, UIDs ascend and a new message's is above every UID the session
saw, an expunged UID never comes back, a message's MODSEQ never goes down; and at the end every
session, and a fresh SELECT, shows exactly the messages acknowledged as added and not as removed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store.model import StoreError
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "carol@example.test"
PASSWORD = "correct horse battery staple"
SESSIONS = 3
STEPS = 120
DELIVERIES = 20  # rounds of deliveries, a few at once (one group commit), while the sessions work

_EXISTS = re.compile(rb"^\* (\d+) EXISTS\r\n$")
_EXPUNGE = re.compile(rb"^\* (\d+) EXPUNGE\r\n$")
_FETCH = re.compile(rb"^\* (\d+) FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)")
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")
_COPYUID = re.compile(rb"\[COPYUID \d+ \S+ (\S+)\]")
_HIGHEST = re.compile(rb"\[HIGHESTMODSEQ (\d+)\]")


class View:
    """One session's view of the selected folder, from the responses it was sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        # By sequence number - 1: the UID, or for a message not told its UID yet (EXISTS) the
        # highest UID the session knew then, as a negative number: its UID must be above it.
        self.uids: list[int] = []
        self.expunged: set[int] = set()
        self.modseq: dict[int, int] = {}
        self.highest = 0  # the highest UID it was told
        self.problems: list[str] = []

    def take(self, lines: list[bytes]) -> None:
        for line in lines:
            if m := _EXISTS.match(line):
                n = int(m.group(1))
                if n < len(self.uids):
                    self.problems.append(f"{self.name}: EXISTS {n} below {len(self.uids)} without EXPUNGE: {line!r}")
                self.uids.extend([-self.highest] * (n - len(self.uids)))
            elif m := _EXPUNGE.match(line):
                n = int(m.group(1))
                if not 1 <= n <= len(self.uids):
                    self.problems.append(f"{self.name}: EXPUNGE of {n} with {len(self.uids)} messages")
                    continue
                uid = self.uids.pop(n - 1)
                if uid > 0:
                    self.expunged.add(uid)
            elif m := _FETCH.match(line):
                n = int(m.group(1))
                if u := _UID.search(line):
                    self._fetched(n, int(u.group(1)), line)
                elif 1 <= n <= len(self.uids) and self.uids[n - 1] > 0:  # (a flag update without its UID)
                    self._modseq(self.uids[n - 1], line)
                else:
                    self.problems.append(f"{self.name}: FETCH of {n} with {len(self.uids)} messages: {line!r}")

    def _fetched(self, n: int, uid: int, line: bytes) -> None:
        if not 1 <= n <= len(self.uids):
            self.problems.append(f"{self.name}: FETCH of {n} with {len(self.uids)} messages: {line!r}")
            return
        known = self.uids[n - 1]
        if known <= 0:
            if uid <= -known:
                self.problems.append(f"{self.name}: new message {n} has UID {uid}, not above {-known}: {line!r}")
            self.uids[n - 1] = uid
            self.highest = max(self.highest, uid)
            told = [u for u in self.uids if u > 0]
            if told != sorted(set(told)):
                self.problems.append(f"{self.name}: UIDs not ascending: {told}")
        elif known != uid:
            self.problems.append(f"{self.name}: message {n} was UID {known}, now {uid}: {line!r}")
        if uid in self.expunged:
            self.problems.append(f"{self.name}: UID {uid} came back after its EXPUNGE: {line!r}")
        self._modseq(uid, line)

    def _modseq(self, uid: int, line: bytes) -> None:
        if m := _MODSEQ.search(line):
            modseq = int(m.group(1))
            if modseq < self.modseq.get(uid, 0):
                self.problems.append(f"{self.name}: UID {uid}'s MODSEQ went from {self.modseq[uid]} to {modseq}")
            self.modseq[uid] = modseq

    def known(self) -> list[int]:
        assert all(u > 0 for u in self.uids), (self.name, self.uids)
        return list(self.uids)


class Worker(threading.Thread):
    def __init__(self, raw: RawImap, number: int) -> None:
        super().__init__(name=f"session-{number}", daemon=True)
        self.raw, self.number = raw, number
        self.view = View(self.name)
        self.rng = random.Random(2911 + number)
        self.added: set[int] = set()  # acknowledged in INBOX (APPENDUID, COPYUID)
        self.removed: set[int] = set()  # acknowledged as gone (UID EXPUNGE, UID MOVE)
        # A UID MOVE or COPY answered OK without COPYUID, or a COPY answered NO: right only for a message
        # gone meanwhile (RFC 4315 and RFC 6851 4.3: what is copied or moved is named in COPYUID); the
        # test's end checks none of them is still there. Only the other program's unlinks make one.
        self.unmoved: set[int] = set()
        self.error: BaseException | None = None
        self.tags = 0

    def tag(self) -> bytes:
        self.tags += 1
        return b"t%d" % self.tags

    def run(self) -> None:
        try:
            for step in range(STEPS):
                self.step(step)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def command(self, text: bytes) -> list[bytes]:
        tag = self.tag()
        reply = self.raw.command(tag, text)
        self.view.take(reply)
        assert reply[-1].startswith(tag + b" OK"), (self.name, text, reply[-3:])
        return reply

    def pipelined(self, texts: list[bytes]) -> list[list[bytes]]:
        tags = [self.tag() for _ in texts]
        self.raw.send(b"".join(t + b" " + text + b"\r\n" for t, text in zip(tags, texts, strict=True)))
        replies = []
        for t, text in zip(tags, texts, strict=True):
            reply = self.raw.until_tagged(t)
            self.view.take(reply)
            assert reply[-1].startswith(t + b" OK"), (self.name, text, reply[-3:])
            replies.append(reply)
        return replies

    def append(self) -> None:
        body = f"Subject: {self.name} {self.tags}\r\n\r\nhello\r\n".encode()
        tag = self.tag()
        self.raw.send(tag + b" APPEND INBOX (%s) {%d}\r\n" % (self.rng.choice([b"", b"\\Seen", b"$Later"]), len(body)))
        first = self.raw.line()
        assert first.startswith(b"+"), first
        self.raw.send(body + b"\r\n")
        reply = self.raw.until_tagged(tag)
        self.view.take(reply)
        assert reply[-1].startswith(tag + b" OK"), reply
        m = _APPENDUID.search(reply[-1])
        assert m, reply
        self.added.add(int(m.group(1)))

    def mine(self) -> int | None:
        live = sorted(self.added - self.removed)
        return self.rng.choice(live) if live else None

    def step(self, step: int) -> None:
        what = self.rng.random()
        if what < 0.35 or not (self.added - self.removed):
            self.append()
        elif what < 0.55:  # a flag change on anyone's message (none is ever \Deleted but by its owner)
            seen = [u for u in self.view.uids if u > 0]
            if seen:
                anyone = self.rng.choice(seen)
                sign = self.rng.choice([b"+", b"-"])
                flag = self.rng.choice([b"\\Flagged", b"\\Answered", b"$Work"])
                self.command(b"UID STORE %d %sFLAGS (%s)" % (anyone, sign, flag))
        elif what < 0.75:  # an expunge of one of its own, pipelined with a look at everything
            uid = self.mine()
            assert uid is not None
            self.pipelined([b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid, b"UID EXPUNGE %d" % uid,
                            b"UID FETCH 1:* (FLAGS)"])
            self.removed.add(uid)
        elif what < 0.85:
            uid = self.mine()
            assert uid is not None
            tag = self.tag()
            reply = self.raw.command(tag, b"UID COPY %d INBOX" % uid)
            self.view.take(reply)
            if b"NO [CANNOT]" in reply[-1]:
                self.unmoved.add(uid)
                return
            assert reply[-1].startswith(tag + b" OK"), reply
            if m := _COPYUID.search(reply[-1]):
                self.added.add(int(m.group(1)))
            else:
                self.unmoved.add(uid)
        elif what < 0.92:
            uid = self.mine()
            assert uid is not None
            reply = self.command(b"UID MOVE %d Elsewhere" % uid)
            if any(_COPYUID.search(line) for line in reply):
                self.removed.add(uid)
            else:
                self.unmoved.add(uid)
        else:
            self.command(b"NOOP")
        self.command(b"UID FETCH 1:* (FLAGS)")


class Deliverer(threading.Thread):
    """Deliveries to the folder (new/, \\Recent, claimed by the sessions' looks), several at once."""

    def __init__(self, box: BoxHandle) -> None:
        super().__init__(name="deliverer", daemon=True)
        self.box = box
        self.added: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        store = self.box.services.store
        try:
            for n in range(DELIVERIES):
                many = [store.deliver([USER], f"Subject: delivery {n}.{i}\r\n\r\nhi\r\n".encode()) for i in range(4)]
                for result in self.box.run(_together(many)):
                    uid = result[USER]
                    assert isinstance(uid, int), result
                    self.added.add(uid)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


class Foreign(threading.Thread):
    """Another program on the same Maildir (a MUA reading it directly): marks files seen by renaming
    them into cur/ with an S, the other letters kept, at any moment."""

    def __init__(self, home: Path, unlink: bool) -> None:
        super().__init__(name="foreign", daemon=True)
        self.home, self.unlink = home, unlink
        self.unlinked = 0
        self.stop = threading.Event()
        self.renamed = 0
        self.rng = random.Random(77)

    def run(self) -> None:
        while not self.stop.is_set():
            names = [(sub, n) for sub in ("new", "cur") for n in os.listdir(self.home / sub) if not n.startswith(".")]
            if not names:
                time.sleep(0.01)
                continue
            sub, name = self.rng.choice(names)
            base, _, info = name.partition(":2,")
            letters = "".join(sorted(set(info) ^ {"S"}))
            if self.unlink and self.rng.random() < 0.1:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.home / sub / name)
                    self.unlinked += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.home / sub / name, self.home / "cur" / f"{base}:2,{letters}")
                self.renamed += 1
            time.sleep(0.002)


class Idler(threading.Thread):
    """A session that only IDLEs: what it is told while idling is an IMAP view too."""

    def __init__(self, raw: RawImap) -> None:
        super().__init__(name="idler", daemon=True)
        self.raw = raw
        self.view = View("idler")
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                tag = b"i%d" % n
                self.raw.send(tag + b" IDLE\r\n")
                lines = []  # (the updates owed come first, before the continuation: RFC 3501 5.2)
                while not (line := self.raw.line()).startswith(b"+"):
                    assert line.startswith(b"* "), line
                    lines.append(line)
                self.raw.sock.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    while True:
                        lines.append(self.raw.line())
                self.raw.sock.settimeout(60)
                self.raw.send(b"DONE\r\n")
                lines += self.raw.until_tagged(tag)
                self.view.take(lines)
                assert lines[-1].startswith(tag + b" OK"), lines[-1]
                fetched = self.raw.command(b"f%d" % n, b"UID FETCH 1:* (FLAGS)")
                self.view.take(fetched)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


async def _together(coros: list[Coroutine[Any, Any, dict[str, int | StoreError]]]) -> list[dict[str, int | StoreError]]:
    return list(await asyncio.gather(*coros))


@pytest.fixture
def sessions(box: BoxHandle) -> Iterator[list[RawImap]]:
    box.add_user(USER, PASSWORD)
    opened: list[RawImap] = []
    try:
        for _ in range(SESSIONS + 2):
            raw = RawImap(box.port("imaps"), box.client_context, timeout=60)
            opened.append(raw)
            raw.login(USER, PASSWORD)
        yield opened
    finally:
        for raw in opened:
            raw.close()


@pytest.mark.parametrize("unlink", [False, True], ids=["renames", "renames-and-unlinks"])
def test_sessions_changing_one_folder_at_once_each_see_a_true_imap_view(box: BoxHandle, sessions: list[RawImap],
                                                                        unlink: bool) -> None:
    assert sessions[0].command(b"c", b"CREATE Elsewhere")[-1].startswith(b"c OK")
    workers = [Worker(raw, n) for n, raw in enumerate(sessions[:SESSIONS])]
    for w in workers:
        assert w.raw.command(b"e", b"ENABLE CONDSTORE")[-1].startswith(b"e OK")
        w.view.take(w.raw.command(b"s", b"SELECT INBOX"))
    idler = Idler(sessions[SESSIONS + 1])
    idler.view.take(idler.raw.command(b"s", b"SELECT INBOX"))
    idler.start()
    deliverer = Deliverer(box)
    foreign = Foreign(box.data.mail / "example.test" / "carol", unlink)
    foreign.start()
    changers: list[Worker | Deliverer] = [*workers, deliverer]
    for c in changers:
        c.start()
    for c in changers:
        c.join(timeout=300)
        assert not c.is_alive(), c.name
        assert c.error is None, (c.name, repr(c.error))
    foreign.stop.set()
    foreign.join()
    idler.stop.set()
    idler.join(timeout=60)
    assert idler.error is None, repr(idler.error)
    print("foreign renames", foreign.renamed, "unlinks", foreign.unlinked,
          "unmoved", sum(len(w.unmoved) for w in workers))

    added = set().union(deliverer.added, *(w.added for w in workers))
    removed = set().union(*(w.removed for w in workers))
    expected = sorted(added - removed)
    fresh = View("fresh")
    fresh.take(sessions[SESSIONS].command(b"s", b"SELECT INBOX (CONDSTORE)"))
    fresh.take(sessions[SESSIONS].command(b"f", b"UID FETCH 1:* (FLAGS MODSEQ)"))
    unmoved = set().union(*(w.unmoved for w in workers))
    # A message a MOVE left in place with OK (or a COPY said was expunged) while it still existed.
    assert not unmoved & set(fresh.known()), sorted(unmoved & set(fresh.known()))
    if not unlink:
        assert not unmoved, sorted(unmoved)
    if unlink:  # the other program's expunges are not counted: none of its own may come back
        assert set(fresh.known()) <= set(expected), sorted(set(fresh.known()) - set(expected))
        expected = fresh.known()
    assert fresh.known() == expected, (sorted(set(fresh.known()) - set(expected)), sorted(set(expected) - set(fresh.known())))
    highest = int(_HIGHEST.search(b"".join(sessions[SESSIONS].command(b"s2", b"EXAMINE INBOX"))).group(1))  # type: ignore[union-attr]
    idler.view.take(idler.raw.command(b"n", b"NOOP"))
    idler.view.take(idler.raw.command(b"f", b"UID FETCH 1:* (FLAGS MODSEQ)"))
    assert idler.view.known() == expected
    assert not idler.view.problems, idler.view.problems[:10]
    for w in workers:
        w.command(b"NOOP")
        w.command(b"UID FETCH 1:* (FLAGS MODSEQ)")
        assert w.view.known() == expected, w.name
        assert not w.view.problems, w.view.problems[:10]
        assert max(w.view.modseq.values(), default=0) <= highest, w.name
    assert not fresh.problems, fresh.problems
