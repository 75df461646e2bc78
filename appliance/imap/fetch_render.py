"""FETCH responses for messages of the selected folder: index items straight to text, file items read
in batches on worker threads, with a per-session cache of the messages' MIME structures.

The session decides what a FETCH means (which messages, \\Seen set by a body fetch, CONDSTORE
modifiers, EXPUNGEISSUED) and hands this the messages and items; what one item's value is lives in
fetch.py (pure). Nothing here writes to the store or to a socket: responses go to the `send` given.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from appliance.imap import fetch as fetching
from appliance.imap.commands import FetchAttribute, FetchItem
from appliance.imap.limits import STRUCTURE_CACHE_ENTRIES
from appliance.imap.mime import Part, scan, scan_header
from appliance.imap.responses import FetchResponse, Preformatted, Response
from appliance.imap.selected import SelectedFolder, flag_text
from appliance.store.mailstore import MessageInfo, open_message

FETCH_BATCH = 64  # messages whose files one worker-thread call reads
INDEX_FETCH_BATCH = 5000  # messages per rendered block of an index-only FETCH

# (folder name, UIDVALIDITY, UID): a UID names one message for as long as its UIDVALIDITY holds.
StructureKey = tuple[str, int, int]
_Job = tuple[int, MessageInfo, fetching.MessageFacts]  # (message number, index entry, facts)


class Send(Protocol):
    async def __call__(self, *responses: Response) -> None: ...


class FetchRenderer:
    """One per session: renders FETCH answers and keeps the structures of recently fetched messages
    (a client reading a message asks for its BODYSTRUCTURE, then for its parts one by one)."""

    def __init__(self) -> None:
        self._structures: OrderedDict[StructureKey, Part] = OrderedDict()

    def forget(self) -> None:
        """The session left its folder: the cached structures are of no more use."""
        self._structures.clear()

    async def send_fetch(
        self, view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool, send: Send,
    ) -> bool:
        """Send the FETCH responses for `uids` (in the selected folder `view`), `flags_changed` adding
        FLAGS (and MODSEQ under CONDSTORE) where the fetch itself changed them (RFC 3501 6.4.5);
        returns whether a message's file had gone meanwhile (no response sent for it)."""
        if not any(fetching.needs_file(i) for i in items):
            for start in range(0, len(uids), INDEX_FETCH_BATCH):
                await send(index_only(view, uids[start:start + INDEX_FETCH_BATCH], items, flags_changed))
            return False
        missing = False
        for start in range(0, len(uids), FETCH_BATCH):
            jobs = [(view.seq_of(uid), view.info(uid), facts(view, uid)) for uid in uids[start:start + FETCH_BATCH]]
            results = await asyncio.to_thread(
                self._render_files, (view.name, view.uidvalidity), jobs, items, flags_changed, condstore,
            )
            missing = missing or None in results
            await send(*[r for r in results if r is not None])
        return missing

    def _render_files(
        self, folder: tuple[str, int], jobs: list[_Job], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool,
    ) -> list[FetchResponse | None]:
        """Runs in a worker thread: read and render what FETCH wants of each message (None: its file
        is gone)."""
        full = any(fetching.needs_structure(i) for i in items)
        out: list[FetchResponse | None] = []
        for seq, info, message in jobs:
            try:
                f = open_message(info.path)
            except FileNotFoundError:
                out.append(None)
                continue
            with f:
                root = self._structure((*folder, info.uid), f, full)
                values = fetching.item_values(items, message, f, root, _reopener(f))
            if message.uid in flags_changed and not any(name == "FLAGS" for name, _ in values):
                values.append(("FLAGS", fetching.index_value("FLAGS", message)))
                if condstore and not any(name == "MODSEQ" for name, _ in values):
                    values.append(("MODSEQ", fetching.index_value("MODSEQ", message)))
            out.append(FetchResponse(seq, tuple(values)))
        return out

    def _structure(self, key: StructureKey, f: BinaryIO, full: bool) -> Part:
        part = self._structures.get(key)
        if part is not None:
            self._structures.move_to_end(key)
            return part
        f.seek(0)
        if not full:
            return scan_header(f)  # cheap enough not to cache
        part = scan(f)
        self._structures[key] = part
        if len(self._structures) > STRUCTURE_CACHE_ENTRIES:
            self._structures.popitem(last=False)
        return part


def facts(view: SelectedFolder, uid: int) -> fetching.MessageFacts:
    """What the index knows of one message, as the session shows it (\\Recent included)."""
    info = view.info(uid)
    return fetching.MessageFacts(uid, tuple(view.flags_of(uid)), info.size, info.internaldate, info.modseq)


def index_only(view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int]) -> Response:
    """FETCH of index items only (the UID FLAGS sync every client does): rendered straight to text,
    a few microseconds per message."""
    names = [item.name for item in items if isinstance(item, FetchAttribute)]
    add_flags = "FLAGS" not in names and bool(flags_changed)
    recent, infos, seq_of = view.recent, view.infos, view.seq_of
    lines: list[str] = []
    for uid in uids:
        info = infos[uid]
        parts: list[str] = []
        for name in names:
            if name == "UID":
                parts.append(f"UID {uid}")
            elif name == "FLAGS":
                parts.append("FLAGS " + flag_text(info.flags, uid in recent))
            elif name == "RFC822.SIZE":
                parts.append(f"RFC822.SIZE {info.size}")
            elif name == "MODSEQ":
                parts.append(f"MODSEQ ({info.modseq})")
            else:
                parts.append("INTERNALDATE " + fetching.internaldate(info.internaldate).decode("ascii"))
        if add_flags and uid in flags_changed:
            parts.append("FLAGS " + flag_text(info.flags, uid in recent))
            if view.condstore and "MODSEQ" not in names:
                parts.append(f"MODSEQ ({info.modseq})")
        lines.append(f"* {seq_of(uid)} FETCH ({' '.join(parts)})\r\n")
    return Preformatted("".join(lines).encode("utf-8"))


def _reopener(f: BinaryIO) -> fetching.Reopen:
    def reopen() -> BinaryIO:
        # A second handle on the same open file (not the path: a flag change renames it).
        return os.fdopen(os.dup(f.fileno()), "rb")

    return reopen
