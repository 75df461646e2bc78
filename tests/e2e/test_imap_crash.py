"""SIGKILL while sessions change flags and expunge: flag changes and expunges are not fsynced (as
Dovecot's mail_fsync=optimized; appliance/store/mailstore.py), so what must hold after a crash is
that the box is consistent: every message has one UID, its IMAP flags are those in its file's name,
no UID is left without its file, no file without its UID, and each message is as its last
acknowledged command left it or as the command in flight when the box was killed would have (a kill
is not a power cut: what the kernel was handed stays, so an acknowledged change stays too)."""

from __future__ import annotations

import contextlib
import imaplib
import random
import re
import threading

import pytest

from appliance.store import maildir
from tests.conftest import ServedBox
from tests.support.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
MESSAGES = 60
SESSIONS = 3
KILL_AFTER = 150  # acknowledged changes before the kill
FLAG_CHOICES = ("\\Seen", "\\Flagged", "\\Answered", "$Later")
FETCHED = re.compile(rb"UID (\d+) FLAGS \(([^)]*)\)")


def message(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: crash {n}\r\n\r\nbody {n}\r\n".encode()


def connect(served: ServedBox) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=20)
    client.login(ALICE, PASSWORD)
    return client


class Changer:
    """One session's share of the messages (UID % SESSIONS): random flag sets and expunges, each
    recorded when it was sent (in flight) and when its OK came (acknowledged)."""

    def __init__(self, served: ServedBox, share: list[int], seed: int) -> None:
        self.served, self.share, self.rng = served, list(share), random.Random(seed)
        self.acked: dict[int, frozenset[str] | None] = {}  # UID: last acknowledged flags, None: expunged
        self.in_flight: dict[int, frozenset[str] | None] = {}
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            client = connect(self.served)
        except (OSError, imaplib.IMAP4.error):
            return
        try:
            client.select("INBOX")
            while not self.stop.is_set() and self.share:
                uid = self.rng.choice(self.share)
                if self.rng.random() < 0.1:
                    self.in_flight = {uid: None}
                    # UID EXPUNGE (RFC 4315): only this session's message goes, not others' \Deleted.
                    ok = client.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
                    ok = ok and client.uid("EXPUNGE", str(uid))[0] == "OK"
                    if ok:
                        self.share.remove(uid)
                else:
                    flags = frozenset(f for f in FLAG_CHOICES if self.rng.random() < 0.5)
                    self.in_flight = {uid: flags}
                    ok = client.uid("STORE", str(uid), "FLAGS.SILENT", f"({' '.join(sorted(flags))})")[0] == "OK"
                if ok:
                    self.acked.update(self.in_flight)
                    self.in_flight = {}
                    self.count += 1
        except (OSError, imaplib.IMAP4.error):
            return  # the kill
        finally:
            with contextlib.suppress(OSError):
                client.shutdown()


def test_sigkill_during_flag_changes_and_expunges_leaves_the_index_and_files_agreeing(served_box: ServedBox) -> None:
    served_box.add_user(ALICE, PASSWORD)
    client = connect(served_box)
    for n in range(MESSAGES):
        assert client.append("INBOX", "()", None, message(n))[0] == "OK"
    client.logout()
    uids = list(range(1, MESSAGES + 1))
    changers = [Changer(served_box, [u for u in uids if u % SESSIONS == i], seed=i) for i in range(SESSIONS)]
    threads = [threading.Thread(target=c.run) for c in changers]
    for t in threads:
        t.start()
    wait_until(lambda: sum(c.count for c in changers) >= KILL_AFTER or not any(t.is_alive() for t in threads),
               seconds=120, what=f"{KILL_AFTER} acknowledged changes", interval=0.002)
    served_box.kill()
    for c in changers:
        c.stop.set()
    for t in threads:
        t.join(timeout=60)
    assert sum(c.count for c in changers) >= KILL_AFTER
    served_box.start()

    client = connect(served_box)
    client.select("INBOX")
    typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
    assert typ == "OK"
    seen = {int(m.group(1)): frozenset(m.group(2).decode().split())
            for item in data if item for m in [FETCHED.search(item if isinstance(item, bytes) else item[0])] if m}
    client.logout()
    served_box.stop()

    for i, c in enumerate(changers):
        for uid in (u for u in uids if u % SESSIONS == i):
            possible = {c.acked.get(uid, frozenset())}
            if uid in c.in_flight:
                possible.add(c.in_flight[uid])
            now = seen.get(uid)
            if now is not None:
                now = now - {"\\Recent", "\\Deleted"}  # a \Deleted whose EXPUNGE was in flight
            assert now in possible, f"UID {uid}: {now} after the restart, expected one of {possible}"

    # The files agree with the index: one file per UID, its name's flags the message's.
    home = served_box.data.mail / "ourdomain.test" / "alice"
    files = [p for sub in ("new", "cur") for p in (home / sub).iterdir()]
    assert len(files) == len(seen)
    letters = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Deleted": "T"}
    by_subject: dict[int, str] = {}
    for path in files:
        n = int(re.search(rb"Subject: crash (\d+)", path.read_bytes()).group(1))  # type: ignore[union-attr]
        by_subject[n + 1] = maildir.split_filename(path.name)[1]  # UIDs were given in APPEND order
    assert set(by_subject) == set(seen)
    for uid, flags in seen.items():
        system = "".join(sorted(letters[f] for f in flags if f in letters))
        assert "".join(sorted(c for c in by_subject[uid] if c.isupper())) == system, f"UID {uid}"
        assert any(c.islower() for c in by_subject[uid]) == ("$Later" in flags), f"UID {uid}"
