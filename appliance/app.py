"""Composition root: open the db, build the services, start every listener, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import ipaddress
import json
import logging
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance import (
    accept_errors,
    backup,
    collector,
    message_spool,
    setup_code,
    systemd_notify,
    time_zone,
    waits,
    web_server,
)
from appliance.accounts import Accounts
from appliance.admin import Admin
from appliance.auth import Auth
from appliance.certificates import start_renewer
from appliance.config import STANDARD_PORTS, ServeConfig
from appliance.data_lock import DataDirInUse, DataDirLock
from appliance.db import Database
from appliance.events import EventLog
from appliance.heap import (
    break_transport_cycles,
    fix_mmap_threshold,
    release_memory,
    share_tls_read_buffer,
    start_heap_watch,
)
from appliance.host_name import system_hostname
from appliance.queue.spool import Spool
from appliance.services import Services
from appliance.settings import PUBLISHED_PORTS, Settings
from appliance.smtp.probes import RecipientProbeGuard
from appliance.srs import SECRET_FILE, SenderRewriter, load_secret
from appliance.status_checks import start_status_checks
from appliance.store.mailstore import MailStore
from appliance.tls import TlsManager

if TYPE_CHECKING:
    from appliance.store.message_cache import CachedMessage, FileStamp

log = logging.getLogger("letterbox")

STOP_TIMEOUT = 5.0  # seconds from SIGTERM to exit, per issue 2
OPEN_FILES_WANTED = 65536  # RLIMIT_NOFILE asked for at start (capped by the hard limit)


class BoundServer(Protocol):
    """What a listener's serve() returns: an asyncio.Server bound but not yet accepting."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    async def start_serving(self) -> None: ...
    def is_serving(self) -> bool: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class ServeListener(Protocol):
    def __call__(self, services: Services, service: str, host: str, port: int, *,
                 start_serving: bool) -> Awaitable[BoundServer]: ...


class BackgroundService(Protocol):
    async def stop(self) -> None: ...


class Deferred:
    """A listener's serve() or a background service's start(), imported on its first call: `serve`
    answers with the web console (the wizard) before it imports the mail services (issue 15: under
    emulation their imports cost seconds of a first boot that the console need not wait for)."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


# Which function serves which port: serve(services, service, host, port, *, start_serving) -> Server;
# with start_serving=False the socket is bound and accepts nothing until `await server.start_serving()`.
LISTENERS: dict[str, ServeListener] = {
    "smtp": Deferred("appliance.smtp.server", "serve"),
    "submission": Deferred("appliance.smtp.server", "serve"),
    "submissions": Deferred("appliance.smtp.server", "serve"),
    "lmtp": Deferred("appliance.smtp.server", "serve"),
    "imap": Deferred("appliance.imap.server", "serve"),
    "imaps": Deferred("appliance.imap.server", "serve"),
    "pop3": Deferred("appliance.pop3.server", "serve"),
    "pop3s": Deferred("appliance.pop3.server", "serve"),
    "http": web_server.serve,
    "https": web_server.serve,
}

# The web console's listeners: bound and serving first (Box.serve_console), the mail listeners after.
CONSOLE = ("http", "https")

# Background services, started once the listeners are bound and before the mail listeners serve; each
# puts itself into its typed field on Services (queue, inbound_check, renewer) and has stop().
BACKGROUND: list[Callable[[Services], Awaitable[BackgroundService]]] = [
    Deferred("appliance.queue.service", "start_queue"),
    Deferred("appliance.inbound_auth", "start_inbound_auth"),  # installs the MX's SPF/DKIM/DMARC check
    # the MX's content filter (rspamd) and the learner from moves into/out of Junk
    Deferred("appliance.spam.content_service", "start_spam_content"),
    Deferred("appliance.store.trash", "start_purger"),  # removed mailboxes' mail, kept 30 days under deleted/
    start_renewer,
    backup.start_scheduler,  # the daily backup, once switched on
    start_status_checks,  # the status checklist, every few hours
    Deferred("appliance.imap.fts", "start_text_index"),  # SEARCH BODY/TEXT's full-text index, filled after delivery
    start_heap_watch,  # gives back the heap a burst of connections freed (no folder's unload trims for it)
    # the sessions of a mailbox the CLI disabled or removed end (the console's change ends them itself)
    Deferred("appliance.session_watch", "start_session_watch"),
    Deferred("appliance.update_outcome", "start_update_follower"),  # an update in flight: its outcome as an event
]


async def record_published_ports(db: Database, config: ServeConfig) -> None:
    """Keep the ports this box's SRV records name (its --port-offset) where `letterbox dns records|check|
    zone` read them: they named 587 where the console named 10587, and a CLI check called the console's
    records wrong."""
    text = json.dumps(config.published_ports(), sort_keys=True)
    if await db.get_setting(PUBLISHED_PORTS) != text:
        await db.set_setting(PUBLISHED_PORTS, text)


def describe_bytes(data: bytes | bytearray, stamp: FileStamp) -> CachedMessage:
    """The store's describer of a message (imap/fetch_cache.py), imported at its first call: the IMAP
    layer it belongs to is imported with the mail listeners, after the console answers (issue 15)."""
    from appliance.imap.fetch_cache import describe_bytes as describe

    return describe(data, stamp)


class StartupError(Exception):
    """The box cannot start; the message is one line for the terminal."""


@dataclass(frozen=True)
class Listener:
    service: str
    host: str
    port: int
    server: BoundServer


class Box:
    """The running box. It starts in two steps, so that the web console answers first (issue 15):

    1. `open` + `bind_console`: the db and the services; the console's listeners bound, and every other
       port reserved (bound, not listening), so a busy port fails the start before anyone is served
       (issue 11 item 13). `serve_console` then accepts connections on the console alone.
    2. `start_mail`: the mail listeners imported and bound on their reserved ports, the background
       services started (the MX's checks are installed before its first connection), then, with
       serve=True, the mail listeners accept connections too.

    `Box.start` does both steps and, unless serve=False, serves everything at the end (tests)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.listeners: dict[str, Listener] = {}
        self._reserved: dict[str, socket.socket] = {}
        self._background: list[BackgroundService] = []

    @classmethod
    async def start(cls, config: ServeConfig, *, serve: bool = True) -> Box:
        """Open the db, build the services, bind every listener, start the background services, and
        (unless serve=False) start accepting connections."""
        box = await cls.open(config)
        try:
            await box.bind_console()
            await box.start_mail(serve=False)
            if serve:
                await box.start_serving()
        except BaseException:
            await box.close()
            raise
        return box

    @classmethod
    async def open(cls, config: ServeConfig) -> Box:
        """The db (migrated) and the services; nothing bound yet."""
        config.data.create()
        db = await Database.open(config.data.db)
        try:
            settings = await Settings.load(db, default_hostname=system_hostname(), hostname_override=config.hostname)
            await record_published_ports(db, config)
            accounts = Accounts(db, data=config.data)
            store = MailStore(config.data.mail, db, accounts, describe=describe_bytes)
            events = EventLog(db)
            services = Services(
                config=config,
                db=db,
                settings=settings,
                accounts=accounts,
                auth=Auth(db, accounts, events=events),
                store=store,
                tls=TlsManager(config.data.tls, settings.now.hostname),
                events=events,
                spool=Spool(config.data.spool, db),
                srs=SenderRewriter(load_secret(config.data.root / SECRET_FILE)),
                recipient_guard=RecipientProbeGuard(),
            )
        except BaseException:
            await db.close()
            raise
        # Background work of the CPU worker (index and cache rows) waits for a pause in the mail.
        services.cpu.last_mail = lambda: store.last_arrival
        services.cpu.last_answer = store.message_cache.last_answer
        # A big folder's work is over when nobody has it open: the worker's memory goes back too.
        store.on_unload.append(services.cpu.retire_idle)
        box = cls(services)
        services.listener_status = box.listener_status
        return box

    def _services_to_listen(self) -> list[str]:
        return [service for service in STANDARD_PORTS if service not in self.services.config.disabled]

    async def bind_console(self) -> None:
        """Reserve every mail port, then bind the console's listeners (none accepts yet)."""
        config = self.services.config
        for service in self._services_to_listen():
            host, port = config.listen_address(service), config.port(service)
            if service in CONSOLE:
                await self._bind(service)
            elif port != 0:  # port 0 (tests): any free port will do, there is nothing to reserve
                try:
                    self._reserved[service] = web_server.bind_socket(host, port)
                except OSError as exc:
                    raise _cannot_listen(service, host, port, exc) from exc

    async def serve_console(self) -> None:
        """The console accepts connections: the wizard answers while the mail services start."""
        for service in CONSOLE:
            if service in self.listeners:
                await self._start_serving(self.listeners[service])

    async def start_mail(self, *, serve: bool = True) -> None:
        """Recover the store, import and bind the mail listeners, start the background services, and
        (serve=True) accept connections on every listener."""
        await self.services.accounts.recover()  # before the store opens a mailbox whose removal was cut short
        await self.services.store.recover()
        stale = await asyncio.to_thread(message_spool.clean_stale, self.services.config.data.tmp)
        if stale:
            log.info("removed %d spool files of messages an unclean stop cut short", stale)
        for service in self._services_to_listen():
            if service not in CONSOLE:
                await self._bind(service)
        for start in BACKGROUND:
            self._background.append(await start(self.services))
        if serve:
            await self.start_serving()

    async def _bind(self, service: str) -> None:
        config = self.services.config
        host, port = config.listen_address(service), config.port(service)
        try:
            # Bound beside its reservation (both SO_REUSEADDR, neither listening: Linux allows it), which
            # is let go only then: the port is never free for someone else in between.
            server = await LISTENERS[service](self.services, service, host, port, start_serving=False)
        except OSError as exc:
            # Nothing but the console has been served: close what was bound and refuse to start.
            raise _cannot_listen(service, host, port, exc) from exc
        finally:
            reserved = self._reserved.pop(service, None)
            if reserved is not None:
                reserved.close()
        bound = server.sockets[0].getsockname()[1] if server.sockets else port
        self.listeners[service] = Listener(service, host, bound, server)
        log.debug("bound: %s on %s:%d", service, host, bound)

    async def start_serving(self) -> None:
        """Every listener is bound: now accept connections, on all of them."""
        for lst in self.listeners.values():
            await self._start_serving(lst)

    @staticmethod
    async def _start_serving(lst: Listener) -> None:
        if not lst.server.is_serving():
            await lst.server.start_serving()
            log.info("listening: %s on %s:%d", lst.service, lst.host, lst.port)

    def listener_status(self) -> dict[str, tuple[str, int, bool]]:
        """For the status page: service -> (host, port, serving)."""
        return {
            name: (lst.host, lst.port, lst.server.is_serving()) for name, lst in self.listeners.items()
        }

    def port(self, service: str) -> int:
        return self.listeners[service].port

    async def close(self) -> None:
        """After a start that failed half-way: what was started stops, the db closes."""
        with contextlib.suppress(Exception):
            await self._stop_services()
        await self.services.db.close()

    async def stop(self) -> None:
        await self._stop_services()
        with contextlib.suppress(Exception):
            await self.services.cpu.stop()  # the worker process, once no session can ask it
        with contextlib.suppress(Exception):
            await self.services.spam_decisions.close()  # the last few decisions, before the db closes
        with contextlib.suppress(Exception):
            await self.services.delivery_log.close()
        # The Maildir's dovecot-uidlist files written before the process goes (issue 17).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.services.store.flush_uidlists(), timeout=10)
        self.services.store.close()
        await self.services.db.close()

    async def _stop_services(self) -> None:
        for obj in reversed(self._background):
            with contextlib.suppress(Exception):
                await obj.stop()
        self._background.clear()
        for sock in self._reserved.values():
            sock.close()
        self._reserved.clear()
        for lst in self.listeners.values():
            lst.server.close()
        for lst in self.listeners.values():
            # wait_closed waits for every connection in 3.12+; bound it so a stuck client can't hold us.
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(lst.server.wait_closed(), timeout=1.0)
        self.listeners.clear()


def _cannot_listen(service: str, host: str, port: int, exc: OSError) -> StartupError:
    return StartupError(f"cannot listen for {service} on {host}:{port}: {exc.strerror}")


def raise_open_files_limit() -> None:
    """Every connection is a descriptor: a box under a connection flood (issue 10 item 6: thousands of
    idle sockets) needs more than the common soft limit of 1024, up to what the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(OPEN_FILES_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)


async def announce_setup_code(services: Services, announce: Callable[[str], None]) -> None:
    """Before the first admin exists, the wizard asks for a one-time code only the person at the box
    sees: printed here (the machine's console on the image) and kept in the data directory."""
    root = services.config.data.root
    if await services.accounts.has_admin():
        await asyncio.to_thread(setup_code.remove_code, root)  # an admin made with the CLI: not needed
        return
    code = await asyncio.to_thread(setup_code.ensure_code, root)
    announce(f"First-run setup code: {code}  (the web wizard asks for it; also in {setup_code.code_path(root)})")


async def serve_forever(config: ServeConfig, *, announce: Callable[[str], None] = print) -> None:
    """`letterbox serve`: run until SIGTERM/SIGINT, then stop within STOP_TIMEOUT seconds.

    The signal handlers are installed before anything is opened (issue 10 item 16): a SIGTERM that
    arrives while the box is starting lets the start finish, then stops cleanly (exit code 0)
    without serving mail (nor the console, if it came before the console answered). Before this
    point nothing is open, and the signal's default action ends the process."""
    waits.install()  # only with LETTERBOX_WAITS set (a bench's probe)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    put_back_handler = accept_errors.install(loop)  # out of descriptors: a line a minute per listener
    data_lock = DataDirLock(config.data.root)
    fix_mmap_threshold()  # before the heap grows (issue 19: RSS after the 100k run)
    break_transport_cycles()  # a closed connection's objects freed at once, not at a full collection
    share_tls_read_buffer()  # an idle TLS connection holds no 64 KiB read buffer of its own
    try:
        raise_open_files_limit()
        aside: Path | None = None
        restored: backup.Staged | None = None
        while True:
            # Taken again at every start: after a restore the path names the restored directory.
            config.data.create()
            try:
                data_lock.acquire()
            except DataDirInUse as exc:
                raise StartupError(str(exc)) from None
            await asyncio.to_thread(backup.clean_stale_uploads, config.data.root)
            # A restore killed before its switch-over left a whole copy of the box (in clear) beside
            # the data directory, until the next restore; the lock keeps a CLI restore's out of reach.
            await asyncio.to_thread(backup.clean_stale_staging, config.data.root)
            try:
                box = await _start(config, stop, announce)
            except Exception:
                if aside is None:
                    raise
                # The restored data did not start: the old data comes back, and starts instead.
                log.exception("the restored data did not start; putting the old data back")
                await asyncio.to_thread(backup.undo_restore, config.data.root, aside)
                aside = restored = None
                continue
            if restored is not None:
                # The events before the switch-over stayed in the old data's database: the restored
                # box's own list says what happened to it (the console's restore page had no answer).
                zone = (await box.services.settings.fresh()).time_zone
                await box.services.events.record("backup", restored_text(restored, aside, zone))
                box.services.backups.restored_at = time.time()
                restored = None
            staged = await _serve_until_stopped(box, config, stop, announce)
            if staged is None:
                return
            # A restore from the web: the services are stopped; switch the data over, start again.
            announce("restoring: switching the data directory over to the backup")
            aside = await asyncio.to_thread(backup.switch_over, staged, config.data.root)
            restored = staged
    finally:
        data_lock.release()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        put_back_handler()


def console_url(box: Box) -> str | None:
    """The console's address to type: `make run`'s 10080 is one browsers refuse (ERR_UNSAFE_PORT), and
    the list of listeners named no page to open. localhost for a box on loopback, else its name."""
    https = box.listeners.get("https")
    if https is None:
        return None
    try:
        local = ipaddress.ip_address(https.host).is_loopback
    except ValueError:
        local = False
    name = "localhost" if local else box.services.hostname
    return f"https://{name}/" if https.port == 443 else f"https://{name}:{https.port}/"


def restored_text(staged: backup.Staged, aside: Path | None, zone: str) -> str:
    """The restored box's event: the backup's time as the console shows times (its manifest's is ISO UTC)."""
    created = str(staged.manifest.get("created"))
    with contextlib.suppress(ValueError):
        created = time_zone.shown(dt.datetime.fromisoformat(created.replace("Z", "+00:00")), zone)
    made = f"made {created} on {staged.manifest.get('host')}"
    kept = f"; the data from before it is kept in {aside}" if aside is not None else ""
    return f"restored from a backup ({made}, {staged.files} files){kept}"


async def _start(config: ServeConfig, stop: asyncio.Event, announce: Callable[[str], None]) -> Box:
    """Console first (issue 15): the web console answers (the wizard, with its setup code announced)
    while the mail services are imported and started; they accept connections once all of them are
    bound and started (_serve_until_stopped), and only then is the box "ready" (READY=1)."""
    box = await Box.open(config)
    try:
        await box.bind_console()
        if not stop.is_set():
            await box.serve_console()
            await announce_setup_code(box.services, announce)
        await box.start_mail(serve=False)
    except BaseException:
        await box.close()
        raise
    return box


async def _serve_until_stopped(box: Box, config: ServeConfig, stop: asyncio.Event,
                               announce: Callable[[str], None]) -> backup.Staged | None:
    """Serve until a signal (None) or until the web asks for a staged restore (returned), then stop."""
    try:
        if stop.is_set():
            log.info("stopping: a signal came while starting")
            return None
        await box.start_serving()
        announce(f"Letterbox {box.services.hostname}: data in {config.data.root.resolve()}")
        for lst in box.listeners.values():
            announce(f"  {lst.service:<12} {lst.host}:{lst.port}")
        console = console_url(box)
        if console:
            announce(f"Open {console} in a web browser.")
        await box.services.events.record("start", f"Letterbox started as {box.services.hostname}")
        await Admin.of(box.services).record_update_outcome()
        # "ready" and READY=1 mean: every listener accepts connections and every background service has
        # started (the console answered earlier: _start). Not everything is imported by then (issue 15): the console's pages other than the
        # login and the wizard load on their first request (web/lazy_routes.py), the ACME client when a
        # certificate is ordered, the bundle reader when an update is installed.
        # What starting freed (import-time garbage, the schema and settings reads) goes back to the
        # system: glibc keeps a freed heap otherwise, and idle RSS stays at the start's peak (issue 19).
        collector.collect_all()  # and what is left frozen: the collector's own full collections skip it
        release_memory()
        announce("ready")
        systemd_notify.notify(f"READY=1\nSTATUS=serving as {box.services.hostname}")
        jobs = box.services.backups
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(jobs.restart.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        log.info("stopping")
        if stop.is_set():
            systemd_notify.notify("STOPPING=1")
        return jobs.staged if not stop.is_set() else None
    finally:
        try:
            await asyncio.wait_for(box.stop(), timeout=STOP_TIMEOUT)
        except TimeoutError:
            log.warning("stop took longer than %.0f s; exiting anyway", STOP_TIMEOUT)
