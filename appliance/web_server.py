"""The web console's listeners: uvicorn inside the box's one asyncio loop.

- "https": the console (web/app.py) with the box's certificate (services.tls.context, so a renewed
  certificate is used from the next handshake on); the handshake is run by the protocol (_GuardedH11),
  not by asyncio's create_server, so that it is counted and bounded from the accept.
- "http": redirects to HTTPS, except /.well-known/ (ACME challenges, Thunderbird's autoconfig) and
  /mail/config-v1.1.xml (Thunderbird asks autoconfig.<domain> over plain HTTP), which the same app
  answers directly.

`serve` binds the socket itself (so port 0 works and a busy port fails at once with OSError, as the
other listeners do) and runs uvicorn's server on it as a task. It returns an object shaped like
asyncio.Server (sockets, close, wait_closed, is_serving) for the composition root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Generator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from appliance.channel import network_of

if TYPE_CHECKING:
    from appliance.services import Services


PLAIN_HTTP_PATHS = ("/.well-known/", "/mail/config-v1.1.xml")
KEEP_ALIVE_SECONDS = 5
GRACEFUL_SHUTDOWN_SECONDS = 2
MAX_CONNECTIONS = 200  # beyond this uvicorn answers 503 rather than piling up work on a small box
MAX_REQUESTS_HEADER_BYTES = 16 * 1024  # h11's bound on an incomplete request head
STARTUP_TIMEOUT = 10.0
BACKLOG = 100
# Slowloris: uvicorn times nothing until a request's head is complete, so 200 connections that each
# sent half a request line held every slot (503 for everyone, ACME's HTTP-01 check included) for as
# long as they stayed open. A request's head must now arrive within REQUEST_HEAD_SECONDS of the
# connection (or of the last response), REQUEST_HEAD_BUSY_SECONDS once half the slots are taken (as
# the mail ports do before a login), and one client (an IPv4 address, an IPv6 /64) holds at most
# MAX_CONNECTIONS_PER_CLIENT of them; a browser opens about 6. One network (a /24, by
# channel.network_of as the mail ports count it; an IPv6 /64 is already one client) holds at most
# MAX_CONNECTIONS_PER_NETWORK: seven addresses of one /24 held every slot before.
REQUEST_HEAD_SECONDS = 20.0
REQUEST_HEAD_BUSY_SECONDS = 5.0
MAX_CONNECTIONS_PER_CLIENT = 32
MAX_CONNECTIONS_PER_NETWORK = 64
# asyncio's own handshake (create_server(ssl=...), as uvicorn calls it) ran before the protocol saw the
# connection, for up to 60 s: 300 connections from one address that never sent a ClientHello were each
# held a minute, uncounted and uncapped, and at the box's descriptor limit the mail ports' accept failed
# too (EMFILE). The HTTPS listener now accepts plain TCP and runs the handshake itself, as the mail
# ports' implicit TLS does: counted from the accept, capped per client, and bounded.
TLS_HANDSHAKE_SECONDS = 10.0
TLS_HANDSHAKE_BUSY_SECONDS = 5.0
# Slow bodies (Apache's mod_reqtimeout: body=20,MinRate=500): a request's body must keep coming once its
# head is in, or one client sending a byte every few seconds holds its slot for days (a 256 KiB login form
# at a byte per 2 s: 6 days), and 200 of them every slot. The head's REQUEST_HEAD_SECONDS are extended by a
# second for every BODY_MIN_RATE octets of body received; time the box itself stops reading (flow control:
# the console is slow to take an upload) does not count.
BODY_MIN_RATE = 500
# A chunked body in tiny chunks: h11 parses each chunk in Python (about 7 us), so 16 KiB sent as 1-octet
# chunks (96 KB on the wire) held the loop 0.12 s in one step, from anyone, before a login. Past
# TINY_CHUNKS_ALLOWED chunks of one request averaging under MIN_CHUNK_OCTETS, the connection is closed.
TINY_CHUNKS_ALLOWED = 1024
MIN_CHUNK_OCTETS = 64

log = logging.getLogger("letterbox.web")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the box's own loop owns SIGTERM/SIGINT."""

    _exit_requested: asyncio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def request_exit(self) -> None:
        """Stop serving; main_loop notices at once."""
        self.should_exit = True
        if self._exit_requested is not None:
            self._exit_requested.set()

    async def main_loop(self) -> None:
        """uvicorn's loop wakes ten times a second (asyncio.sleep(0.1)) to notice should_exit, and
        refreshes the Date header on every tenth tick. Two console listeners made 20 wake-ups a second
        of an idle box: 0.3 % of a core here, a tenth of a CPU in the image's VM under emulation (the
        idle box's whole CPU use there, measured by the cgroup's usage). Here one tick a second (the
        Date header as fresh as uvicorn keeps it), and request_exit() wakes it at once."""
        self._exit_requested = event = asyncio.Event()
        if self.should_exit:
            event.set()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header when counter % 10 == 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=1.0)


def _client_key(host: str) -> str:
    return network_of(host) if ":" in host else host  # IPv6 by /64, as the mail ports count it


class _ConsoleConfig(uvicorn.Config):
    """uvicorn's config with the context _GuardedH11 runs its handshakes with: uvicorn itself is given
    none, so that asyncio's create_server does no handshake of its own before the protocol is told."""

    tls: ssl.SSLContext | None = None


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the TLS handshake, the deadline for a request's head and the
    per-client and per-network caps above."""

    _head_timer: asyncio.TimerHandle | None = None
    _handshake: asyncio.Task[None] | None = None
    # The request whose body is arriving, from when (loop time) and how many octets of it came since.
    _body_of: object = None
    _body_since = 0.0
    _body_octets = 0
    # What the TLS layer passes on with the handshake's last flight (a browser sends its request at once),
    # which can come before start_tls has returned and h11 knows the connection.
    _early: bytearray | None = None
    _peer: tuple[str, str] | None = None  # the client's key and network, for the caps
    # The body's pieces (h11.Data events: a chunk, or what one read brought of a longer one) and octets.
    _pieces = 0
    _piece_octets = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h11_next_event = self.conn.next_event
        self.conn.next_event = self._next_event  # type: ignore[method-assign]  # h11 hands uvicorn's loop each event through here

    def _next_event(self) -> Any:
        event = self._h11_next_event()
        if type(event) is h11.Data:
            self._pieces += 1
            self._piece_octets += len(event.data)
            if self._pieces > TINY_CHUNKS_ALLOWED and self._piece_octets < self._pieces * MIN_CHUNK_OCTETS:
                log.info("%s: a request body in chunks of %d octets on average, connection closed",
                         self.client[0] if self.client else "?", self._piece_octets // self._pieces)
                self.transport.close()
                return h11.PAUSED  # uvicorn's loop over the events stops here
        elif type(event) is h11.Request:
            self._pieces = self._piece_octets = 0
        return event

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        tls = self.config.tls if isinstance(self.config, _ConsoleConfig) else None
        if tls is None:
            super().connection_made(transport)
            if self._within_share():
                self._arm(REQUEST_HEAD_BUSY_SECONDS if self._busy() else REQUEST_HEAD_SECONDS)
            return
        # Counted from the accept, by the same set uvicorn counts its connections in (its shutdown closes
        # a handshake in progress too, through self.transport).
        self.connections.add(self)
        self.transport = transport
        self.client = get_remote_addr(transport)
        if not self._within_share():
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in between
        self._early = bytearray()
        seconds = TLS_HANDSHAKE_BUSY_SECONDS if self._busy() else TLS_HANDSHAKE_SECONDS
        self._handshake = self.loop.create_task(self._secure(transport, tls, seconds))

    async def _secure(self, raw: asyncio.Transport, context: ssl.SSLContext, seconds: float) -> None:
        try:
            secured = await self.loop.start_tls(raw, self, context, server_side=True,
                                                ssl_handshake_timeout=seconds)
        except (ssl.SSLError, OSError, TimeoutError) as exc:  # late, refused or reset: asyncio closed the socket
            log.debug("%s: TLS handshake failed: %s", self.client, exc)
            secured = None
        except BaseException:
            self._not_secured(raw)
            raise
        if secured is None or raw.is_closing():  # a connection lost during the handshake returns a transport
            self._not_secured(raw)
            return
        early, self._early = self._early, None
        super().connection_made(secured)
        self._arm(REQUEST_HEAD_BUSY_SECONDS if self._busy() else REQUEST_HEAD_SECONDS)
        if early:
            self.data_received(bytes(early))

    def _not_secured(self, raw: asyncio.Transport) -> None:
        # The TLS layer tells the protocol nothing of a connection lost before the handshake ended.
        raw.close()
        self.connections.discard(self)

    def _within_share(self) -> bool:
        """Whether this client and its network hold no more than their shares, and the listener no more
        than its slots; if not, the connection is closed. Beyond MAX_CONNECTIONS uvicorn would answer
        only 503, and connections from many addresses would each hold a descriptor of the box until
        their deadline."""
        host = self.client[0] if self.client else ""
        # Kept: every connection in the set was through here once, and a flood's accepts each compare
        # against all of them (no address parsed again).
        self._peer = key, network = _client_key(host), network_of(host)
        same = same_network = 0
        for other in self.connections:
            if isinstance(other, _GuardedH11) and other._peer is not None:
                same += other._peer[0] == key
                same_network += other._peer[1] == network
        if (same > MAX_CONNECTIONS_PER_CLIENT or same_network > MAX_CONNECTIONS_PER_NETWORK
                or len(self.connections) > MAX_CONNECTIONS):
            self.transport.close()
            return False
        return True

    def _busy(self) -> bool:
        return len(self.connections) >= MAX_CONNECTIONS // 2

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early += data
            return
        if self.cycle is not None and self.cycle is self._body_of:
            self._body_octets += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        # Where uvicorn starts each request: from data_received, and from on_response_complete for a
        # request pipelined behind the one answered (its octets came before, with no data_received).
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._body_of:  # a new request's head is in
            self._body_of, self._body_since, self._body_octets = self.cycle, self.loop.time(), 0
            names = {name for name, _ in self.cycle.scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                # RFC 9112 6.1: the body is read as chunked, and the connection MUST close after the
                # answer; h11 kept it, so what a proxy in front took for body came next as a request.
                self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(REQUEST_HEAD_SECONDS)  # the next request on this connection gets its own time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(seconds, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request being answered: none came whole
            self.transport.close()
        elif self.cycle.more_body:  # its body is still coming
            now = self.loop.time()
            if self.flow.read_paused:  # we are not reading: the client is not late
                self._body_since, self._body_octets = now, 0
                self._arm(REQUEST_HEAD_SECONDS)
                return
            left = self._body_since + REQUEST_HEAD_SECONDS + self._body_octets / BODY_MIN_RATE - now
            if left > 0:
                self._arm(left)
            else:
                self.transport.close()


class WebListener:
    """What Box keeps for a listener: the bound socket, start_serving(), close(), wait_closed(),
    is_serving() (the shape of asyncio.Server)."""

    def __init__(self, server: _EmbeddedServer, sock: socket.socket, service: str) -> None:
        self._server = server
        self._service = service
        self._task: asyncio.Task[None] | None = None
        self.sockets = [sock]

    async def start_serving(self) -> None:
        """Run uvicorn on the bound socket and wait until it accepts connections."""
        if self._task is not None:
            return
        sock = self.sockets[0]
        sock.listen(BACKLOG)
        server = self._server
        self._task = task = asyncio.create_task(server.serve(sockets=[sock]), name=f"letterbox-{self._service}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises what went wrong
                raise OSError(f"{self._service}: the web server stopped while starting")
            if loop.time() > deadline:
                server.request_exit()
                raise OSError(f"{self._service}: the web server did not start within {STARTUP_TIMEOUT:.0f} s")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self._server.request_exit()
        if self._task is None:
            self.sockets[0].close()  # bound, never served

    async def wait_closed(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    def is_serving(self) -> bool:
        return (
            self._task is not None and self._server.started and not self._task.done()
            and not self._server.should_exit
        )


class RedirectToHttps:
    """The plain-HTTP listener: the few paths clients fetch over HTTP go to the app, the rest to HTTPS."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    def https_port(self) -> int:
        bound = self.services.listeners()
        if "https" in bound:
            return bound["https"][1]
        return self.services.config.port("https")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path.startswith(PLAIN_HTTP_PATHS):
            await self.app(scope, receive, send)
            return
        if not path.startswith("/"):
            # Absolute-form, "*" or CONNECT's authority: no path to send on (it was glued to the port).
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"12"),
            ]})
            await send({"type": "http.response.body", "body": b"Bad Request\n"})
            return
        host = _host_without_port(scope) or self.services.hostname
        port = self.https_port()
        target = f"https://{host}{'' if port == 443 else f':{port}'}{quote(path)}"
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        await send({"type": "http.response.start", "status": 301, "headers": [
            (b"location", target.encode("latin-1")), (b"content-length", b"0"), (b"cache-control", b"no-store"),
        ]})
        await send({"type": "http.response.body", "body": b""})


def _host_without_port(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"host":
            host: str = value.decode("latin-1").strip()
            if host.startswith("["):  # [IPv6]:port
                literal, _, port = host[1:].partition("]")
                if port and not port.startswith(":"):
                    return None
                try:
                    address = ipaddress.IPv6Address(literal)
                except ValueError:
                    return None  # '[/@evil.example' went into the Location header as it came
                return None if address.scope_id else f"[{address.compressed}]"  # a zone may hold '@'...
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            # Only a plain host name or address goes into the Location header.
            if host and all(ch.isalnum() or ch in ".-" for ch in host):
                return host
            return None
    return None


def console_app(services: Services) -> ASGIApp:
    if services.web_app is None:
        from web.app import create_app  # the web layer sits above appliance/: imported only here

        services.web_app = create_app(services)
    return services.web_app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bound, not yet listening: until start_serving() a connection is refused, not left waiting. Also
    how the box holds a mail port while the console starts first (appliance/app.py, Box.bind_console)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as socket.create_server does
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    services: Services, service: str, host: str, port: int, *, start_serving: bool = True
) -> WebListener:
    if service not in ("http", "https"):
        raise ValueError(f"the web server does not serve {service!r}")
    app = console_app(services)
    uvicorn_log = logging.getLogger("uvicorn.error")  # its start/stop chatter is INFO; real errors still show
    if uvicorn_log.level == logging.NOTSET:
        uvicorn_log.setLevel(logging.WARNING)
    tls: ssl.SSLContext | None = services.tls.context if service == "https" else None
    config = _ConsoleConfig(
        app if service == "https" else RedirectToHttps(app, services),
        lifespan="off",
        http=_GuardedH11,
        ws="none",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # the peer address feeds the login throttle: never take it from a header
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=MAX_REQUESTS_HEADER_BYTES,
    )
    config.tls = tls
    listener = WebListener(_EmbeddedServer(config), bind_socket(host, port), service)
    if start_serving:
        await listener.start_serving()
    return listener
