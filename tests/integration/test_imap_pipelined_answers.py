"""Commands a client pipelines are answered in one write while none of them waits (issue 19).

imaptest's stress mode sends five or six commands at a time; each tagged reply was flushed alone, a
TLS record, a send(2) and a wake-up of the client each, a third of the event loop's time. Now a reply
with more input already buffered behind it goes out at the loop's next iteration, with the answers of
the commands that ran on meanwhile. An answer never waits behind a command that waits (a lock, a thread,
the disk): the loop's next iteration comes as soon as that command waits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.channel import Channel
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def session(box: BoxHandle) -> Iterator[RawImap]:
    box.add_user(USER, PASSWORD)
    raw = RawImap(box.port("imaps"), box.client_context, timeout=10)
    try:
        raw.login(USER, PASSWORD)
        yield raw
    finally:
        raw.close()


def test_pipelined_commands_that_do_not_wait_are_answered_in_one_write(
        session: RawImap, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real = Channel.write

    def counted(self: Channel, data: bytes) -> None:
        writes.append(data)
        real(self, data)

    monkeypatch.setattr(Channel, "write", counted)
    session.send(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n")  # one TLS record: all three buffered at once
    reply = session.until_tagged(b"c")
    assert [line for line in reply if not line.startswith(b"*")] == [
        b"a OK NOOP completed\r\n", b"b OK NOOP completed\r\n", b"c OK NOOP completed\r\n"]
    assert len(writes) == 1, writes


def test_an_answer_does_not_wait_for_a_pipelined_command_that_waits(box: BoxHandle, session: RawImap) -> None:
    store = box.services.store
    real = store.snapshot
    release = asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await real(*args, **kwargs)

    store.snapshot = held  # type: ignore[method-assign]
    try:
        session.send(b"a NOOP\r\nb STATUS INBOX (MESSAGES)\r\n")
        try:
            first = session.until_tagged(b"a")[-1]
        except TimeoutError:
            first = b"no answer to NOOP while the STATUS behind it waited"
        assert first.startswith(b"a OK"), first
    finally:
        box.loop.call_soon_threadsafe(release.set)
        store.snapshot = real  # type: ignore[method-assign]
    assert session.until_tagged(b"b")[-1].startswith(b"b OK")
