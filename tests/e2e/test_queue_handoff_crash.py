"""The queue hands a message to a remote MX and the box is SIGKILLed before the delivery is recorded:
the fake MX holds its 250 until strace holds the box's next write to the database's WAL before it is
made (the record follows the 250, and one thread writes the database), then the kill comes. The message
is sent again after the restart (at least once: a duplicate is allowed, a loss is not), and then leaves
the queue with its spool file. (Holding the first WAL fsync instead missed the window when no other
durable commit came first: the record's own write was in the page cache, which a kill keeps.)"""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ServedBox
from tests.support.dns_server import ZoneServer
from tests.support.kill_points import held_after
from tests.support.polling import wait_until
from tests.support.receivers import Receiver, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"


def settings(db: Path, values: dict[str, str]) -> None:
    with sqlite3.connect(db, timeout=30) as conn:
        conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?)"
                         " ON CONFLICT(key) DO UPDATE SET value = excluded.value", list(values.items()))
    conn.close()


def queued(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        [(n,)] = conn.execute("SELECT COUNT(*) FROM queue_messages").fetchall()
    conn.close()
    return int(n)


def test_a_kill_between_the_remote_250_and_its_record_sends_the_message_again(served_box: ServedBox) -> None:
    zone = ZoneServer(ttl=0)
    zone.start()
    port = free_port(("127.0.0.2",))
    replies = threading.Event()
    receiver = Receiver("127.0.0.2", port, reply_when=replies)
    receiver.start()
    try:
        zone.set("far.test", "MX", ["10 mx.far.test."])
        zone.set("mx.far.test", "A", ["127.0.0.2"])
        served_box.stop()
        served_box.add_user(ALICE, PASSWORD)
        settings(served_box.data.db, {"dns_resolver": zone.address, "outbound_port": str(port), "queue_hold": "1",
                                      "queue_retry_intervals": "1"})
        served_box.start()
        with smtplib.SMTP("127.0.0.1", served_box.port("submission"), timeout=30) as client:
            client.starttls(context=served_box.client_context)
            client.login(ALICE, PASSWORD)
            client.sendmail(ALICE, ["bob@far.test"], f"From: <{ALICE}>\r\nSubject: handoff\r\n\r\nbody\r\n".encode())
        assert served_box.proc is not None
        pid = served_box.proc.pid
        settings(served_box.data.db, {"queue_hold": "0"})
        receiver.wait(1, timeout=60)  # the box waits for the 250
        with held_after(pid, "pwrite64,write,pwritev", served_box.data.root / "letterbox.db-wal", before=True):
            replies.set()
            time.sleep(2)  # the record's write is held by now (or not yet begun): never made
            os.kill(pid, signal.SIGKILL)
        served_box.kill()
        assert queued(served_box.data.db) == 1, "the delivery was recorded before the kill"

        served_box.start()
        [first, again] = receiver.wait(2, timeout=60)
        for sent in (first, again):  # the same message (signed again: the DKIM signature's time differs)
            assert b"Subject: handoff\r\n" in sent.data
            assert sent.data.endswith(b"\r\n\r\nbody\r\n")
            assert sent.rcpt_tos == ("bob@far.test",)
        wait_until(lambda: queued(served_box.data.db) == 0, seconds=60, what="the queue empty")
        wait_until(lambda: not any(served_box.data.spool.glob("*.eml")), seconds=30, what="the spool file gone")
    finally:
        receiver.stop()
        zone.stop()
