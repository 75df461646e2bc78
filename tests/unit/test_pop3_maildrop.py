"""The per-session maildrop: numbering, deletion marks, sizes and unique-ids (RFC 1939 5-7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.pop3.maildrop import LISTING_CHUNK, Maildrop, parse_line_count, parse_number, unique_id
from appliance.pop3.replies import Pop3Err
from appliance.store.model import MessageInfo


def info(uid: int, size: int, name: str | None = None) -> MessageInfo:
    path = Path("/m/cur") / (name or f"1700000000.M{uid}P1Q1.host,S={size}:2,")
    return MessageInfo(uid, frozenset(), size, 1_700_000_000, 1, path.parent, path.name)


def listing(d: Maildrop, unique_ids: bool) -> bytes:
    return b"".join(d.listing(unique_ids).chunks())


def drop() -> Maildrop:
    return Maildrop(1234, [info(3, 100), info(7, 250), info(9, 40)])


def test_numbers_sizes_and_unique_ids() -> None:
    d = drop()
    assert [(m.number, m.uid, m.size, m.unique_id) for m in map(d.at, range(1, 4))] == [
        (1, 3, 100, "00000003000004D2"), (2, 7, 250, "00000007000004D2"), (3, 9, 40, "00000009000004D2"),
    ]
    assert d.stat() == (3, 390)


def test_deletion_marks_hide_messages_until_reset() -> None:
    d = drop()
    d.delete(d.message("2"))
    d.delete(d.at(2))  # marked once, counted once
    assert d.stat() == (2, 140)
    assert listing(d, unique_ids=False) == b"1 100\r\n3 40\r\n.\r\n"
    assert listing(d, unique_ids=True) == b"1 00000003000004D2\r\n3 00000009000004D2\r\n.\r\n"
    with pytest.raises(Pop3Err, match="already deleted"):
        d.message("2")
    assert d.deleted_uids() == [7]
    d.reset()
    assert d.stat() == (3, 390)
    assert d.deleted_uids() == []


def test_seen_are_retrieved_and_not_deleted() -> None:
    d = drop()
    d.retrieved.update({1, 2})
    d.delete(d.message("1"))
    assert d.seen_uids() == [7]


@pytest.mark.parametrize("argument", ["0", "4", "99999999999", "-1", "1.0", "x", "", "١"])
def test_bad_message_numbers(argument: str) -> None:
    with pytest.raises(Pop3Err) as caught:
        drop().message(argument)
    assert caught.value.reply.render().startswith(b"-ERR ")


def test_parse_number() -> None:
    assert parse_number("0") == 0
    assert parse_number("0042") == 42
    with pytest.raises(Pop3Err):
        parse_number("12345678901")


def test_unique_ids_are_printable_and_short() -> None:
    uid = unique_id(2**32 - 1, 2**32 - 1)
    assert len(uid) <= 70
    assert all(0x21 <= ord(c) <= 0x7E for c in uid)


def test_a_big_maildrop_shares_the_snapshot_and_lists_in_pieces() -> None:
    messages = tuple(info(uid, 10 + uid % 7) for uid in range(1, 2 * LISTING_CHUNK + 2))
    d = Maildrop(7, messages)
    assert d.messages is messages  # no object per message
    d.delete(d.message("2"))
    d.delete(d.message(str(LISTING_CHUNK + 1)))
    pieces = list(d.listing(unique_ids=True).chunks())
    assert len(pieces) == 4  # 1,000 messages a piece, the terminator last
    expected = [b"%d %08X00000007" % (n, n) for n in range(1, len(messages) + 1) if n not in {2, LISTING_CHUNK + 1}]
    assert b"".join(pieces) == b"".join(line + b"\r\n" for line in expected) + b".\r\n"
    assert d.stat() == (len(messages) - 2, sum(m.size for m in messages) - messages[1].size - messages[LISTING_CHUNK].size)


def test_parse_line_count() -> None:
    assert parse_line_count("0") == 0
    assert parse_line_count("0" * 40 + "7") == 7
    assert parse_line_count("99999999999") == 99_999_999_999
    for argument in ("-1", "+1", "1.0", "", "١", "9" * 21):
        with pytest.raises(Pop3Err):
            parse_line_count(argument)
