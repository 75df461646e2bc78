"""SIGKILL at chosen points of IMAP and POP3 commands (tests/support/kill_points.py: strace holds the
thread right after the system call, the test sees its effect on disk and kills the box): after the
MOVE's rename and before its commit, after COPY's link, after EXPUNGE's and POP3 QUIT's unlink, after a
folder RENAME's directory rename. After the restart: a message is in one of MOVE's folders, once; every
folder's count is its files'; no UID names another message than before; nothing acknowledged is gone.
(bench/crash_loop.py kills at random moments under mixed traffic, round after round.)"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import re
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ServedBox
from tests.support.kill_points import LINKS, RENAMES, UNLINKS, held_after
from tests.support.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
SUBJECT = re.compile(rb"Subject: (m\d+)")
UID = re.compile(rb"UID (\d+)")


def home(served: ServedBox, folder: str = "INBOX") -> Path:
    root = served.data.mail / "ourdomain.test" / "alice"
    return root if folder == "INBOX" else root / f".{folder}"


def files(served: ServedBox, folder: str) -> list[bytes]:
    """The folder's message files. The waits below watch the box at work: a file (or directory) it
    unlinks or renames between the listing and the read is not there (a loaded run read a file POP3's
    QUIT had just unlinked: FileNotFoundError)."""
    found: list[bytes] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            for p in list((home(served, folder) / sub).iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    found.append(p.read_bytes())
    return found


def subjects_on_disk(served: ServedBox, folder: str) -> list[str]:
    return sorted(m.group(1).decode() for raw in files(served, folder) for m in [SUBJECT.search(raw)] if m)


def contents(client: imaplib.IMAP4, folder: str) -> tuple[int, dict[int, str]]:
    """(UIDVALIDITY, UID -> subject) as the box answers."""
    typ, _ = client.select(folder)
    assert typ == "OK", folder
    validity = int(client.untagged_responses["UIDVALIDITY"][0])  # type: ignore[arg-type]
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    found = {}
    for item in data:
        if isinstance(item, tuple):
            uid, subject = UID.search(item[0]), SUBJECT.search(item[1])
            assert uid is not None, item
            assert subject is not None, item
            found[int(uid.group(1))] = subject.group(1).decode()
    return validity, found


def agree(served: ServedBox, client: imaplib.IMAP4, folder: str) -> dict[int, str]:
    """The box's answer and the files agree; returns UID -> subject."""
    _, found = contents(client, folder)
    assert sorted(found.values()) == subjects_on_disk(served, folder), folder
    return found


def killed_during(served: ServedBox, client: imaplib.IMAP4 | poplib.POP3, syscalls: str,
                  command: Callable[[], object], done: Callable[[], bool]) -> None:
    """Run `command` (a call of `client`'s) with the box's threads held after their first of
    `syscalls`; once `done()` sees the call's effect on disk, SIGKILL the box (and close `client`)."""
    assert served.proc is not None
    with held_after(served.proc.pid, syscalls):
        worker = threading.Thread(target=_quietly, args=(command,), daemon=True)
        worker.start()
        wait_until(done, seconds=30, interval=0.01, what="the held call's effect on disk")
        os.kill(served.proc.pid, signal.SIGKILL)  # gone once strace lets go of it, as the block ends
    served.kill()
    worker.join(30)
    with contextlib.suppress(*_GONE):
        if isinstance(client, imaplib.IMAP4):
            client.shutdown()
        else:
            client.close()


_GONE = (OSError, EOFError, imaplib.IMAP4.abort, imaplib.IMAP4.error, poplib.error_proto)


def _quietly(command: Callable[[], object]) -> None:
    with contextlib.suppress(*_GONE):
        command()


def mailbox_with(served: ServedBox, folders: dict[str, int]) -> imaplib.IMAP4:
    """Alice with `count` messages m<folder-index><n> in each folder; a session with INBOX selected."""
    served.add_user(ALICE, PASSWORD)
    client = served.imap(ALICE, PASSWORD)
    n = 0
    for folder, count in folders.items():
        if folder != "INBOX":
            assert client.create(folder)[0] == "OK"
        for _ in range(count):
            assert client.append(folder, "()", None, f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode())[0] == "OK"
            n += 1
    assert client.select("INBOX")[0] == "OK"
    return client


def test_kill_after_moves_rename_before_its_commit(served_box: ServedBox) -> None:
    client = mailbox_with(served_box, {"INBOX": 3, "Other": 0})
    killed_during(served_box, client, RENAMES, lambda: client.uid("MOVE", "2", "Other"),
                  lambda: len(files(served_box, "Other")) == 1)
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    inbox, other = agree(served_box, client, "INBOX"), agree(served_box, client, "Other")
    assert sorted([*inbox.values(), *other.values()]) == ["m0", "m1", "m2"]  # once, in one of them
    assert inbox.get(1) == "m0"
    assert inbox.get(3) == "m2"
    client.logout()


def test_kill_after_copys_link_before_its_commit(served_box: ServedBox) -> None:
    client = mailbox_with(served_box, {"INBOX": 3, "Other": 0})
    killed_during(served_box, client, LINKS, lambda: client.uid("COPY", "1:3", "Other"),
                  lambda: len(files(served_box, "Other")) >= 1)
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    assert agree(served_box, client, "INBOX") == {1: "m0", 2: "m1", 3: "m2"}
    other = agree(served_box, client, "Other")
    assert len(set(other.values())) == len(other)  # a copy at most once
    client.logout()


def test_kill_after_expunges_unlink_before_its_commit(served_box: ServedBox) -> None:
    client = mailbox_with(served_box, {"INBOX": 3})
    assert client.uid("STORE", "2", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    killed_during(served_box, client, UNLINKS, lambda: client.uid("EXPUNGE", "2"),
                  lambda: len(files(served_box, "INBOX")) == 2)
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    assert agree(served_box, client, "INBOX") == {1: "m0", 3: "m2"}
    assert client.append("INBOX", "()", None, b"Subject: m9\r\n\r\nnew\r\n")[0] == "OK"
    assert agree(served_box, client, "INBOX") == {1: "m0", 3: "m2", 4: "m9"}  # UID 2 never again
    client.logout()


def test_kill_after_pop3_quits_unlink_before_its_commit(served_box: ServedBox) -> None:
    client = mailbox_with(served_box, {"INBOX": 3})
    client.logout()
    pop = poplib.POP3_SSL("localhost", served_box.port("pop3s"), context=served_box.client_context, timeout=20)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    pop.dele(1)
    pop.dele(2)
    killed_during(served_box, pop, UNLINKS, pop.quit, lambda: len(files(served_box, "INBOX")) < 3)
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    left = agree(served_box, client, "INBOX")
    assert left.get(3) == "m2"
    assert set(left) <= {1, 2, 3}
    client.logout()


def test_kill_after_a_folder_renames_directory_before_its_commit(served_box: ServedBox) -> None:
    client = mailbox_with(served_box, {"INBOX": 1, "Work": 2})
    assert client.subscribe("Work")[0] == "OK"
    validity, before = contents(client, "Work")
    # Its dovecot-uidlist (written a second after a change) names its UIDVALIDITY on the disk.
    wait_until(lambda: (home(served_box, "Work") / "dovecot-uidlist").exists(), seconds=30, what="the uidlist")
    killed_during(served_box, client, RENAMES, lambda: client.rename("Work", "Done"),
                  lambda: home(served_box, "Done").is_dir())
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    _, listed = client.list()
    names = {line.rsplit(b" ", 1)[-1].strip(b'"').decode() for line in listed if isinstance(line, bytes)}
    assert "Done" in names, names
    assert "Work" not in names, names
    assert sorted(agree(served_box, client, "Done").values()) == ["m1", "m2"]
    _, subscribed = client.lsub()
    assert any(line.endswith(b"Done") or line.endswith(b'"Done"') for line in subscribed if isinstance(line, bytes)), subscribed
    assert contents(client, "Done") == (validity, before)  # RFC 3501 6.3.5: UIDs and UIDVALIDITY stay
    # The old name made again is a new folder: none of the old UIDs there.
    assert client.create("Work")[0] == "OK"
    assert agree(served_box, client, "Work") == {}
    assert contents(client, "Work")[0] != validity
    client.logout()
    served_box.stop()
    assert "a RENAME cut short" in served_box.log_path.read_text()


def test_kill_after_a_folder_deletes_directory_step_before_its_commit(served_box: ServedBox) -> None:
    """The folder's row went on naming a directory that was gone: the text indexer tried it every few
    minutes, with a traceback, after every start, for ever."""
    client = mailbox_with(served_box, {"INBOX": 1, "Old": 2})
    killed_during(served_box, client, RENAMES, lambda: client.delete("Old"),
                  lambda: not home(served_box, "Old").is_dir())
    served_box.start()
    client = served_box.imap(ALICE, PASSWORD)
    _, listed = client.list()
    assert not any(line.endswith(b"Old") for line in listed if isinstance(line, bytes)), listed
    assert agree(served_box, client, "INBOX") == {1: "m0"}
    client.logout()
    served_box.stop()
    with contextlib.closing(sqlite3.connect(served_box.data.db)) as db:
        assert db.execute("SELECT COUNT(*) FROM folders WHERE name = 'Old'").fetchone() == (0,)
    log = served_box.log_path.read_text()
    assert "folder Old is gone from the disk" in log
    assert "left to the scan" not in log
