"""POP3 on a real box with poplib: the maildrop, RETR/TOP/UIDL/DELE, UPDATE only at QUIT, sessions of one
mailbox side by side, IMAP."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import threading
from collections.abc import Callable

import pytest

from appliance.account_sessions import MAX_SESSIONS_PER_ACCOUNT
from tests.conftest import BoxHandle
from tests.integration.test_pop3_listeners import RawPop3
from tests.support.polling import wait_until

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def pop_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"From: sender{n}@example.org\r\nTo: {USER}\r\nSubject: message {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\n\r\n".encode()
        + (body or f"Body of message {n}.\r\n".encode())
    )


def deliver(box: BoxHandle, data: bytes, mailbox: str = USER) -> int:
    result = box.run(box.services.store.deliver([mailbox], data))[mailbox]
    assert isinstance(result, int), result
    return result


def pop3s(box: BoxHandle) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=15)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def drop(client: poplib.POP3) -> None:
    """Hang up without QUIT."""
    client.file.close()
    client.sock.close()


def pop3_stls(box: BoxHandle) -> poplib.POP3:
    """A session on 110 after STLS."""
    client = poplib.POP3("127.0.0.1", box.port("pop3"), timeout=15)
    client.stls(box.client_context)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def read_all(box: BoxHandle) -> list[bytes]:
    """Every message of the maildrop, by a new session."""
    client = pop3s(box)
    try:
        return [retr(client, n) for n in range(1, client.stat()[0] + 1)]
    finally:
        client.quit()


def inbox(box: BoxHandle) -> list[int]:
    return [m.uid for m in box.run(box.services.store.snapshot(USER, "INBOX")).messages]


def retr(client: poplib.POP3, n: int) -> bytes:
    """RETR as bytes: poplib splits the lines and removes the dot-stuffing."""
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def imap_uids(box: BoxHandle) -> tuple[int, list[int]]:
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=15) as imap:
        imap.login(USER, PASSWORD)
        imap.select("INBOX", readonly=True)
        uidvalidity = int(imap.response("UIDVALIDITY")[1][0])
        _, data = imap.uid("SEARCH", "ALL")
        return uidvalidity, [int(u) for u in data[0].split()]


def test_stat_list_uidl_retr_top_agree_with_the_store_and_imap(pop_box: BoxHandle) -> None:
    stuffed = b".leading dot\r\n..two dots\r\n.\r\nend\r\n"
    sent = [message(1), message(2, stuffed), message(3)]
    for data in sent:
        deliver(pop_box, data)
    client = pop3s(pop_box)
    try:
        count, octets = client.stat()
        assert (count, octets) == (3, sum(len(d) for d in sent))
        _, listing, _ = client.list()
        assert listing == [f"{i} {len(d)}".encode() for i, d in enumerate(sent, 1)]
        assert client.list(2).split()  # type: ignore[attr-defined]  # list(n) answers one line (bytes); the stubs say a tuple == [b"+OK", b"2", str(len(sent[1])).encode()]
        for i, data in enumerate(sent, 1):
            assert retr(client, i) == data
        _, top, _ = client.top(2, 1)
        assert top[-2:] == [b"", b".leading dot"]
        assert top[0].startswith(b"From: ")
        _, uidl, _ = client.uidl()
        uidvalidity, uids = imap_uids(pop_box)
        # Dovecot's default pop3_uidl_format %08Xu%08Xv (issue 17).
        assert uidl == [f"{i} {uid:08X}{uidvalidity:08X}".encode() for i, uid in enumerate(uids, 1)]
        assert client.uidl(3).split()[2] == f"{uids[2]:08X}{uidvalidity:08X}".encode()
        assert client.noop().startswith(b"+OK")
    finally:
        client.quit()


def test_deletions_only_at_quit_and_rset(pop_box: BoxHandle) -> None:
    for n in range(1, 5):
        deliver(pop_box, message(n))
    client = pop3s(pop_box)
    client.dele(1)
    client.dele(2)
    assert client.stat()[0] == 2
    with pytest.raises(poplib.error_proto, match="already deleted"):
        client.retr(1)
    assert [line.split()[0] for line in client.list()[1]] == [b"3", b"4"]
    assert client.rset().startswith(b"+OK Maildrop has 4 messages")
    client.dele(4)
    # The connection drops without QUIT: nothing is deleted (RFC 1939 6).
    drop(client)
    client = pop3s(pop_box)
    assert client.stat()[0] == 4
    client.dele(1)
    client.dele(3)
    assert client.quit() == b"+OK Letterbox POP3 server signing off (2 messages deleted)"
    assert read_all(pop_box) == [message(2), message(4)]


def test_sessions_side_by_side_each_quit_removes_only_its_own_marks(pop_box: BoxHandle) -> None:
    # As Dovecot's default (pop3_lock_session = no): a second login was -ERR [IN-USE] while the first lasted.
    uids = [deliver(pop_box, message(n)) for n in range(1, 6)]
    first, second = pop3s(pop_box), pop3_stls(pop_box)  # 995 and 110 alike
    try:
        for client in (first, second):
            assert client.stat()[0] == 5
            assert [retr(client, n) for n in (1, 2, 3, 4, 5)] == [message(n) for n in range(1, 6)]
        first.dele(1)
        first.dele(2)
        second.dele(4)
        late = deliver(pop_box, message(6))  # after both logins: in neither snapshot, left alone
        assert first.quit() == b"+OK Letterbox POP3 server signing off (2 messages deleted)"
        assert second.quit() == b"+OK Letterbox POP3 server signing off (1 message deleted)"
    finally:
        for client in (first, second):
            client.close()
    assert inbox(pop_box) == [uids[2], uids[4], late]
    wait_until(lambda: pop_box.services.pop3_sessions.count(USER) == 0, seconds=10, what="both sessions uncounted")


def test_a_message_another_session_removed_answers_as_dovecot(pop_box: BoxHandle) -> None:
    # Dovecot 2.3.19 (bench.peers.BenchDovecot, two sessions): after the first QUITs, the second's STAT,
    # LIST and UIDL still count the message (its snapshot), RETR and TOP of it answer "-ERR Message 1
    # expunged.", DELE of it "+OK", and QUIT "+OK" removing the rest of its marks.
    uids = [deliver(pop_box, message(n)) for n in range(1, 5)]
    first, second = pop3s(pop_box), pop3s(pop_box)
    try:
        first.dele(1)
        assert first.quit().startswith(b"+OK")
        assert inbox(pop_box) == uids[1:]
        assert second.stat() == (4, sum(len(message(n)) for n in range(1, 5)))
        assert [line.split()[0] for line in second.uidl()[1]] == [b"1", b"2", b"3", b"4"]
        gone = re.escape("-ERR Message 1 was removed by another session")
        with pytest.raises(poplib.error_proto, match=gone):
            second.retr(1)
        with pytest.raises(poplib.error_proto, match=gone):
            second.top(1, 0)
        assert retr(second, 2) == message(2)
        assert second.dele(1) == b"+OK Message 1 deleted"
        second.dele(3)
        assert second.quit() == b"+OK Letterbox POP3 server signing off (2 messages deleted)"
    finally:
        for client in (first, second):
            client.close()
    assert inbox(pop_box) == [uids[1], uids[3]]
    assert read_all(pop_box) == [message(2), message(4)]


def test_a_dead_connection_does_not_refuse_the_next_login(pop_box: BoxHandle) -> None:
    # A phone's connection that died without a FIN is, to the server, a session saying nothing until its
    # idle timeout (10 minutes): it held the maildrop's lock all that while.
    deliver(pop_box, message(1))
    dead = pop3s(pop_box)
    dead.dele(1)
    try:
        again = pop3s(pop_box)
        assert again.stat()[0] == 1
        assert again.quit().startswith(b"+OK")
    finally:
        drop(dead)
    wait_until(lambda: pop_box.services.pop3_sessions.count(USER) == 0, seconds=10, what="the dropped session uncounted")
    assert len(inbox(pop_box)) == 1  # the dead session's mark is never applied


def test_one_mailbox_holds_a_bounded_number_of_sessions(pop_box: BoxHandle) -> None:
    # Side by side, one account's password could hold every POP3 session of the listeners; past the bound
    # the login answers -ERR [IN-USE], as Dovecot's past mail_max_userip_connections.
    sessions = pop_box.services.pop3_sessions
    sessions.limit = 2
    clients = [pop3s(pop_box), pop3_stls(pop_box)]
    try:
        refused = poplib.POP3_SSL("127.0.0.1", pop_box.port("pop3s"), context=pop_box.client_context, timeout=15)
        clients.append(refused)
        refused.user(USER)
        with pytest.raises(poplib.error_proto, match=re.escape("-ERR [IN-USE] Too many POP3 sessions of this mailbox (at most 2)")):
            refused.pass_(PASSWORD)
        assert clients[0].quit().startswith(b"+OK")
        refused.user(USER)
        assert refused.pass_(PASSWORD).startswith(b"+OK Logged in")
        assert refused.quit().startswith(b"+OK")
    finally:
        sessions.limit = MAX_SESSIONS_PER_ACCOUNT
        for client in clients:
            client.close()
    wait_until(lambda: sessions.count(USER) == 0, seconds=10, what="every session uncounted")


def test_maildrop_is_a_snapshot_at_login(pop_box: BoxHandle) -> None:
    deliver(pop_box, message(1))
    client = pop3s(pop_box)
    deliver(pop_box, message(2))
    assert client.stat()[0] == 1
    client.quit()
    client = pop3s(pop_box)
    assert client.stat()[0] == 2
    client.quit()


def test_imap_sees_pop3_deletions_as_expunge_and_retrieved_as_seen(pop_box: BoxHandle) -> None:
    for n in range(1, 4):
        deliver(pop_box, message(n))
    with imaplib.IMAP4_SSL("127.0.0.1", pop_box.port("imaps"), ssl_context=pop_box.client_context,
                           timeout=15) as imap:
        imap.login(USER, PASSWORD)
        imap.select("INBOX")
        client = pop3s(pop_box)
        client.retr(1)
        client.retr(3)
        client.dele(1)
        client.quit()
        _, data = imap.noop()
        untagged = imap.untagged_responses
        assert untagged.get("EXPUNGE") == [b"1"], (data, untagged)
        imap.untagged_responses.clear()  # the NOOP's FETCH of the flag change would be mixed in
        _, fetched = imap.fetch("1:*", "(UID FLAGS)")
        flags = {int(m.group(1)): m.group(2) for item in fetched
                 if isinstance(item, bytes) and (m := re.search(rb"UID (\d+) FLAGS \((.*?)\)", item))}
        assert set(flags) == {2, 3}
        assert b"\\Seen" not in flags[2]
        assert b"\\Seen" in flags[3]
        imap.logout()


def test_large_message_streams_intact(pop_box: BoxHandle) -> None:
    line = b"0123456789" * 7 + b"\r\n"
    body = b"".join((b"." if i % 97 == 0 else b"") + line for i in range(100_000))  # about 7 MB
    data = message(1, body)
    deliver(pop_box, data)
    client = pop3s(pop_box)
    try:
        assert client.stat() == (1, len(data))
        assert retr(client, 1) == data
    finally:
        client.quit()


def test_foreign_message_with_bare_lf_is_sent_with_crlf(pop_box: BoxHandle) -> None:
    deliver(pop_box, message(1))  # makes the Maildir
    new = pop_box.data.mail / "example.test" / "alice" / "new"
    (new / "1700000000.M1P1.elsewhere").write_bytes(b"Subject: lf only\n\n.dot\nbody\n")
    client = pop3s(pop_box)
    try:
        assert client.stat()[0] == 2
        assert retr(client, 2) == b"Subject: lf only\r\n\r\n.dot\r\nbody\r\n"
    finally:
        client.quit()


def test_list_size_of_a_bare_lf_message_is_what_retr_sends(pop_box: BoxHandle) -> None:
    deliver(pop_box, message(1))  # makes the Maildir
    content = b"Subject: lf only\n\n.dot stuffed on the wire\nbody\n..two dots\n\nend\n"
    expected = content.replace(b"\n", b"\r\n")  # only bare LFs: each becomes CRLF
    new = pop_box.data.mail / "example.test" / "alice" / "new"
    (new / f"1700000000.M1P1.elsewhere,S={len(content)}").write_bytes(content)
    client = pop3s(pop_box)
    try:
        assert client.stat() == (2, len(message(1)) + len(expected))
        assert client.list(2).split()  # type: ignore[attr-defined]  # list(n) answers one line (bytes); the stubs say a tuple == [b"+OK", b"2", str(len(expected)).encode()]
        _, listing, _ = client.list()
        assert listing[1] == b"2 %d" % len(expected)
        response, lines, octets = client.retr(2)
        # poplib counts the octets with CRLF and without the dot-stuffing: the message as RFC 1939 sizes it.
        assert octets == len(expected)
        assert response.split()[1] == str(len(expected)).encode()
        assert b"".join(line + b"\r\n" for line in lines) == expected
    finally:
        client.quit()


def test_message_removed_by_imap_meanwhile_gets_err(pop_box: BoxHandle) -> None:
    uid = deliver(pop_box, message(1))
    client = pop3s(pop_box)
    pop_box.run(pop_box.services.store.expunge(USER, "INBOX", [uid]))
    with pytest.raises(poplib.error_proto, match="removed by another session"):
        client.retr(1)
    client.dele(1)
    assert client.quit().startswith(b"+OK")


BIG_DROP = 50_000


def loop_gaps(box: BoxHandle, done: threading.Event) -> Callable[[], float]:
    """Start a probe on the box's event loop: the longest time between two of its 5 ms wake-ups, that
    is the longest step anything else held the loop for, until `done`; the returned call waits for it."""
    async def probe() -> float:
        loop = asyncio.get_running_loop()
        longest, last = 0.0, loop.time()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = loop.time()
            longest, last = max(longest, now - last), now
        return longest

    future = asyncio.run_coroutine_threadsafe(probe(), box.loop)
    return lambda: future.result(60)


@pytest.mark.slow(seconds=25)
def test_a_big_maildrop_does_not_hold_up_the_box(pop_box: BoxHandle) -> None:
    """A 50k-message INBOX (a client that leaves mail on the server for years): the login, LIST and UIDL
    gave the loop up only once done, 0.3-0.9 s a command at 100k, during which no other session of any
    protocol was served; the answers are the same, every line in order."""
    deliver(pop_box, message(0))  # makes the Maildir
    cur = pop_box.data.mail / "example.test" / "alice" / "cur"
    for n in range(1, BIG_DROP):
        data = b"Subject: m%d\r\n\r\nbody\r\n" % n
        (cur / f"{1_700_000_000 + n}.M{n}P1.old,S={len(data)}:2,S").write_bytes(data)
    snapshot = pop_box.run(pop_box.services.store.snapshot(USER, "INBOX"))  # indexed before the probe
    assert len(snapshot.messages) == BIG_DROP
    done = threading.Event()
    longest = loop_gaps(pop_box, done)
    try:
        raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context, timeout=120)
        try:
            raw.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode() + b"LIST\r\nUIDL\r\n" * 3 + b"QUIT\r\n")
            assert raw.line() == b"+OK Send your password"
            octets = sum(m.size for m in snapshot.messages)
            assert raw.line() == b"+OK Logged in, %d messages (%d octets)" % (BIG_DROP, octets)
            for _ in range(3):
                assert raw.line() == b"+OK %d messages (%d octets)" % (BIG_DROP, octets)
                assert raw.multiline() == [b"%d %d" % (n, m.size) for n, m in enumerate(snapshot.messages, 1)]
                assert raw.line() == b"+OK Unique-ID listing follows"
                assert raw.multiline() == [
                    b"%d %08X%08X" % (n, m.uid, snapshot.uidvalidity) for n, m in enumerate(snapshot.messages, 1)]
            assert raw.line().startswith(b"+OK Letterbox POP3 server signing off")
        finally:
            raw.close()
    finally:
        done.set()
    assert longest() < 0.15
