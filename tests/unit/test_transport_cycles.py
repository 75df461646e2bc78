"""A closed connection's socket transport is freed when its last reference goes, not at the next full
collection (heap.break_transport_cycles): asyncio 3.11 keeps the transport's own bound method in it."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

from appliance.heap import break_transport_cycles


def test_a_closed_socket_transport_is_freed_without_a_collection() -> None:
    break_transport_cycles()
    break_transport_cycles()  # twice changes nothing more

    async def run() -> weakref.ref[asyncio.Transport]:
        lost = asyncio.get_running_loop().create_future()

        class Quiet(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(None)

        left, right = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(Quiet, left)
        gone = weakref.ref(transport)
        del transport
        right.close()  # the peer goes: the transport sees EOF and closes itself
        await lost
        await asyncio.sleep(0)  # past the loop's call of connection_lost
        return gone

    gc.collect()
    gc.disable()
    try:
        gone = asyncio.run(run())
        assert gone() is None
    finally:
        gc.enable()
