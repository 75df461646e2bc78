"""The server's socket reads stay below its fixed mmap threshold (issue 19): asyncio allocates each
read's buffer at full size before it shrinks it, and at 256 KiB every read was an mmap and a munmap."""

from __future__ import annotations

import asyncio
import socket

from appliance.heap import MMAP_THRESHOLD, SOCKET_READ_SIZE, fix_mmap_threshold


def test_a_plain_socket_reads_below_the_mmap_threshold_and_a_big_message_still_arrives_whole() -> None:
    fix_mmap_threshold()
    assert SOCKET_READ_SIZE < MMAP_THRESHOLD
    payload = bytes(range(256)) * 4096  # 1 MiB: many reads of the smaller size

    async def run() -> tuple[int, bytes]:
        got = bytearray()
        done = asyncio.get_running_loop().create_future()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                assert len(data) <= SOCKET_READ_SIZE
                got.extend(data)

            def connection_lost(self, exc: Exception | None) -> None:
                done.set_result(None)

        left, right = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(Sink, left)
        size = transport.max_size  # type: ignore[attr-defined]
        def send() -> None:
            with right:
                right.sendall(payload)

        await asyncio.get_running_loop().run_in_executor(None, send)
        await done
        return size, bytes(got)

    size, got = asyncio.run(run())
    assert size == SOCKET_READ_SIZE
    assert got == payload
