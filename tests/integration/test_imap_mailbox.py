"""IMAP commands of the authenticated and selected states, driven by imapclient and imaplib over TLS."""

from __future__ import annotations

import datetime as dt
import imaplib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from appliance.imap import fetch as fetching
from appliance.store import mailboxes, model
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "mime"


def message(n: int, subject: str | None = None, body: str = "hello") -> bytes:
    return (f"From: Sender {n} <sender{n}@example.org>\r\nTo: {USER}\r\nSubject: {subject or f'message {n}'}\r\n"
            f"Date: Mon, {n % 28 + 1} Jan 2024 10:00:00 +0000\r\nMessage-ID: <m{n}@example.org>\r\n\r\n"
            f"{body} {n}\r\n").encode()


def deliver(box: BoxHandle, data: bytes, folder: str = "INBOX") -> int:
    result = box.run(box.services.store.deliver([USER], data, folder=folder))[USER]
    assert isinstance(result, int), result
    return result


@pytest.fixture
def imap_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


@pytest.fixture
def client(imap_box: BoxHandle) -> Iterator[IMAPClient]:
    with IMAPClient("127.0.0.1", port=imap_box.port("imaps"), ssl_context=imap_box.client_context,
                    timeout=30) as c:
        c.login(USER, PASSWORD)
        yield c


def test_select_reports_the_folder(imap_box: BoxHandle, client: IMAPClient) -> None:
    for n in range(3):
        deliver(imap_box, message(n))
    info = client.select_folder("INBOX")
    assert info[b"EXISTS"] == 3
    assert info[b"RECENT"] == 3
    assert info[b"UIDNEXT"] == 4
    assert info[b"UIDVALIDITY"] > 0
    assert info[b"READ-WRITE"]
    assert b"\\*" in info[b"PERMANENTFLAGS"]
    assert info[b"UNSEEN"] == [b"1"]
    # A second session sees them, no longer \Recent.
    assert client.select_folder("INBOX", readonly=True)[b"RECENT"] == 0


def test_fetch_items_and_implicit_seen(imap_box: BoxHandle, client: IMAPClient) -> None:
    uid = deliver(imap_box, message(1, "Hello there"))
    client.select_folder("INBOX")
    got = client.fetch([uid], ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY"])[uid]
    assert got[b"FLAGS"] == (b"\\Recent",)
    assert got[b"RFC822.SIZE"] == len(message(1, "Hello there"))
    assert isinstance(got[b"INTERNALDATE"], dt.datetime)
    assert got[b"ENVELOPE"].subject == b"Hello there"
    assert got[b"ENVELOPE"].from_[0].mailbox == b"sender1"
    assert got[b"BODYSTRUCTURE"][0] == b"text"
    peek = client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])[uid]
    assert peek[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: Hello there\r\n\r\n"
    assert b"\\Seen" not in client.get_flags([uid])[uid]
    whole = client.fetch([uid], ["BODY[]"])[uid]
    assert whole[b"BODY[]"] == message(1, "Hello there")
    assert b"\\Seen" in whole[b"FLAGS"]  # RFC 3501 6.4.5: the flag change comes with the data
    partial = client.fetch([uid], ["BODY.PEEK[TEXT]<0.5>"])[uid]
    assert partial[b"BODY[TEXT]<0>"] == b"hello"


def test_fetch_corpus_messages_match_the_files(imap_box: BoxHandle, client: IMAPClient) -> None:
    files = sorted(p for p in CORPUS.glob("*.eml") if b"\r\n" in p.read_bytes())
    uids = [deliver(imap_box, p.read_bytes()) for p in files]
    client.select_folder("INBOX")
    got = client.fetch(uids, ["BODY.PEEK[]", "BODYSTRUCTURE", "ENVELOPE", "RFC822.SIZE"])
    for uid, path in zip(uids, files, strict=True):
        assert got[uid][b"BODY[]"] == path.read_bytes(), path.name
        assert got[uid][b"RFC822.SIZE"] == len(path.read_bytes())


def test_store_flags_and_keywords(imap_box: BoxHandle, client: IMAPClient) -> None:
    uids = [deliver(imap_box, message(n)) for n in range(3)]
    client.select_folder("INBOX")
    assert client.add_flags(uids[:2], [b"\\Flagged", b"$Important"])[uids[0]] == (
        b"\\Flagged", b"$Important", b"\\Recent")
    client.remove_flags([uids[0]], [b"\\Flagged"])
    client.set_flags([uids[2]], [b"\\Seen", b"\\Answered"])
    flags = client.get_flags(uids)
    assert set(flags[uids[0]]) == {b"$Important", b"\\Recent"}
    assert set(flags[uids[1]]) == {b"\\Flagged", b"$Important", b"\\Recent"}
    assert set(flags[uids[2]]) == {b"\\Seen", b"\\Answered", b"\\Recent"}
    # Persisted: a new session sees the same flags (without \Recent).
    client.unselect_folder()
    client.select_folder("INBOX")
    assert set(client.get_flags([uids[1]])[uids[1]]) == {b"\\Flagged", b"$Important"}
    assert b"$Important" in client.select_folder("INBOX")[b"FLAGS"]


def test_impossible_dates_and_unknown_system_flags_are_refused_and_nothing_is_stored(imap_box: BoxHandle) -> None:
    with imaplib.IMAP4_SSL("127.0.0.1", imap_box.port("imaps"), ssl_context=imap_box.client_context,
                           timeout=30) as client:
        client.login(USER, PASSWORD)
        # imaplib waits for "+" before it sends the message: the BAD comes first, so it never does.
        with pytest.raises(imaplib.IMAP4.error, match="bad date-time"):
            client.append("INBOX", None, '"31-Feb-2024 00:00:00 +0000"', message(1))
        with pytest.raises(imaplib.IMAP4.error, match=r"invalid system flag \\\\Bogus"):
            client.append("INBOX", r"(\Seen \Bogus)", None, message(2))
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"0"])
        assert client.append("INBOX", None, None, message(3))[0] == "OK"
        client.select("INBOX")
        with pytest.raises(imaplib.IMAP4.error, match="invalid system flag"):
            client.store("1", "+FLAGS", r"(\Bogus)")
        assert client.fetch("1", "(FLAGS)") == ("OK", [b"1 (FLAGS ())"])
        assert client.store("1", "+FLAGS", r"(\Seen $Later)")[0] == "OK"


def test_silent_store_and_sequence_numbers(imap_box: BoxHandle) -> None:
    for n in range(3):
        deliver(imap_box, message(n))
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")
        assert raw.command(b"a", b"STORE 2 +FLAGS.SILENT (\\Deleted)") == [b"a OK STORE completed\r\n"]
        reply = raw.command(b"b", b"STORE 1:* FLAGS (\\Seen)")
        assert reply[:3] == [b"* 1 FETCH (FLAGS (\\Seen \\Recent))\r\n", b"* 2 FETCH (FLAGS (\\Seen \\Recent))\r\n",
                             b"* 3 FETCH (FLAGS (\\Seen \\Recent))\r\n"]
        assert raw.command(b"c", b"UID STORE 2 -FLAGS (\\Seen)")[0] == b"* 2 FETCH (UID 2 FLAGS (\\Recent))\r\n"
        assert raw.command(b"d", b"FETCH 4 FLAGS")[-1].startswith(b"d BAD")
        assert raw.command(b"e", b"UID FETCH 4:9 FLAGS")[-1].startswith(b"e OK")  # "*" range beyond: 3
    finally:
        raw.close()


def test_search(imap_box: BoxHandle, client: IMAPClient) -> None:
    a = deliver(imap_box, message(1, "Invoice March", "please pay"))
    b = deliver(imap_box, message(2, "Lunch", "sandwiches"))
    c = deliver(imap_box, (CORPUS / "02_alternative_qp.eml").read_bytes())
    client.select_folder("INBOX")
    client.add_flags([b], [b"\\Seen"])
    assert client.search(["SUBJECT", "invoice"]) == [a]
    assert client.search(["BODY", "sandwiches"]) == [b]
    assert client.search(["UNSEEN"]) == [a, c]
    assert client.search(["OR", "SEEN", "SUBJECT", "invoice"]) == [a, b]
    assert client.search(["TEXT", "Grüße"], charset="UTF-8") == [c]
    assert client.search(["FROM", "Jörg"], charset="UTF-8") == [c]
    assert client.search(["SINCE", dt.date(2000, 1, 1)]) == [a, b, c]
    assert client.search(["UID", f"{b}:*"]) == [b, c]
    assert client.search(["NOT", "1"]) == [b, c]
    with pytest.raises(IMAPClientError, match="BADCHARSET"):
        client.search(["TEXT", "x"], charset="KOI8-R")


def test_append_with_flags_and_date(imap_box: BoxHandle) -> None:
    with imaplib.IMAP4_SSL("127.0.0.1", imap_box.port("imaps"), ssl_context=imap_box.client_context,
                           timeout=30) as client:
        client.login(USER, PASSWORD)
        when = dt.datetime(2023, 5, 17, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        typ, data = client.append("INBOX", r"(\Seen \Flagged $Work)", imaplib.Time2Internaldate(when),
                                  message(9))
        assert typ == "OK"
        m = re.search(rb"\[APPENDUID (\d+) (\d+)\]", data[0])
        assert m, data
        uid = int(m.group(2))
        client.select("INBOX")
        typ, data = client.uid("FETCH", str(uid), "(FLAGS INTERNALDATE BODY.PEEK[])")
        first = data[0]
        assert isinstance(first, tuple)  # (the line up to the literal, the literal)
        head = first[0]
        assert b"\\Seen" in head
        assert b"\\Flagged" in head
        assert b"$Work" in head
        parsed = imaplib.Internaldate2tuple(head)
        assert parsed is not None
        stamp = dt.datetime(*parsed[:6])
        assert stamp == dt.datetime.fromtimestamp(when.timestamp())
        assert first[1] == message(9)
        typ, data = client.append("Nope", None, None, message(1))
        assert typ == "NO"
        assert b"[TRYCREATE]" in data[0]


def test_folders_create_list_rename_delete(imap_box: BoxHandle, client: IMAPClient) -> None:
    client.create_folder("Projects")
    client.create_folder("Projects/Alpha")
    client.create_folder("Archive/2024")  # parents come along
    with pytest.raises(IMAPClientError, match="ALREADYEXISTS"):
        client.create_folder("Projects")
    with pytest.raises(IMAPClientError, match="CANNOT"):
        client.create_folder("Bad.Name")
    listed = {name: flags for flags, _, name in client.list_folders()}
    assert "INBOX" in listed
    assert "Projects/Alpha" in listed
    assert "Archive/2024" in listed
    assert b"\\HasChildren" in listed["Projects"]
    assert b"\\HasNoChildren" in listed["Projects/Alpha"]
    top = [name for _, _, name in client.list_folders("", "%")]
    assert "Projects" in top
    assert "Projects/Alpha" not in top
    assert client.list_folders("", "")[0][1] == b"/"
    client.rename_folder("Projects", "Work")
    names = [name for _, _, name in client.list_folders()]
    assert "Work/Alpha" in names
    assert "Projects" not in names
    client.delete_folder("Work/Alpha")
    with pytest.raises(IMAPClientError, match="NONEXISTENT"):
        client.delete_folder("Work/Alpha")
    with pytest.raises(IMAPClientError):
        client.delete_folder("INBOX")
    with pytest.raises(IMAPClientError, match="NONEXISTENT"):
        client.select_folder("Nope")


def test_a_name_in_modified_utf7_is_taken_only_in_its_one_spelling(imap_box: BoxHandle) -> None:
    """RFC 3501 5.1.3: modified BASE64 never encodes what spells itself in printable ASCII, and its
    padding bits are zero. Only the shift's syntax was checked, so a client could make a folder every
    client shows as "INBOX", one shown as "a/b" that is no child of "a", or "a" twice; and two shifts
    in a row spelt a second name of what one shift spells."""
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        refused = ["&AEkATgBCAE8AWA-", "a&AC8-b", "&AGE-", "&ZZZ-", "&2D0-", "&AOkAAA-", "Work/&AEkATgBCAE8AWA-",
                   "&U,BTFw-&ZeVnLIqe-"]  # two shifts in a row: what "&U,BTF2XlZyyKng-" spells in one
        taken = ["&AOk-t&AOk-", "A&-B", "&Jjo-", "&2D3eAA-", "&ZeVnLIqe-", "&U,BTF2XlZyyKng-", "&AOk-&-", "&-&AOk-"]
        for n, name in enumerate(refused):
            reply = raw.command(b"C%d" % n, b'CREATE "%s"' % name.encode())
            assert reply[-1].startswith(b"C%d NO [CANNOT] Bad modified UTF-7" % n), (name, reply)
            reply = raw.command(b"R%d" % n, b'RENAME Drafts "%s"' % name.encode())
            assert reply[-1].startswith(b"R%d NO [CANNOT] Bad modified UTF-7" % n), (name, reply)
        for n, name in enumerate(taken):
            assert raw.command(b"T%d" % n, b'CREATE "%s"' % name.encode())[-1].startswith(b"T%d OK" % n), name
        listed = b"".join(raw.command(b"L", b'LIST "" *'))
        assert all(name.encode() in listed for name in taken)
        assert not any(b'"/" ' + name.encode() + b"\r\n" in listed for name in refused)
    finally:
        raw.close()


def test_special_use_and_subscriptions(imap_box: BoxHandle, client: IMAPClient) -> None:
    for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        if not client.folder_exists(name):
            client.create_folder(name)
    flags = {name: set(f) for f, _, name in client.list_folders()}
    assert b"\\Sent" in flags["Sent"]
    assert b"\\Trash" in flags["Trash"]
    assert b"\\Junk" in flags["Junk"]
    assert b"\\Drafts" in flags["Drafts"]
    assert b"\\Archive" in flags["Archive"]
    special = client._imap._simple_command("LIST", "(SPECIAL-USE)", '""', '"*"')  # RFC 6154 selection
    assert special[0] == "OK"
    untagged = client._imap.untagged_responses.pop("LIST", [])
    assert untagged
    assert all(b"INBOX" not in line for line in untagged)
    client.create_folder("Lists")
    client.unsubscribe_folder("Lists")
    assert "Lists" not in [n for _, _, n in client.list_sub_folders()]
    client.subscribe_folder("Lists")
    assert "Lists" in [n for _, _, n in client.list_sub_folders()]


def test_status(imap_box: BoxHandle, client: IMAPClient) -> None:
    for n in range(4):
        deliver(imap_box, message(n))
    client.select_folder("INBOX")
    client.add_flags([1], [b"\\Seen"])
    client.create_folder("Other")
    status = client.folder_status("INBOX", ["MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"])
    assert status[b"MESSAGES"] == 4
    assert status[b"UNSEEN"] == 3
    assert status[b"UIDNEXT"] == 5
    assert client.folder_status("Other", ["MESSAGES"])[b"MESSAGES"] == 0
    with pytest.raises(IMAPClientError, match="NONEXISTENT"):
        client.folder_status("Nope", ["MESSAGES"])


def test_copy_move_and_uidplus(imap_box: BoxHandle, client: IMAPClient) -> None:
    uids = [deliver(imap_box, message(n)) for n in range(4)]
    client.create_folder("Kept")
    client.select_folder("INBOX")
    raw = client._imap
    typ, data = raw.uid("COPY", f"{uids[0]}:{uids[1]}", "Kept")
    assert typ == "OK"
    _, copyuid = raw.response("COPYUID")  # imaplib keeps response codes by name
    assert copyuid[0], copyuid
    assert re.fullmatch(rb"\d+ 1:2 1:2", copyuid[0]), copyuid
    typ, data = raw.uid("COPY", str(uids[0]), "Missing")
    assert typ == "NO"
    assert b"[TRYCREATE]" in data[0]
    client.move([uids[2]], "Kept")
    assert client.search(["ALL"]) == [uids[0], uids[1], uids[3]]
    client.select_folder("Kept")
    assert client.search(["ALL"]) == [1, 2, 3]
    assert client.fetch([3], ["BODY.PEEK[]"])[3][b"BODY[]"] == message(2)


def test_expunge_and_uid_expunge(imap_box: BoxHandle) -> None:
    for n in range(5):
        deliver(imap_box, message(n))
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")
        raw.command(b"a", b"STORE 1:4 +FLAGS.SILENT (\\Deleted)")
        assert raw.command(b"b", b"UID EXPUNGE 2:3") == [b"* 2 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n",
                                                         b"b OK EXPUNGE completed\r\n"]
        assert raw.command(b"c", b"EXPUNGE") == [b"* 1 EXPUNGE\r\n", b"* 1 EXPUNGE\r\n", b"c OK EXPUNGE completed\r\n"]
        assert raw.command(b"d", b"UID SEARCH ALL")[0] == b"* SEARCH 5\r\n"
        raw.command(b"e", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert raw.command(b"f", b"CLOSE") == [b"f OK CLOSE completed\r\n"]  # silent expunge
        raw.command(b"g", b"EXAMINE INBOX")
        assert raw.command(b"h", b"SEARCH ALL")[0] == b"* SEARCH\r\n"
        assert raw.command(b"i", b"STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"i ")
        assert raw.command(b"j", b"EXPUNGE")[-1].startswith(b"j NO")
        assert raw.command(b"k", b"UNSELECT")[-1].startswith(b"k OK")
        assert raw.command(b"l", b"FETCH 1 FLAGS")[-1].startswith(b"l BAD")
    finally:
        raw.close()


def test_quota(box: BoxHandle) -> None:
    box.add_user("small@example.test", PASSWORD, quota_bytes=10 * 1024)
    with IMAPClient("127.0.0.1", port=box.port("imaps"), ssl_context=box.client_context, timeout=30) as client:
        client.login("small@example.test", PASSWORD)
        roots = client.get_quota_root("INBOX")
        quota = roots[1][0]
        assert quota.resource == "STORAGE"
        assert quota.limit == 10
        with pytest.raises(IMAPClientError, match="OVERQUOTA"):
            client.append("INBOX", b"Subject: big\r\n\r\n" + b"x" * 20_000)


def test_literal_plus_append(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        data = message(3)
        raw.send(b"a APPEND INBOX (\\Draft) {%d+}\r\n%s\r\n" % (len(data), data))
        reply = raw.until_tagged(b"a")
        assert reply[-1].startswith(b"a OK [APPENDUID ")
        raw.send(b"b APPEND INBOX {%d}\r\n" % len(data))
        assert raw.line().startswith(b"+ ")
        raw.send(data + b"\r\n")
        assert raw.until_tagged(b"b")[-1].startswith(b"b OK [APPENDUID ")
    finally:
        raw.close()


def test_rename_inbox_moves_its_messages(imap_box: BoxHandle, client: IMAPClient) -> None:
    for n in range(3):
        deliver(imap_box, message(n))
    client.rename_folder("INBOX", "Old Mail")  # RFC 3501 6.3.5: INBOX stays, empty
    assert client.select_folder("INBOX")[b"EXISTS"] == 0
    assert client.select_folder("Old Mail")[b"EXISTS"] == 3
    assert client.fetch([1], ["BODY.PEEK[]"])[1][b"BODY[]"] == message(0)


def test_delete_folder_with_children(imap_box: BoxHandle, client: IMAPClient) -> None:
    client.create_folder("Parent/Child")
    deliver(imap_box, message(1), folder="Parent")
    client.delete_folder("Parent")  # RFC 3501 6.3.4: the children stay
    listing = {name: flags for flags, _, name in client.list_folders()}
    assert "Parent/Child" in listing
    if "Parent" in listing:
        assert b"\\Noselect" in listing["Parent"]
    with pytest.raises(IMAPClientError):
        client.select_folder("Parent")


def test_a_mailbox_holds_a_bounded_number_of_folders(imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each folder is four directories and a row outside the quota; one session's CREATEs made 140 a
    second, so one mailbox's password could fill the disk (found by attack40). Past MAX_FOLDERS
    (10,000; 12 here) CREATE and a RENAME that would make parents are NO [LIMIT], nothing is made."""
    monkeypatch.setattr(mailboxes, "MAX_FOLDERS", 12)  # INBOX and the 5 special folders are 6
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        for n in range(5):
            assert raw.command(b"c", b"CREATE F%d" % n)[-1].startswith(b"c OK"), n
        assert raw.command(b"d", b"CREATE Deep/Er")[-1] == (
            b"d NO [LIMIT] A mailbox has at most 12 folders; delete some first\r\n")  # two to make: 13
        assert raw.command(b"e", b"CREATE F5")[-1].startswith(b"e OK")
        assert raw.command(b"f", b"CREATE F6")[-1].startswith(b"f NO [LIMIT]")
        assert raw.command(b"g", b"RENAME F0 New/F0")[-1].startswith(b"g NO [LIMIT]")  # New/ is one more
        assert raw.command(b"h", b"RENAME F0 G0")[-1].startswith(b"h OK")  # a rename makes none
        names = b"".join(raw.command(b"l", b'LIST "" *'))
        assert [name for name in (b"F6", b"Deep", b"New", b"G0") if name in names] == [b"G0"]
        folders = {p.name for p in (imap_box.data.mail / "example.test" / "alice").iterdir()}
        assert not folders & {".F6", ".Deep", ".Deep.Er", ".New", ".New.F0"}
        assert raw.command(b"i", b"DELETE F1")[-1].startswith(b"i OK")
        assert raw.command(b"j", b"CREATE F6")[-1].startswith(b"j OK")  # room again
        assert raw.command(b"k", b"NOOP")[-1].startswith(b"k OK")
    finally:
        raw.close()


def test_unexpected_error_is_a_bye_not_a_traceback(imap_box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.imap.commands import Command
    from appliance.imap.session import DISPATCH, ImapSession, Route

    async def broken(session: ImapSession, command: Command) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setitem(DISPATCH["authenticated"], "NAMESPACE", Route(Command, broken))
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        raw.send(b"a NAMESPACE\r\n")
        line = raw.line()
        assert line.startswith(b"* BYE ")
        assert b"secret" not in line
        assert raw.closed()
    finally:
        raw.close()


def test_rfc822_size_of_a_file_with_bare_lf(imap_box: BoxHandle, client: IMAPClient) -> None:
    client.select_folder("INBOX")  # the Maildir exists
    data = message(5).replace(b"\r\n", b"\n")
    cur = imap_box.data.mail / "example.test" / "alice" / "cur"
    (cur / f"1700000000.M1P1.other,S={len(data)},W={len(message(5))}:2,S").write_bytes(data)
    client.noop()
    [uid] = client.search(["ALL"])
    item = client.fetch([uid], ["RFC822.SIZE", "BODY.PEEK[]"])[uid]
    assert item[b"BODY[]"] == message(5)
    assert item[b"RFC822.SIZE"] == len(message(5))


def crlf(data: bytes) -> bytes:
    """As the wire has it: every LF without a CR before it written as CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def fetch_whole(raw: RawImap, uid: int) -> tuple[int, bytes]:
    """(RFC822.SIZE, BODY[] content) of one message, read by the literal length the server announced."""
    reply = raw.command(b"f", b"UID FETCH %d (RFC822.SIZE BODY.PEEK[])" % uid)
    assert reply[-1].startswith(b"f OK"), reply[-1]
    [line] = [r for r in reply if r.startswith(b"* ") and b" FETCH (" in r]
    size = re.search(rb"RFC822\.SIZE (\d+)", line)
    literal = re.search(rb"BODY\[\] \{(\d+)\}\r\n", line)
    assert size is not None, line[:200]
    assert literal is not None, line[:200]
    content = line[literal.end():literal.end() + int(literal[1])]
    assert line[literal.end() + len(content):][:1] in (b")", b" ")  # the literal ended where it said
    return int(size[1]), content


def dates_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the message files whose date (mtime) the box reads from now on."""
    read: list[str] = []
    file_date = model.file_date

    def reading(directory: Path, name: str) -> int:
        read.append(name)
        return file_date(directory, name)

    monkeypatch.setattr(model, "file_date", reading)
    return read


def test_a_list_fetch_of_files_copied_in_reads_no_date_and_internaldate_is_the_mtime(
    imap_box: BoxHandle, client: IMAPClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file copied in with both sizes in its name is indexed without a stat and dated in the
    background: a FETCH that does not send INTERNALDATE (a mail program's first list) reads no
    file's date meanwhile (it was a stat per message on the event loop, issue 19); one that does
    sends the file's mtime."""
    client.select_folder("INBOX")  # the Maildir exists
    data = message(7)
    path = imap_box.data.mail / "example.test" / "alice" / "cur" / f"1700000000.M7P1.other,S={len(data)},W={len(data)}:2,S"
    path.write_bytes(data)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    read = dates_read(monkeypatch)
    client.noop()  # lists the folder: the file is found (UID 1)
    listed = client.fetch([1], ["UID", "RFC822.SIZE", "FLAGS", "BODY.PEEK[HEADER.FIELDS (From Subject)]", "ENVELOPE"])
    assert [item[b"RFC822.SIZE"] for item in listed.values()] == [len(data)]
    assert read == []
    [dated] = client.fetch([1], ["INTERNALDATE"]).values()
    assert dated[b"INTERNALDATE"].timestamp() == 1_600_000_000


def test_a_search_of_files_copied_in_reads_dates_only_for_date_keys(
    imap_box: BoxHandle, client: IMAPClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SEARCH of files indexed without a stat (both sizes in their names), before they are dated in
    the background: a key comparing no date reads no file's date (it was a stat per message on the
    event loop, issue 19); SINCE and BEFORE compare the files' mtimes, and SORT ARRIVAL orders by them."""
    client.select_folder("INBOX")  # the Maildir exists
    cur = imap_box.data.mail / "example.test" / "alice" / "cur"
    for n, mtime in ((1, 1_600_000_000), (2, 1_500_000_000)):
        data = message(n, subject=f"copied {n}")
        path = cur / f"170000000{n}.M{n}P1.other,S={len(data)},W={len(data)}:2,S"
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))
    read = dates_read(monkeypatch)
    client.noop()  # lists the folder: the files are found (UIDs 1 and 2)
    assert client.search(["SUBJECT", "copied"]) == [1, 2]
    assert client.search(["UNSEEN"]) == []
    assert read == []
    assert client.search(["SINCE", dt.date(2019, 1, 1)]) == [1]
    assert client.search(["BEFORE", dt.date(2019, 1, 1)]) == [2]
    assert client.sort(["ARRIVAL"]) == [2, 1]


def test_rfc822_size_and_body_of_bare_lf_files_without_w_size(imap_box: BoxHandle, client: IMAPClient) -> None:
    client.select_folder("INBOX")  # the Maildir exists
    small = b"Subject: mixed\n\r\nCRLF line\r\nLF line\n\nlone\rCR\n"
    large = b"Subject: large\n\n" + b"".join(b"line %06d of a long message\n" % i for i in range(20_000))
    assert len(crlf(large)) > fetching.INLINE_LITERAL  # sent as a streamed literal
    cur = imap_box.data.mail / "example.test" / "alice" / "cur"
    (cur / f"1700000000.M1P1.other,S={len(small)}:2,S").write_bytes(small)
    (cur / f"1700000001.M1P1.other,S={len(large)}:2,S").write_bytes(large)
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        for uid, data in ((1, small), (2, large)):
            size, content = fetch_whole(raw, uid)
            assert content == crlf(data)
            assert size == len(crlf(data))
    finally:
        raw.close()


def test_append_and_copy_of_a_bare_lf_message_keep_the_wire_size(imap_box: BoxHandle) -> None:
    data = b"Subject: appended with LF\n\nfirst\nsecond\r\nthird\n"
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        raw.send(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(data), data))
        assert raw.until_tagged(b"a")[-1].startswith(b"a OK [APPENDUID ")
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        assert fetch_whole(raw, 1) == (len(crlf(data)), crlf(data))
        assert raw.command(b"c", b"UID COPY 1 Archive")[-1].startswith(b"c OK")
        assert raw.command(b"s2", b"SELECT Archive")[-1].startswith(b"s2 OK")
        assert fetch_whole(raw, 1) == (len(crlf(data)), crlf(data))
    finally:
        raw.close()


def test_new_keywords_are_announced_to_every_session_with_the_folder(imap_box: BoxHandle) -> None:
    # Issue 17 (imaptest: "Keyword used without being in FLAGS"): RFC 3501 7.2.6 FLAGS lists the
    # flags of the mailbox; a keyword new to it comes with an untagged FLAGS and PERMANENTFLAGS.
    deliver(imap_box, message(1))
    deliver(imap_box, message(2), folder="Archive")
    one = RawImap(imap_box.port("imaps"), imap_box.client_context)
    two = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        for c in (one, two):
            c.login(USER, PASSWORD)
            assert c.command(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
        stored = one.command(b"A", b"STORE 1 +FLAGS ($Label1)")
        flags = [i for i, line in enumerate(stored) if line.startswith(b"* FLAGS ")]
        fetch = [i for i, line in enumerate(stored) if b"FETCH" in line]
        assert flags, stored
        assert fetch, stored
        assert flags[0] < fetch[0], stored
        assert b"$Label1" in stored[flags[0]]
        assert any(b"[PERMANENTFLAGS (" in line and b"$Label1 \\*)]" in line for line in stored), stored
        again = one.command(b"B", b"STORE 1 +FLAGS ($Label1)")
        assert not any(line.startswith(b"* FLAGS") for line in again)  # announced once
        seen = two.command(b"C", b"NOOP")
        assert any(line.startswith(b"* FLAGS ") and b"$Label1" in line for line in seen), seen
        assert any(b"PERMANENTFLAGS" in line and b"$Label1" in line for line in seen), seen
        # COPY and APPEND from another session bring their keywords along too.
        assert one.command(b"D", b"SELECT Archive")[-1].startswith(b"D OK")
        assert one.command(b"E", b"STORE 1 +FLAGS ($FromArchive)")[-1].startswith(b"E OK")
        assert one.command(b"F", b"COPY 1 INBOX")[-1].startswith(b"F OK")
        seen = two.command(b"G", b"NOOP")
        assert any(line.startswith(b"* FLAGS ") and b"$FromArchive" in line for line in seen), seen
        literal = message(3)
        one.send(b'H APPEND INBOX ($Appended) {%d+}\r\n' % len(literal) + literal + b"\r\n")
        assert one.until_tagged(b"H")[-1].startswith(b"H OK")
        seen = two.command(b"I", b"NOOP")
        assert any(line.startswith(b"* FLAGS ") and b"$Appended" in line for line in seen), seen
    finally:
        one.close()
        two.close()


def lsub(raw: RawImap, tag: bytes, pattern: bytes) -> list[bytes]:
    reply = raw.command(tag, b'LSUB "" ' + pattern)
    assert reply[-1].startswith(tag + b" OK"), reply
    return [line.rstrip(b"\r\n") for line in reply[:-1]]


def test_subscriptions_as_imaptest_checks_them(imap_box: BoxHandle) -> None:
    # Issue 17 (imaptest "subscribe"), RFC 3501 6.3.6-6.3.9: CREATE does not subscribe, DELETE does
    # not unsubscribe, LSUB shows an unsubscribed parent of a subscribed name as \Noselect.
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        for name in (b"box/test", b"box/test2/test", b"box/test3/test3"):
            assert raw.command(b"C", b"CREATE " + name)[-1].startswith(b"C OK")
        assert lsub(raw, b"L0", b'"box/*"') == []
        for name in (b"box/test", b"box/test2/test", b"box/test3/test3"):
            assert raw.command(b"S", b"SUBSCRIBE " + name)[-1].startswith(b"S OK")
        assert sorted(lsub(raw, b"L1", b'"box/%"')) == [
            b'* LSUB () "/" box/test', b'* LSUB (\\Noselect) "/" box/test2', b'* LSUB (\\Noselect) "/" box/test3']
        assert sorted(lsub(raw, b"L2", b"*test")) == [b'* LSUB () "/" box/test', b'* LSUB () "/" box/test2/test']
        assert raw.command(b"D", b"DELETE box/test")[-1].startswith(b"D OK")
        assert b'* LSUB () "/" box/test' in lsub(raw, b"L3", b'"box/%"')
        listed = raw.command(b"L4", b'LIST (SUBSCRIBED) "" "box/test"')
        assert listed[0].rstrip(b"\r\n") == b'* LIST (\\NonExistent \\Subscribed) "/" box/test', listed
        assert raw.command(b"U", b"UNSUBSCRIBE box/test")[-1].startswith(b"U OK")
        assert b'* LSUB () "/" box/test' not in lsub(raw, b"L5", b'"box/%"')
        # With "*" the subscribed names themselves are listed, not their unsubscribed parents.
        assert sorted(lsub(raw, b"L7", b'"box/*"')) == [
            b'* LSUB () "/" box/test2/test', b'* LSUB () "/" box/test3/test3']
        # INBOX and the special folders are subscribed from the start.
        assert {line.rsplit(b" ", 1)[1] for line in lsub(raw, b"L6", b"%")} >= {
            b"INBOX", b"Sent", b"Drafts", b"Trash", b"Junk", b"Archive"}
    finally:
        raw.close()
