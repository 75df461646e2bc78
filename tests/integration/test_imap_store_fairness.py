"""Fairness (issue 19): a big STORE, MOVE or EXPUNGE in one session does not stall the other sessions of
the same folder. It holds the folder's lock one slice of messages at a time (mailstore._slices), so
another session's NOOP is answered while the command is still under way, not after it: with the
lock held across all the renames and their commit, a NOOP waited 1.3 s for a 20k STORE (11 ms
idle). Counted, not timed: in how many steps the other session's NOOPs tell of the command's
changes."""

from __future__ import annotations

import threading

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
MESSAGES = 5000
BODY = b"Subject: hello\r\n\r\nhello\r\n"


def fill(box: BoxHandle) -> None:
    """MESSAGES files copied in, named as Dovecot names them (both sizes: indexed without a stat)."""
    folder = box.data.mail / "example.test" / "alice"
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    size = len(BODY)
    for n in range(MESSAGES):
        (folder / "cur" / f"{1_600_000_000 + n}.M{n}P1.test,S={size},W={size}:2,").write_bytes(BODY)


def noops_during(busy: RawImap, command: bytes, other: RawImap, marker: bytes) -> tuple[list[bytes], list[int]]:
    """Send `command` in `busy` and NOOPs in `other` until its tagged reply, then one more NOOP:
    (that reply, for each NOOP that told of the command's changes, how many `marker` lines it had)."""
    busy.send(b"big " + command + b"\r\n")
    reply: list[bytes] = []
    waiter = threading.Thread(target=lambda: reply.extend(busy.until_tagged(b"big")))
    waiter.start()
    told: list[int] = []
    try:
        while True:
            done = not waiter.is_alive()
            lines = other.command(f"n{len(told)}".encode(), b"NOOP")
            assert lines[-1].startswith(b"n"), lines[-1]
            if seen := sum(1 for line in lines if line.endswith(marker)):
                told.append(seen)
            if done:
                break
    finally:
        waiter.join(timeout=120)
    assert reply, "the big command was not answered"
    return reply, told


def test_a_big_store_move_and_expunge_leave_the_folders_other_sessions_served(box: BoxHandle) -> None:
    """Another session's NOOPs while the command runs tell of its changes in several steps: it was
    answered between the command's slices. With the lock held across the whole command, one NOOP
    waited for all of it and told of all of it at once."""
    box.add_user(USER, PASSWORD)
    fill(box)
    busy = RawImap(box.port("imaps"), box.client_context, timeout=120)
    other = RawImap(box.port("imaps"), box.client_context, timeout=120)
    try:
        for raw in (busy, other):
            raw.login(USER, PASSWORD)
            assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")

        reply, told = noops_during(busy, b"UID STORE 1:* +FLAGS.SILENT (\\Deleted)", other, b"))\r\n")
        assert reply[-1].startswith(b"big OK"), reply
        assert sum(told) == MESSAGES
        assert len(told) >= 2, told

        half = MESSAGES // 2
        reply, told = noops_during(busy, f"UID MOVE 1:{half} Archive".encode(), other, b" EXPUNGE\r\n")
        assert reply[-1].startswith(b"big OK"), reply[-1]
        assert sum(1 for line in reply if line.endswith(b" EXPUNGE\r\n")) == half
        assert sum(told) == half
        assert len(told) >= 2, told

        reply, told = noops_during(busy, b"EXPUNGE", other, b" EXPUNGE\r\n")
        assert reply[-1].startswith(b"big OK"), reply[-1]
        assert sum(1 for line in reply if line.endswith(b" EXPUNGE\r\n")) == MESSAGES - half
        assert sum(told) == MESSAGES - half
        assert len(told) >= 2, told
        status = other.command(b"t", b"STATUS INBOX (MESSAGES)")
        assert b"(MESSAGES 0)" in status[0], status
        status = other.command(b"t", b"STATUS Archive (MESSAGES)")
        assert f"(MESSAGES {half})".encode() in status[0], status
        assert not list((box.data.mail / "example.test" / "alice" / "cur").iterdir())
    finally:
        busy.close()
        other.close()
