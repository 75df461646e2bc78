"""CONDSTORE and QRESYNC (RFC 7162) over real sessions: mod-sequences per message and per folder,
conditional STORE, CHANGEDSINCE, and a QRESYNC client resyncing after changes made while it was
away (by another session, by another program renaming files in the Maildir), across a restart."""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def message(n: int) -> bytes:
    return (f"From: <sender{n}@example.org>\r\nTo: {USER}\r\nSubject: message {n}\r\n"
            f"Message-ID: <m{n}@example.org>\r\n\r\nbody {n}\r\n").encode()


def deliver(box: BoxHandle, n: int) -> int:
    result = box.run(box.services.store.deliver([USER], message(n)))[USER]
    assert isinstance(result, int), result
    return result


def session(box: BoxHandle) -> RawImap:
    raw = RawImap(box.port("imaps"), box.client_context)
    raw.login(USER, PASSWORD)
    return raw


def code(lines: list[bytes], name: bytes) -> int:
    for line in lines:
        m = re.search(rb"\[" + name + rb" (\d+)\]", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no {name!r} in {lines}")


def fetches(lines: list[bytes]) -> dict[int, tuple[bytes, int]]:
    """UID -> (FLAGS, MODSEQ) of the untagged FETCH responses."""
    out = {}
    for line in lines:
        m = re.match(rb"\* \d+ FETCH \((.*)\)\r\n$", line)
        if m:
            body = m.group(1)
            uid = re.search(rb"UID (\d+)", body)
            flags = re.search(rb"FLAGS \(([^)]*)\)", body)
            modseq = re.search(rb"MODSEQ \((\d+)\)", body)
            assert uid, line
            assert flags, line
            assert modseq, line
            kept = b" ".join(f for f in flags.group(1).split() if f != b"\\Recent")
            out[int(uid.group(1))] = (kept, int(modseq.group(1)))
    return out


@pytest.fixture
def imap_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


@pytest.fixture
def raw(imap_box: BoxHandle) -> Iterator[RawImap]:
    client = session(imap_box)
    yield client
    client.close()


def test_capabilities_and_enable(raw: RawImap) -> None:
    caps = raw.command(b"c", b"CAPABILITY")[0]
    assert b" CONDSTORE" in caps
    assert b" QRESYNC" in caps
    assert raw.command(b"e", b"ENABLE QRESYNC")[0] == b"* ENABLED CONDSTORE QRESYNC\r\n"
    assert raw.command(b"e2", b"ENABLE CONDSTORE")[0] == b"* ENABLED\r\n"  # already on


def test_qresync_select_needs_enable(raw: RawImap) -> None:
    reply = raw.command(b"s", b"SELECT INBOX (QRESYNC (1 1))")
    assert reply[-1].startswith(b"s BAD")


def test_modseq_fetch_store_search_status(imap_box: BoxHandle, raw: RawImap) -> None:
    for n in range(4):
        deliver(imap_box, n)
    selected = raw.command(b"s", b"SELECT INBOX (CONDSTORE)")
    highest = code(selected, b"HIGHESTMODSEQ")
    seen = fetches(raw.command(b"f", b"FETCH 1:* (UID FLAGS MODSEQ)"))
    assert set(seen) == {1, 2, 3, 4}
    assert all(0 < m <= highest for _, m in seen.values())

    # STORE carries the new MODSEQ; the folder's HIGHESTMODSEQ follows.
    stored = fetches(raw.command(b"t", b"UID STORE 2 +FLAGS (\\Flagged)"))
    assert stored[2][0] == b"\\Flagged"
    assert stored[2][1] > highest
    status = raw.command(b"st", b"STATUS INBOX (HIGHESTMODSEQ MESSAGES)")
    assert f"HIGHESTMODSEQ {stored[2][1]}".encode() in status[0]

    # CHANGEDSINCE: only what changed after the given mod-sequence.
    changed = fetches(raw.command(b"c", f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})".encode()))
    assert set(changed) == {2}

    # UNCHANGEDSINCE: message 2 changed after `highest`, so it is left alone and reported MODIFIED;
    # message 3 did not, so it is changed.
    reply = raw.command(b"u", f"UID STORE 2:3 (UNCHANGEDSINCE {highest}) +FLAGS (\\Seen)".encode())
    assert reply[-1].startswith(b"u OK [MODIFIED 2]"), reply
    after = fetches(raw.command(b"f2", b"UID FETCH 2:3 (FLAGS)"))
    assert b"\\Seen" not in after[2][0]
    assert b"\\Seen" in after[3][0]
    numbered = raw.command(b"u2", b"STORE 1 (UNCHANGEDSINCE 1) -FLAGS (\\Seen)")
    assert numbered[-1].startswith(b"u2 OK [MODIFIED 1]"), numbered

    # SEARCH MODSEQ gives the matches and the highest mod-sequence among them.
    found = raw.command(b"q", f"UID SEARCH MODSEQ {highest + 1}".encode())
    assert found[0] == f"* SEARCH 2 3 (MODSEQ {after[3][1]})\r\n".encode(), found
    assert raw.command(b"q2", b"SEARCH MODSEQ 999999999")[0] == b"* SEARCH\r\n"


def test_condstore_used_while_selected_sends_highestmodseq(imap_box: BoxHandle, raw: RawImap) -> None:
    deliver(imap_box, 1)
    plain = raw.command(b"s", b"SELECT INBOX")
    assert not any(b"HIGHESTMODSEQ" in line for line in plain)
    first = raw.command(b"f", b"FETCH 1 (MODSEQ)")
    assert any(b"[HIGHESTMODSEQ " in line for line in first), first  # RFC 7162 3.1
    assert re.match(rb"\* 1 FETCH \(MODSEQ \(\d+\)\)", first[-2]), first


def test_uid_expunge_gives_vanished_under_qresync(imap_box: BoxHandle, raw: RawImap) -> None:
    for n in range(5):
        deliver(imap_box, n)
    raw.command(b"e", b"ENABLE QRESYNC")
    raw.command(b"s", b"SELECT INBOX")
    raw.command(b"d", b"UID STORE 2:4 +FLAGS.SILENT (\\Deleted)")
    reply = raw.command(b"x", b"UID EXPUNGE 2:3")
    assert reply[0] == b"* VANISHED 2:3\r\n", reply
    assert reply[-1].startswith(b"x OK"), reply
    # Another session's expunge reaches this one as VANISHED too.
    other = session(imap_box)
    other.command(b"s", b"SELECT INBOX")
    assert other.command(b"x", b"EXPUNGE")[0] == b"* 2 EXPUNGE\r\n"  # no QRESYNC there
    other.close()
    noop = raw.command(b"n", b"NOOP")
    assert b"* VANISHED 4\r\n" in noop, noop


def _changes_while_away(box: BoxHandle) -> None:
    """Another session flags 2, expunges 3; a new message arrives (UID 6)."""
    other = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context)
    other.login(USER, PASSWORD)
    other.select("INBOX")
    other.uid("STORE", "2", "+FLAGS", "(\\Flagged)")
    other.uid("STORE", "3", "+FLAGS", "(\\Deleted)")
    other.expunge()
    other.logout()
    assert deliver(box, 6) == 6


def _flag_file_behind_the_box(root: Path, uid: int, box: BoxHandle) -> None:
    """Another program (a Dovecot, a sync tool) marks a message \\Seen by renaming its file."""
    snap = box.run(box.services.store.snapshot(USER, "INBOX"))
    path = next(m.path for m in snap.messages if m.uid == uid)
    base = path.name.split(":2,")[0]
    path.rename(path.parent.parent / "cur" / f"{base}:2,S")


def test_qresync_client_resyncs_after_offline_changes_across_a_restart(tmp_path: Path, ca: trustme.CA) -> None:
    root = tmp_path / "data"
    box = BoxHandle(root, ca)
    try:
        box.add_user(USER, PASSWORD)
        for n in range(1, 6):
            deliver(box, n)
        client = session(box)
        client.command(b"e", b"ENABLE QRESYNC")
        selected = client.command(b"s", b"SELECT INBOX")
        uidvalidity, highest = code(selected, b"UIDVALIDITY"), code(selected, b"HIGHESTMODSEQ")
        known = fetches(client.command(b"f", b"UID FETCH 1:* (FLAGS MODSEQ)"))
        client.command(b"o", b"LOGOUT")
        client.close()
        _changes_while_away(box)
        _flag_file_behind_the_box(root, 4, box)
        box.run(box.services.store.snapshot(USER, "INBOX"))  # the store discovers it
        modseqs_before = fetches_all(box)
    finally:
        box.close()

    box = BoxHandle(root, ca)
    try:
        assert fetches_all(box) == modseqs_before  # mod-sequences survive the restart
        client = session(box)
        client.command(b"e", b"ENABLE QRESYNC")
        reply = client.command(
            b"s", f"SELECT INBOX (QRESYNC ({uidvalidity} {highest} 1:5))".encode())
        assert reply[-1].startswith(b"s OK"), reply
        assert b"* VANISHED (EARLIER) 3\r\n" in reply, reply
        assert b"* 5 EXISTS\r\n" in reply, reply  # UIDs 1, 2, 4, 5, 6
        changed = fetches(reply)
        # Exactly the changes: 2 flagged by the other session, 4 seen by the other program; nothing
        # for 1 and 5; 6 (new) is outside the known UIDs given.
        assert set(changed) == {2, 4}, reply
        assert changed[2][0] == b"\\Flagged"
        assert changed[4][0] == b"\\Seen"
        assert all(m > highest for _, m in changed.values())
        assert all(m == known[uid][1] for uid, (_, m) in fetches_all(box).items() if uid in (1, 5))
        new_highest = code(reply, b"HIGHESTMODSEQ")
        assert new_highest == max(m for _, m in fetches_all(box).values())  # the file renamed last
        client.command(b"o", b"LOGOUT")
        client.close()

        # Without known UIDs the new message is reported too; resyncing from the new point: nothing.
        client = session(box)
        client.command(b"e", b"ENABLE QRESYNC")
        reply = client.command(b"s", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {highest}))".encode())
        assert set(fetches(reply)) == {2, 4, 6}
        assert b"* VANISHED (EARLIER) 3\r\n" in reply, reply
        reply = client.command(b"s2", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {new_highest} 1:6))".encode())
        assert fetches(reply) == {}, reply
        assert not any(b"VANISHED" in line for line in reply), reply
        # A wrong UIDVALIDITY: a plain select, nothing resynced (RFC 7162 3.2.5.2).
        reply = client.command(b"s3", f"EXAMINE INBOX (QRESYNC ({uidvalidity + 1} {highest}))".encode())
        assert fetches(reply) == {}, reply
        assert not any(b"VANISHED" in line for line in reply), reply
        # UID FETCH ... (CHANGEDSINCE n VANISHED) tells the same within the set.
        reply = client.command(b"f", f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest} VANISHED)".encode())
        assert reply[0] == b"* VANISHED (EARLIER) 3\r\n", reply
        assert set(fetches(reply)) == {2, 4, 6}
        client.close()
    finally:
        box.close()


def fetches_all(box: BoxHandle) -> dict[int, tuple[bytes, int]]:
    snap = box.run(box.services.store.snapshot(USER, "INBOX"))
    return {m.uid: (b" ".join(sorted(f.encode() for f in m.flags)), m.modseq) for m in snap.messages}
