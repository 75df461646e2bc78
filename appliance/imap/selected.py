"""The selected folder as one session sees it: message numbers, flags, \\Recent, and what changed.

Message sequence numbers are per session (RFC 3501 2.3.1.2): they only shift when this session is
told about an expunge. A new store snapshot is turned into the untagged responses that bring the
client up to date: EXPUNGE (RFC 3501 7.4.1), EXISTS/RECENT (7.3.1-2) and FETCH FLAGS (7.4.2).
During FETCH, STORE and SEARCH (not their UID forms) an EXPUNGE must not be sent (7.4.1); the
expunged messages then stay in the view, marked gone, until a later command may announce them.

Folders of 100,000 messages are normal, and a hundred sessions may hold one selected: the view is the
store's state it took in last (shared with every session at that state) and what differs from it (a
few messages), nothing per message of its own; it renders a flag list once per distinct set of flags.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, compress, filterfalse
from operator import is_not, itemgetter

from appliance.imap.commands import RECENT, SYSTEM_FLAGS, SearchKey, SequenceSet, compact
from appliance.imap.responses import Atom, Data, Preformatted, Response, UntaggedStatus, flag_list
from appliance.store.mailstore import FolderSnapshot, MessageInfo

_ORDER = {flag: i for i, flag in enumerate(SYSTEM_FLAGS)}
_UID = itemgetter(0)  # MessageInfo's
_FIRST_UID = lambda pair: pair[0][0]  # noqa: E731  (new, old) pairs by UID


@lru_cache(maxsize=4096)
def flag_text(flags: frozenset[str], recent: bool) -> str:
    """'(\\Seen $Label \\Recent)': system flags in their usual order, keywords, then \\Recent."""
    ordered = sorted(flags, key=lambda f: (_ORDER.get(f, len(_ORDER)), f))
    if recent:
        ordered.append(RECENT)
    return "(" + " ".join(ordered) + ")"


@dataclass
class SearchContext:
    """RFC 5267 4.2 SEARCH RETURN (UPDATE): a search whose result the client keeps, told of the
    messages that enter it (ADDTO) or leave it (REMOVEFROM) while the folder changes."""

    tag: str
    uid: bool  # UID SEARCH: the updates name UIDs, else message numbers
    key: SearchKey
    charset: str | None
    result: set[int] = field(default_factory=set)  # the UIDs the client has as the result
    version: int = 0  # SelectedFolder.version the result was computed at

    def update(self, kind: str, numbers: Iterable[int]) -> Data:
        """`* ESEARCH (TAG "t") [UID] ADDTO|REMOVEFROM (0 set)`: position 0, as the result of an
        unsorted SEARCH has no order to place a message at (RFC 5267 4.3)."""
        uid = " UID" if self.uid else ""
        return Data(f'ESEARCH (TAG "{self.tag}"){uid} {kind} (0 {compact(sorted(numbers))})')


class SelectedFolder:
    def __init__(self, snapshot: FolderSnapshot, readonly: bool) -> None:
        self.name = snapshot.name
        self.readonly = readonly
        self.uidvalidity = snapshot.uidvalidity
        self.uidnext = snapshot.uidnext
        # The last state of the store this view took in (SELECT's, then each apply's), shared with
        # every session that took in the same state: the view's messages are its messages but for
        # the few below, so a view holds nothing per message of its folder (issue 19: a dict of the
        # folder's infos and one of its message numbers per session were ~110 bytes per message and
        # session, 11 MB per session of a 100k folder). The next apply finds what changed since by
        # comparing the new state's messages with its messages.
        self._base = snapshot
        # Messages as this view has them where that is not _base's: expunged elsewhere and not yet
        # announced (`gone`, not in _base), and this session's own changes until the next apply.
        self._told: dict[int, MessageInfo] = {}
        # UIDs of _base this session expunged (not in the view any more).
        self._dropped: set[int] = set()
        # The view's own UIDs, ascending, while they are not _base's (`gone` or `_dropped` not empty):
        # 4 octets each. None: _base's.
        self._uids: array[int] | None = None
        self.gone: set[int] = set()  # expunged elsewhere, not yet announced to this client
        self.recent: frozenset[int] = snapshot.recent
        self.keywords: set[str] = set(snapshot.keywords)
        self.highestmodseq = snapshot.highestmodseq
        # RFC 7162: once CONDSTORE is enabled every FETCH of flags carries MODSEQ (3.1); once QRESYNC
        # is, expunges are told as VANISHED with UIDs (3.2.10) and every FETCH carries the UID.
        self.condstore = False
        self.qresync = False
        self.contexts: dict[str, SearchContext] = {}  # RFC 5267 searches kept up to date, by tag
        self.version = 0  # bumped on every change a kept search may have to be re-run for

    # --- numbers -----------------------------------------------------------------------------------

    @property
    def uids(self) -> Sequence[int]:
        """The view's UIDs, ascending (the state's shared tuple, or the view's own array)."""
        return self._uids if self._uids is not None else self._base.uids

    @property
    def infos(self) -> Mapping[int, MessageInfo]:
        """The view's messages by UID: the state's shared map, or a look-up through the view while it
        differs from the state (a few messages told apart)."""
        if not self._told and self._uids is None:
            return self._base.by_uid
        return _Infos(self._base, dict(self._told), self._uids)

    @property
    def exists(self) -> int:
        return len(self._uids) if self._uids is not None else len(self._base.messages)

    @property
    def largest_uid(self) -> int:
        if self._uids is not None:
            return self._uids[-1] if self._uids else 0
        messages = self._base.messages
        return messages[-1].uid if messages else 0

    def _place(self, uid: int) -> int:
        """Where `uid` is in the view's UIDs (its message number - 1), or -1."""
        own = self._uids
        if own is None:
            return self._base.place(uid)
        i = bisect_left(own, uid)
        return i if i < len(own) and own[i] == uid else -1

    def has(self, uid: int) -> bool:
        return self._place(uid) >= 0

    def seq_of(self, uid: int) -> int:
        """The message number of `uid` (by bisection: UIDs ascend with the numbers); KeyError when the
        view has no such message."""
        i = self._place(uid)
        if i < 0:
            raise KeyError(uid)
        return i + 1

    def seqs_of(self, uids: Sequence[int]) -> Sequence[int]:
        """The message numbers of `uids` (ascending, all in the view): a range when they are a run of
        the view's messages (1:*, or a batch of it), else one bisection each."""
        if not uids:
            return ()
        first = self.seq_of(uids[0])
        run = self.uids[first - 1:first - 1 + len(uids)]
        if len(run) == len(uids) and run[-1] == uids[-1] and list(run) == list(uids):
            return range(first, first + len(uids))
        return [self.seq_of(uid) for uid in uids]

    def uid_of(self, seq: int) -> int:
        return self.uids[seq - 1]

    def resolve(self, seqset: SequenceSet, uid: bool) -> list[int]:
        """UIDs (ascending) a sequence set names. For UID sets, numbers that are not messages are
        ignored (RFC 3501 6.4.8); `*` is the largest UID in use."""
        uids = self.uids
        if uid:
            if not uids:
                return []
            if len(seqset.ranges) == 1:
                low, high = next(seqset.bounds(self.largest_uid))
                if low <= uids[0] and high >= uids[-1]:
                    return list(uids)
            return seqset.select(uids, self.largest_uid)
        return [uids[n - 1] for n in seqset.numbers(self.exists)]

    def flags_of(self, uid: int) -> list[str]:
        return flag_text(self.info(uid).flags, uid in self.recent)[1:-1].split()

    def flags_atom(self, uid: int) -> Atom:
        return Atom(flag_text(self.info(uid).flags, uid in self.recent))

    def info(self, uid: int) -> MessageInfo:
        """The message as this view has it; KeyError for a UID the view never had."""
        if self._told:
            told = self._told.get(uid)
            if told is not None:
                return told
        found = self._base.find(uid)
        if found is None:
            raise KeyError(uid)
        return found

    def is_gone(self, uid: int) -> bool:
        return uid in self.gone

    # --- responses for SELECT ----------------------------------------------------------------------

    def flags_response(self) -> Data:
        return Data("FLAGS", (flag_list([*SYSTEM_FLAGS, *sorted(self.keywords)]),))

    def permanent_flags(self) -> UntaggedStatus:
        if self.readonly:
            return UntaggedStatus("OK", "Limited", "PERMANENTFLAGS ()")
        flags = " ".join([*SYSTEM_FLAGS, *sorted(self.keywords), "\\*"])
        return UntaggedStatus("OK", "Flags permitted", f"PERMANENTFLAGS ({flags})")

    def _learn_keywords(self, messages: Iterable[MessageInfo]) -> list[Response]:
        """Take in keywords now in use; the untagged FLAGS and PERMANENTFLAGS that announce new ones.
        RFC 3501 7.2.6: FLAGS lists the flags defined in the folder (its "mailbox"), and a client may
        rely on it to show keywords; one set by STORE, COPY or APPEND (here or in another session) is
        announced before the FETCH that carries it, as Dovecot does."""
        new = _keywords(messages) - self.keywords
        if not new:
            return []
        self.keywords |= new
        return [self.flags_response(), self.permanent_flags()]

    def first_unseen(self) -> int | None:
        if not self._told and self._uids is None:
            return self._base.first_unseen  # worked out once per folder state
        for i, uid in enumerate(self.uids, start=1):
            if "\\Seen" not in self.info(uid).flags:
                return i
        return None

    def unseen_count(self) -> int:
        return sum(1 for u in self.uids if u not in self.gone and "\\Seen" not in self.info(u).flags)

    # --- changes -----------------------------------------------------------------------------------

    def update_infos(self, infos: Iterable[MessageInfo]) -> list[Response]:
        """This session changed these messages (STORE, implicit \\Seen): take the new state without
        announcing it again later. Returns the announcement of any new keyword (send it first)."""
        taken = [info for info in infos if self.has(info.uid)]
        self.version += 1
        for info in taken:
            self._told[info.uid] = info
        return self._learn_keywords(taken)

    def expunged_by_us(self, uids: Sequence[int]) -> list[Response]:
        """Remove messages this session expunged; the EXPUNGE responses for them."""
        return self._remove([u for u in uids if self.has(u)])

    def apply(self, snapshot: FolderSnapshot, allow_expunge: bool, with_uid: bool = True) -> list[Response]:
        """Bring the view up to `snapshot`; the untagged responses that tell the client."""
        if snapshot is self._base and not (allow_expunge and self.gone):
            return []  # the state this view took in last: nothing to tell
        out: list[Response] = []
        largest = self.largest_uid
        pairs = self._changed(snapshot)  # (marks the view's messages no longer there as gone)
        if allow_expunge and self.gone:
            out += self._remove(sorted(self.gone))
        # Take in the new state: the view is its messages, but for those still gone.
        self._base = snapshot
        self._told = {u: self._told[u] for u in self.gone}
        self._dropped = {u for u in self._dropped if snapshot.place(u) >= 0}
        if self.gone or self._dropped:
            # (sorted() merges the two ascending runs in one pass)
            self._uids = array("I", sorted(chain(filterfalse(self._dropped.__contains__, snapshot.uids), self.gone)))
        else:
            self._uids = None
        # Flag changes made elsewhere.
        changed: list[MessageInfo] = []
        for new, old in pairs:
            if new.flags != old.flags or (self.condstore and new.modseq != old.modseq):
                changed.append(new)
                out.append(self.flags_fetch(new.uid, with_uid))
        # New messages (UIDs only grow, RFC 3501 2.3.1.1).
        messages = snapshot.messages
        added = [m for m in messages[bisect_right(messages, largest, key=_UID):] if m.uid not in self._dropped]
        recent_before = len(self.recent)
        if not snapshot.recent <= self.recent:
            self.recent |= snapshot.recent
        if added:
            out.append(Data(f"{self.exists} EXISTS"))
        if added or len(self.recent) != recent_before:
            out.append(Data(f"{len(self.recent)} RECENT"))
        self.uidnext = max(self.uidnext, snapshot.uidnext)
        self.highestmodseq = max(self.highestmodseq, snapshot.highestmodseq)
        if out:
            self.version += 1
        return [*self._learn_keywords([*changed, *added]), *out]

    def _changed(self, snapshot: FolderSnapshot) -> list[tuple[MessageInfo, MessageInfo]]:
        """The view's messages that `snapshot` has as another object: (the new one, the view's),
        in UID order; the view's messages it no longer has are marked gone (kept as the view has
        them). The index hands out the same MessageInfo while a message is unchanged: the few that
        are not the same object are found in C loops (a loop of Python over every message, for each
        session at each state of a folder that changes at every command, issue 19)."""
        base = self._base
        messages, before = snapshot.messages, base.messages
        told = self._told
        # UIDs only grow and an expunged one never comes back: when the new state has as many
        # messages up to the largest UID of `base` (the last state this view took in), none of
        # them is gone and they are in the same places: compared by place with base's, without a
        # map of either (building the new state's UID map and reading every message of the view's
        # was most of a session's catch-up after a delivery or a STORE slice: 25 ms at 100k).
        pairs: dict[int, tuple[MessageInfo, MessageInfo]] = {}
        dropped = self._dropped
        # The new state is taken whatever changed in a message (its file's name, its date read in
        # the background): a view that kept an equal old object found it "not the same" at every
        # later apply, a loop of Python over the whole folder for each session at each change once
        # the folder's dates were read (25 ms per session per delivery at 100k, issue 19).
        if not before or bisect_right(messages, before[-1].uid, key=_UID) == len(before):
            for i in snapshot.replaced_since(base):
                new = messages[i]
                if new.uid not in dropped:
                    pairs[new.uid] = (new, told.get(new.uid, before[i]))
        else:
            current = snapshot.by_uid
            for uid in filterfalse(current.__contains__, self.uids):
                if uid not in self.gone:
                    told[uid] = self.info(uid)
                    self.gone.add(uid)
            known = bisect_right(snapshot.uids, before[-1].uid)
            by_old = base.by_uid
            for i in compress(range(known), map(is_not, messages, map(by_old.get, snapshot.uids[:known]))):
                new = messages[i]
                old = told.get(new.uid) or by_old.get(new.uid)
                if old is not None and new.uid not in dropped:
                    pairs[new.uid] = (new, old)
        # This session's own changes the new state has as base had them (none, as the store goes).
        for uid, old in told.items():
            if uid not in pairs and uid not in self.gone:
                new_info = snapshot.find(uid)
                if new_info is not None and new_info is not old:
                    pairs[uid] = (new_info, old)
        return sorted(pairs.values(), key=_FIRST_UID) if len(pairs) > 1 else list(pairs.values())

    def flags_fetch(self, uid: int, with_uid: bool = True) -> Response:
        """* n FETCH (UID u FLAGS (...) MODSEQ (m)), the text made at once: one per message another
        session changed, for each session at its catch-up, where a FetchResponse's items and their
        rendering cost more than the line (issue 19)."""
        info = self.info(uid)
        line = f"* {self.seq_of(uid)} FETCH ({f'UID {uid} ' if with_uid or self.qresync else ''}FLAGS " + flag_text(
            info.flags, uid in self.recent)
        if self.condstore:
            line += f" MODSEQ ({info.modseq})"
        return Preformatted((line + ")\r\n").encode("utf-8"))

    def _remove(self, uids: Sequence[int]) -> list[Response]:
        if not uids:
            return []
        doomed = set(uids)
        out: list[Response] = []
        self.version += 1
        # RFC 5267 4.3: an expunged message leaves every kept result; told before the EXPUNGE,
        # while its number still means it.
        for context in self.contexts.values():
            leaving = context.result & doomed
            if leaving:
                context.result -= leaving
                out.append(context.update("REMOVEFROM", leaving if context.uid else map(self.seq_of, leaving)))
        if self.qresync:
            out.append(Data("VANISHED " + compact(sorted(doomed))))  # RFC 7162 3.2.10
        else:
            # Each EXPUNGE shifts the later numbers down at once.
            seqs = sorted(map(self.seq_of, doomed))
            out += [Data(f"{seq - removed} EXPUNGE") for removed, seq in enumerate(seqs)]
        base = self._base
        self._uids = array("I", filterfalse(doomed.__contains__, self.uids))
        for uid in doomed:
            self._told.pop(uid, None)
            if base.place(uid) >= 0:
                self._dropped.add(uid)
        if not self.recent.isdisjoint(doomed):
            self.recent -= doomed
        self.gone -= doomed
        return out


class _Infos(Mapping[int, MessageInfo]):
    """SelectedFolder.infos while the view differs from the state it took in last: the view's
    messages as they are when asked for (later changes of the view do not show; a FETCH's background
    work may read it after the view moved on)."""

    def __init__(self, base: FolderSnapshot, told: dict[int, MessageInfo], uids: array[int] | None) -> None:
        self._base, self._told, self._uids = base, told, uids

    def __getitem__(self, uid: int) -> MessageInfo:
        found = self._told.get(uid)
        if found is None:
            if self._uids is not None and not _holds(self._uids, uid):
                raise KeyError(uid)
            found = self._base.find(uid)
            if found is None:
                raise KeyError(uid)
        return found

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        if self._uids is not None:
            return _holds(self._uids, uid)
        return self._base.place(uid) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._uids if self._uids is not None else self._base.uids)

    def __len__(self) -> int:
        return len(self._uids) if self._uids is not None else len(self._base.messages)


def _holds(uids: Sequence[int], uid: int) -> bool:
    i = bisect_left(uids, uid)
    return i < len(uids) and uids[i] == uid


def _keywords(messages: Iterable[MessageInfo]) -> set[str]:
    return {f for m in messages for f in m.flags if not f.startswith("\\")}
