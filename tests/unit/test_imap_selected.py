"""The selected-folder view: sequence numbers, and turning store snapshots into untagged updates."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from appliance.imap.commands import STAR, SequenceSet
from appliance.imap.selected import SelectedFolder
from appliance.store.mailstore import FolderSnapshot, MessageInfo


def info(uid: int, *flags: str) -> MessageInfo:
    return MessageInfo(uid, frozenset(flags), 100 + uid, 1_700_000_000, 1, Path("/m/cur"), f"{uid}:2,")


def snap(*messages: MessageInfo, recent: frozenset[int] = frozenset(), uidnext: int = 0) -> FolderSnapshot:
    top = max((m.uid for m in messages), default=0)
    return FolderSnapshot("INBOX", 42, uidnext or top + 1, tuple(messages), recent)


def lines(responses: list) -> list[bytes]:  # type: ignore[type-arg]
    return [r.to_bytes() for r in responses]


def test_numbers_and_resolve() -> None:
    view = SelectedFolder(snap(info(3), info(7), info(9)), readonly=False)
    assert view.exists == 3
    assert view.largest_uid == 9
    assert view.seq_of(7) == 2
    assert view.uid_of(3) == 9
    assert view.resolve(SequenceSet(((2, STAR),)), uid=False) == [7, 9]
    assert view.resolve(SequenceSet(((1, STAR),)), uid=True) == [3, 7, 9]
    assert view.resolve(SequenceSet(((4, 8),)), uid=True) == [7]
    assert view.resolve(SequenceSet(((10, STAR),)), uid=True) == [9]  # "*" is the largest UID
    assert SelectedFolder(snap(), False).resolve(SequenceSet(((1, STAR),)), uid=True) == []


def test_new_messages_announce_exists_and_recent() -> None:
    view = SelectedFolder(snap(info(1)), readonly=False)
    out = view.apply(snap(info(1), info(2), info(3), recent=frozenset({2, 3})), allow_expunge=True)
    assert lines(out) == [b"* 3 EXISTS\r\n", b"* 2 RECENT\r\n"]
    assert view.flags_of(2) == ["\\Recent"]
    assert view.apply(snap(info(1), info(2), info(3)), allow_expunge=True) == []


def test_expunge_numbers_shift_as_they_go() -> None:
    view = SelectedFolder(snap(info(1), info(2), info(3), info(4), info(5)), readonly=False)
    out = view.apply(snap(info(1), info(3), info(5)), allow_expunge=True)
    # RFC 3501 7.4.1: each EXPUNGE renumbers the messages after it at once.
    assert lines(out) == [b"* 2 EXPUNGE\r\n", b"* 3 EXPUNGE\r\n"]
    assert list(view.uids) == [1, 3, 5]


def test_expunge_deferred_while_not_allowed() -> None:
    view = SelectedFolder(snap(info(1), info(2), info(3)), readonly=False)
    out = view.apply(snap(info(1), info(3), info(4)), allow_expunge=False)
    assert lines(out) == [b"* 4 EXISTS\r\n", b"* 0 RECENT\r\n"]
    assert view.is_gone(2)
    assert view.seq_of(3) == 3
    out = view.apply(snap(info(1), info(3), info(4)), allow_expunge=True)
    assert lines(out) == [b"* 2 EXPUNGE\r\n"]


def test_flag_changes_elsewhere_become_fetch_flags() -> None:
    view = SelectedFolder(snap(info(1), info(2)), readonly=False)
    out = view.apply(snap(info(1), info(2, "\\Seen", "$Label1")), allow_expunge=True)
    # A keyword new to the folder is announced first (RFC 3501 7.2.6), then the flags that use it.
    assert lines(out) == [
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label1)\r\n",
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label1 \\*)] Flags permitted\r\n",
        b"* 2 FETCH (UID 2 FLAGS (\\Seen $Label1))\r\n",
    ]
    assert "$Label1" in view.keywords
    assert b"$Label1" in view.flags_response().to_bytes()


def test_own_changes_are_not_announced_again() -> None:
    view = SelectedFolder(snap(info(1)), readonly=False)
    view.update_infos([info(1, "\\Seen")])
    assert view.apply(snap(info(1, "\\Seen")), allow_expunge=True) == []


def test_expunged_by_us() -> None:
    view = SelectedFolder(snap(info(1), info(2), info(3)), readonly=False)
    assert lines(view.expunged_by_us([1, 3])) == [b"* 1 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert list(view.uids) == [2]


def test_first_unseen_and_counts() -> None:
    view = SelectedFolder(snap(info(1, "\\Seen"), info(2), info(3)), readonly=True)
    assert view.first_unseen() == 2
    assert view.unseen_count() == 2


def test_an_update_takes_every_state_object_that_changed() -> None:
    """The store hands out the same MessageInfo while a message is unchanged, and a session finds
    the few that are not the same object in C loops (issue 19: 100k messages took 0.3 s of Path
    comparisons per update). Each one found is taken, whatever changed in it (its flags, its file's
    name, its date read in the background): a view that kept an equal old object found it again at
    every later update, a loop of Python over the folder for each session at each change once a
    folder's dates had been read (25 ms per session per delivery at 100k). An expunge is still found."""
    messages = [info(uid) for uid in range(1, 2001)]
    view = SelectedFolder(snap(*messages), readonly=False)
    messages[9] = info(10, "\\Seen")
    messages[19] = messages[19]._replace(filename="20:2,S-renamed")
    messages[4] = messages[4]._replace(date=1_700_000_000)
    out = view.apply(snap(*messages), allow_expunge=True)
    assert lines(out) == [b"* 10 FETCH (UID 10 FLAGS (\\Seen))\r\n"]
    assert view.info(20).filename == "20:2,S-renamed"
    assert all(view.info(m.uid) is m for m in messages)
    del messages[29]
    assert lines(view.apply(snap(*messages), allow_expunge=True)) == [b"* 30 EXPUNGE\r\n"]
    assert view.exists == 1999


def test_a_catch_up_without_expunges_compares_by_place_and_builds_no_uid_map() -> None:
    """A session's catch-up with a state that only changed flags and added messages (a delivery, a
    STORE slice of another session) compares the state's messages with those of the last state it
    took in, place by place: the new state's UID list and map are not built (that and a look-up of
    every message of the view were 25 ms per session per change at 100k messages, issue 19). What it
    tells is the same: the flags changed elsewhere (not those this session changed itself), the new
    messages with their numbers, and an expunge, found the other way."""
    messages = [info(uid) for uid in range(1, 1001)]
    view = SelectedFolder(snap(*messages), readonly=False)
    assert view.seq_of(1000) == 1000
    messages[4] = info(5, "\\Seen")  # this session's STORE...
    assert view.update_infos([messages[4]]) == []
    messages[9] = info(10, "\\Flagged")  # ...and another session's
    messages.append(info(1001))
    state = snap(*messages, recent=frozenset({1001}))
    out = view.apply(state, allow_expunge=True)
    assert lines(out) == [b"* 10 FETCH (UID 10 FLAGS (\\Flagged))\r\n", b"* 1001 EXISTS\r\n", b"* 1 RECENT\r\n"]
    assert "uids" not in state.__dict__  # (where cached_property keeps them)
    assert "by_uid" not in state.__dict__
    assert (view.seq_of(1001), view.flags_of(1001)) == (1001, ["\\Recent"])
    assert view.apply(state, allow_expunge=True) == []
    messages[19] = info(20, "\\Deleted")
    del messages[2]
    later = snap(*messages, recent=frozenset({1001}))
    out = view.apply(later, allow_expunge=False)  # (a FETCH: no EXPUNGE yet)
    assert lines(out) == [b"* 20 FETCH (UID 20 FLAGS (\\Deleted))\r\n"]
    assert view.is_gone(3)
    assert lines(view.apply(later, allow_expunge=True)) == [b"* 3 EXPUNGE\r\n"]
    assert (view.exists, view.seq_of(1001)) == (1000, 1000)
    messages.append(info(1002))
    out = view.apply(snap(*messages, recent=frozenset({1001})), allow_expunge=True)
    assert lines(out) == [b"* 1001 EXISTS\r\n", b"* 1 RECENT\r\n"]
    assert view.seq_of(1002) == 1001


def test_views_hold_nothing_per_message() -> None:
    """Issue 19: a hundred sessions may hold one folder of 100k messages selected. A view is the
    state it took in last (shared with every session at that state) and the few messages it tells
    apart, nothing per message of its own, through every kind of change: a flag set elsewhere, a new
    message, its own STORE, an expunge it may not announce yet and then does, one it makes itself.
    (Each view copied the folder's UID list and info map at its first change, and built a map of
    its message numbers: about 110 bytes per message and session.)"""
    count, views = 10_000, 10
    messages = [info(uid) for uid in range(1, count + 1)]
    first = snap(*messages)
    messages[9] = info(10, "\\Flagged")  # another session's STORE, and a delivery
    messages.append(info(count + 1))
    second = snap(*messages, recent=frozenset({count + 1}))
    messages[6] = info(7, "\\Seen")  # this session's STORE
    del messages[2]  # an expunge elsewhere
    third = snap(*messages)
    del messages[3]  # and this session's own expunge of UID 5
    fourth = snap(*messages)
    for state in (first, second, third, fourth):  # what readers of a state build, once per state
        assert state.first_unseen == 1
        assert len(state.by_uid) == len(state.uids)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [SelectedFolder(first, readonly=False) for _ in range(views)]
        for view in held:
            assert view.seq_of(count) == count
            assert view.infos[count].uid == count
            assert lines(view.apply(second, allow_expunge=True))[0] == b"* 10 FETCH (UID 10 FLAGS (\\Flagged))\r\n"
            assert view.seqs_of(view.resolve(SequenceSet(((1, STAR),)), uid=True)) == range(1, count + 2)
            view.update_infos([info(7, "\\Seen")])
            assert view.apply(third, allow_expunge=False) == []
            assert view.is_gone(3)
            assert view.exists == count + 1
            assert lines(view.apply(third, allow_expunge=True)) == [b"* 3 EXPUNGE\r\n"]
            assert lines(view.expunged_by_us([5])) == [b"* 4 EXPUNGE\r\n"]
            assert view.apply(fourth, allow_expunge=True) == []
            assert (view.exists, view.seq_of(count + 1)) == (count - 1, count - 1)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_message = (after - before) / views / count
    assert per_message < 2, f"{per_message:.1f} bytes per message and view"


class _CountedMessages(tuple):  # type: ignore[type-arg]
    """A state's messages that count the loops over them (each a pass over the whole folder)."""

    loops = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _CountedMessages.loops += 1
        return super().__iter__()


def test_sessions_taking_in_one_change_compare_the_folder_once() -> None:
    # Every IDLE session on a folder takes in the same new state from the same old one: the loop
    # over the folder's messages that finds what changed ran once per session per delivery (about
    # 180 µs of the box's CPU per IDLE session per delivery at 2k messages, bench.idle); now once.
    base = snap(*(info(uid) for uid in range(1, 2001)))
    views = [SelectedFolder(base, readonly=False) for _ in range(30)]
    messages = list(base.messages)
    messages[9] = info(10, "\\Seen")
    new = FolderSnapshot("INBOX", 42, 2002, _CountedMessages((*messages, info(2001))), frozenset())
    _CountedMessages.loops = 0
    outs = [lines(view.apply(new, allow_expunge=True)) for view in views]
    assert outs[0] == [b"* 10 FETCH (UID 10 FLAGS (\\Seen))\r\n", b"* 2001 EXISTS\r\n",
                       b"* 0 RECENT\r\n"]
    assert all(out == outs[0] for out in outs)
    assert _CountedMessages.loops <= 2  # (was one or more per view: 30+)
    # A view that took in another state gets its own answer; the kept one holds no old state alive.
    other = SelectedFolder(snap(info(1), info(2)), readonly=False)
    assert lines(other.apply(new, allow_expunge=True))[-2:] == [b"* 2001 EXISTS\r\n", b"* 0 RECENT\r\n"]
    del views, other, base
    gc.collect()
    kept = new.__dict__["_replaced"][0]
    assert kept() is None
