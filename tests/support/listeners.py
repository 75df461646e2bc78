"""Stopping the listeners a test starts itself on the box's loop (appliance.channel.start_server)."""

from __future__ import annotations

import asyncio


async def stop_server(server: asyncio.Server, wait: float = 10) -> None:
    """Close the listener and wait for its connections: on the box's loop (`box.run(stop_server(s))`),
    never from the test's thread, where asyncio.Server.close() races the loop's own bookkeeping of the
    connections that end (a TypeError in Server._wakeup, seen once in a make test)."""
    server.close()
    await asyncio.wait_for(server.wait_closed(), wait)
