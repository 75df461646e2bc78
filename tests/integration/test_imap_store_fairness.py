"""Fairness (issue 19): a big STORE or EXPUNGE in one session does not stall the other sessions of
the same folder. It holds the folder's lock one slice of messages at a time (mailstore._slices), so
another session's NOOP is answered while the command is still under way, not after it: with the
lock held across all the renames and their commit, a NOOP waited 1.3 s for a 20k STORE (11 ms
idle). Counted, not timed: how many of the other session's NOOPs are answered before the big
command's tagged OK."""

from __future__ import annotations

import threading
import time

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


def noops_during(busy: RawImap, command: bytes, other: RawImap) -> tuple[list[bytes], int]:
    """Send `command` in `busy` and NOOPs in `other` until its tagged reply: (that reply, how many
    NOOPs were answered before it came)."""
    busy.send(b"big " + command + b"\r\n")
    reply: list[bytes] = []
    answered_at: list[float] = []

    def wait_for_reply() -> None:
        reply.extend(busy.until_tagged(b"big"))
        answered_at.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_reply)
    waiter.start()
    noops: list[float] = []
    try:
        while waiter.is_alive():
            assert other.command(f"n{len(noops)}".encode(), b"NOOP")[-1].startswith(b"n")
            noops.append(time.monotonic())
    finally:
        waiter.join(timeout=120)
    assert answered_at, "the big command was not answered"
    return reply, sum(1 for at in noops if at < answered_at[0])


def test_a_big_store_and_expunge_leave_the_folders_other_sessions_served(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    fill(box)
    busy = RawImap(box.port("imaps"), box.client_context, timeout=120)
    other = RawImap(box.port("imaps"), box.client_context, timeout=120)
    try:
        for raw in (busy, other):
            raw.login(USER, PASSWORD)
            assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")

        reply, answered = noops_during(busy, b"UID STORE 1:* +FLAGS.SILENT (\\Deleted)", other)
        assert reply[-1].startswith(b"big OK"), reply
        # Held across the whole command, the lock let at most the NOOP that came before it through.
        assert answered >= 3, answered
        flags = other.command(b"f", b"UID FETCH 1:* (FLAGS)")
        assert sum(1 for line in flags if b"\\Deleted" in line) == MESSAGES  # all of it, told at the next command

        reply, answered = noops_during(busy, b"EXPUNGE", other)
        assert reply[-1].startswith(b"big OK"), reply[-1]
        assert sum(1 for line in reply if line.endswith(b" EXPUNGE\r\n")) == MESSAGES
        assert answered >= 3, answered
        assert other.command(b"x", b"NOOP")[-1].startswith(b"x OK")
        status = other.command(b"t", b"STATUS INBOX (MESSAGES)")
        assert b"(MESSAGES 0)" in status[0], status
        assert not list((box.data.mail / "example.test" / "alice" / "cur").iterdir())
    finally:
        busy.close()
        other.close()
