"""SIGKILL while sessions change flags and expunge: flag changes and expunges are not fsynced (as
Dovecot's mail_fsync=optimized; appliance/store/mailstore.py), so what must hold after a crash is
that the box is consistent: every message has one UID, its IMAP flags are those in its file's name,
no UID is left without its file, no file without its UID, and each message is as its last
acknowledged command left it or as the command in flight when the box was killed would have (a kill
is not a power cut: what the kernel was handed stays, so an acknowledged change stays too). A power
cut is played by hand after: the database of one moment with the Maildir of another."""

from __future__ import annotations

import contextlib
import imaplib
import random
import re
import shutil
import threading
from pathlib import Path

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
    return served.imap(ALICE, PASSWORD)


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


# --- what a power cut may leave: one side of an unfsynced change without the other -------------------

DB_FILES = ("letterbox.db", "letterbox.db-wal", "letterbox.db-shm")


def _snapshot(served: ServedBox, to: Path) -> None:
    """The stopped box's database files and Alice's Maildir, as they are on disk."""
    to.mkdir()
    for name in DB_FILES:
        if (served.data.root / name).exists():
            shutil.copy2(served.data.root / name, to / name)
    shutil.copytree(_home(served), to / "alice")


def _restore(served: ServedBox, db_from: Path, mail_from: Path) -> None:
    for name in DB_FILES:
        (served.data.root / name).unlink(missing_ok=True)
        if (db_from / name).exists():
            shutil.copy2(db_from / name, served.data.root / name)
    shutil.rmtree(_home(served))
    shutil.copytree(mail_from / "alice", _home(served))


def _home(served: ServedBox) -> Path:
    return served.data.mail / "ourdomain.test" / "alice"


def _state(served: ServedBox) -> dict[int, tuple[int, frozenset[str]]]:
    """Subject number: (UID, flags) as the restarted box answers, after checking that its answer and
    the files agree (one file per message, its name's letters its flags)."""
    client = connect(served)
    client.select("INBOX")
    typ, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    client.logout()
    state: dict[int, tuple[int, frozenset[str]]] = {}
    for item in data:
        if isinstance(item, tuple):
            m = FETCHED.search(item[0])
            n = int(re.search(rb"crash (\d+)", item[1]).group(1))  # type: ignore[union-attr]
            assert m is not None, data
            assert n not in state, data
            state[n] = (int(m.group(1)), frozenset(m.group(2).decode().split()) - {"\\Recent"})
    files = [p for sub in ("new", "cur") for p in (_home(served) / sub).iterdir()]
    assert len(files) == len(state)
    letters = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Deleted": "T"}
    for path in files:
        n = int(re.search(rb"Subject: crash (\d+)", path.read_bytes()).group(1))  # type: ignore[union-attr]
        name_letters = "".join(sorted(c for c in maildir.split_filename(path.name)[1] if c.isupper()))
        assert name_letters == "".join(sorted(letters[f] for f in state[n][1])), (path.name, state[n])
    return state


def test_a_power_cut_that_kept_one_side_of_a_flag_change_or_expunge_leaves_a_consistent_box(
        served_box: ServedBox, tmp_path: Path) -> None:
    """Flag changes and expunges are not fsynced (appliance/store/mailstore.py): a power cut may keep
    the database's commit and lose the rename or unlink, or the other way round. Both mixes, made by
    hand from the files before and after the changes: the box starts, its answer and the files agree,
    a message keeps its UID, its flags are the old or the new ones, and a message whose unlink was
    lost comes back under a UID above every one given out (never the expunged one again)."""
    served_box.add_user(ALICE, PASSWORD)
    client = connect(served_box)
    for n in range(6):
        assert client.append("INBOX", "()", None, message(n))[0] == "OK"
    client.select("INBOX")  # claims them: in cur/, no longer \Recent
    client.logout()
    served_box.stop()
    _snapshot(served_box, tmp_path / "before")
    served_box.start()
    client = connect(served_box)
    client.select("INBOX")
    assert client.uid("STORE", "1", "+FLAGS", "(\\Seen)")[0] == "OK"
    assert client.uid("STORE", "2", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert client.uid("STORE", "3", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"
    client.logout()
    served_box.stop()
    _snapshot(served_box, tmp_path / "after")
    old: dict[int, frozenset[str]] = {n: frozenset() for n in range(6)}
    new = {**old, 0: frozenset({"\\Seen"}), 1: frozenset({"\\Flagged"})}

    # The commits kept, the renames and the unlink lost.
    _restore(served_box, db_from=tmp_path / "after", mail_from=tmp_path / "before")
    served_box.start()
    state = _state(served_box)
    served_box.stop()
    assert set(state) == set(range(6))
    for n in (0, 1, 3, 4, 5):
        assert state[n][0] == n + 1, state
        assert state[n][1] in (old[n], new[n]), state
    assert state[2][0] > 6, state  # back, as a new message

    # The renames and the unlink kept, the commits lost.
    _restore(served_box, db_from=tmp_path / "before", mail_from=tmp_path / "after")
    served_box.start()
    state = _state(served_box)
    assert set(state) == {0, 1, 3, 4, 5}
    for n in state:
        assert state[n][0] == n + 1, state
        assert state[n][1] in (old[n], new[n]), state
