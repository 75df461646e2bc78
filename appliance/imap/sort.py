"""SORT (RFC 5256 3): message order by sort criteria, with the base subject of RFC 5256 2.1.

Keys come from the index (ARRIVAL, SIZE) and from the header fields of each message (CC, DATE,
FROM, SUBJECT, TO): those kept in the message cache (fetch_cache.py), else the header block of the
file, read in a worker thread, once per message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path

from appliance.imap.fetch import first_display, first_mailbox
from appliance.imap.fetch_cache import HeaderLookup, exact_headers, known_rows
from appliance.imap.limits import MAX_HEADER_OCTETS
from appliance.imap.mime import decode_words, parse_header
from appliance.store.maildir import open_message
from appliance.store.message_cache import FolderCache

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})
HEADER_KEYS = frozenset({"CC", "DATE", "FROM", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})
CACHE_BATCH = 500  # messages whose message-cache rows one read brings


@dataclass(frozen=True)
class SortItem:
    seq: int
    uid: int
    size: int
    internaldate: int
    path: Path


def sort(items: Sequence[SortItem], criteria: Sequence[tuple[str, bool]], cache: FolderCache | None = None
         ) -> list[SortItem]:
    """`criteria`: (key, reversed) pairs. Runs in a worker thread when headers are needed. Ties
    keep message-number order (RFC 5256 3: the final tie-breaker is the sequence number)."""
    headers = _all_headers(items, cache) if any(k in HEADER_KEYS for k, _ in criteria) else {}
    ordered = sorted(items, key=lambda i: i.seq)
    for key, reverse in reversed(criteria):  # stable sorts, last criterion first
        ordered.sort(key=lambda i, k=key: _key(k, i, headers.get(i.uid)), reverse=reverse)  # type: ignore[misc]
    return ordered


def _all_headers(items: Sequence[SortItem], cache: FolderCache | None) -> dict[int, HeaderLookup | None]:
    """The header fields of each message (by UID): the cached ones (every field SORT and THREAD
    read is in fetch_cache.CACHED_FIELDS), else the file's."""
    out: dict[int, HeaderLookup | None] = {}
    for start in range(0, len(items), CACHE_BATCH):
        batch = items[start:start + CACHE_BATCH]
        rows = known_rows(cache, [(i.uid, i.path) for i in batch])
        for i in batch:
            cached = exact_headers(rows.get(i.uid))
            out[i.uid] = cached if cached is not None else _headers(i.path)
    return out


def _headers(path: Path) -> Message | None:
    try:
        with open_message(path) as f:
            block = bytearray()
            for line in f:
                if line in (b"\r\n", b"\n") or len(block) > MAX_HEADER_OCTETS:
                    break
                block += line
    except OSError:
        return None  # expunged meanwhile: sorted as if it had no header fields
    return parse_header(bytes(block))


def _key(key: str, item: SortItem, headers: HeaderLookup | None) -> int | str:
    if key == "ARRIVAL":
        return item.internaldate
    if key == "SIZE":
        return item.size
    if key == "DATE":
        return _sent(headers, item.internaldate)
    if key == "SUBJECT":
        value = headers.get("Subject") if headers is not None else None
        return base_subject(decode_words(str(value))) if value is not None else ""
    if key in ("DISPLAYFROM", "DISPLAYTO"):
        # RFC 5957 2: the display name (decoded) or else the address of the first From/To address,
        # compared with i;unicode-casemap (case-folded here).
        value = headers.get(key[7:].capitalize()) if headers is not None else None
        if value is None:
            return ""
        text, is_name = first_display(str(value))
        return (decode_words(text) if is_name else text).casefold()
    # CC, FROM, TO: the mailbox (local part) of the first address, case-folded (RFC 5256 3).
    value = headers.get(key.capitalize() if key != "CC" else "Cc") if headers is not None else None
    return first_mailbox(str(value)).lower() if value is not None else ""


def _sent(headers: HeaderLookup | None, fallback: int) -> int:
    """RFC 5256 3 DATE: the Date header in UTC; the internal date when it is missing or invalid."""
    value = headers.get("Date") if headers is not None else None
    if value is None:
        return fallback
    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return fallback
    if when.tzinfo is None:
        return fallback
    return int(when.timestamp())


_BLOB = re.compile(r"\[[^\[\]]*\]\s*")
_REFWD = re.compile(r"(?:re|fwd?)\s*(?:\[[^\[\]]*\])?\s*:\s*", re.IGNORECASE)


def base_subject(subject: str) -> str:
    """RFC 5256 2.1: the subject without Re:, Fwd:, [list] blobs, (fwd) trailers and [fwd: ...]
    wrappers, whitespace collapsed, compared case-insensitively.

    The steps move two ends over the text rather than cutting a copy (or searching it again) per
    step: that was quadratic, and a mailed Subject of 40,000 "(fwd)" trailers (the MX takes 256 KiB
    of header) held a thread for minutes in every SORT and THREAD of its folder."""
    text = " ".join(subject.split())
    start, end = 0, len(text)
    while True:
        end = _without_trailers(text, start, end)  # (2)
        start = _without_leaders(text, start, end)  # (3)-(5)
        if text[start:start + 5].lower() == "[fwd:" and end - start >= 6 and text[end - 1] == "]":  # (6)
            start, end = _stripped(text, start + 5, end - 1)
            continue
        return text[start:end].upper()


def _without_trailers(text: str, start: int, end: int) -> int:
    """The end of text[start:end] without its "(fwd)" trailers and the white space around them."""
    while True:
        bare = _stripped(text, start, end)[1]
        if bare - start < 5 or text[bare - 5:bare].lower() != "(fwd)":
            return end
        end = _stripped(text, start, bare - 5)[1]


def _without_leaders(text: str, start: int, end: int) -> int:
    """The start of text[start:end] without its leaders (blobs then Re: or Fwd:), nor its blobs as long
    as something remains after them."""
    while True:
        blobs, last = start, start  # past the run of blobs here, and where its last one starts
        while (blob := _BLOB.match(text, blobs, end)) is not None:
            last, blobs = blobs, blob.end()
        if (leader := _REFWD.match(text, blobs, end)) is not None:
            start = leader.end()
        elif start < blobs < end:
            start = blobs  # (each blob of the run goes, one by one: the same leader test fails after it)
        elif last > start:
            return last  # all blobs: the last one stays
        else:
            return start


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _leads_as_reply(subject: str) -> bool:
    """Whether the subject starts with a subj-leader (blobs, then Re: or Fwd:): a reply (RFC 5256 3 4B)."""
    text = " ".join(subject.split())
    blobs = 0
    while (blob := _BLOB.match(text, blobs)) is not None:
        blobs = blob.end()
    return _REFWD.match(text, blobs) is not None


# --- THREAD=REFERENCES (RFC 5256 3) ----------------------------------------------------------------

_MSGID = re.compile(r"<[^<>\s]+>")


@dataclass(eq=False)
class _Node:
    item: SortItem | None = None
    parent: _Node | None = None
    children: list[_Node] | None = None
    date: int = 0
    subject: str = ""
    reply: bool = False

    def kids(self) -> list[_Node]:
        if self.children is None:
            self.children = []
        return self.children

    def has_ancestor(self, other: _Node) -> bool:
        node: _Node | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False


def thread_references(items: Sequence[SortItem], cache: FolderCache | None = None) -> list[_Node]:
    """RFC 5256 3 REFERENCES: threads by Message-ID/References/In-Reply-To, dummies pruned, roots
    grouped by base subject, siblings and threads in sent-date order. Runs in a worker thread."""
    table: dict[str, _Node] = {}
    all_headers = _all_headers(items, cache)
    for item in sorted(items, key=lambda i: i.seq):
        headers = all_headers[item.uid]
        ids = _MSGID.findall(_field(headers, "Message-ID"))
        own = ids[0] if ids else ""
        if not own or (own in table and table[own].item is not None):
            own = f"<dummy-{item.uid}>"  # missing or duplicate Message-ID: a unique one (RFC 5256 3 1A)
        node = table.setdefault(own, _Node())
        raw_subject = decode_words(_field(headers, "Subject"))
        node.item, node.date = item, _sent(headers, item.internaldate)
        node.subject = base_subject(raw_subject)
        node.reply = _leads_as_reply(raw_subject) or raw_subject.rstrip().lower().endswith("(fwd)")
        refs = _MSGID.findall(_field(headers, "References")) or _MSGID.findall(_field(headers, "In-Reply-To"))[:1]
        prev: _Node | None = None
        for ref in refs:  # 1B: link the references in order, never making a loop
            ref_node = table.setdefault(ref, _Node())
            # (A node without children is nobody's ancestor: a long References line of new ids costs
            # no walk up the chain per id, which was quadratic.)
            if prev is not None and ref_node.parent is None and ref_node is not prev and (
                    not ref_node.children or not prev.has_ancestor(ref_node)):
                _link(prev, ref_node)
            prev = ref_node
        if node.parent is not None:  # 1C: the message's parent is its last reference
            node.parent.kids().remove(node)
            node.parent = None
        if prev is not None and prev is not node and not prev.has_ancestor(node):
            _link(prev, node)
    roots = [n for n in table.values() if n.parent is None]
    roots = _prune(roots)
    for root in roots:
        _sort_tree(root)
    roots = _group_by_subject(roots)
    for root in roots:
        _sort_tree(root)
    roots.sort(key=lambda n: (n.date, _first_seq(n)))
    return roots


def thread_orderedsubject(items: Sequence[SortItem], cache: FolderCache | None = None) -> list[_Node]:
    """RFC 5256 3 ORDEREDSUBJECT: the messages sorted by base subject, then sent date; each run of
    one base subject is a thread whose first message is the parent of all the others; threads in
    the sent-date order of their first messages (ties by message number). Runs in a worker thread."""
    nodes = []
    all_headers = _all_headers(items, cache)
    for item in items:
        headers = all_headers[item.uid]
        subject = base_subject(decode_words(_field(headers, "Subject")))
        nodes.append(_Node(item=item, date=_sent(headers, item.internaldate), subject=subject))
    nodes.sort(key=lambda n: (n.subject, n.date, _first_seq(n)))
    roots: list[_Node] = []
    for node in nodes:
        if roots and roots[-1].subject == node.subject:
            _link(roots[-1], node)
        else:
            roots.append(node)
    roots.sort(key=lambda n: (n.date, _first_seq(n)))
    return roots


THREADERS = {"REFERENCES": thread_references, "ORDEREDSUBJECT": thread_orderedsubject}


def _field(headers: HeaderLookup | None, name: str) -> str:
    value = headers.get(name) if headers is not None else None
    return str(value) if value is not None else ""


def _link(parent: _Node, child: _Node) -> None:
    child.parent = parent
    parent.kids().append(child)


def _prune(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 3 step 3: dummies without children go; a dummy's children take its place, except a
    dummy at the top with several children, which stays to hold them together. Children before their
    parents, without recursion: a mailed References line of thousands of ids makes a chain that deep."""
    for node in reversed(_preorder(roots)):
        node.children = _pruned_level(node.children or [], top=False)
        for child in node.children:
            child.parent = node
    return _pruned_level(roots, top=True)


def _pruned_level(nodes: list[_Node], top: bool) -> list[_Node]:
    """Step 3 for one list of siblings whose own children are pruned already."""
    out: list[_Node] = []
    for node in nodes:
        if node.item is None:
            if not node.children:
                continue
            if not top or len(node.children) == 1:
                for child in node.children:
                    child.parent = node.parent
                out.extend(node.children)
                continue
        out.append(node)
    return out


def _preorder(roots: Sequence[_Node]) -> list[_Node]:
    """Every node of the trees, each before its children."""
    order: list[_Node] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children or [])
    return order


def _sort_tree(root: _Node) -> None:
    """Siblings by sent date (ties by message number); a dummy dates from its first child."""
    for node in reversed(_preorder([root])):
        if node.children:
            node.children.sort(key=lambda n: (n.date, _first_seq(n)))
        if node.item is None and node.children:
            node.date, node.subject = node.children[0].date, node.children[0].subject


def _first_seq(node: _Node) -> int:
    while node.item is None and node.children:
        node = node.children[0]
    return node.item.seq if node.item is not None else 0


def _group_by_subject(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 3 step 5: threads whose roots share a base subject are gathered."""
    table: dict[str, _Node] = {}
    for root in roots:
        subject = root.subject if root.item is not None else (root.children or [_Node()])[0].subject
        if not subject:
            continue
        seen = table.get(subject)
        if seen is None or (root.item is None and seen.item is not None) or (seen.reply and not root.reply):
            table[subject] = root
    out: list[_Node] = []
    for root in roots:
        subject = root.subject if root.item is not None else (root.children or [_Node()])[0].subject
        keeper = table.get(subject) if subject else None
        if keeper is None or keeper is root:
            out.append(root)
            continue
        if keeper.item is None and root.item is None:
            for child in root.kids():
                _link(keeper, child)
        elif keeper.item is None or (root.reply and not keeper.reply):
            _link(keeper, root)
        else:  # both replies or both not: a new dummy holds them
            holder = _Node(subject=subject)
            index = out.index(keeper) if keeper in out else None
            for node in (keeper, root):
                _link(holder, node)
            table[subject] = holder
            if index is not None:
                out[index] = holder
            else:
                roots_pos = roots.index(keeper)
                roots[roots_pos] = holder  # not yet reached: the holder takes its place
    return out


def thread_text(roots: Sequence[_Node], uid: bool) -> str:
    """RFC 5256 4: (1)(2 3 4)(5 (6)(7)): a chain of only children flat, several children nested.
    Without recursion, as deep as the threads go."""
    out: list[str] = []
    stack: list[_Node | str] = [part for root in reversed(roots) for part in (")", root, "(")]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
            continue
        numbers: list[str] = []
        while True:
            if node.item is not None:
                numbers.append(str(node.item.uid if uid else node.item.seq))
            kids = node.children or []
            if len(kids) != 1:
                break
            node = kids[0]
        out.append(" ".join(numbers))
        if kids:
            if numbers:
                out.append(" ")
            stack.extend(part for kid in reversed(kids) for part in (")", kid, "("))
    return "".join(out)
