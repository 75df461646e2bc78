"""The socket side shared by our own protocol servers (IMAP, POP3): a Channel per connection, the
per-listener connection limits, and a listener whose close() ends the connections too.

The socket side is a small asyncio.Protocol rather than asyncio streams: STARTTLS/STLS must stop
reading *before* the OK goes out and drop whatever plaintext arrived with the command, or bytes
pipelined behind it could be taken as sent over TLS (RFC 3501 6.2.1, RFC 2595 4, CVE-2011-0411).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

WRITE_HIGH_WATER = 256 * 1024  # written but unsent output before a writer waits
CLOSE_TIMEOUT = 5.0
# Connections the kernel queues before the loop accepts them (asyncio's default is 100): a burst of
# connections must not make a legitimate client's SYN wait for a retransmission.
LISTEN_BACKLOG = 1024
# When the pre-auth pool is full, a new connection pushes out the oldest one not logged in, if that
# one has had at least this many seconds to log in.
EVICT_MIN_AGE = 2.0
# A flood is refused thousands of times: one log line per interval says how many, not one per refusal.
REFUSAL_LOG_INTERVAL = 10.0
# A read's timer that fires this close to its deadline counts as on time (the loop runs a timer up to
# its clock resolution early).
READ_CLOCK_SLACK = 0.001
# Seconds of one connection's pipelined commands the loop runs before it turns to the other
# connections (take_turn): commands that never wait for anything (NOOPs, or a 23 KB DEFLATE stream
# that inflates to two million of them) held the loop, every other session and SMTP, for 52 s.
TURN_SECONDS = 0.01


class ConnectionClosed(Exception):
    """The client went away or stopped reading; end the session quietly."""


class DeadlineExpired(ConnectionClosed):
    """A time limit that bounds more than one read ran out (the pre-auth phase, one whole command)."""


class Channel(asyncio.Protocol):
    """One socket's bytes both ways, with flow control; it stays the protocol across STARTTLS."""

    def __init__(self, on_connect: Callable[[Channel], None], max_buffered: int) -> None:
        self._on_connect = on_connect
        self._max_buffered = max_buffered  # unread input held before the socket stops being read
        self.transport: asyncio.Transport | None = None
        self._incoming = bytearray()
        self._eof = False
        self._lost = asyncio.Event()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False
        self._peer = "unknown"
        self._expired: str | None = None
        # read_within's clock: the one timer of the connection, the deadline of the read waiting
        # (None: no read waiting), and whether that read's time ran out.
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_deadline: float | None = None
        self._read_timed_out = False
        # Loop time this connection last let the others run (a read that waited, or take_turn).
        self._turn_began = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Read once, now: an SSL transport forgets its peer once the client has gone.
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._incoming += data
        self._readable.set()
        if len(self._incoming) > self._max_buffered and self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool | None:
        self._eof = True
        self._readable.set()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()  # (it holds this channel until it fires)
            self._read_timer = None
        self._eof = True
        self._lost.set()
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # for the handler

    @property
    def peer(self) -> str:
        """The client's address as it was at accept (stable across STARTTLS and after the close)."""
        return self._peer

    def expire(self, reason: str) -> None:
        """A deadline passed: the read waiting now (or the next one) raises DeadlineExpired."""
        self._expired = reason
        self._readable.set()

    def cancel_expiry(self) -> None:
        """The login that was running when the pre-auth deadline passed succeeded: it counts."""
        self._expired = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def read_within(self, seconds: float) -> bytes:
        """read(), raising TimeoutError when nothing has arrived within `seconds`. The connection
        keeps one timer, moved only when it would fire too late, or fires before the deadline of
        the read then waiting (once per idle timeout of a busy connection): asyncio.timeout made a
        timer, a heap entry and a cancel per read, ~7 µs of each IMAP command (issue 19)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        timer = self._read_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._read_timer = loop.call_at(deadline, self._read_time_up)
        self._read_deadline = deadline
        self._read_timed_out = False
        try:
            return await self.read()
        finally:
            self._read_deadline = None
            self._read_timed_out = False  # (data that came with the time-up was returned)

    def _read_time_up(self) -> None:
        self._read_timer = None
        deadline = self._read_deadline
        if deadline is None:
            return  # no read waits: the next one sets the timer again
        loop = asyncio.get_running_loop()
        if deadline - loop.time() > READ_CLOCK_SLACK:
            self._read_timer = loop.call_at(deadline, self._read_time_up)  # a read that began later
            return
        self._read_timed_out = True
        self._readable.set()

    async def read(self) -> bytes:
        """What has arrived, waiting for something; b"" at the end of the stream."""
        while not self._incoming and not self._eof:
            if self._expired is not None:
                raise DeadlineExpired(self._expired)
            if self._read_timed_out:
                self._read_timed_out = False
                raise TimeoutError
            self._readable.clear()
            await self._readable.wait()
            self._turn_began = asyncio.get_running_loop().time()
        if self._expired is not None:
            raise DeadlineExpired(self._expired)
        data = bytes(self._incoming)
        self._incoming.clear()
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def take_turn(self) -> None:
        """Between two commands: after TURN_SECONDS of this connection's commands without a read that
        waited, one loop iteration for the other connections. Only a flood of pipelined commands
        pays it (a sleep(0) per command was one more select(2) per command, issue 19)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._turn_began >= TURN_SECONDS:
            await asyncio.sleep(0)
            self._turn_began = loop.time()

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        self.transport.write(data)

    @property
    def drained(self) -> bool:
        """Whether drain() would return at once: the transport takes more and the peer is there."""
        return self._writable.is_set() and not self.lost

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost:
            raise ConnectionClosed("connection closed")

    def stop_reading(self) -> None:
        """Before the OK to STARTTLS: nothing more is read as plaintext, and what came is dropped."""
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        self._incoming.clear()

    async def start_tls(self, context: ssl.SSLContext, handshake_seconds: float) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                             ssl_handshake_timeout=handshake_seconds)
        except BaseException:
            # asyncio has closed the socket, but the SSL layer it put in between never tells us
            # connection_lost: mark the channel gone, or wait_closed would wait its whole timeout.
            self.connection_lost(None)
            raise
        if transport is None:
            self.connection_lost(None)
            raise ConnectionClosed("TLS handshake failed")
        self.transport = transport
        self._reading_paused = False  # start_tls resumes reading on the new transport

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait(), seconds)
        if not self.lost and self.transport is not None:
            self.transport.abort()


class ListenerLimits(Protocol):
    """What start_listener needs from a protocol's limits (ImapLimits, Pop3Limits, SmtpLimits)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def max_preauth_connections(self) -> int: ...
    @property
    def max_connections_per_network(self) -> int: ...
    @property
    def max_connections_per_client(self) -> int: ...
    @property
    def preauth_timeout(self) -> float: ...
    @property
    def stressed_preauth_timeout(self) -> float: ...
    @property
    def stress_fraction(self) -> float: ...
    @property
    def tls_handshake_timeout(self) -> float: ...


class Handler(Protocol):
    """One connection's protocol logic: serve() runs the session to its end and never raises."""

    @property
    def peer(self) -> str: ...
    async def serve(self) -> None: ...


# Addresses are also counted per network: one host with a /24 (IPv4) or a /64 (IPv6, the usual
# allocation to a single site, RFC 6177) has as many addresses as it likes.
IPV4_NETWORK_PREFIX = 24
IPV6_NETWORK_PREFIX = 64
# Who holds a full pre-auth pool is judged by site: an IPv6 site gets a /48 (RFC 6177), 65536 /64s.
IPV6_SITE_PREFIX = 48


@functools.lru_cache(maxsize=4096)  # a few hundred KB at most; asked at every connection and RCPT
def network_of(address: str) -> str:
    """The /24 or /64 an address belongs to (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP address (a Unix socket, "unknown"): its own network
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_NETWORK_PREFIX if ip.version == 4 else IPV6_NETWORK_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@functools.lru_cache(maxsize=4096)
def site_of(network: str) -> str:
    """The site a network_of() belongs to: an IPv4 /24 is its own, an IPv6 /64 counts as its /48."""
    if ":" not in network or "/" not in network:
        return network
    return str(ipaddress.ip_network(network).supernet(new_prefix=IPV6_SITE_PREFIX))


class Slot:
    """One accepted connection's place in its listener's counts.

    The address and network are captured once, at accept: after the client has gone, an SSL
    transport no longer knows its peer, so reading the address again at release would decrement the
    wrong entry and leak the slot for ever (issue 10 item 2). release() is idempotent, so every path
    that ends a connection (handshake failure, timeout, exception, cancellation) may call it.
    """

    def __init__(self, limiter: ConnectionLimiter, address: str, network: str, connected_at: float) -> None:
        self.limiter = limiter
        self.address = address
        self.network = network
        self.connected_at = connected_at
        self.authenticated = False
        self.released = False
        self.stressed = False  # the listener was under stress while this connection was pre-auth
        self._on_expire: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # How the listener hangs up on this connection to make room for a newer one (set by the
        # listener right after acquire; see ConnectionLimiter.acquire).
        self.on_evict: Callable[[], None] | None = None
        self.evicted = False

    @property
    def preauth_deadline(self) -> float:
        """Loop time by which the client must have logged in (a deadline from connect, not per read)."""
        limits = self.limiter
        seconds = limits.preauth_timeout
        if self.stressed:
            seconds = min(seconds, limits.stressed_preauth_timeout)
        return self.connected_at + seconds

    def watch_preauth(self, on_expire: Callable[[], None]) -> None:
        """Call on_expire at the pre-auth deadline unless promote() or release() comes first; the
        deadline moves earlier if the listener comes under stress meanwhile."""
        self._on_expire = on_expire
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on_expire is None or self.authenticated or self.released:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.preauth_deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        on_expire, self._on_expire = self._on_expire, None
        if on_expire is not None and not self.authenticated and not self.released:
            on_expire()

    def _stress(self) -> None:
        if not self.stressed:
            self.stressed = True
            if self._timer is not None:
                self._arm()

    def promote(self) -> None:
        """The client logged in (or, on the MX, started a transaction): it leaves the pre-auth pool."""
        self.limiter._promote(self)

    def release(self) -> None:
        self.limiter._release(self)

    def _stop_timer(self) -> None:
        self._on_expire = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionLimiter:
    """Open connections of one listener: per client address, per network, in total, and those not
    yet logged in. Refuses past the limits; under stress cuts the pre-auth time.

    As Postfix's stress-adaptive behaviour (and postscreen) does: when the pre-auth pool is more
    than `stress_fraction` full, connections that have not logged in get `stressed_preauth_timeout`
    (counted from their connect) instead of `preauth_timeout`, so idle sockets held by an attacker
    are cut in seconds. The pre-auth pool is smaller than the total, so logged-in sessions always
    have room that idle unauthenticated sockets cannot take.
    """

    def __init__(
        self,
        *,
        per_client: int,
        per_network: int,
        preauth: int,
        total: int,
        preauth_timeout: float,
        stressed_preauth_timeout: float,
        stress_fraction: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The clock must be the event loop's (asyncio's default loop.time() is time.monotonic()):
        # pre-auth deadlines are armed with loop.call_at.
        self._clock = clock
        self.per_client = per_client
        self.per_network = per_network
        self.max_preauth = min(preauth, total)
        self.total = total
        self.preauth_timeout = preauth_timeout
        self.stressed_preauth_timeout = stressed_preauth_timeout
        self.stress_fraction = stress_fraction
        self._by_address: collections.Counter[str] = collections.Counter()
        self._by_network: collections.Counter[str] = collections.Counter()
        # Insertion order is connect order: the first entry is the oldest connection not logged in.
        self._preauth: dict[Slot, None] = {}
        self._preauth_by_site: collections.Counter[str] = collections.Counter()
        self._open = 0
        self._refused_unlogged = 0
        self._refusal_logged_at: float | None = None

    @classmethod
    def for_limits(cls, limits: ListenerLimits) -> ConnectionLimiter:
        return cls(
            per_client=limits.max_connections_per_client,
            per_network=limits.max_connections_per_network,
            preauth=limits.max_preauth_connections,
            total=limits.max_connections,
            preauth_timeout=limits.preauth_timeout,
            stressed_preauth_timeout=limits.stressed_preauth_timeout,
            stress_fraction=limits.stress_fraction,
        )

    @property
    def stressed(self) -> bool:
        return len(self._preauth) >= self.stress_fraction * self.max_preauth

    def acquire(self, address: str) -> Slot | None:
        """A slot for a new connection from `address`, or None when a limit is reached."""
        network = network_of(address)
        if self._by_address[address] >= self.per_client or self._by_network[network] >= self.per_network:
            return None
        if len(self._preauth) >= self.max_preauth and not self._evict_for(site_of(network)):
            return None
        if self._open >= self.total:
            return None
        slot = Slot(self, address, network, self._clock())
        self._by_address[address] += 1
        self._by_network[network] += 1
        self._open += 1
        self._preauth[slot] = None
        self._preauth_by_site[site_of(network)] += 1
        if self.stressed:
            for waiting in self._preauth:
                waiting._stress()
        return slot

    def refusal_to_log(self) -> int:
        """Count one refusal; returns how many to report now (0: stay quiet, one line per interval)."""
        self._refused_unlogged += 1
        now = self._clock()
        if self._refusal_logged_at is not None and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return 0
        count, self._refused_unlogged = self._refused_unlogged, 0
        self._refusal_logged_at = now
        return count

    def _evict_for(self, site: str) -> bool:
        """The pre-auth pool is full: hang up on one of its connections to make room for a newcomer
        from `site` (site_of), so that a newcomer is never refused by idle sockets alone (Dovecot's login
        processes do the same when their connection queue is full).

        While some site holds at least two more of the pool than the newcomer's, its oldest goes,
        however young: a flood reconnecting faster than EVICT_MIN_AGE from a few networks kept every
        socket of a full pool younger than that, and every other client was refused for as long as it
        went on. Otherwise the pool's oldest goes, if it has had EVICT_MIN_AGE seconds to log in: an
        attacker who keeps the pool full then only pushes out his own older sockets."""
        heaviest, held = max(self._preauth_by_site.items(), key=lambda item: item[1], default=("", 0))
        if held >= self._preauth_by_site[site] + 2:
            victim = next((slot for slot in self._preauth if site_of(slot.network) == heaviest and slot.on_evict),
                          None)
        else:
            victim = next(iter(self._preauth), None)
            if victim is not None and self._clock() - victim.connected_at < EVICT_MIN_AGE:
                victim = None
        if victim is None or victim.on_evict is None:
            return False
        self._leave_pool(victim)  # its other counts go when its session ends
        victim.evicted = True
        victim._stop_timer()
        victim.on_evict()
        return True

    def _leave_pool(self, slot: Slot) -> None:
        if slot in self._preauth:
            del self._preauth[slot]
            site = site_of(slot.network)
            self._preauth_by_site[site] -= 1
            if self._preauth_by_site[site] <= 0:
                del self._preauth_by_site[site]

    def _promote(self, slot: Slot) -> None:
        if slot.released or slot.authenticated or slot.evicted:
            return
        slot.authenticated = True
        slot._stop_timer()
        self._leave_pool(slot)

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        slot._stop_timer()
        self._leave_pool(slot)
        self._open -= 1
        for counter, key in ((self._by_address, slot.address), (self._by_network, slot.network)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    # what the listener holds, for tests and the status page

    def count(self, address: str) -> int:
        return self._by_address[address]

    def network_count(self, address: str) -> int:
        return self._by_network[network_of(address)]

    @property
    def open(self) -> int:
        return self._open

    @property
    def preauth(self) -> int:
        return len(self._preauth)


def _evict(channel: Channel) -> None:
    """Hang up on a connection not logged in to make room (ConnectionLimiter._evict_oldest)."""
    channel.expire("connection queue full, oldest not logged in dropped")
    channel.close()


async def start_listener(  # noqa: C901  the listener's options (TLS, limits, PROXY) set up in one place, in order
    host: str,
    port: int,
    *,
    tls_context: ssl.SSLContext | None,
    limits: ListenerLimits,
    max_buffered: int,
    make_handler: Callable[[Channel, Slot], Handler],
    refusal: bytes,
    log: logging.Logger,
    start_serving: bool = True,
) -> asyncio.Server:
    """A listener (implicit TLS when tls_context is given) that refuses connections over the limits
    with `refusal`, and whose close() cancels every session (each says goodbye in its own protocol).

    make_handler gets the connection's Slot: it promotes it at login and may watch its pre-auth
    deadline; the listener releases it, once, when the session's task ends, however it ends.
    With start_serving=False the socket is bound but accepts nothing until start_serving()."""
    limiter = ConnectionLimiter.for_limits(limits)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def serve_one(channel: Channel, slot: Slot, handler: Handler) -> None:
        try:
            if tls_context is not None:
                # Implicit TLS: the handshake happens here, after accept, so a connection is counted
                # (per address, per network, pre-auth) from its first moment, and its pre-auth
                # deadline bounds the handshake too. With create_server(ssl=...) asyncio would hold
                # thousands of silent sockets in their handshake without our knowing.
                seconds = min(limits.tls_handshake_timeout, slot.preauth_deadline - loop.time())
                try:
                    await channel.start_tls(tls_context, max(seconds, 0.001))
                except (ssl.SSLError, OSError, TimeoutError, ConnectionClosed) as exc:
                    log.debug("%s: TLS handshake failed: %s", channel.peer, exc)
                    return
            await handler.serve()
        finally:
            channel.close()
            await channel.wait_closed(CLOSE_TIMEOUT)

    def on_connect(channel: Channel) -> None:
        peer = channel.peer
        slot = limiter.acquire(peer)
        if slot is None:
            if refused := limiter.refusal_to_log():
                log.warning("%s: too many connections, refused (%d refused since the last report)", peer, refused)
            if tls_context is None:  # on an implicit-TLS port plaintext would only garble the handshake
                with contextlib.suppress(Exception):
                    channel.write(refusal)
            channel.close()
            return
        slot.on_evict = lambda: _evict(channel)
        if tls_context is not None:
            channel.stop_reading()  # the ClientHello is for the TLS layer start_tls puts in between
        try:
            task = loop.create_task(serve_one(channel, slot, make_handler(channel, slot)))
        except BaseException:
            slot.release()
            channel.close()
            raise

        def finished(task: asyncio.Task[None]) -> None:
            # A done callback runs on every ending, even for a task cancelled before it started,
            # where a finally block in serve_one would never run.
            slot.release()
            tasks.discard(task)

        tasks.add(task)
        task.add_done_callback(finished)

    server = await loop.create_server(
        lambda: Channel(on_connect, max_buffered),
        start_serving=start_serving,
        host=host,
        port=port,
        reuse_address=True,
        backlog=LISTEN_BACKLOG,
    )
    stop_listening = server.close
    stop_waiting = server.wait_closed

    def close() -> None:
        # asyncio.Server.close() leaves open connections alone; ours are told and closed.
        stop_listening()
        for task in list(tasks):
            task.cancel()

    async def wait_closed() -> None:
        # As in Python 3.12: closed means every connection has finished too (sockets closed).
        if tasks:
            await asyncio.wait(list(tasks))
        await stop_waiting()

    server.close = close  # type: ignore[method-assign]
    server.wait_closed = wait_closed  # type: ignore[method-assign]
    server.limiter = limiter  # type: ignore[attr-defined]
    return server
