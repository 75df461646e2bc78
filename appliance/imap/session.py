"""What each IMAP command does, against the services (RFC 3501 6, plus the extensions we offer).

One ImapSession per connection. Commands are dispatched through one table per state (RFC 3501 3);
handlers are named cmd_<command>. A handler answers through `self.io` and raises ImapNo / ImapBad
for a failed command: the error carries its reply. Anything else is a bug: the server logs it and
says BYE.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Generic, Literal, Protocol, TypeVar

from appliance.auth import Refused
from appliance.disk_full import DISK_FULL_TEXT, is_disk_full
from appliance.imap import fetch_cache, names
from appliance.imap.catenate import locate, parse_url, read
from appliance.imap.commands import (
    Append,
    AppendContent,
    Authenticate,
    BinarySection,
    BodySection,
    CancelUpdate,
    CatenateUrl,
    Command,
    Compress,
    CopyMove,
    Enable,
    Expunge,
    Fetch,
    FetchAttribute,
    FolderCommand,
    Id,
    ListCommand,
    Login,
    Notify,
    NotifyFilter,
    Qresync,
    QuotaCommand,
    Rename,
    Search,
    SearchKey,
    Select,
    SequenceSet,
    Sort,
    Status,
    Store,
    Thread,
    compact,
    in_ranges,
)
from appliance.imap.errors import ImapBad, ImapError, ImapNo
from appliance.imap.fetch_cache import HeaderLookup
from appliance.imap.fetch_render import FetchRenderer
from appliance.imap.limits import MAX_APPEND_OCTETS, MAX_LIST_PATTERNS, MAX_SEARCH_CONTEXTS
from appliance.imap.mime import base64_for_nul
from appliance.imap.notify import NOTIFY_EVENTS, NotifyState, status_items, unknown_events
from appliance.imap.responses import (
    Bye,
    Continuation,
    Data,
    Response,
    Tagged,
    UntaggedStatus,
    Value,
    encode_astring,
)
from appliance.imap.search import (
    SUPPORTED_CHARSETS,
    CachedSubject,
    Candidate,
    Searcher,
    TextHits,
    search_files,
    uses_modseq,
)
from appliance.imap.selected import SearchContext, SelectedFolder
from appliance.imap.sort import HEADER_KEYS as SORT_HEADER_KEYS
from appliance.imap.sort import THREADERS, SortItem, thread_text
from appliance.imap.sort import sort as sort_messages
from appliance.imap.store_errors import MissingFolderCode, store_errors
from appliance.message_memory import BUSY_TEXT
from appliance.sizes import limit_text
from appliance.store.mailstore import (
    FolderInfo,
    Generation,
    NoSuchFolder,
    SessionEnd,
    StoreError,
    Watcher,
)
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.services import Services
    from appliance.store.message_cache import FolderCache

log = logging.getLogger("letterbox.imap")
C = TypeVar("C", bound=Command)

State = Literal["not_authenticated", "authenticated", "selected", "logout"]
BASE_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE")
AUTHENTICATED_CAPABILITIES = (
    "IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE",
    "NAMESPACE", "CHILDREN", "UNSELECT", "QUOTA", "CONDSTORE", "QRESYNC", "ESEARCH", "LIST-STATUS",
    "STATUS=SIZE", "SORT", "SORT=DISPLAY", "ESORT", "MULTIAPPEND", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT",
    "BINARY", "COMPRESS=DEFLATE", "LIST-EXTENDED", "CATENATE",
    "CONTEXT=SEARCH", "NOTIFY",
)
SERVER_ID = (("name", "Letterbox"), ("vendor", "Letterbox"))
EXTERNAL_POLL = 60.0  # seconds between looks at the disk during IDLE
SEEN = "\\Seen"
RECENT_FLAG = frozenset({"\\Recent"})
FLAGS_ITEM, MODSEQ_ITEM = FetchAttribute("FLAGS"), FetchAttribute("MODSEQ")  # (made once, not per FETCH)
# Commands after which the selected folder is another or none: no point bringing the old one up to date.
LEAVES_FOLDER = frozenset({"SELECT", "EXAMINE", "UNSELECT", "CLOSE", "LOGOUT"})
POLLS = frozenset({"NOOP", "CHECK"})  # always OK (RFC 3501 6.1.2, 6.4.1): their look at the folder is their own (_look)
DELETED = "\\Deleted"
LIST_ON_LOOP = 2000  # names times patterns a LIST matches on the event loop; more go to a thread
SEARCH_ON_LOOP = 1000  # messages an index-only SEARCH checks on the event loop; more go to a thread
SEARCH_CACHE_BATCH = 500  # messages whose message-cache rows one read brings, for header keys
SCAN_CHUNK_MESSAGES = 500  # messages per task of the worker process that scans files
SCAN_CHUNK_OCTETS = 8 * 1024 * 1024
SCAN_LIGHT_MESSAGES = 50  # a scan of at most this many files runs in a thread when no worker is up
# The BYE of a session whose login no longer holds (_mailbox_removed).
SESSION_END_TEXT: dict[SessionEnd, str] = {
    "removed": "This mailbox no longer exists",
    "disabled": "This account is disabled",
    "password": "The password of this account was changed",
}


class SessionIO(Protocol):
    """What the session needs from the connection (server.py provides it)."""

    peer: str
    tls_active: bool
    starttls_available: bool

    async def send(self, *responses: Response) -> None: ...
    async def read_line(self, seconds: float) -> bytes | None: ...
    def prepare_tls(self) -> None: ...
    async def start_tls(self) -> None: ...
    def wait_line(self, seconds: float) -> asyncio.Task[bytes | None]: ...
    def start_compression(self) -> None: ...
    @property
    def compressed(self) -> bool: ...
    def room_for_append(self, octets: int) -> bool: ...
    def hold(self, octets: int) -> bool: ...


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    idle_timeout: float
    max_append_octets: int = MAX_APPEND_OCTETS  # the connection's (ImapLimits): what its literals may take


class ImapSession:
    def __init__(self, services: Services, io: SessionIO, config: SessionConfig) -> None:
        self.services = services
        self.store = services.store
        self.io = io
        self.config = config
        self.state: State = "not_authenticated"
        self.user: str | None = None
        self._counted: str | None = None  # the account whose session count this session is in
        self._generation: Generation | None = None  # logged in to (MailStore.mailbox_generation)
        self.selected: SelectedFolder | None = None
        self.watcher: Watcher | None = None
        # Look at the store before the next response: `_dirty` when the client polled (NOOP, CHECK,
        # IDLE's periodic look), which reads the disk too for other programs' changes; `_owed` for
        # expunges not yet announced and for changes IDLE was woken by; a fired watcher means a
        # change made through this process's store, which the index holds already (no listing of
        # the Maildir per command).
        self._dirty = False
        self._owed = False
        self._disk_seen = 0.0  # time.monotonic() of the last sync that read the disk
        self.fetcher = FetchRenderer(services.cpu)  # FETCH responses and the structure cache of the selected folder
        # RFC 7162 3.1/3.2: on once the client used or enabled CONDSTORE / enabled QRESYNC; never off.
        self.condstore = False
        self.qresync = False
        self.notify = NotifyState()  # RFC 5465: other mailboxes whose changes are told as STATUS
        self.scanned = 0  # messages SEARCH read from their files (not answered by the full-text index)
        self._id_logged = False
        self._look_failed = False  # a poll's look failed on a full disk, and was logged (_look)

    # --- greeting and capabilities -----------------------------------------------------------------

    def capabilities(self) -> tuple[str, ...]:
        if self.state in ("authenticated", "selected"):
            return AUTHENTICATED_CAPABILITIES
        caps = list(BASE_CAPABILITIES)
        if self.io.starttls_available and not self.io.tls_active:
            caps.append("STARTTLS")
        if self.io.tls_active:
            caps.append("AUTH=PLAIN")
        else:
            caps.append("LOGINDISABLED")  # RFC 3501 6.2.3: no password over cleartext
        return tuple(caps)

    def capability_code(self) -> str:
        return "CAPABILITY " + " ".join(self.capabilities())

    def greeting(self) -> Response:
        return UntaggedStatus("OK", f"{self.config.hostname} Letterbox IMAP ready", self.capability_code())

    # --- dispatch ----------------------------------------------------------------------------------

    async def handle(self, command: Command) -> str:
        """Run one command and answer it; returns the status of the answer (OK, NO or BAD).
        Raises only for bugs (the server logs them and says BYE)."""
        if await self._mailbox_removed():
            return "NO"
        route = DISPATCH[self.state].get(command.name)
        try:
            if route is None:
                if any(command.name in t for t in DISPATCH.values()):
                    raise ImapBad(f"{command.name} is not allowed now")
                raise ImapBad(f"Unknown command {command.name}")
            if self.state == "selected" and command.name not in LEAVES_FOLDER and command.name not in POLLS:
                # A look at the folder that cannot be written (a full disk) is this command's NO.
                with store_errors(command.name):
                    await self.sync(allow_expunge=_may_expunge(command))
            await route.run(self, command)
        except ImapError as exc:
            # Removed while the command ran (an IDLE woken by the removal): BYE, as at the next command.
            if await self._mailbox_removed():
                return "NO"
            if self.state == "selected":
                # The updates are owed at a later command when the look fails too: the answer is NO anyway.
                with contextlib.suppress(ImapError), store_errors(command.name):
                    await self.sync(allow_expunge=_may_expunge(command))
            await self.io.send(Tagged(command.tag, exc.status, exc.text, exc.code))
            return exc.status
        return "OK"

    async def _mailbox_removed(self) -> bool:
        """Removed since the login, maybe re-created for someone else, disabled, or given another
        password: nothing more for this session (a BYE, and True)."""
        if self.user is None or self._generation is None:
            return False
        ended = await self.store.session_ended(self.user, self._generation)
        if ended is None:
            return False
        self._unselect()
        self.state = "logout"
        await self.io.send(Bye(SESSION_END_TEXT[ended]))
        return True

    async def ok(self, command: Command, text: str | None = None, code: str | None = None, *,
                 look: bool = True) -> None:
        """The tagged OK, after any updates the client is owed (RFC 3501 7: untagged first); `look`
        False when the command looked at the folder itself (_look)."""
        if self.state == "selected" and look:
            await self.sync(allow_expunge=_may_expunge(command))
        if self.notify.mailboxes:
            await self._notify_changes()
        await self.io.send(Tagged(command.tag, "OK", text or f"{command.name} completed", code))

    async def close(self) -> None:
        if self._counted is not None:
            self.services.account_sessions.close(self._counted)
            self._counted = None
        self._unselect()
        self.notify.close()

    # --- any state (RFC 3501 6.1) ------------------------------------------------------------------

    async def cmd_capability(self, command: Command) -> None:
        await self.io.send(Data("CAPABILITY " + " ".join(self.capabilities())))
        await self.ok(command)

    async def cmd_noop(self, command: Command) -> None:
        await self._polled(command)

    async def _polled(self, command: Command) -> None:
        """NOOP's and CHECK's answer: how a client polls (RFC 3501 6.1.2, 6.4.1), looking at the disk
        too, for changes another program made to the Maildir (they do not wake the watcher). Always
        OK, whatever the look found (_look)."""
        self._dirty = True
        await self._look(command.name)
        await self.ok(command, look=False)

    async def _look(self, name: str) -> None:
        """A poll's look at the selected folder (NOOP, CHECK, IDLE), which tells what changed. A look
        that finds a change on the disk commits it as it reads the folder (another program's rename,
        or the files of a STORE whose rows a full disk refused); a full disk refusing that write is
        not the poll's failure: the updates stay owed to a later look, and the session logs it once
        until a look succeeds again."""
        try:
            await self.sync(allow_expunge=True)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self._dirty = True  # (cleared by the look that failed)
            if not self._look_failed:
                self._look_failed = True
                log.warning("IMAP %s: the changes found in the folder cannot be written (%s): told at a later"
                            " look", name, exc)
            return
        self._look_failed = False

    async def cmd_logout(self, command: Command) -> None:
        self._unselect()
        self.state = "logout"
        await self.io.send(Bye("Logging out"), Tagged(command.tag, "OK", "LOGOUT completed"))

    async def cmd_id(self, command: Id) -> None:
        if command.params and not self._id_logged:
            # Once per session: ID is allowed before the login, and every line it logged was a line
            # of the box's log an unauthenticated client could write again and again.
            self._id_logged = True
            shown = " ".join(f"{k}={v}" for k, v in command.params[:8] if len(k) < 40)[:300]
            log.info("imap client id: peer=%s %s", self.io.peer, shown.encode("ascii", "replace").decode())
        values: list[Value] = []
        for key, value in SERVER_ID:
            values += [key, value]
        await self.io.send(Data("ID", (values,)))
        await self.ok(command)

    # --- not authenticated (RFC 3501 6.2) ----------------------------------------------------------

    async def cmd_starttls(self, command: Command) -> None:
        if self.io.tls_active or not self.io.starttls_available:
            raise ImapBad("TLS is already active" if self.io.tls_active else "STARTTLS is not offered here")
        self.io.prepare_tls()  # stop reading plaintext before the client may start its handshake
        await self.io.send(Tagged(command.tag, "OK", "Begin TLS negotiation now"))
        await self.io.start_tls()

    async def cmd_login(self, command: Login) -> None:
        self._require_tls()
        await self._authenticate(command, command.user, command.password)

    async def cmd_authenticate(self, command: Authenticate) -> None:
        if command.mechanism != "PLAIN":
            raise ImapNo(f"Unsupported mechanism {command.mechanism}", "CANNOT")
        self._require_tls()
        response = command.initial
        if response is None:
            await self.io.send(Continuation(""))
            line = await self.io.read_line(self.config.idle_timeout)
            if line is None:
                raise ImapBad("Authentication abandoned")
            response = line.decode("ascii", "replace").strip()
        if response == "*":
            raise ImapBad("Authentication cancelled")  # RFC 3501 6.2.2
        try:
            # RFC 4959 3: "=" is an empty initial response.
            decoded = b"" if response == "=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            raise ImapBad("Invalid base64") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            raise ImapNo("Malformed PLAIN response", "AUTHENTICATIONFAILED")
        authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
        if authzid and authzid.lower() != authcid.lower():
            raise ImapNo("Authorization identity must be the login name", "AUTHORIZATIONFAILED")
        await self._authenticate(command, authcid, password)

    def _require_tls(self) -> None:
        if not self.io.tls_active:
            # RFC 3501 6.2.3 / RFC 5530 PRIVACYREQUIRED: never a password in clear text.
            raise ImapNo("Use STARTTLS first: no passwords over plain text", "PRIVACYREQUIRED")

    async def _authenticate(self, command: Command, user: str, password: str) -> None:
        principal = await self.services.auth.login(user, password, "imap", self.io.peer)
        if isinstance(principal, Refused):  # RFC 5530 3: a temporary refusal, not a wrong password
            raise ImapNo(principal.message(), "UNAVAILABLE")
        if principal is None or principal.kind != "mailbox":
            raise ImapNo("Authentication failed", "AUTHENTICATIONFAILED")
        generation = await self.store.mailbox_generation(principal.name)
        if generation is None or generation.password_hash != principal.password_hash:
            # Disabled, removed or given another password while its password was checked.
            raise ImapNo("Authentication failed", "AUTHENTICATIONFAILED")
        if not self.services.account_sessions.open(principal.name):
            raise ImapNo("Too many sessions open for this account", "LIMIT")  # RFC 5530 3
        self._counted = principal.name
        self.user = principal.name
        self._generation = generation
        self.state = "authenticated"
        await self.io.send(Tagged(command.tag, "OK", "Logged in", self.capability_code()))

    # --- authenticated (RFC 3501 6.3) --------------------------------------------------------------

    @property
    def mailbox(self) -> str:
        """The account logged in to: a mailbox in our words (README), whose folders are what RFC 3501
        calls mailboxes."""
        assert self.user is not None
        return self.user

    async def cmd_select(self, command: Select) -> None:
        readonly = command.name == "EXAMINE"
        if command.qresync is not None and not self.qresync:
            raise ImapBad("QRESYNC is not enabled")  # RFC 7162 3.2.5: ENABLE QRESYNC comes first
        if command.condstore:
            self.condstore = True
        # RFC 3501 6.3.1: SELECT first leaves any selected folder, and a failed SELECT leaves the
        # session in the authenticated state (not selected with no folder).
        self._unselect()
        self.state = "authenticated"
        name = names.canonical(command.folder)
        snapshot = await self.store.snapshot(self.mailbox, name, claim_recent=not readonly)
        view = SelectedFolder(snapshot, readonly)
        view.condstore, view.qresync = self.condstore, self.qresync
        self.watcher = self.store.watch(self.mailbox, view.name)
        self.selected = view
        self.state = "selected"
        self._dirty = self._owed = False
        self._disk_seen = time.monotonic()  # the snapshot above read the disk
        out: list[Response] = [
            view.flags_response(),
            Data(f"{view.exists} EXISTS"),
            Data(f"{len(view.recent)} RECENT"),
        ]
        unseen = view.first_unseen()
        if unseen is not None:
            out.append(UntaggedStatus("OK", f"First unseen is {unseen}", f"UNSEEN {unseen}"))
        out += [
            UntaggedStatus("OK", "UIDs valid", f"UIDVALIDITY {view.uidvalidity}"),
            UntaggedStatus("OK", "Predicted next UID", f"UIDNEXT {view.uidnext}"),
            view.permanent_flags(),
        ]
        if self.condstore:
            out.append(UntaggedStatus("OK", "Highest", f"HIGHESTMODSEQ {view.highestmodseq}"))  # RFC 7162 3.1.2.1
        if command.qresync is not None and command.qresync.uidvalidity == view.uidvalidity:
            out += await self._resync(view, command.qresync)
        await self.io.send(*out)
        await self.io.send(Tagged(command.tag, "OK", f"{command.name} completed",
                                  "READ-ONLY" if readonly else "READ-WRITE"))
        cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity)
        if cache is not None:
            self.fetcher.prefill(view, cache)

    cmd_examine = cmd_select

    async def _resync(self, view: SelectedFolder, known: Qresync) -> list[Response]:
        """RFC 7162 3.2.5.2: what changed since the client's mod-sequence: VANISHED (EARLIER) for the
        expunged UIDs, then a FETCH of UID, FLAGS and MODSEQ for every message changed or added.
        With known UIDs, only those are reported."""
        out: list[Response] = []
        vanished = await self._vanished(view, known.modseq, known.known_uids, _still_numbered(view, known.seq_match))
        if vanished:
            out.append(Data("VANISHED (EARLIER) " + vanished))
        ranges = known.known_uids.merged(view.largest_uid) if known.known_uids is not None else None
        for uid in view.uids:
            info = view.info(uid)
            if info.modseq > known.modseq and (ranges is None or in_ranges(uid, ranges)):
                out.append(view.flags_fetch(uid))
        return out

    async def _vanished(self, view: SelectedFolder, modseq: int, within: SequenceSet | None, above: int = 0) -> str:
        """The UIDs expunged since `modseq` (within a UID set when given, and above the UID `above`,
        below which nothing was expunged), as an IMAP set ('' for none)."""
        recorded, complete = await self.store.expunged_since(self.mailbox, view.name, modseq)
        present = set(view.uids) - view.gone
        largest = max(view.largest_uid, view.uidnext - 1)
        if complete:
            uids = [u for u in recorded if u not in present and u > above]
            if within is not None:
                uids = within.select(uids, view.largest_uid)
            return compact(uids)
        # The record of expunges starts after `modseq` (older records are pruned): every UID the
        # folder no longer has may be one (RFC 7162 3.2.5.2 allows reporting UIDs expunged
        # earlier, or never seen), narrowed by the known UIDs and the sequence match data.
        gaps: list[tuple[int, int]] = []
        low = above + 1
        for uid in sorted(u for u in present if u > above):
            if uid > low:
                gaps.append((low, uid - 1))
            low = uid + 1
        if low <= largest:
            gaps.append((low, largest))
        if within is not None:
            gaps = _intersect(gaps, within.merged(view.largest_uid))
        return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in gaps)

    async def _condstore_on(self) -> None:
        """A CONDSTORE-enabling command (RFC 7162 3.1): the first one while a folder is selected is
        followed by its HIGHESTMODSEQ, so the client has a starting point."""
        if self.condstore:
            return
        self.condstore = True
        if self.selected is not None:
            self.selected.condstore = True
            await self.io.send(UntaggedStatus("OK", "Highest", f"HIGHESTMODSEQ {self.selected.highestmodseq}"))

    async def cmd_create(self, command: FolderCommand) -> None:
        name = names.canonical(command.folder.rstrip(names.SEPARATOR))  # RFC 3501 6.3.3: "foo/" is foo
        if names.is_inbox(name):
            raise ImapNo("INBOX always exists", "ALREADYEXISTS")
        reason = names.invalid_reason(name)
        if reason:
            raise ImapNo(reason, "CANNOT")
        await self.store.create_folder(self.mailbox, name)
        await self.ok(command)

    async def cmd_delete(self, command: FolderCommand) -> None:
        name = names.canonical(command.folder)
        if names.is_inbox(name):
            raise ImapNo("INBOX cannot be deleted", "CANNOT")  # RFC 3501 6.3.4
        if self.selected is not None and self.selected.name == name:
            self._unselect()
            self.state = "authenticated"
        await self.store.delete_folder(self.mailbox, name)
        await self.ok(command)

    async def cmd_rename(self, command: Rename) -> None:
        old, new = names.canonical(command.old), names.canonical(command.new.rstrip(names.SEPARATOR))
        if names.is_inbox(new):
            raise ImapNo("Cannot rename to INBOX", "ALREADYEXISTS")
        reason = names.invalid_reason(new)
        if reason:
            raise ImapNo(reason, "CANNOT")
        await self.store.rename_folder(self.mailbox, old, new)
        await self.ok(command)

    async def cmd_subscribe(self, command: FolderCommand) -> None:
        await self.store.subscribe(self.mailbox, names.canonical(command.folder), command.name == "SUBSCRIBE")
        await self.ok(command)

    cmd_unsubscribe = cmd_subscribe

    async def cmd_list(self, command: ListCommand) -> None:
        lsub = command.name == "LSUB"
        if not lsub and command.patterns == ("",):
            # RFC 3501 6.3.8: an empty pattern asks for the hierarchy delimiter and root.
            await self.io.send(Data('LIST (\\Noselect) "/" ""'))
            await self.ok(command)
            return
        if len(command.patterns) > MAX_LIST_PATTERNS:
            # RFC 5258 allows several patterns; thousands of them, each matched against every folder
            # on the event loop, would stall every other session.
            raise ImapBad("Too many patterns")
        only_subscribed = lsub or "SUBSCRIBED" in command.select
        only_special = "SPECIAL-USE" in command.select
        show_subscribed = "SUBSCRIBED" in command.select or "SUBSCRIBED" in command.returns
        # FolderInfo.subscribed is only looked at to show \Subscribed (_list_attributes).
        folders = await self.store.folders(self.mailbox, subscriptions=show_subscribed)
        by_name = {f.name: f for f in folders}
        # RFC 3501 6.3.9: LSUB lists every subscribed name, also one whose folder is gone.
        subscribed = set(await self.store.subscriptions(self.mailbox)) if only_subscribed else set()
        pool = sorted(subscribed) if only_subscribed else list(by_name)
        job = _ListJob(command.reference, command.patterns, by_name, subscribed, only_subscribed, only_special,
                       show_subscribed, lsub, "RECURSIVEMATCH" in command.select)
        if len(pool) * len(command.patterns) > LIST_ON_LOOP:
            # Thousands of folders times many patterns is real CPU: off the event loop.
            entries = await asyncio.to_thread(job.entries, pool)
        else:
            entries = job.entries(pool)
        if not command.status_items:
            await self.io.send(*[Data(line) for _, line in entries])
            await self.ok(command)
            return
        for name, line in entries:
            await self.io.send(Data(line))
            if name in by_name:
                # RFC 5819 2: the STATUS of each selectable folder listed, right after its LIST line;
                # one that vanished meanwhile is left out.
                with contextlib.suppress(StoreError):
                    await self.io.send(await self._status_response(name, command.status_items))
        await self.ok(command)

    cmd_lsub = cmd_list

    async def cmd_namespace(self, command: Command) -> None:
        await self.io.send(Data('NAMESPACE (("" "/")) NIL NIL'))  # RFC 2342: one personal namespace
        await self.ok(command)

    async def cmd_status(self, command: Status) -> None:
        name = names.canonical(command.folder)
        response = await self._status_response(name, command.items)
        if "HIGHESTMODSEQ" in command.items:
            await self._condstore_on()
        await self.io.send(response)
        await self.ok(command)

    async def _status_response(self, name: str, items: Sequence[str]) -> Response:
        snapshot = await self.store.snapshot(self.mailbox, name)
        values = {
            "MESSAGES": len(snapshot.messages),
            "RECENT": len(snapshot.recent),
            "UIDNEXT": snapshot.uidnext,
            "UIDVALIDITY": snapshot.uidvalidity,
            "UNSEEN": snapshot.unseen,
            "HIGHESTMODSEQ": snapshot.highestmodseq,  # RFC 7162 3.1.2.2
            "SIZE": snapshot.size,  # RFC 8438: octets as RFC822.SIZE counts them
        }
        if self.selected is not None and self.selected.name == snapshot.name:
            values["RECENT"] = len(self.selected.recent)
        text = " ".join(f"{item} {values[item]}" for item in items)
        return Data("STATUS " + encode_astring(snapshot.name).decode("utf-8") + f" ({text})")

    async def cmd_append(self, command: Append) -> None:
        name = names.canonical(command.folder)
        contents = [(command.flags, command.date, command.message), *command.more]
        if any(isinstance(content, tuple) for _, _, content in contents):
            # RFC 4469 5: a missing target folder is TRYCREATE (store_errors) before any URL is looked at.
            await self.store.uidvalidity(self.mailbox, name)
        # CATENATE parts are joined first: every URL is checked before anything is appended. The
        # command's messages together stay within one limit, as a MULTIAPPEND of literals does
        # (protocol.py): the URLs' octets have what the literals left.
        left = self.config.max_append_octets - sum(_literal_octets(content) for _, _, content in contents)
        messages = []
        for flags, date, content in contents:
            message, used = await self._message_of(content, left)
            left -= used
            messages.append((flags, date, message))
        if not all(message for _, _, message in messages):
            raise ImapNo("Empty message", "CANNOT")
        if not self.io.room_for_append(sum(len(message) for _, _, message in messages)):
            # What is left of the disk is for reading and deleting mail (appliance/disk_full.py).
            log.warning("IMAP APPEND refused: the disk is nearly full")
            raise ImapNo(DISK_FULL_TEXT, "OVERQUOTA")
        if any(b"\0" in message for _, _, message in messages):
            # RFC 3516 4.4: binary content (literal8) holding NULs is kept as base64, which any
            # literal can carry; BINARY[] still gives the octets back.
            messages = [(flags, date, await asyncio.to_thread(base64_for_nul, message))
                        for flags, date, message in messages]
        uids: list[int] = []
        uidvalidity = 0
        try:
            for flags, date, message in messages:
                uidvalidity, uid = await self.store.append(self.mailbox, name, message, frozenset(flags), date)
                uids.append(uid)
        except Exception:
            if uids:
                # RFC 3502 6: all or nothing: the messages appended before the failure (a store error, a
                # full disk) go again.
                try:
                    await self.store.expunge(self.mailbox, name, uids)
                except Exception:  # the answer stays the first failure's
                    log.exception("APPEND: the messages appended before the failure could not be taken back")
            raise  # answered by store_errors: TRYCREATE for a folder that does not exist (RFC 3501 6.3.11)
        await self.ok(command, code=f"APPENDUID {uidvalidity} {compact(uids)}")  # RFC 4315 3

    async def _message_of(self, content: AppendContent, left: int) -> tuple[bytes | bytearray, int]:
        """An APPEND's message: its literal, or its RFC 4469 CATENATE parts joined (a URL that does
        not name one of this user's messages, or a part of one, is NO [BADURL url]); and the octets its
        URLs added, of the `left` the command may still take. The message joined is a copy of its
        TEXT parts too (their literals stay with the command until it is answered): those octets are
        held in the box's message memory as well, as the URLs' are (_url_content)."""
        if not isinstance(content, tuple):
            return content, 0
        if len(content) == 1 and not isinstance(content[0], CatenateUrl):
            return content[0], 0  # one TEXT part: the literal itself, no copy
        out = bytearray()
        used = 0
        for part in content:
            if isinstance(part, CatenateUrl):
                data = await self._url_content(part.url, left - used)
                if data is None:
                    raise ImapNo("Bad URL", "BADURL " + part.url[:200])
                used += len(data)
                part = data
            elif not self.io.hold(len(part)):
                raise ImapNo(BUSY_TEXT, "UNAVAILABLE")  # RFC 5530 3, as for a literal that does not fit
            out += part
        return out, used

    async def _url_content(self, text: str, left: int) -> bytes | None:
        """What the URL names, held in the box's message memory (appliance/message_memory.py) until the
        APPEND is answered, as a literal is: a 24 KB APPEND of 20 CATENATEs of 60 URLs to one 1 MB
        message held 1.2 GB outside that budget, so a few sessions ran the box out of memory."""
        url = parse_url(text)
        if url is None:
            return None
        try:
            snapshot = await self.store.snapshot(self.mailbox, names.canonical(url.folder))
        except StoreError:
            return None
        if url.uidvalidity is not None and url.uidvalidity != snapshot.uidvalidity:
            return None
        found = snapshot.by_uid.get(url.uid)
        if found is None:
            return None
        try:
            located = await asyncio.to_thread(locate, found.path, url)
            if located is None:
                return None
            if located.octets > left:
                raise ImapNo(  # RFC 4469 5: TOOBIG
                    f"Message too big: this server takes messages of at most {limit_text(self.config.max_append_octets)}",
                    "TOOBIG")
            if not self.io.hold(located.octets):
                raise ImapNo(BUSY_TEXT, "UNAVAILABLE")  # RFC 5530 3, as for a literal that does not fit
            return await asyncio.to_thread(read, found.path, located)
        except OSError:
            return None  # expunged meanwhile

    async def cmd_enable(self, command: Enable) -> None:
        # RFC 5161 3.1: ENABLED lists what this command turned on; unknown names are ignored.
        enabled: list[str] = []
        wanted = {c.upper() for c in command.capabilities}
        if "QRESYNC" in wanted and not self.qresync:
            self.qresync = True  # RFC 7162 3.2.3: QRESYNC implies CONDSTORE
            enabled.append("QRESYNC")
        if ("CONDSTORE" in wanted or "QRESYNC" in wanted) and not self.condstore:
            self.condstore = True
            enabled.insert(0, "CONDSTORE")
        await self.io.send(Data(" ".join(["ENABLED", *enabled])))
        await self.ok(command)

    async def cmd_getquotaroot(self, command: FolderCommand) -> None:
        name = names.canonical(command.folder)
        await self.io.send(Data("QUOTAROOT " + encode_astring(name).decode("utf-8") + ' ""'), await self._quota())
        await self.ok(command)

    async def cmd_getquota(self, command: QuotaCommand) -> None:
        if command.root != "":
            raise ImapNo("No such quota root", "NONEXISTENT")
        await self.io.send(await self._quota())
        await self.ok(command)

    async def cmd_setquota(self, command: QuotaCommand) -> None:
        raise ImapNo("Quotas are set by the administrator", "NOPERM")

    async def _quota(self) -> Response:
        used, limit = await self.store.usage(self.mailbox)
        if not limit:
            return Data('QUOTA "" ()')
        # RFC 2087 3: STORAGE in units of 1024 octets.
        return Data(f'QUOTA "" (STORAGE {(used + 1023) // 1024} {limit // 1024})')

    async def cmd_idle(self, command: Command) -> None:
        """RFC 2177: report changes as they happen until the client sends DONE."""
        await self.io.send(Continuation("idling"))
        done = self.io.wait_line(self.config.idle_timeout)
        # No folder selected, so no folder's watcher: a watch of the mailbox itself, woken only when it
        # is disabled or removed (else such an IDLE went on until the client's DONE).
        gone = self.store.watch_mailbox(self.mailbox) if self.watcher is None else None
        try:
            while True:
                await self._idle_once(done, gone)
                if done.done():
                    break
                if await self._mailbox_removed():  # or disabled: woken by the console's change
                    return
        finally:
            if not done.done():
                done.cancel()
            if gone is not None:
                gone.close()
        line = done.result()
        if line is None:
            self.state = "logout"
            await self.io.send(Bye("Autologout: idle for too long"))
            return
        if line.strip().upper() != b"DONE":
            raise ImapBad("Expected DONE")
        await self._look("IDLE")
        await self.ok(command, "IDLE terminated", look=False)

    async def _idle_once(self, done: asyncio.Task[bytes | None], gone: Watcher | None = None) -> None:
        """One round of IDLE: tell what changed, then wait for a change, the client's line or the
        next look at the disk (or, without a folder, the mailbox's `gone` watch)."""
        if self.selected is not None:
            await self._look("IDLE")
        notified: asyncio.Task[None] | None = None
        if self.notify.mailboxes:
            await self._notify_changes()
            notified = asyncio.ensure_future(self.notify.wait(EXTERNAL_POLL))
        waiter: asyncio.Task[bool] | None = None
        woken: asyncio.Future[None] | None = None
        watcher = self.watcher
        if watcher is not None:
            # Woken by any change through the store; every EXTERNAL_POLL seconds the disk
            # is looked at as well, for changes other programs make to the Maildir.
            woken = watcher.woken()
        elif gone is not None:
            waiter = asyncio.ensure_future(gone.wait(EXTERNAL_POLL))
        pending: set[asyncio.Future[object]] = {f for f in (done, waiter, woken, notified) if f is not None}  # type: ignore[misc]
        await asyncio.wait(pending, timeout=EXTERNAL_POLL if woken is not None else None,
                           return_when=asyncio.FIRST_COMPLETED)
        if notified is not None and not notified.done():
            await cancel_and_wait(notified)
        changed: bool | None = None  # whether the folder's watch woke (None: the client's line came first)
        if woken is not None and watcher is not None:
            if woken.done() or not (done.done() or (notified is not None and notified.done())):
                changed = await watcher.wait(0)  # (False: EXTERNAL_POLL seconds went by)
            woken.cancel()
        elif waiter is not None and not waiter.done():
            await cancel_and_wait(waiter)
        elif waiter is not None:
            changed = waiter.result()
        if changed is not None:
            self._woke(changed)

    def _woke(self, changed: bool) -> None:
        """What IDLE's next look owes after its wait for the folder ended (`changed`: woken by a change)."""
        if changed and time.monotonic() - self._disk_seen < EXTERNAL_POLL:
            self._owed = True  # a change through the store: in the index already
        else:
            self._dirty = True  # time to look at the disk too (other programs' changes)

    # --- selected (RFC 3501 6.4) -------------------------------------------------------------------

    @property
    def view(self) -> SelectedFolder:
        assert self.selected is not None
        return self.selected

    async def cmd_check(self, command: Command) -> None:
        await self._polled(command)  # as NOOP (RFC 3501 6.4.1)

    async def cmd_close(self, command: Command) -> None:
        view = self.view
        if not view.readonly:
            # RFC 3501 6.4.2: expunge \Deleted messages, without EXPUNGE responses.
            doomed = [u for u in view.uids if DELETED in view.info(u).flags and not view.is_gone(u)]
            if doomed:
                await self.store.expunge(self.mailbox, view.name, doomed)
        self._unselect()
        self.state = "authenticated"
        await self.ok(command)

    async def cmd_unselect(self, command: Command) -> None:
        self._unselect()
        self.state = "authenticated"  # RFC 3691: like CLOSE, without the expunge
        await self.ok(command)

    async def cmd_expunge(self, command: Expunge) -> None:
        view = self._writable()
        candidates = view.uids if command.uids is None else view.resolve(command.uids, uid=True)
        doomed = [u for u in candidates if DELETED in view.info(u).flags and not view.is_gone(u)]
        if doomed:
            expunged = await self.store.expunge(self.mailbox, view.name, doomed)
            await self.io.send(*view.expunged_by_us(expunged))
            if expunged and self.qresync:
                # RFC 7162 3.2.7 (EXPUNGE) and 3.2.9 (UID EXPUNGE): the folder's mod-sequence after
                # the expunge, once every change up to it has been told (the sync before the OK).
                await self.sync(allow_expunge=True)
                await self.ok(command, code=f"HIGHESTMODSEQ {view.highestmodseq}")
                return
        await self.ok(command)

    async def _matching(self, key: SearchKey, charset: str | None) -> list[Candidate]:
        """The messages of the selected folder a search key matches, in message-number order."""
        if charset is not None and charset not in SUPPORTED_CHARSETS:
            raise ImapNo("Unsupported charset", "BADCHARSET (" + " ".join(SUPPORTED_CHARSETS) + ")")
        view = self.view
        searcher = Searcher(key, view.exists, view.largest_uid)
        needle = searcher.lone_subject()
        if needle is not None:
            cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity)
            if cache is not None:
                return await self._lone_subject(searcher, needle, cache)
        term = searcher.lone_term()
        if term is not None:
            hits = await self._text_hits(searcher)
            if hits is not None and term in hits.found:
                return await self._lone_term(searcher, hits, hits.found[term])
        candidates = self._candidates(searcher, enumerate(view.uids, start=1))
        if searcher.needs_content():
            return await self._search_content(searcher, candidates)
        if len(candidates) > SEARCH_ON_LOOP:
            # A key of thousands of terms over a large folder is seconds of CPU: off the event loop,
            # so other sessions are served meanwhile.
            return await asyncio.to_thread(_search_index, searcher, candidates)
        return _search_index(searcher, candidates)

    def _candidates(self, searcher: Searcher, numbered: Iterable[tuple[int, int]]) -> list[Candidate]:
        """A Candidate for each of these (message number, UID) of the selected folder."""
        view = self.view
        recent, infos = view.recent, view.infos
        # The date as the index has it unless a key compares dates: a file copied in is dated in the
        # background after the folder's first listing, and reading an undated one's is a stat, here
        # on the event loop (half of a SEARCH SUBJECT's samples at 10k right after the first FETCH,
        # issue 19). SORT and THREAD read the dates of what matched (_dated).
        dated = searcher.reads_dates()
        candidates = []
        for seq, uid in numbered:
            info = infos[uid]
            flags = info.flags | RECENT_FLAG if uid in recent else info.flags
            candidates.append(Candidate(seq, uid, flags, info.size, info.internaldate if dated else info.date,
                                        info.modseq))
        return candidates

    async def _lone_subject(self, searcher: Searcher, needle: str, cache: FolderCache) -> list[Candidate]:
        """A SEARCH whose key is one SUBJECT (Searcher.lone_subject): decided from the message cache's
        subject texts, in SQLite, in one trip to a thread (fetch_cache.subject_search); only the
        messages that matched, and those the cache cannot answer (which go the usual way), are made
        Candidates. A Candidate per message, each row's text made a Python string, and then a trip
        per 5,000 messages with a path and a row object each, were most of a SEARCH SUBJECT (issue 19)."""
        view = self.view
        # (The view's UID list and infos change only in this session's own commands, not meanwhile.)
        # Answering as a FETCH does: the background work that waits for a pause in the clients'
        # reads (a prefill, the dating of a folder copied in) waits for this one too.
        with cache.answering_now():
            hits, unknown = await asyncio.to_thread(fetch_cache.subject_search, cache, view.uids, view.infos, needle)
        found = self._candidates_of(searcher, hits)
        if unknown:
            found += await self._search_content(searcher, self._candidates_of(searcher, unknown))
            found.sort(key=lambda c: c.seq)
        return found

    def _candidates_of(self, searcher: Searcher, uids: Iterable[int]) -> list[Candidate]:
        """_candidates for some of the selected folder's messages (UIDs ascending), each one's message
        number found by bisection: not a pass over the whole folder for a few matches."""
        every = self.view.uids
        numbered = []
        for uid in uids:
            seq = bisect.bisect_left(every, uid)
            if seq < len(every) and every[seq] == uid:
                numbered.append((seq + 1, uid))
        return self._candidates(searcher, numbered)

    async def _text_hits(self, searcher: Searcher) -> TextHits | None:
        """The full-text index's answer for the search's BODY and TEXT keys (fts.py), kept on the
        searcher; None without an index, or without such keys, or for a folder renumbered since."""
        index = self.services.text_index
        if index is not None and searcher.terms():
            view = self.view
            folder_id, uidvalidity = await self.store.folder_key(self.mailbox, view.name)
            if uidvalidity == view.uidvalidity:
                searcher.hits = await index.lookup(folder_id, uidvalidity, searcher.terms())
        return searcher.hits

    async def _lone_term(self, searcher: Searcher, hits: TextHits, matched: frozenset[int]) -> list[Candidate]:
        """A SEARCH whose key is one BODY or TEXT key the full-text index answered (Searcher.lone_term,
        `matched`: the UIDs whose rows hold it): the messages the index holds are decided by its rows,
        with a Candidate made only for those that matched; only those it lacks (not yet indexed, or too
        large to be) go the usual way, their files read. A Candidate per message and a call of the
        compiled key for each were most of a SEARCH BODY at 100k (issue 19)."""
        indexed = hits.indexed
        found = self._candidates_of(searcher, sorted(matched & indexed))
        rest = [(seq, uid) for seq, uid in enumerate(self.view.uids, start=1) if uid not in indexed]
        if rest:
            found += await self._search_content(searcher, self._candidates(searcher, rest))
            found.sort(key=lambda c: c.seq)
        return found

    async def _search_content(self, searcher: Searcher, candidates: list[Candidate]) -> list[Candidate]:
        """A search that reads message text: the full-text index answers BODY and TEXT for the
        messages it holds (fts.py); the rest is read and scanned in the CPU pool's worker process, a
        bounded chunk at a time (never in this process: a scan holding the GIL stalled every other
        session and SMTP, issue 19)."""
        view = self.view
        if searcher.hits is None:
            await self._text_hits(searcher)
        # Header and SENT* keys: the message cache's fields where they are exact (fetch_cache).
        cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity) if searcher.reads_headers() else None
        found: list[Candidate] = []
        scan: list[_Scan] = []
        subject_only = searcher.subject_only()
        needle = searcher.lone_subject()
        for start in range(0, len(candidates), SEARCH_CACHE_BATCH):
            batch = candidates[start:start + SEARCH_CACHE_BATCH]
            known: dict[int, HeaderLookup] = {}
            if cache is not None:
                known = await self._known_headers(cache, batch, subject_only)
            for c in batch:
                cached = known.get(c.uid)
                if needle is not None and isinstance(cached, CachedSubject):
                    if needle in cached.text:  # what Searcher.matches decides, without its calls
                        found.append(c)
                    continue
                if searcher.needs_file(c, cached is not None):
                    scan.append((c, cached))
                elif searcher.matches(c, _no_content, cached):
                    found.append(c)
            await asyncio.sleep(0)  # a 100k folder answered from the indexes: others go meanwhile
        self.scanned += len(scan)
        if scan:
            by_seq = {c.seq: c for c, _ in scan}
            # A few files are read here in a thread (milliseconds); more in the worker process.
            cpu = self.services.cpu
            run = cpu.run_light if len(scan) <= SCAN_LIGHT_MESSAGES else cpu.run
            for chunk in _scan_chunks(scan):
                items = [(c, view.info(c.uid).file, cached) for c, cached in chunk]
                hits = searcher.hits.narrowed({c.uid for c, _ in chunk}) if searcher.hits is not None else None
                seqs = await run(search_files, searcher.key, searcher.largest_seq, searcher.largest_uid, hits, items)
                found += [by_seq[n] for n in seqs]
        found.sort(key=lambda c: c.seq)  # (in order but for the scanned)
        return found

    async def _known_headers(self, cache: FolderCache, batch: list[Candidate], subject_only: bool) -> dict[int, HeaderLookup]:
        """What the message cache knows of a batch's headers for a SEARCH. (A lone SUBJECT was
        decided from the rows' subject texts before, in _lone_subject: what reaches here of it are
        the messages those rows could not answer.)"""
        view = self.view
        # Paths as strings: a Path per message was a tenth of a header SEARCH's time.
        files = [(c.uid, view.info(c.uid).file) for c in batch]
        if not files:
            return {}
        return await asyncio.to_thread(_cached_headers, cache, files, subject_only)

    def _sort_items(self, found: list[Candidate]) -> list[SortItem]:
        """What SORT and THREAD order the matching messages by, their internal dates read from the
        index (or their files) here: a Candidate has it only when the key compared dates."""
        infos = self.view.infos
        return [SortItem(c.seq, c.uid, c.size, (info := infos[c.uid]).internaldate, info.path) for c in found]

    async def cmd_sort(self, command: Sort) -> None:
        """RFC 5256 3: the matching messages in the order of the criteria."""
        found = await self._matching(command.key, command.charset)
        items = self._sort_items(found)
        view = self.view
        if any(k in SORT_HEADER_KEYS for k, _ in command.criteria):
            cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity)
            ordered = await asyncio.to_thread(sort_messages, items, command.criteria, cache)
        else:
            ordered = sort_messages(items, command.criteria)
        numbers = [i.uid if command.uid else i.seq for i in ordered]
        if command.returns is not None:
            # RFC 5267 ESORT: an ESEARCH answer whose MIN, MAX and ALL follow the sort order.
            await self.io.send(_esearch(command, [], numbers, False))
        else:
            await self.io.send(Data("SORT" + "".join(f" {n}" for n in numbers)))
        await self.ok(command)

    async def cmd_compress(self, command: Compress) -> None:
        """RFC 4978 3: the OK goes out uncompressed; everything after it, both ways, is DEFLATE."""
        if command.mechanism != "DEFLATE":
            raise ImapBad("Unknown compression mechanism")
        if self.io.compressed:
            raise ImapNo("Compression is already active", "COMPRESSIONACTIVE")
        await self.io.send(Tagged(command.tag, "OK", "DEFLATE active"))
        self.io.start_compression()

    async def cmd_thread(self, command: Thread) -> None:
        """RFC 5256 4: the matching messages as threads (REFERENCES or ORDEREDSUBJECT)."""
        found = await self._matching(command.key, command.charset)
        items = self._sort_items(found)
        view = self.view
        cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity)
        roots = await asyncio.to_thread(THREADERS[command.algorithm], items, cache)
        await self.io.send(Data("THREAD" + (" " + thread_text(roots, command.uid) if roots else "")))
        await self.ok(command)

    async def cmd_search(self, command: Search) -> None:
        found = await self._matching(command.key, command.charset)
        numbers = [c.uid if command.uid else c.seq for c in found]
        modseq = uses_modseq(command.key)
        if modseq:
            await self._condstore_on()
        if command.returns is not None:
            await self.io.send(_esearch(command, found, numbers, modseq))
            if "UPDATE" in command.returns:
                # RFC 5267 4.2: keep the result and tell its changes until CANCELUPDATE or the
                # folder is left; a new search with the same tag replaces the old one.
                view = self.view
                if command.tag not in view.contexts and len(view.contexts) >= MAX_SEARCH_CONTEXTS:
                    await self.ok(command, code=f'NOUPDATE "{command.tag}"')
                    return
                view.contexts[command.tag] = SearchContext(
                    command.tag, command.uid, command.key, command.charset, {c.uid for c in found}, view.version)
            await self.ok(command)
            return
        text = "SEARCH" + "".join(f" {n}" for n in numbers)
        if modseq and found:
            text += f" (MODSEQ {max(c.modseq for c in found)})"  # RFC 7162 3.1.5
        await self.io.send(Data(text))
        await self.ok(command)

    async def cmd_notify(self, command: Notify) -> None:
        """RFC 5465 3: follow these mailboxes from now on (NOTIFY NONE: none); with STATUS, their
        state at once (5.1). Only message events are done: others get NO [BADEVENT]."""
        if unknown_events(command.filters):
            raise ImapNo("Only message events can be notified", "BADEVENT (" + " ".join(NOTIFY_EVENTS) + ")")
        wanted = await self._notify_targets(command.filters)
        self.notify.close()
        selected = self.selected.name if self.selected is not None else None
        for name, items in wanted.items():
            watched = self.notify.follow(name, items, self.store.watch(self.mailbox, name))
            try:
                response = await self._status_response(name, items)
            except NoSuchFolder:
                continue
            watched.told = _text(response)
            if command.status and name != selected:
                await self.io.send(response)
        await self.ok(command)

    async def _notify_targets(self, filters: Sequence[NotifyFilter]) -> dict[str, tuple[str, ...]]:
        """The existing mailboxes the filters name (RFC 5465 6), with the STATUS items of their
        events. SELECTED and SELECTED-DELAYED add nothing: the selected mailbox tells its changes
        as usual."""
        folders = await self.store.folders(self.mailbox)
        events: dict[str, tuple[str, ...]] = {}
        for f in filters:
            named = {names.canonical(n.rstrip(names.SEPARATOR)) for n in f.folders}
            for info in folders:
                name = info.name
                chosen = (
                    f.kind == "PERSONAL" or (f.kind == "INBOXES" and name == "INBOX")
                    or (f.kind == "SUBSCRIBED" and info.subscribed) or (f.kind == "MAILBOXES" and name in named)
                    or (f.kind == "SUBTREE" and any(name == n or name.startswith(n + names.SEPARATOR) for n in named))
                )
                if chosen:
                    events[name] = events.get(name, ()) + f.events
        wanted = {name: status_items(e) for name, e in events.items()}
        return {name: items for name, items in wanted.items() if items}

    async def _notify_changes(self) -> None:
        """RFC 5465 5.2-5.4: an unsolicited STATUS for each followed mailbox (not the selected
        one) whose state changed since it was last told."""
        fired = self.notify.take_fired()
        if not fired:
            return
        selected = self.selected.name if self.selected is not None else None
        for name, watched in self.notify.mailboxes.items():  # (in their order, not the set's)
            if name not in fired or name == selected:
                continue
            try:
                response = await self._status_response(name, watched.items)
            except NoSuchFolder:
                continue
            text = _text(response)
            if text != watched.told:
                watched.told = text
                await self.io.send(response)

    async def cmd_cancelupdate(self, command: CancelUpdate) -> None:
        """RFC 5267 4.3: stop the updates of these searches; a tag with none is an error."""
        contexts = self.view.contexts
        unknown = [t for t in command.tags if t not in contexts]
        if unknown:
            raise ImapBad("No search with UPDATE has that tag")
        for t in command.tags:
            del contexts[t]
        await self.ok(command)

    async def cmd_fetch(self, command: Fetch) -> None:
        view = self.view
        uids = self._resolve(command.set, command.uid)
        uids = await self._fetch_modifiers(command, uids)
        if not uids:
            await self.ok(command)
            return
        marks_seen = any(
            (isinstance(i, BodySection | BinarySection) and not i.peek)
            or (isinstance(i, FetchAttribute) and i.name in ("RFC822", "RFC822.TEXT"))
            for i in command.items
        )
        flags_changed: set[int] = set()
        if marks_seen and not view.readonly:
            unseen = [u for u in uids if SEEN not in view.info(u).flags and not view.is_gone(u)]
            if unseen:
                updated = await self.store.store_flags(self.mailbox, view.name, unseen, frozenset({SEEN}), "add")
                await self.io.send(*view.update_infos(updated))
                flags_changed = {i.uid for i in updated}
        items = command.items
        if self.condstore and FLAGS_ITEM in items and MODSEQ_ITEM not in items:
            items = (*items, MODSEQ_ITEM)  # RFC 7162 3.1: FLAGS come with their MODSEQ
        cache = None
        if fetch_cache.wants_header_only(items):  # a message list: answered from the message cache
            cache = await self.store.folder_cache(self.mailbox, view.name, view.uidvalidity)
        missing = await self.fetcher.send_fetch(view, uids, items, flags_changed, self.condstore, self.io.send,
                                                cache)
        if any(not view.is_gone(u) for u in missing):
            # A file not at the path this view has: most often another session's flag change or move
            # from new/ to cur/, in memory (and so in this view) before its rename is made, not an
            # expunge. Answered once the folder's queued changes are made and the view is in step;
            # a UID FETCH left such messages out, OK, though they were there all along. (A message
            # the view knows expunged is gone for good: no wait for the folder's queued changes,
            # under imaptest's stress mode one header FETCH in twelve, issue 19.)
            await self.store.settled(self.mailbox, view.name)
            self._owed = True  # (the view looks again, for a rename made since it looked)
            await self.sync(allow_expunge=False)
            again = [u for u in missing if not view.is_gone(u)]
            missing = [u for u in missing if view.is_gone(u)] + (await self.fetcher.send_fetch(
                view, again, items, flags_changed, self.condstore, self.io.send, cache) if again else [])
        if missing and not command.uid:
            # As Dovecot answers: the messages still here were answered and the expunged ones left
            # out (RFC 2180 4.1.3), the tagged reply OK with RFC 5530's code (4.1.4's OK). A NO made
            # clients such as imaptest count another session's EXPUNGE as a failed FETCH.
            await self.sync(allow_expunge=False)
            await self.io.send(Tagged(command.tag, "OK", "Some messages were already expunged", "EXPUNGEISSUED"))
            return
        await self.ok(command)

    async def _fetch_modifiers(self, command: Fetch, uids: list[int]) -> list[int]:
        """RFC 7162 3.1.4.1 CHANGEDSINCE (only messages changed since) and 3.2.6 VANISHED (the UIDs of
        the set expunged since, told first); the messages to answer for."""
        view = self.view
        if command.vanished and not self.qresync:
            raise ImapBad("VANISHED needs QRESYNC enabled")
        if command.changedsince is None and MODSEQ_ITEM not in command.items:
            return uids
        await self._condstore_on()
        since = command.changedsince
        if since is None:
            return uids
        if command.vanished:
            vanished = await self._vanished(view, since, command.set)
            if vanished:
                await self.io.send(Data("VANISHED (EARLIER) " + vanished))
        return [u for u in uids if view.info(u).modseq > since]

    async def cmd_store(self, command: Store) -> None:
        view = self._writable()
        uids = [u for u in self._resolve(command.set, command.uid) if not view.is_gone(u)]
        if command.unchangedsince is not None:
            await self._condstore_on()
        modified: list[int] = []
        if uids:
            updated, modified = await self.store.store_flags_unchanged_since(
                self.mailbox, view.name, uids, frozenset(command.flags), command.mode, command.unchangedsince,
            )
            await self.io.send(*view.update_infos(updated))
            if not command.silent:
                await self.io.send(*[view.flags_fetch(i.uid, with_uid=command.uid) for i in updated])
        if modified:
            # RFC 7162 3.1.3: the messages changed since UNCHANGEDSINCE were left alone; named by UID
            # for UID STORE, by number otherwise.
            numbers = modified if command.uid else [view.seq_of(u) for u in modified]
            await self.ok(command, code="MODIFIED " + compact(sorted(numbers)))
            return
        await self.ok(command)

    async def cmd_copy(self, command: CopyMove) -> None:
        view = self.view
        if command.name == "MOVE":
            self._writable()
        dest = names.canonical(command.folder)
        uids = [u for u in self._resolve(command.set, command.uid) if not view.is_gone(u)]
        if not uids:
            await self.ok(command)
            return
        operation = self.store.move if command.name == "MOVE" else self.store.copy
        pairs = await operation(self.mailbox, view.name, uids, dest)  # store_errors: TRYCREATE (RFC 3501 6.4.7)
        code = None
        if pairs:
            validity = await self.store.uidvalidity(self.mailbox, dest)
            code = f"COPYUID {validity} {compact(p[0] for p in pairs)} {compact(p[1] for p in pairs)}"
        if command.name == "MOVE":
            # RFC 6851 4.3: COPYUID goes in an untagged OK before the EXPUNGEs.
            if code:
                await self.io.send(UntaggedStatus("OK", "Moved", code))
            await self.io.send(*view.expunged_by_us([p[0] for p in pairs]))
            await self.ok(command)
        else:
            await self.ok(command, code=code)

    cmd_move = cmd_copy

    # --- helpers -----------------------------------------------------------------------------------

    def _writable(self) -> SelectedFolder:
        view = self.view
        if view.readonly:
            raise ImapNo("Mailbox is read-only", "READ-ONLY")
        return view

    def _resolve(self, seqset: SequenceSet, uid: bool) -> list[int]:
        view = self.view
        # RFC 3501 6.4.8: a number beyond the mailbox is an error; in an empty one `*` names no message
        # either (RFC 9051 9: it is the count "in a non-empty mailbox"). BAD, as Dovecot answers both.
        if not uid and (view.exists == 0 or seqset.mentions_beyond(view.exists)):
            raise ImapBad("Invalid message sequence number")
        return view.resolve(seqset, uid)

    def _unselect(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self.watcher = None
        self.selected = None
        self.fetcher.forget()

    def note_change(self) -> None:
        self._dirty = True

    async def sync(self, allow_expunge: bool) -> None:
        """Send the untagged updates for changes made elsewhere since the last look."""
        view = self.selected
        if view is None or self.watcher is None:
            return
        disk = self._dirty
        changed = disk or self._owed or await self.watcher.wait(0)
        if changed:
            self._dirty = self._owed = False
            if disk:
                self._disk_seen = time.monotonic()
            try:
                snapshot = await self.store.snapshot(self.mailbox, view.name, claim_recent=not view.readonly,
                                                     disk=disk)
            except NoSuchFolder:
                # RFC 3501 leaves this open; the folder is gone, so the session leaves it.
                self._unselect()
                self.state = "authenticated"
                await self.io.send(UntaggedStatus("OK", "Selected mailbox was deleted", "CLOSED"))
                return
            await self.io.send(*view.apply(snapshot, allow_expunge))
            if view.gone:  # a subset of view.uids until announced
                self._owed = True  # expunges still owed at the next command that may carry them
        await self._update_searches(view)

    async def _update_searches(self, view: SelectedFolder) -> None:
        """RFC 5267 4.3: the kept searches are re-run after a change to the folder, and the client
        told which messages entered (ADDTO) or left (REMOVEFROM) each result. Expunged messages
        were already taken out as they were announced (SelectedFolder._remove)."""
        for context in list(view.contexts.values()):
            if context.version == view.version:
                continue
            context.version = view.version
            now = {c.uid for c in await self._matching(context.key, context.charset)}
            left, entered = context.result - now, now - context.result
            context.result = now
            for kind, uids in (("REMOVEFROM", left), ("ADDTO", entered)):
                if uids:
                    await self.io.send(context.update(kind, uids if context.uid else map(view.seq_of, uids)))


# --- module helpers -------------------------------------------------------------------------------

def _literal_octets(content: AppendContent) -> int:
    """An APPEND message's octets that came as literals (a CATENATE's TEXT parts, or the message)."""
    if isinstance(content, tuple):
        return sum(len(part) for part in content if not isinstance(part, CatenateUrl))
    return len(content)


def _may_expunge(command: Command) -> bool:
    # RFC 3501 7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (the UID forms may carry it).
    if isinstance(command, Fetch | Store | Search | Sort | Thread):
        return command.uid
    return True


def _esearch(command: Search | Sort, found: Sequence[Candidate], numbers: list[int], with_modseq: bool) -> Response:
    """RFC 4731 3.1: * ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set; RETURN () means ALL.
    MIN, MAX and ALL are left out when nothing matched; MODSEQ (RFC 7162 3.1.5) when the search
    used one: the highest of the messages returned, which for MIN and/or MAX alone means only
    those one or two (imaptest esearch-condstore, as Dovecot)."""
    options = command.returns or ("ALL",)
    modseq = 0
    if with_modseq and found:
        returned = found if "ALL" in options or "COUNT" in options else [
            c for c, wanted in ((found[0], "MIN" in options), (found[-1], "MAX" in options)) if wanted]
        modseq = max((c.modseq for c in returned), default=0)
    parts = [f'ESEARCH (TAG "{command.tag}")']
    if command.uid:
        parts.append("UID")
    if isinstance(command, Search) and command.partial is not None:
        # RFC 5267 4.4: the asked range of positions in the result (1-based), and the
        # messages there; NIL when none are.
        low, high = command.partial
        part = numbers[low - 1:high]
        parts.append(f"PARTIAL ({low}:{high} {compact(part) if part else 'NIL'})")
    if numbers:
        if "MIN" in options:
            parts.append(f"MIN {numbers[0]}")
        if "MAX" in options:
            parts.append(f"MAX {numbers[-1]}")
    if "COUNT" in options:
        parts.append(f"COUNT {len(numbers)}")
    if numbers and "ALL" in options:
        parts.append("ALL " + compact(numbers))
    if modseq:
        parts.append(f"MODSEQ {modseq}")
    return Data(" ".join(parts))


def _still_numbered(view: SelectedFolder, seq_match: tuple[SequenceSet, SequenceSet] | None) -> int:
    """RFC 7162 3.2.5.2 sequence match data: pairs of a message number and the UID the client had
    there. While a UID still has the number the client gave it, no message below it was expunged
    since (new messages only come above), so VANISHED (EARLIER) need not look below it. The largest
    such UID, reading the pairs in order up to the first that no longer holds; 0 without data."""
    if seq_match is None:
        return 0
    numbers, uids = (_members(s) for s in seq_match)
    above = 0
    for number, uid in zip(numbers, uids, strict=False):
        if uid <= above or view.is_gone(uid) or uid not in view.infos or view.seq_of(uid) != number:
            break
        above = uid
    return above


def _members(seqset: SequenceSet) -> Iterator[int]:
    """The numbers of a set in the client's order, lazily: the caller stops at the first mismatch,
    so a set of billions of numbers costs no more than the folder's size."""
    for low, high in seqset.bounds(0):
        yield from range(low, high + 1)


def _intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The overlap of two sorted lists of disjoint inclusive ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _no_content() -> BinaryIO:
    raise AssertionError("an index-only search opened a message")


def _search_index(searcher: Searcher, candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if searcher.matches(c, _no_content)]


_Scan = tuple[Candidate, HeaderLookup | None]


def _cached_headers(cache: FolderCache, files: list[tuple[int, str]], subject_only: bool) -> dict[int, HeaderLookup]:
    """What the message cache holds of these messages' headers for a SEARCH (worker thread): with
    `subject_only`, the subject text alone where a row has it (no fields read or parsed: SEARCH
    SUBJECT over 10k messages was 0.04x of Dovecot, issue 19); else, or for rows without it, the
    exact cached fields."""
    out: dict[int, HeaderLookup] = {}
    if subject_only:
        out.update((uid, CachedSubject(text)) for uid, text in fetch_cache.known_subjects(cache, files).items())
        files = [(uid, path) for uid, path in files if uid not in out]
    if files:
        for uid, row in fetch_cache.known_rows(cache, files).items():
            headers = fetch_cache.exact_headers(row)
            if headers is not None:
                out[uid] = headers
    return out


def _scan_chunks(candidates: list[_Scan]) -> Iterator[list[_Scan]]:
    """Bounded pieces of a scan: each is one task of the worker process, so a 100k-message search
    queues behind no one for long and its partial results stay small."""
    chunk: list[_Scan] = []
    octets = 0
    for item in candidates:
        chunk.append(item)
        octets += item[0].size
        if len(chunk) >= SCAN_CHUNK_MESSAGES or octets >= SCAN_CHUNK_OCTETS:
            yield chunk
            chunk, octets = [], 0
    if chunk:
        yield chunk


def _list_order(name: str) -> tuple[int, str]:
    return (0 if name == "INBOX" else 1, name)


@dataclass(frozen=True)
class _ListJob:
    """The LIST/LSUB answer lines for a pool of names: pure, so it can run in a worker thread."""

    reference: str
    patterns: tuple[str, ...]
    by_name: dict[str, FolderInfo]
    subscribed: set[str]
    only_subscribed: bool
    only_special: bool
    show_subscribed: bool
    lsub: bool
    recursive: bool = False  # RFC 5258 RECURSIVEMATCH

    def lines(self, pool: list[str]) -> list[str]:
        return [line for _, line in self.entries(pool)]

    def entries(self, pool: list[str]) -> list[tuple[str, str]]:
        """(name, LIST line) for each name listed, in order."""
        matchers = [names.pattern_regex(self.reference, p) for p in self.patterns]
        # Names with a folder below them, once: testing each name against every folder would be
        # quadratic in the folder count.
        parents = set(names.with_parents(self.by_name)) - set(self.by_name)
        parents |= {n for n, info in self.by_name.items() if info.has_children}
        out: list[tuple[str, str]] = []
        head = "LSUB" if self.lsub else "LIST"
        listed = names.with_parents(pool)
        matched = {name for name in listed if any(m.match(name) for m in matchers)}
        # RFC 3501 6.3.9: in LSUB a level that is only implied is listed, \Noselect, when it stands
        # for a subscribed name below it that the pattern does not reach ("%" with "a/b" gives
        # "a"); with "*" the name itself is listed and its parents are not (as Dovecot). LIST
        # shows every implied level, as Dovecot does.
        unreached_parents = {
            names.SEPARATOR.join(levels[:i])
            for levels in (n.split(names.SEPARATOR) for n in pool if n not in matched)
            for i in range(1, len(levels))
        }
        # RFC 5258 3.5 (RECURSIVEMATCH): a name the patterns match with a subscribed name below it
        # that they do not match is listed with CHILDINFO, whether or not it is subscribed itself.
        childinfo = unreached_parents & matched if self.recursive and self.only_subscribed else set()
        for name, exists in sorted(listed.items(), key=lambda item: _list_order(item[0])):
            if name not in matched:
                continue
            if self.only_subscribed and not exists and name not in childinfo and not (
                    self.lsub and name in unreached_parents):
                continue
            info = self.by_name.get(name)
            if self.only_special and (info is None or info.special_use is None):
                continue
            # LSUB marks a level that is only implied \Noselect; LIST asks whether the folder exists.
            selectable = exists if self.lsub else info is not None
            attrs = _list_attributes(name, info, selectable, name in parents, self.show_subscribed, self.lsub)
            if info is None and not self.lsub and (name in self.subscribed or name not in parents):
                # RFC 5258 3.4: a subscribed name whose folder is gone (or a name only a subscription
                # below it stands for).
                attrs = ["\\NonExistent", *(["\\Subscribed"] if name in self.subscribed else [])]
            line = f'{head} ({" ".join(attrs)}) "/" ' + encode_astring(name).decode("utf-8")
            if name in childinfo:
                line += ' ("CHILDINFO" ("SUBSCRIBED"))'
            out.append((name, line))
        return out


def _list_attributes(
    name: str, info: FolderInfo | None, exists: bool, children: bool, show_subscribed: bool, lsub: bool,
) -> list[str]:
    attrs: list[str] = []
    if not exists:
        attrs.append("\\Noselect")
    if not lsub:
        attrs.append("\\HasChildren" if children else "\\HasNoChildren")  # RFC 3348
    if info is not None and info.special_use:
        attrs.append(info.special_use)  # RFC 6154
    if show_subscribed and info is not None and info.subscribed:
        attrs.append("\\Subscribed")
    return attrs


class Route(Generic[C]):
    """One entry of the dispatch tables: the class the parser makes for a command name and the
    handler that takes exactly that class, so handlers need no downcast and mypy checks the pair."""

    __slots__ = ("handler", "kind", "missing_folder")

    def __init__(self, kind: type[C], handler: Callable[[ImapSession, C], Awaitable[None]],
                 missing_folder: MissingFolderCode = "NONEXISTENT") -> None:
        self.kind = kind
        self.handler = handler
        self.missing_folder = missing_folder  # the code for a folder that does not exist (store_errors)

    async def run(self, session: ImapSession, command: Command) -> None:
        if not isinstance(command, self.kind):
            # The parser and this table disagree: a bug, which the server logs and answers with BYE.
            raise TypeError(f"{command.name} parsed as {type(command).__name__}, not {self.kind.__name__}")
        with store_errors(command.name, self.missing_folder):
            await self.handler(session, command)


class Dispatch(Protocol):
    """What the session needs of a table entry (the Route whatever command class it binds)."""

    async def run(self, session: ImapSession, command: Command) -> None: ...


_ANY: dict[str, Dispatch] = {
    "CAPABILITY": Route(Command, ImapSession.cmd_capability),
    "NOOP": Route(Command, ImapSession.cmd_noop),
    "LOGOUT": Route(Command, ImapSession.cmd_logout),
    "ID": Route(Id, ImapSession.cmd_id),
}
_AUTHENTICATED: dict[str, Dispatch] = {
    **_ANY,
    "SELECT": Route(Select, ImapSession.cmd_select),
    "EXAMINE": Route(Select, ImapSession.cmd_examine),
    "CREATE": Route(FolderCommand, ImapSession.cmd_create),
    "DELETE": Route(FolderCommand, ImapSession.cmd_delete),
    "RENAME": Route(Rename, ImapSession.cmd_rename),
    "SUBSCRIBE": Route(FolderCommand, ImapSession.cmd_subscribe),
    "UNSUBSCRIBE": Route(FolderCommand, ImapSession.cmd_unsubscribe),
    "LIST": Route(ListCommand, ImapSession.cmd_list),
    "LSUB": Route(ListCommand, ImapSession.cmd_lsub),
    "NAMESPACE": Route(Command, ImapSession.cmd_namespace),
    "STATUS": Route(Status, ImapSession.cmd_status),
    "APPEND": Route(Append, ImapSession.cmd_append, missing_folder="TRYCREATE"),  # RFC 3501 6.3.11
    "ENABLE": Route(Enable, ImapSession.cmd_enable),
    "GETQUOTA": Route(QuotaCommand, ImapSession.cmd_getquota),
    "GETQUOTAROOT": Route(FolderCommand, ImapSession.cmd_getquotaroot),
    "SETQUOTA": Route(QuotaCommand, ImapSession.cmd_setquota),
    "IDLE": Route(Command, ImapSession.cmd_idle),
    "NOTIFY": Route(Notify, ImapSession.cmd_notify),
    "COMPRESS": Route(Compress, ImapSession.cmd_compress),
}
# RFC 3501 3: the commands each state accepts.
DISPATCH: dict[State, dict[str, Dispatch]] = {
    "not_authenticated": {
        **_ANY,
        "STARTTLS": Route(Command, ImapSession.cmd_starttls),
        "AUTHENTICATE": Route(Authenticate, ImapSession.cmd_authenticate),
        "LOGIN": Route(Login, ImapSession.cmd_login),
    },
    "authenticated": _AUTHENTICATED,
    "selected": {
        **{name: route for name, route in _AUTHENTICATED.items() if name != "ENABLE"},  # RFC 5161 3.1
        "CHECK": Route(Command, ImapSession.cmd_check),
        "CLOSE": Route(Command, ImapSession.cmd_close),
        "UNSELECT": Route(Command, ImapSession.cmd_unselect),
        "EXPUNGE": Route(Expunge, ImapSession.cmd_expunge),
        "SEARCH": Route(Search, ImapSession.cmd_search),
        "SORT": Route(Sort, ImapSession.cmd_sort),
        "CANCELUPDATE": Route(CancelUpdate, ImapSession.cmd_cancelupdate),
        "THREAD": Route(Thread, ImapSession.cmd_thread),
        "FETCH": Route(Fetch, ImapSession.cmd_fetch),
        "STORE": Route(Store, ImapSession.cmd_store),
        "COPY": Route(CopyMove, ImapSession.cmd_copy, missing_folder="TRYCREATE"),  # RFC 3501 6.4.7
        "MOVE": Route(CopyMove, ImapSession.cmd_move, missing_folder="TRYCREATE"),  # RFC 6851 3.3
    },
    "logout": {},
}


def _text(response: Response) -> str:
    return b"".join(p for p in response.render() if isinstance(p, bytes)).decode("utf-8", "replace")
