"""A command's tagged reply reaches the client when it is made, not when the command's handler returns.

Some handlers go on after their answer: SELECT looks up the folder's message cache for the background
prefill. When the connection joined a command's answers by flushing only at its next read from the
client, the client of a cold SELECT of 1k messages waited for that look-up too (10-12 -> 22-27 ms,
issue 19). Here the look-up is held until the client has its OK: the SELECT's OK must arrive while it
is held."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.polling import wait_until

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def test_a_selects_ok_is_sent_before_the_work_after_it(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    store = box.services.store
    real = store.folder_cache
    release = asyncio.Event()
    held: list[str] = []

    async def held_lookup(*args: Any, **kwargs: Any) -> Any:
        held.append(args[1])
        await release.wait()
        return await real(*args, **kwargs)

    store.folder_cache = held_lookup  # type: ignore[method-assign]
    raw = RawImap(box.port("imaps"), box.client_context, timeout=10)
    try:
        raw.login(USER, PASSWORD)
        try:
            reply = raw.command(b"s", b"SELECT INBOX")
        except TimeoutError:
            reply = [b"no tagged reply while the work after it was held"]
        # The look-up begins after the OK is handed to the transport: on a loaded machine the client
        # may read the OK before the box has got there.
        wait_until(lambda: held == ["INBOX"], seconds=10, what="the SELECT's look-up after its OK")
        assert reply[-1].startswith(b"s OK"), reply[-1]
    finally:
        box.loop.call_soon_threadsafe(release.set)
        store.folder_cache = real  # type: ignore[method-assign]
        raw.close()
