"""Every TLS connection of the event loop reads its socket into one shared buffer
(heap.share_tls_read_buffer): asyncio kept a 64 KiB buffer per connection, idle ones included."""

from __future__ import annotations

import asyncio
import logging
import ssl
import tracemalloc
from asyncio import sslproto

import pytest
import trustme

from appliance.heap import SOCKET_READ_SIZE, share_tls_read_buffer

CONNECTIONS = 40


async def _echo_over_tls(ca: trustme.CA) -> tuple[int, list[bytes]]:
    """(octets asyncio's TLS layer holds while CONNECTIONS connections are idle, what each echoed)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    ended: list[asyncio.Future[None]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done = asyncio.get_running_loop().create_future()
        ended.append(done)
        try:
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()
        finally:
            done.set_result(None)

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    tracemalloc.start()
    try:
        pairs = [await asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="localhost")
                 for _ in range(CONNECTIONS)]
        await asyncio.sleep(0.1)
        held = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*asyncio/sslproto.py")]).statistics("filename"))
    finally:
        tracemalloc.stop()
    for n, (_, writer) in enumerate(pairs):  # all at once: the buffer is shared, their bytes are not
        writer.write(b"%d:" % n + bytes([n]) * 100_000)
    echoed = [await reader.readexactly(100_000 + len(b"%d:" % n)) for n, (reader, _) in enumerate(pairs)]
    for _, writer in pairs:
        writer.close()
    await asyncio.gather(*ended)
    server.close()
    await server.wait_closed()
    return held, echoed


def test_idle_tls_connections_share_one_read_buffer() -> None:
    share_tls_read_buffer()
    share_tls_read_buffer()  # twice changes nothing more
    ca = trustme.CA()
    held, echoed = asyncio.run(_echo_over_tls(ca))
    assert echoed == [b"%d:" % n + bytes([n]) * 100_000 for n in range(CONNECTIONS)]
    # Both ends of each connection are asyncio's: 80 SSLProtocols, 5 MiB of buffers before.
    assert held < 2 * CONNECTIONS * SOCKET_READ_SIZE / 8


def test_backs_off_when_asyncio_changed_shape(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A Python whose SSLProtocol no longer reads into _ssl_buffer_view keeps its own buffers, and says so."""

    class Changed(sslproto.SSLProtocol):
        def get_buffer(self, n: int) -> memoryview:
            return memoryview(bytearray(n))  # no _ssl_buffer_view any more

    monkeypatch.setattr(sslproto, "SSLProtocol", Changed)
    with caplog.at_level(logging.WARNING, logger="letterbox.heap"):
        share_tls_read_buffer()
    assert Changed.get_buffer.__qualname__.startswith("test_backs_off")
    assert "__init__" not in vars(Changed)
    assert "not the shape" in caplog.text
