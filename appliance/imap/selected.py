"""The selected folder as one session sees it: message numbers, flags, \\Recent, and what changed.

Message sequence numbers are per session (RFC 3501 2.3.1.2): they only shift when this session is
told about an expunge. A new store snapshot is turned into the untagged responses that bring the
client up to date: EXPUNGE (RFC 3501 7.4.1), EXISTS/RECENT (7.3.1-2) and FETCH FLAGS (7.4.2).
During FETCH, STORE and SEARCH (not their UID forms) an EXPUNGE must not be sent (7.4.1); the
expunged messages then stay in the view, marked gone, until a later command may announce them.

Folders of 100,000 messages are normal, so the view keeps plain lists, dicts and sets (no object per
message beyond the store's MessageInfo), and renders a flag list once per distinct set of flags.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import compress
from operator import is_not, itemgetter

from appliance.imap.commands import RECENT, SYSTEM_FLAGS, SearchKey, SequenceSet, compact
from appliance.imap.responses import Atom, Data, FetchResponse, Response, UntaggedStatus, flag_list
from appliance.store.mailstore import FolderSnapshot, MessageInfo

_ORDER = {flag: i for i, flag in enumerate(SYSTEM_FLAGS)}
_UID = itemgetter(0)  # MessageInfo's


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
        # Shared with the snapshot (and every session that selected the same state) until this view
        # changes: SELECT of an unchanged folder builds no per-message object (issue 19). Read them
        # freely; change them only after _own().
        self.uids: Sequence[int] = snapshot.uids
        self.infos: dict[int, MessageInfo] = snapshot.by_uid
        self._snapshot: FolderSnapshot | None = snapshot  # None once the view has its own copies
        # The last state of the store this view took in (SELECT's, then each apply's): the next
        # apply finds what changed since by comparing the new state's messages with its messages.
        self._base = snapshot
        self.gone: set[int] = set()  # expunged elsewhere, not yet announced to this client
        self.recent: set[int] = set(snapshot.recent)
        self._seq: dict[int, int] | None = None
        self.keywords: set[str] = set(snapshot.keywords)
        self.highestmodseq = snapshot.highestmodseq
        # RFC 7162: once CONDSTORE is enabled every FETCH of flags carries MODSEQ (3.1); once QRESYNC
        # is, expunges are told as VANISHED with UIDs (3.2.10) and every FETCH carries the UID.
        self.condstore = False
        self.qresync = False
        self.contexts: dict[str, SearchContext] = {}  # RFC 5267 searches kept up to date, by tag
        self.version = 0  # bumped on every change a kept search may have to be re-run for

    def _own(self) -> list[int]:
        """This view's own UID list and info map, copied from the shared snapshot's at the first
        change; returns the list (to append to)."""
        if self._snapshot is not None:
            self._snapshot = None
            self.uids = list(self.uids)
            self.infos = dict(self.infos)
        assert isinstance(self.uids, list)
        return self.uids

    # --- numbers -----------------------------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def largest_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def seq_of(self, uid: int) -> int:
        if self._seq is None:
            self._seq = {u: i for i, u in enumerate(self.uids, start=1)}
        return self._seq[uid]

    def uid_of(self, seq: int) -> int:
        return self.uids[seq - 1]

    def resolve(self, seqset: SequenceSet, uid: bool) -> list[int]:
        """UIDs (ascending) a sequence set names. For UID sets, numbers that are not messages are
        ignored (RFC 3501 6.4.8); `*` is the largest UID in use."""
        if uid:
            if not self.uids:
                return []
            if len(seqset.ranges) == 1:
                low, high = next(seqset.bounds(self.largest_uid))
                if low <= self.uids[0] and high >= self.uids[-1]:
                    return list(self.uids)
            return seqset.select(self.uids, self.largest_uid)
        return [self.uids[n - 1] for n in seqset.numbers(self.exists)]

    def flags_of(self, uid: int) -> list[str]:
        return flag_text(self.infos[uid].flags, uid in self.recent)[1:-1].split()

    def flags_atom(self, uid: int) -> Atom:
        return Atom(flag_text(self.infos[uid].flags, uid in self.recent))

    def info(self, uid: int) -> MessageInfo:
        return self.infos[uid]

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
        if self._snapshot is not None:
            return self._snapshot.first_unseen  # worked out once per folder state
        for i, uid in enumerate(self.uids, start=1):
            if "\\Seen" not in self.infos[uid].flags:
                return i
        return None

    def unseen_count(self) -> int:
        return sum(1 for u, m in self.infos.items() if u not in self.gone and "\\Seen" not in m.flags)

    # --- changes -----------------------------------------------------------------------------------

    def update_infos(self, infos: Iterable[MessageInfo]) -> list[Response]:
        """This session changed these messages (STORE, implicit \\Seen): take the new state without
        announcing it again later. Returns the announcement of any new keyword (send it first)."""
        taken = [info for info in infos if info.uid in self.infos]
        self.version += 1
        if taken:
            self._own()
        for info in taken:
            self.infos[info.uid] = info
        return self._learn_keywords(taken)

    def expunged_by_us(self, uids: Sequence[int]) -> list[Response]:
        """Remove messages this session expunged; the EXPUNGE responses for them."""
        return self._remove([u for u in uids if u in self.infos])

    def apply(self, snapshot: FolderSnapshot, allow_expunge: bool, with_uid: bool = True) -> list[Response]:
        """Bring the view up to `snapshot`; the untagged responses that tell the client."""
        out: list[Response] = []
        changed: list[MessageInfo] = []
        if snapshot is self._snapshot or (snapshot is self._base and not (allow_expunge and self.gone)):
            return []  # the very state this view shows, or took in last: nothing to tell
        base, self._base = self._base, snapshot
        self._own()
        messages = snapshot.messages
        places = self._changed_places(snapshot, base)
        if allow_expunge and self.gone:
            out += self._remove(sorted(self.gone))
        # Flag changes made elsewhere.
        infos = self.infos
        for i in places:
            new = messages[i]
            old = infos.get(new.uid)
            if old is None:
                continue  # (expunged by this session meanwhile)
            # The new state is taken whatever changed (its file's name, its date read in the
            # background): a view that kept an equal old object found it "not the same" at every
            # later apply, a loop of Python over the whole folder for each session at each change
            # once the folder's dates were read (25 ms per session per delivery at 100k, issue 19).
            infos[new.uid] = new
            if new.flags != old.flags or (self.condstore and new.modseq != old.modseq):
                changed.append(new)
                out.append(self.flags_fetch(new.uid, with_uid))
        # New messages (UIDs only grow, RFC 3501 2.3.1.1).
        added = messages[bisect_right(messages, self.largest_uid, key=_UID):]
        recent_before = len(self.recent)
        self.recent |= set(snapshot.recent)
        if added:
            uids = self._own()
            seq = self._seq  # kept: new messages take the next numbers (made again was O(folder) per delivery)
            for m in added:
                uids.append(m.uid)
                self.infos[m.uid] = m
                if seq is not None:
                    seq[m.uid] = len(uids)
            out.append(Data(f"{self.exists} EXISTS"))
        if added or len(self.recent) != recent_before:
            out.append(Data(f"{len(self.recent)} RECENT"))
        self.uidnext = max(self.uidnext, snapshot.uidnext)
        self.highestmodseq = max(self.highestmodseq, snapshot.highestmodseq)
        if out:
            self.version += 1
        return [*self._learn_keywords([*changed, *added]), *out]

    def _changed_places(self, snapshot: FolderSnapshot, base: FolderSnapshot) -> Iterable[int]:
        """Where in `snapshot.messages`, among the messages this view has, those that are not the
        object the view took in are (lazily); the view's messages no longer in it are added to
        `gone`. The index hands out the same MessageInfo while a message is unchanged: the few that
        are not the same object are found in C loops (a loop of Python over every message, for
        each session at each state of a folder that changes at every command, issue 19)."""
        messages, before = snapshot.messages, base.messages
        # UIDs only grow and an expunged one never comes back: when the new state has as many
        # messages up to the largest UID of `base` (the last state this view took in), none of
        # them is gone and they are in the same places: compared by place with base's, without a
        # map of either (building the new state's UID map and reading every message of the view's
        # was most of a session's catch-up after a delivery or a STORE slice: 25 ms at 100k).
        if not before or bisect_right(messages, before[-1].uid, key=_UID) == len(before):
            return compress(range(len(before)), map(is_not, messages, before))
        current = snapshot.by_uid
        # The snapshot's UIDs up to the view's largest are a subset of the view's: as many means
        # the same, and no message is gone.
        known = bisect_right(snapshot.uids, self.largest_uid)
        if known != len(self.uids):
            self.gone.update(u for u in self.uids if u not in current)
        return compress(range(known), map(is_not, messages, map(self.infos.get, snapshot.uids)))

    def flags_fetch(self, uid: int, with_uid: bool = True) -> FetchResponse:
        items: list[tuple[str, Atom | int]] = []
        if with_uid or self.qresync:
            items.append(("UID", uid))
        items.append(("FLAGS", self.flags_atom(uid)))
        if self.condstore:
            items.append(("MODSEQ", Atom(f"({self.infos[uid].modseq})")))
        return FetchResponse(self.seq_of(uid), tuple(items))

    def _remove(self, uids: Sequence[int]) -> list[Response]:
        if not uids:
            return []
        doomed = set(uids)
        self._own()
        out: list[Response] = []
        removed = 0
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
            for seq, uid in enumerate(self.uids, start=1):
                if uid in doomed:
                    out.append(Data(f"{seq - removed} EXPUNGE"))  # later numbers shift down at once
                    removed += 1
        self.uids = [u for u in self.uids if u not in doomed]
        for uid in doomed:
            self.infos.pop(uid, None)
            self.recent.discard(uid)
        self.gone -= doomed
        self._seq = None
        return out


def _keywords(messages: Iterable[MessageInfo]) -> set[str]:
    return {f for m in messages for f in m.flags if not f.startswith("\\")}
