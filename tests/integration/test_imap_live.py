"""Live sessions: changes by deliveries and other sessions reach a client at its next command, and
at once while it IDLEs (RFC 2177)."""

from __future__ import annotations

from pathlib import Path

import pytest
from imapclient import IMAPClient

from appliance.imap import session as imap_session
from appliance.store import index
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.polling import wait_until

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def message(n: int) -> bytes:
    return f"From: s@example.org\r\nSubject: live {n}\r\n\r\nbody {n}\r\n".encode()


def deliver(box: BoxHandle, n: int) -> int:
    result = box.run(box.services.store.deliver([USER], message(n)))[USER]
    assert isinstance(result, int)
    return result


@pytest.fixture
def imap_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


def session(box: BoxHandle) -> RawImap:
    raw = RawImap(box.port("imaps"), box.client_context)
    raw.login(USER, PASSWORD)
    raw.command(b"s", b"SELECT INBOX")
    return raw


def test_delivery_shows_at_next_command(imap_box: BoxHandle) -> None:
    deliver(imap_box, 1)
    raw = session(imap_box)
    try:
        deliver(imap_box, 2)
        reply = raw.command(b"a", b"NOOP")
        assert b"* 2 EXISTS\r\n" in reply
        assert b"* 2 RECENT\r\n" in reply
        assert raw.command(b"b", b"NOOP") == [b"b OK NOOP completed\r\n"]
    finally:
        raw.close()


def test_other_sessions_flags_and_expunges(imap_box: BoxHandle) -> None:
    for n in range(3):
        deliver(imap_box, n)
    first, second = session(imap_box), session(imap_box)
    try:
        second.command(b"a", b"STORE 2 +FLAGS (\\Flagged)")
        # The first session selected first, so the messages are \Recent in it.
        assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))\r\n" in first.command(b"b", b"NOOP")
        second.command(b"c", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        second.command(b"d", b"EXPUNGE")
        # RFC 3501 7.4.1: no EXPUNGE during FETCH; the message numbers stay put until a NOOP.
        reply = first.command(b"e", b"FETCH 3 (UID)")
        assert b"EXPUNGE" not in b"".join(reply)
        assert b"* 3 FETCH (UID 3)\r\n" in reply
        reply = first.command(b"f", b"NOOP")
        assert b"* 1 EXPUNGE\r\n" in reply
        assert first.command(b"g", b"FETCH 2 (UID)")[0] == b"* 2 FETCH (UID 3)\r\n"
    finally:
        first.close()
        second.close()


def test_idle_is_woken_by_a_delivery_not_by_its_poll(imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session looks at the disk every EXTERNAL_POLL seconds during IDLE; with that an hour, an
    # EXISTS within the wait below can only come from the delivery waking the session (no clock
    # read here: a loaded machine makes the wake slower, never wrong).
    monkeypatch.setattr(imap_session, "EXTERNAL_POLL", 3600.0)
    with IMAPClient("127.0.0.1", port=imap_box.port("imaps"), ssl_context=imap_box.client_context,
                    timeout=60) as client:
        client.login(USER, PASSWORD)
        client.select_folder("INBOX")
        client.idle()  # returns on the server's "+ idling"; a change from then on is kept for it
        deliver(imap_box, 7)
        responses = client.idle_check(timeout=30)
        client.idle_done()
        assert (1, b"EXISTS") in responses


def test_idle_reports_other_sessions_changes(imap_box: BoxHandle) -> None:
    deliver(imap_box, 1)
    other = session(imap_box)
    try:
        with IMAPClient("127.0.0.1", port=imap_box.port("imaps"), ssl_context=imap_box.client_context,
                        timeout=30) as client:
            client.login(USER, PASSWORD)
            client.select_folder("INBOX")
            client.idle()
            other.command(b"a", b"STORE 1 +FLAGS (\\Seen)")
            responses = client.idle_check(timeout=30)  # returns at the first response
            assert any(r[1] == b"FETCH" for r in responses), responses
            other.command(b"b", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            other.command(b"c", b"EXPUNGE")
            responses = []

            def expunge_told() -> bool:
                responses.extend(client.idle_check(timeout=1))  # the \Deleted flag may come first
                return (1, b"EXPUNGE") in responses

            wait_until(expunge_told, seconds=30, what="EXPUNGE told to the IDLE session")
            client.idle_done()
    finally:
        other.close()


def test_idle_needs_done(imap_box: BoxHandle) -> None:
    raw = session(imap_box)
    try:
        raw.send(b"i IDLE\r\n")
        assert raw.line() == b"+ idling\r\n"
        raw.send(b"DONE\r\n")
        assert raw.line() == b"i OK IDLE terminated\r\n"
        raw.send(b"j IDLE\r\n")
        raw.line()
        raw.send(b"NOPE\r\n")
        assert raw.line().startswith(b"j BAD")
    finally:
        raw.close()


def test_fetch_of_a_message_expunged_elsewhere(imap_box: BoxHandle) -> None:
    for n in range(3):
        deliver(imap_box, n)
    first, second = session(imap_box), session(imap_box)
    try:
        second.command(b"a", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
        second.command(b"b", b"EXPUNGE")
        # RFC 2180 4.1.3 / RFC 5530: the numbers stay, the content is gone; OK as Dovecot says it.
        reply = first.command(b"c", b"FETCH 2 BODY.PEEK[]")
        assert reply[-1].startswith(b"c OK [EXPUNGEISSUED]")
        assert b"EXPUNGE\r\n" not in b"".join(reply)
        assert first.command(b"d", b"UID FETCH 2 BODY.PEEK[]")[-2:] == [b"* 2 EXPUNGE\r\n", b"d OK FETCH completed\r\n"]
    finally:
        first.close()
        second.close()


def test_a_fetch_of_a_message_known_expunged_does_not_wait_for_the_folder(
        imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message this session's view knows expunged (not yet told) is gone for good: its FETCH is
    answered OK [EXPUNGEISSUED] without waiting for the folder's queued changes (store.settled),
    which a file not at its path otherwise waits for (issue 19)."""
    for n in range(3):
        deliver(imap_box, n)
    first, second = session(imap_box), session(imap_box)
    store = imap_box.services.store
    real = store.settled
    waited: list[str] = []

    async def counted(mailbox: str, folder: str) -> None:
        waited.append(folder)
        await real(mailbox, folder)

    monkeypatch.setattr(store, "settled", counted)
    try:
        second.command(b"a", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
        second.command(b"b", b"EXPUNGE")
        for tag, items in ((b"c", b"BODY.PEEK[]"), (b"d", b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]")):
            reply = first.command(tag, b"FETCH 2 (" + items + b")")
            assert reply[-1].startswith(tag + b" OK [EXPUNGEISSUED]"), reply
        assert waited == []
    finally:
        first.close()
        second.close()


def test_other_sessions_changes_come_without_a_look_at_the_disk_other_programs_at_noop(
        imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change made through the store (another session, a delivery) is in the index already: the
    session it wakes answers from the index, with no listing of the Maildir per command (issue 19:
    the imaptest stress mode's sessions listed it at almost every command). A change another program
    makes to the Maildir is seen at NOOP (RFC 3501 6.1.2), where the disk is looked at."""
    for n in range(3):
        deliver(imap_box, n)
    first, second = session(imap_box), session(imap_box)
    scans = _Scans(monkeypatch)
    try:
        second.command(b"a", b"STORE 2 +FLAGS (\\Flagged)")
        deliver(imap_box, 3)
        scans.count = 0
        reply = first.command(b"b", b"FETCH 1 (UID)")
        assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))\r\n" in reply
        assert b"* 4 EXISTS\r\n" in reply
        assert scans.count == 0
        # Another program (a Maildir MUA, rsync) marks message 3 seen by renaming its file.
        _flag_behind_the_box(imap_box, 3, "S")
        reply = first.command(b"d", b"NOOP")
        assert b"* 3 FETCH (UID 3 FLAGS (\\Seen \\Recent))\r\n" in reply
        assert scans.count > 0
    finally:
        first.close()
        second.close()


class _Scans:
    """Counts the listings of Maildir folders (FolderIndex.scan) while the test runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_scan = index.FolderIndex.scan

        def counted(folder: index.FolderIndex, *, inline: bool = False) -> index.DiskChanges | None:
            self.count += 1
            return real_scan(folder, inline=inline)

        monkeypatch.setattr(index.FolderIndex, "scan", counted)


def _flag_behind_the_box(box: BoxHandle, uid: int, letters: str) -> None:
    """Another program (a Maildir MUA, rsync) sets INBOX message `uid`'s flags by renaming its file in
    cur/, keeping the unique part of its name."""
    async def find() -> Path:
        path = await box.services.store.message_path(USER, "INBOX", uid)
        assert path is not None
        return path

    base = box.run(find()).name.partition(":")[0]
    cur = box.data.mail / "example.test" / "alice" / "cur"
    [path] = [p for p in cur.iterdir() if p.name.startswith(base)]
    path.rename(path.with_name(f"{base}:2,{letters}"))


def test_idle_woken_by_a_store_change_reads_no_disk_and_its_poll_sees_other_programs(
        imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """IDLE woken by another session's change answers from the index (no listing of the Maildir
    per change); the disk is looked at when EXTERNAL_POLL has passed since the last look, so a file
    another program renamed is still told during IDLE."""
    deliver(imap_box, 1)
    deliver(imap_box, 2)
    scans = _Scans(monkeypatch)
    monkeypatch.setattr(imap_session, "EXTERNAL_POLL", 3600.0)
    other = session(imap_box)
    try:
        with IMAPClient("127.0.0.1", port=imap_box.port("imaps"), ssl_context=imap_box.client_context,
                        timeout=30) as client:
            client.login(USER, PASSWORD)
            client.select_folder("INBOX")
            client.idle()
            scans.count = 0
            other.command(b"a", b"STORE 1 +FLAGS (\\Seen)")
            responses = client.idle_check(timeout=30)
            assert any(r[1] == b"FETCH" for r in responses), responses
            client.idle_done()
            assert scans.count == 0
            monkeypatch.setattr(imap_session, "EXTERNAL_POLL", 0.2)
            client.idle()
            _flag_behind_the_box(imap_box, 2, "F")
            told: list[tuple[int, bytes, object]] = []

            def flagged() -> bool:
                told.extend(client.idle_check(timeout=1))
                return any(r[:2] == (2, b"FETCH") for r in told)

            wait_until(flagged, seconds=30, what="the other program's flag told to the IDLE session")
            client.idle_done()
    finally:
        other.close()
