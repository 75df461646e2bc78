"""What Dovecot's imaptest (bench/imaptest.py) found, each reproduced over a real TLS session, and the
RFC 5258 LIST-EXTENDED and RFC 7162 details added with it: binary APPENDs holding NULs, ESEARCH
MODSEQ with MIN/MAX, quoted-printable BINARY, SORT by a group's name, LIST selection and return
options with CHILDINFO, HIGHESTMODSEQ on EXPUNGE, sequence match data narrowing VANISHED, and the
extensions whose imaptest groups only ran on Dovecot before: ESORT, SORT=DISPLAY and
THREAD=ORDEREDSUBJECT."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from appliance.store import index
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def deliver(box: BoxHandle, data: bytes, folder: str = "INBOX") -> int:
    result = box.run(box.services.store.deliver([USER], data, folder=folder))[USER]
    assert isinstance(result, int), result
    return result


def message(n: int) -> bytes:
    return f"From: <s{n}@example.org>\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()


def modseq_of(line: bytes) -> int:
    found = re.search(rb"MODSEQ \((\d+)\)", line)
    assert found, line
    return int(found.group(1))


@pytest.fixture
def raw(box: BoxHandle) -> Iterator[RawImap]:
    box.add_user(USER, PASSWORD)
    client = RawImap(box.port("imaps"), box.client_context)
    client.login(USER, PASSWORD)
    yield client
    client.close()


def test_append_of_binary_content_with_nul(raw: RawImap) -> None:
    """imaptest append-binary: BODY[1] never carries a NUL (the part is kept as base64, RFC 3516
    4.4); BINARY[1] gives the 7 octets back, bare LFs and all."""
    content = b"\x00-\xe4\n\r\n\n"
    data = (b"From: user@domain.org\r\nMime-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + content)
    reply = raw.command(b"a", b"APPEND INBOX ~{%d+}\r\n" % len(data) + data)
    assert reply[-1].startswith(b"a OK"), reply
    raw.command(b"s", b"SELECT INBOX")
    body = raw.command(b"b", b"FETCH 1 (BODY.PEEK[1])")
    assert body[0] == b"* 1 FETCH (BODY[1] {12}\r\nAC3kCg0KCg==)\r\n", body
    binary = raw.command(b"c", b"FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])")
    assert binary[0] == b"* 1 FETCH (BINARY.SIZE[1] 7 BINARY[1] ~{7}\r\n" + content + b")\r\n", binary


def test_binary_of_quoted_printable(box: BoxHandle, raw: RawImap) -> None:
    """imaptest fetch-binary-mime-qp: RFC 2045 6.7 trailing white space and soft line breaks."""
    deliver(box, b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                 b"hello  \r\nfoo\t \t= \r\n=62\r\nfoo = \t\r\nbar\r\n")
    raw.command(b"s", b"SELECT INBOX")
    reply = raw.command(b"f", b"FETCH 1 (BINARY.PEEK[1])")
    assert reply[0] == b"* 1 FETCH (BINARY[1] {25}\r\nhello\r\nfoo\t \tb\r\nfoo bar\r\n)\r\n", reply


def test_sort_by_cc_takes_a_groups_name(box: BoxHandle, raw: RawImap) -> None:
    """imaptest sort-addresses: a Cc that is a group sorts by the group's name (RFC 5256 3 with the
    ENVELOPE's group start), not by its first member."""
    for cc in ("user2@domain2.org (foo bar)", "user2: blah@domain1.org;", "user1@domain1.org"):
        deliver(box, f"From: x@example.org\r\nCc: {cc}\r\n\r\nbody\r\n".encode())
    raw.command(b"s", b"SELECT INBOX")
    assert raw.command(b"a", b"SORT (CC) US-ASCII ALL")[0] == b"* SORT 3 1 2\r\n"
    assert raw.command(b"b", b"SORT (REVERSE CC) US-ASCII ALL")[0] == b"* SORT 1 2 3\r\n"


def test_esearch_modseq_of_min_and_max(box: BoxHandle, raw: RawImap) -> None:
    """imaptest esearch-condstore, RFC 7162 3.1.5: with only MIN and/or MAX returned, MODSEQ is the
    highest of the messages returned, not of every match."""
    for n in range(4):
        deliver(box, message(n))
    raw.command(b"s", b"SELECT INBOX (CONDSTORE)")
    modseqs = {n: modseq_of(raw.command(b"t%d" % n, b"STORE %d +FLAGS (\\Seen)" % n)[0]) for n in (1, 3, 2, 4)}
    search = b'RETURN (%s) 1:3 MODSEQ "/flags/\\\\seen" all 1'
    assert raw.command(b"a", b"SEARCH " + search % b"MIN")[0] == b'* ESEARCH (TAG "a") MIN 1 MODSEQ %d\r\n' % modseqs[1]
    assert raw.command(b"b", b"SEARCH " + search % b"MAX")[0] == b'* ESEARCH (TAG "b") MAX 3 MODSEQ %d\r\n' % modseqs[3]
    assert raw.command(b"c", b"SEARCH " + search % b"")[0] == b'* ESEARCH (TAG "c") ALL 1:3 MODSEQ %d\r\n' % modseqs[2]
    assert raw.command(b"d", b"SEARCH " + search % b"MIN COUNT")[0] == (
        b'* ESEARCH (TAG "d") MIN 1 COUNT 3 MODSEQ %d\r\n' % modseqs[2])


def test_list_extended_options_and_childinfo(raw: RawImap) -> None:
    """imaptest listext, RFC 5258: unknown options and a lone RECURSIVEMATCH are BAD; (SUBSCRIBED
    RECURSIVEMATCH) lists a parent whose subscribed child the pattern does not reach with CHILDINFO,
    and not when the pattern reaches the child itself."""
    assert b" LIST-EXTENDED" in raw.command(b"c", b"CAPABILITY")[0]
    for folder in ("t/a", "t/b/", "t/b/c", "t/d/e", "t/d/f", "t/g"):
        assert raw.command(b"m", b"CREATE " + folder.encode())[-1].startswith(b"m OK")
    for folder in ("t/a", "t/b/c", "t/d/e", "t/d/f", "t/g"):
        raw.command(b"u", b"SUBSCRIBE " + folder.encode())
    raw.command(b"x", b"DELETE t/g")  # still subscribed: \NonExistent (RFC 5258 3.4)
    for bad in (b"LIST (imaptest) \"\" \"\"", b"LIST (RECURSIVEMATCH) \"\" \"\"",
                b"LIST (RECURSIVEMATCH REMOTE) \"\" \"\"", b"LIST \"\" \"\" RETURN (imaptest)"):
        assert raw.command(b"b", bad)[-1].startswith(b"b BAD"), bad
    assert raw.command(b"r", b'LIST (REMOTE) "" %')[-1].startswith(b"r OK")

    subscribed = raw.command(b"l", b'LIST (SUBSCRIBED) "" t/*')
    assert subscribed[:-1] == [b'* LIST (\\HasNoChildren \\Subscribed) "/" t/a\r\n',
                               b'* LIST (\\HasNoChildren \\Subscribed) "/" t/b/c\r\n',
                               b'* LIST (\\HasNoChildren \\Subscribed) "/" t/d/e\r\n',
                               b'* LIST (\\HasNoChildren \\Subscribed) "/" t/d/f\r\n',
                               b'* LIST (\\NonExistent \\Subscribed) "/" t/g\r\n'], subscribed
    child = raw.command(b"l", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" t/b% RETURN (CHILDREN)')
    assert child[:-1] == [b'* LIST (\\HasChildren) "/" t/b ("CHILDINFO" ("SUBSCRIBED"))\r\n'], child
    # t/d/e is reached by the pattern, t/d/f is not: t/d gets CHILDINFO for f.
    both = raw.command(b"l", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" (t/d t/d/e)')
    assert both[:-1] == [b'* LIST (\\HasChildren) "/" t/d ("CHILDINFO" ("SUBSCRIBED"))\r\n',
                         b'* LIST (\\HasNoChildren \\Subscribed) "/" t/d/e\r\n'], both
    reached = raw.command(b"l", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" (t/b t/b/c)')
    assert reached[:-1] == [b'* LIST (\\HasNoChildren \\Subscribed) "/" t/b/c\r\n'], reached
    # RETURN (SUBSCRIBED) marks without selecting; several patterns in one LIST.
    marked = raw.command(b"l", b'LIST "" (t/a t/b) RETURN (CHILDREN SUBSCRIBED)')
    assert marked[:-1] == [b'* LIST (\\HasNoChildren \\Subscribed) "/" t/a\r\n',
                           b'* LIST (\\HasChildren) "/" t/b\r\n'], marked


def test_expunge_under_qresync_ends_with_highestmodseq(box: BoxHandle, raw: RawImap) -> None:
    """RFC 7162 3.2.7 / 3.2.9: with QRESYNC, an EXPUNGE or UID EXPUNGE that removed messages
    carries the folder's mod-sequence in its tagged OK (Dovecot does the same); one that removed
    nothing, and CLOSE, carry none (as Dovecot)."""
    for n in range(4):
        deliver(box, message(n))
    raw.command(b"e", b"ENABLE QRESYNC")
    raw.command(b"s", b"SELECT INBOX")
    stored = raw.command(b"d", b"UID STORE 1:2 +FLAGS (\\Deleted)")
    reply = raw.command(b"x", b"EXPUNGE")
    assert reply[0] == b"* VANISHED 1:2\r\n", reply
    highest = int(re.match(rb"x OK \[HIGHESTMODSEQ (\d+)\]", reply[-1]).group(1))  # type: ignore[union-attr]
    assert highest > max(modseq_of(line) for line in stored[:-1])
    status = raw.command(b"t", b"STATUS INBOX (HIGHESTMODSEQ)")
    assert status[0] == b"* STATUS INBOX (HIGHESTMODSEQ %d)\r\n" % highest
    assert raw.command(b"y", b"EXPUNGE") == [b"y OK EXPUNGE completed\r\n"]
    raw.command(b"d2", b"UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    uid = raw.command(b"z", b"UID EXPUNGE 3:4")
    assert uid[0] == b"* VANISHED 3\r\n"
    assert uid[-1].startswith(b"z OK [HIGHESTMODSEQ "), uid


def test_sequence_match_data_narrows_vanished(box: BoxHandle, raw: RawImap, monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 7162 3.2.5.2: when the expunge records a client would need were pruned, every UID that is
    gone may have been expunged (a superset the RFC allows); the client's (message number, UID)
    pairs that still hold show that nothing below them was, so only UIDs above them are named."""
    monkeypatch.setattr(index, "EXPUNGES_KEPT", 2)
    for n in range(1, 11):
        deliver(box, message(n))
    other = RawImap(box.port("imaps"), box.client_context)
    other.login(USER, PASSWORD)
    other.command(b"s", b"SELECT INBOX")

    def expunge(uid: int) -> None:
        other.command(b"d", b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
        assert other.command(b"x", b"UID EXPUNGE %d" % uid)[-1].startswith(b"x OK")

    expunge(2)  # before the client's last sync: it knows
    raw.command(b"e", b"ENABLE QRESYNC")
    selected = b"".join(raw.command(b"s", b"SELECT INBOX"))
    uidvalidity = re.search(rb"UIDVALIDITY (\d+)", selected).group(1)  # type: ignore[union-attr]
    old = int(re.search(rb"HIGHESTMODSEQ (\d+)", selected).group(1))  # type: ignore[union-attr]
    raw.command(b"u", b"UNSELECT")
    for uid in (7, 8, 9):  # one mod-sequence each: the records of 2 and 7 are pruned
        expunge(uid)
    other.close()

    def vanished(seq_match: bytes) -> list[bytes]:
        reply = raw.command(b"q", b"SELECT INBOX (QRESYNC (%s %d 1:10%s))" % (uidvalidity, old, seq_match))
        assert reply[-1].startswith(b"q OK"), reply
        return [line for line in reply if line.startswith(b"* VANISHED")]

    assert vanished(b"") == [b"* VANISHED (EARLIER) 2,7:9\r\n"]  # every gap: 2 is told again
    # UID 1 is still number 1 and UID 6 still number 5: nothing at or below 6 was expunged since.
    assert vanished(b" (1,5 1,6)") == [b"* VANISHED (EARLIER) 7:9\r\n"]
    # Pairs are read up to the first that no longer holds (UID 10 is number 6 now, not 8).
    assert vanished(b" (5,8 6,10)") == [b"* VANISHED (EARLIER) 7:9\r\n"]
    # A first pair that does not hold narrows nothing.
    assert vanished(b" (3 3)") == [b"* VANISHED (EARLIER) 2,7:9\r\n"]
    # A client that synced after the expunge of 7 (a STORE and an EXPUNGE: two mod-sequences) is
    # covered by the records kept: the exact list.
    exact = raw.command(b"n", b"SELECT INBOX (QRESYNC (%s %d))" % (uidvalidity, old + 2))
    assert [line for line in exact if line.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 8:9\r\n"], exact


def test_esort_sort_display_and_orderedsubject(box: BoxHandle, raw: RawImap) -> None:
    """imaptest esort, sort-display-from/-to, thread-orderedsubject: RFC 5267 SORT RETURN gives an
    ESEARCH in sort order; RFC 5957 sorts on the display name (decoded) or else the address, a group
    on its name; RFC 5256 ORDEREDSUBJECT threads by base subject, the first message the parent."""
    letters = [
        ("foo bar <a@b.c>", "a", "Mon, 1 Jan 2024 10:00:00 +0000"),
        ("b@c.d", "Re: b", "Mon, 1 Jan 2024 12:00:00 +0000"),
        ("=?iso-8859-1?q?foo_aar?= <e@f.g>", "b", "Mon, 1 Jan 2024 11:00:00 +0000"),
        ("team: x@y.z;", "[list] Fwd: a", "Mon, 1 Jan 2024 13:00:00 +0000"),
        ("Zed <z@z.z>", "Re: B", "Mon, 1 Jan 2024 09:00:00 +0000"),
    ]
    for sender, subject, date in letters:
        deliver(box, f"From: {sender}\r\nTo: {sender}\r\nSubject: {subject}\r\nDate: {date}\r\n\r\nx\r\n".encode())
    raw.command(b"s", b"SELECT INBOX")
    caps = raw.command(b"c", b"CAPABILITY")[0].split()
    for cap in (b"ESORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT"):
        assert cap in caps
    # "b@c.d" < "foo aar" < "foo bar" < "team" < "zed"
    assert raw.command(b"a", b"SORT (DISPLAYFROM) UTF-8 ALL")[0] == b"* SORT 2 3 1 4 5\r\n"
    assert raw.command(b"b", b"SORT (REVERSE DISPLAYTO) UTF-8 ALL")[0] == b"* SORT 5 4 1 3 2\r\n"
    assert raw.command(b"e", b"SORT RETURN (MIN MAX COUNT ALL) (DISPLAYFROM) UTF-8 ALL")[0] == (
        b'* ESEARCH (TAG "e") MIN 2 MAX 5 COUNT 5 ALL 2:3,1,4:5\r\n')
    assert raw.command(b"f", b"UID SORT RETURN () (ARRIVAL) UTF-8 ALL")[0] == b'* ESEARCH (TAG "f") UID ALL 1:5\r\n'
    # Base subjects A (1, 4) and B (2, 3, 5); B's first by date is 5 (09:00), A's is 1 (10:00).
    assert raw.command(b"t", b"THREAD ORDEREDSUBJECT UTF-8 ALL")[0] == b"* THREAD (5 (3)(2))(1 4)\r\n"


def test_catenate(box: BoxHandle, raw: RawImap) -> None:
    """imaptest catenate, catenate-multiappend (RFC 4469): TEXT and URL parts joined into one message;
    a URL to another UIDVALIDITY, a missing message or section is NO [BADURL] and nothing is
    appended; a missing folder is TRYCREATE first; each message of a MULTIAPPEND may be catenated."""
    uid = deliver(box, b"From: foo@example.com\r\nSubject: s\r\n\r\nHello world body\r\n")
    uidvalidity = _uidvalidity(raw.command(b"s", b"SELECT INBOX"))
    assert b" CATENATE" in raw.command(b"c", b"CAPABILITY")[0]
    raw.command(b"m", b"CREATE Out")
    text = b"\r\nbody1\r\n"
    reply = raw.command(b"a", b'APPEND Out (\\Seen) CATENATE (URL "/INBOX;UIDVALIDITY=%s/;UID=%d/;SECTION=HEADER" '
                              b"TEXT {%d+}\r\n%s)" % (uidvalidity, uid, len(text), text))
    assert reply[-1].startswith(b"a OK [APPENDUID"), reply
    head = b"X-New: 1\r\n"
    reply = raw.command(b"b", b'APPEND Out CATENATE (TEXT {%d+}\r\n%s URL "/INBOX/;UID=%d/;SECTION=TEXT/;PARTIAL=0.5") '
                              b'CATENATE (URL "/INBOX/;UID=%d")' % (len(head), head, uid, uid))
    assert reply[-1].startswith(b"b OK [APPENDUID"), reply
    for url in (b"/INBOX;UIDVALIDITY=12345/;UID=%d" % uid, b"/INBOX/;UID=999", b"/INBOX/;UID=%d/;SECTION=4" % uid,
                b"/Nowhere/;UID=1", b"not a url"):
        refused = raw.command(b"n", b'APPEND Out CATENATE (TEXT {3+}\r\nx\r\n URL "%s")' % url)
        assert refused[-1].startswith(b'n NO [BADURL ' + url + b"]"), refused
    missing = raw.command(b"t", b'APPEND Gone CATENATE (URL "/INBOX/;UID=999")')
    assert missing[-1].startswith(b"t NO [TRYCREATE]"), missing
    raw.command(b"o", b"SELECT Out")
    bodies = raw.command(b"f", b"FETCH 1:* (BODY.PEEK[])")
    assert bodies[:-1] == [
        b"* 1 FETCH (BODY[] {46}\r\nFrom: foo@example.com\r\nSubject: s\r\n\r\n\r\nbody1\r\n)\r\n",
        b"* 2 FETCH (BODY[] {15}\r\nX-New: 1\r\nHello)\r\n",
        b"* 3 FETCH (BODY[] {55}\r\nFrom: foo@example.com\r\nSubject: s\r\n\r\nHello world body\r\n)\r\n",
    ], bodies


def _uidvalidity(selected: list[bytes]) -> bytes:
    found = re.search(rb"UIDVALIDITY (\d+)", b"".join(selected))
    assert found
    return found.group(1)
