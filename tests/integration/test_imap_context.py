"""RFC 5267 CONTEXT=SEARCH over a real TLS session: ESEARCH RETURN (PARTIAL) pages of a result,
RETURN (UPDATE) searches told of messages entering (ADDTO) and leaving (REMOVEFROM) their result as
flags change, messages arrive and are expunged, and CANCELUPDATE (imaptest search-partial and
search-context-update*)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.imap.limits import MAX_SEARCH_CONTEXTS
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def raw(box: BoxHandle) -> Iterator[RawImap]:
    box.add_user(USER, PASSWORD)
    for n in range(1, 6):
        result = box.run(box.services.store.deliver(
            [USER], f"From: <s{n}@example.org>\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()))[USER]
        assert isinstance(result, int), result
    client = RawImap(box.port("imaps"), box.client_context)
    client.login(USER, PASSWORD)
    client.command(b"s", b"SELECT INBOX")
    yield client
    client.close()


def untagged(reply: list[bytes]) -> list[bytes]:
    return [line for line in reply if line.startswith(b"* ESEARCH")]


def test_capability_is_offered(raw: RawImap) -> None:
    assert b"CONTEXT=SEARCH" in b"".join(raw.command(b"c", b"CAPABILITY"))


def test_partial_pages_of_a_result(raw: RawImap) -> None:
    """RFC 5267 4.4: positions low:high of the result, given either way round; NIL past the end."""
    cases = {
        b"(PARTIAL 1:1) ALL": b'* ESEARCH (TAG "p") PARTIAL (1:1 1)\r\n',
        b"(PARTIAL 4:2) ALL": b'* ESEARCH (TAG "p") PARTIAL (2:4 2:4)\r\n',
        b"(PARTIAL 1:6) ALL": b'* ESEARCH (TAG "p") PARTIAL (1:6 1:5)\r\n',
        b"(PARTIAL 6:6) ALL": b'* ESEARCH (TAG "p") PARTIAL (6:6 NIL)\r\n',
        b"(PARTIAL 2:4) 1:2,4:5": b'* ESEARCH (TAG "p") PARTIAL (2:4 2,4:5)\r\n',
    }
    for args, expected in cases.items():
        reply = raw.command(b"p", b"SEARCH RETURN " + args)
        assert reply[0] == expected, (args, reply)
        assert reply[-1].startswith(b"p OK"), reply
    raw.command(b"x", b"STORE 2 +FLAGS \\Deleted")
    raw.command(b"y", b"EXPUNGE")
    reply = raw.command(b"p", b"UID SEARCH RETURN (PARTIAL 2:2) ALL")
    assert reply[0] == b'* ESEARCH (TAG "p") UID PARTIAL (2:2 3)\r\n', reply


@pytest.mark.parametrize("bad", [b"(PARTIAL 1) ALL", b"(PARTIAL 1:*) ALL", b"(PARTIAL 0:2) ALL",
                                 b"(UPDATE PARTIAL 1:2) ALL"])
def test_malformed_partial_is_bad(raw: RawImap, bad: bytes) -> None:
    assert raw.command(b"b", b"SEARCH RETURN " + bad)[-1].startswith(b"b BAD")


def test_update_tells_additions_and_removals(raw: RawImap) -> None:
    """RFC 5267 4.2-4.3: after SEARCH RETURN (UPDATE), each change to the result comes as ADDTO or
    REMOVEFROM with the search's tag; an expunged member leaves before its EXPUNGE."""
    first = raw.command(b"u", b"SEARCH RETURN (UPDATE) SEEN")
    assert untagged(first) == [b'* ESEARCH (TAG "u")\r\n'], first
    reply = raw.command(b"a", b"STORE 1,2,4 +FLAGS.SILENT (\\Seen)")
    assert untagged(reply) == [b'* ESEARCH (TAG "u") ADDTO (0 1:2,4)\r\n'], reply
    reply = raw.command(b"b", b"STORE 1,2 -FLAGS.SILENT (\\Seen)")
    assert untagged(reply) == [b'* ESEARCH (TAG "u") REMOVEFROM (0 1:2)\r\n'], reply
    raw.command(b"c", b"STORE 3:5 +FLAGS.SILENT (\\Deleted)")
    reply = raw.command(b"d", b"EXPUNGE")
    assert reply[:4] == [b'* ESEARCH (TAG "u") REMOVEFROM (0 4)\r\n', b"* 3 EXPUNGE\r\n",
                         b"* 3 EXPUNGE\r\n", b"* 3 EXPUNGE\r\n"], reply
    data = b"Subject: new\r\n\r\nhi\r\n"
    reply = raw.command(b"e", b"APPEND INBOX (\\Seen) {%d+}\r\n" % len(data) + data)
    assert b"* 3 EXISTS\r\n" in reply
    assert untagged(reply) == [b'* ESEARCH (TAG "u") ADDTO (0 3)\r\n'], reply
    assert raw.command(b"f", b'CANCELUPDATE "u"')[-1].startswith(b"f OK")
    reply = raw.command(b"g", b"STORE 1 +FLAGS.SILENT (\\Seen)")
    assert untagged(reply) == [], reply
    assert raw.command(b"h", b'CANCELUPDATE "u"')[-1].startswith(b"h BAD")


def test_uid_update_with_all_names_uids(raw: RawImap) -> None:
    """UID SEARCH RETURN (UPDATE ALL): the first result at once, the updates by UID."""
    raw.command(b"a", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    raw.command(b"b", b"EXPUNGE")
    reply = raw.command(b"u", b"UID SEARCH RETURN (UPDATE ALL) SUBJECT m3")
    assert untagged(reply) == [b'* ESEARCH (TAG "u") UID ALL 3\r\n'], reply
    reply = raw.command(b"c", b"STORE 3 +FLAGS.SILENT (\\Seen)")
    assert untagged(reply) == [], reply
    raw.command(b"d", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
    reply = raw.command(b"e", b"EXPUNGE")
    assert untagged(reply) == [b'* ESEARCH (TAG "u") UID REMOVEFROM (0 3)\r\n'], reply


def test_changes_by_others_reach_the_kept_search(box: BoxHandle, raw: RawImap) -> None:
    """A message delivered and a flag set by another session are told at the next NOOP."""
    raw.command(b"u", b"SEARCH RETURN (UPDATE) UNSEEN SUBJECT news")
    result = box.run(box.services.store.deliver([USER], b"Subject: news\r\n\r\nhi\r\n"))[USER]
    assert isinstance(result, int), result
    reply = raw.command(b"n", b"NOOP")
    assert b"* 6 EXISTS\r\n" in reply
    assert untagged(reply) == [b'* ESEARCH (TAG "u") ADDTO (0 6)\r\n'], reply
    other = RawImap(box.port("imaps"), box.client_context)
    try:
        other.login(USER, PASSWORD)
        other.command(b"s", b"SELECT INBOX")
        other.command(b"f", b"STORE 6 +FLAGS.SILENT (\\Seen)")
    finally:
        other.close()
    reply = raw.command(b"n", b"NOOP")
    assert untagged(reply) == [b'* ESEARCH (TAG "u") REMOVEFROM (0 6)\r\n'], reply


def test_kept_searches_are_bounded(raw: RawImap) -> None:
    """Past MAX_SEARCH_CONTEXTS the search is answered but not kept: OK [NOUPDATE] (RFC 5267 4.2)."""
    for n in range(MAX_SEARCH_CONTEXTS):
        assert raw.command(b"k%d" % n, b"SEARCH RETURN (UPDATE) SEEN")[-1].startswith(b"k%d OK" % n)
    reply = raw.command(b"z", b"SEARCH RETURN (UPDATE) SEEN")
    assert reply[-1].startswith(b'z OK [NOUPDATE "z"]'), reply
    reply = raw.command(b"a", b"STORE 1 +FLAGS.SILENT (\\Seen)")
    assert len(untagged(reply)) == MAX_SEARCH_CONTEXTS, reply
