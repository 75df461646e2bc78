"""A backup made while SMTP deliveries and IMAP flag changes keep going (issue 14): the restored box is
consistent (every indexed message has its file, every file is indexed, no file is cut short) and no
message acknowledged before the backup started is missing."""

from __future__ import annotations

import asyncio
import imaplib
import os
import random
import smtplib
import sqlite3
import threading
from pathlib import Path

from appliance import backup
from appliance.config import DataLayout
from appliance.store import maildir
from tests.conftest import BoxHandle

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@one.test"


def message(tag: str) -> bytes:
    return (f"From: x@far.test\r\nTo: {ALICE}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@far.test>\r\n\r\n"
            + "line of text\r\n" * 200 + f"END {tag}\r\n").encode()


def test_backup_during_deliveries_and_flag_changes(box: BoxHandle, tmp_path: Path) -> None:  # noqa: C901  two load threads and the checks read best in one place
    box.add_user(ALICE, PASSWORD)
    for n in range(300):
        box.run(box.services.store.deliver([ALICE], message(f"pre{n}")))
    stop = threading.Event()
    acked: list[tuple[str, int]] = []  # (tag, backups started before its 250)
    started = [0]
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
                n = 0
                while not stop.is_set():
                    tag = f"live{n}"
                    client.sendmail("x@far.test", [ALICE], message(tag))
                    acked.append((tag, started[0]))
                    n += 1
        except Exception as exc:  # noqa: BLE001  whatever ends the thread is reported by the test
            errors.append(exc)

    def flag() -> None:
        try:
            with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context) as imap:
                imap.login(ALICE, PASSWORD)
                imap.select("INBOX")  # moves new/ to cur/ (\Recent claimed)
                rng = random.Random(7)
                while not stop.is_set():
                    uid = rng.randint(1, 300)
                    flags = rng.choice(["\\Seen", "\\Flagged", "$Work", "\\Answered"])
                    imap.uid("STORE", str(uid), rng.choice(["+FLAGS", "-FLAGS"]), f"({flags})")
                    imap.noop()
        except Exception as exc:  # noqa: BLE001  whatever ends the thread is reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=deliver), threading.Thread(target=flag)]
    for t in threads:
        t.start()
    try:
        while len(acked) < 20 and not errors:
            threading.Event().wait(0.02)
        kit = box.run(backup.make_key(box.services.db, box.services.events, "x"))
        before = {tag for tag, _ in acked}
        started[0] = 1
        made = box.run(backup.create(box.services.db, box.services.events, box.data))
        after = {tag for tag, _ in acked}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert len(after) > len(before), "deliveries went on during the backup"

    fresh = DataLayout(tmp_path / "restored")
    asyncio.run(backup.restore(fresh, made.path, backup.Secret.from_text(kit.text)))
    conn = sqlite3.connect(fresh.db)
    try:
        indexed = {b for (b,) in conn.execute("SELECT basename FROM messages")}
    finally:
        conn.close()
    inbox = fresh.mail / "one.test" / "alice"
    on_disk: dict[str, bytes] = {}
    for sub in ("cur", "new"):
        for name in os.listdir(inbox / sub):
            on_disk[maildir.split_filename(name)[0]] = (inbox / sub / name).read_bytes()
    assert set(on_disk) == indexed  # index = files
    tags = set()
    for data in on_disk.values():
        tag = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert data.endswith(f"END {tag}\r\n".encode())  # fully in, never cut short
        tags.add(tag)
    assert {f"pre{n}" for n in range(300)} <= tags
    assert before <= tags  # acknowledged before the backup started: in it
