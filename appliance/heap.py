"""The C heap of the server (glibc's malloc): its mmap threshold, trims, and the watch that gives back
what a burst of connections freed (issue 19: idle RSS <= 60 MB, <= 120 MB after the 100k run).

glibc keeps freed memory in its heap: RSS stays at the peak until malloc_trim hands the free pages
back. Work on a big folder trims when the folder leaves memory (MailStore's trim); a flood of
connections touches no folder. After 600 IMAPS and 1,000 HTTPS connections held idle and closed
(loopback, 30 client networks) the server's RSS stayed at 237.7 MiB (50.7 before) with no Python
object of theirs left (gc counts as before: the TLS objects' C memory, freed into glibc's heap):
mallinfo2 said 175 MiB of it free, and malloc_trim(0) took RSS to 63.4 MiB in 19 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import threading
from asyncio import selector_events, sslproto
from typing import Any

from appliance import collector
from appliance.libc import libc
from appliance.tasks import cancel_and_wait

log = logging.getLogger("letterbox.heap")


def release_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: RSS would stay at its peak)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _glibc("malloc_trim") or False
    if _malloc_trim:
        _malloc_trim(0)

_malloc_trim: Any = None

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 * 1024
# Octets asyncio reads from a socket at once. Each read allocates a buffer of this size and shrinks it
# to what came: asyncio's 256 KiB, above the threshold, made every read an mmap, mremap and munmap
# (a TLB shootdown in a threaded process; six reads per MX message, strace -c, issue 19).
SOCKET_READ_SIZE = 64 * 1024


def fix_mmap_threshold() -> None:
    """Blocks of 128 KiB and more straight from mmap, returned to the system when freed, for the
    server's whole life. glibc starts there too, but raises the threshold to the size of each large
    block freed (up to 32 MiB): after a 100k folder's big FETCH and SEARCH lists, their successors
    came from the heap and stayed behind as holes malloc_trim could not give back. Letterbox-only
    rounds of the 100k IMAP rows (one round each, load 5-9): main process RSS 5 s after them
    168-187 MiB with the sliding threshold (3 rounds), 129.4 and 129.0 MiB with it fixed (2 rounds;
    peak 227-246 -> 207-208 MiB). What stays is mostly pymalloc's: 73 arenas of 1 MiB holding 25 MB
    of objects, as many as idle, and 48 MB of empty pools in arenas not wholly free."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:  # not glibc: its own policy stands
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    # Plain transports read into a fresh buffer of max_size; TLS ones call SSLObject.read(max_size),
    # which allocates that size at every call, and again for the call that finds nothing more (~2 per
    # IMAP command under imaptest's stress mode). A TLS record is at most 16 KiB.
    selector_events._SelectorSocketTransport.max_size = SOCKET_READ_SIZE  # type: ignore[attr-defined]
    sslproto.SSLProtocol.max_size = SOCKET_READ_SIZE


def break_transport_cycles() -> None:
    """A socket transport lets go of its own bound method when its connection is lost. asyncio keeps
    it as `_read_ready_cb` (3.11): a cycle through the transport, so every closed connection's
    transport, socket, protocol, session and TLS state stayed alive until a full collection, which the
    box's own allocations seldom bring. After 20 IMAPS and 20 HTTPS connections closed, all 40
    transports were still there; after the flood above, 31,200 objects and 175 MiB of heap."""
    lost = selector_events._SelectorSocketTransport._call_connection_lost  # type: ignore[attr-defined]
    if getattr(lost, "breaks_cycle", False):
        return

    def call_connection_lost(self: Any, exc: BaseException | None) -> None:
        try:
            lost(self, exc)
        finally:
            # The reader is removed by now (its pending handle cancelled): nothing reads again.
            self._read_ready_cb = _no_read

    call_connection_lost.breaks_cycle = True  # type: ignore[attr-defined]
    selector_events._SelectorSocketTransport._call_connection_lost = call_connection_lost  # type: ignore[attr-defined]


def _no_read() -> None:
    pass


_tls_reads = threading.local()  # each thread's event loop has its own


def share_tls_read_buffer() -> None:
    """Every TLS connection of a thread reads the socket into one buffer, not one of its own.

    asyncio's SSLProtocol keeps a SOCKET_READ_SIZE buffer per connection for the socket's raw bytes,
    64 KiB of the heap for each idle TLS connection: an attacker's silent sockets on 993, 995 and 465
    held it in every slot of the pre-auth pools (1600 slots, 100 MB). The transport fills the buffer
    (recv_into) and the protocol copies it into the connection's MemoryBIO in the same call, nothing
    running in between, so one buffer per thread serves every connection."""
    init = sslproto.SSLProtocol.__init__
    if getattr(vars(sslproto.SSLProtocol).get("__init__"), "shares_buffer", False):
        return
    if not _tls_protocol_as_expected(sslproto.SSLProtocol):
        log.warning("asyncio's SSLProtocol is not the shape heap.share_tls_read_buffer knows (Python %s):"
                    " each TLS connection keeps its own read buffer", sys.version.split()[0])
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._ssl_buffer = b""  # never read: get_buffer hands out the thread's buffer
        self._ssl_buffer_view = memoryview(self._ssl_buffer)

    def get_buffer(self: Any, n: int) -> memoryview:
        view = getattr(_tls_reads, "view", None)
        if view is None or len(view) < self.max_size:
            view = _tls_reads.view = memoryview(bytearray(self.max_size))
        self._ssl_buffer_view = view  # buffer_updated copies from here, in this same call
        return view

    __init__.shares_buffer = True  # type: ignore[attr-defined]
    sslproto.SSLProtocol.__init__ = __init__  # type: ignore[method-assign]
    sslproto.SSLProtocol.get_buffer = get_buffer  # type: ignore[method-assign]


# What share_tls_read_buffer relies on in CPython's private SSLProtocol (3.11 to 3.13): the names each
# method's code uses. A Python that changed them gets asyncio's own buffers, and one line in the log.
_SSL_PROTOCOL_SHAPE = {
    "__init__": {"max_size", "_ssl_buffer", "_ssl_buffer_view"},
    "get_buffer": {"max_size", "_ssl_buffer_view"},
    "buffer_updated": {"_incoming", "_ssl_buffer_view"},
}


def _tls_protocol_as_expected(cls: type) -> bool:
    """Whether cls's methods read and write the buffer attributes share_tls_read_buffer replaces."""
    for method, names in _SSL_PROTOCOL_SHAPE.items():
        code = getattr(getattr(cls, method, None), "__code__", None)
        if code is None or not names <= set(code.co_names):
            return False
    return True


def _glibc(name: str) -> Any:
    """glibc's function `name`, or None where the C library is another one."""
    try:
        return getattr(libc(), name)
    except (OSError, AttributeError):
        return None


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33 and later), every field a size_t.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap() -> int | None:
    """Octets free in malloc's heaps (mallinfo2's fordblks), held by the process until a trim; None
    where the C library has no mallinfo2. About 0.1 ms, with 190 MiB of fragmented heap."""
    global _mallinfo2
    if _mallinfo2 is None:
        _mallinfo2 = _glibc("mallinfo2") or False
        if _mallinfo2:
            _mallinfo2.restype = _MallInfo2
            _mallinfo2.argtypes = []
    if not _mallinfo2:
        return None
    return int(_mallinfo2().fordblks)

_mallinfo2: Any = None

# How often the watch looks, and by how much the process's RSS or malloc's free heap must have grown since
# the last trim for the next. Idle, about 2 MiB of heap is free. A look costs about 0.2 ms (statm and
# mallinfo2); a trim after the flood above 50 ms (its full collection 51 ms, malloc_trim 19 ms), one that
# finds little about 30 ms, so only a growth of GROWTH or more since the last makes one: a box that
# stays busy at one size pays nothing, one that keeps growing at most one per WATCH_EVERY.
WATCH_EVERY = 15.0
GROWTH = 32 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    """The process's RSS in octets (/proc/self/statm, about 20 us)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class HeapWatch:
    """Every `every` seconds: a full collection and a trim, if RSS has grown by `growth` octets since
    the last trim (the objects of closed connections still wait in cycles for a full collection:
    1,600 sockets and their transports after the flood above), or if the heap's free octets have
    (connections whose memory went back to malloc at their close, once collected)."""

    def __init__(self, *, every: float = WATCH_EVERY, growth: int = GROWTH) -> None:
        self.every = every
        self.growth = growth
        self.trims = 0
        self._task: asyncio.Task[None] | None = None
        self._rss_after = resident()
        self._low_free = free_heap() or 0

    def start(self) -> None:
        if free_heap() is None:
            return  # not glibc: nothing to ask, and its own policy stands
        self._task = asyncio.create_task(self._run(), name="heap-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def check(self) -> bool:
        """Collect and trim now if RSS or the free heap grew enough since the last trim; True if it did."""
        free, rss = free_heap() or 0, resident()
        self._low_free = min(self._low_free, free)
        if rss - self._rss_after < self.growth and free - self._low_free < self.growth:
            return False
        collector.collect()
        release_memory()
        self.trims += 1
        self._rss_after, self._low_free = resident(), free_heap() or 0
        log.debug("heap: RSS %.1f -> %.1f MiB by a full collection and a trim", rss / 2**20, self._rss_after / 2**20)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.check()


async def start_heap_watch(svc: object) -> HeapWatch:
    """A background service of the box (app.BACKGROUND)."""
    watch = HeapWatch()
    watch.start()
    return watch
