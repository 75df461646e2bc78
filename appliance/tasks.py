"""Stopping background tasks: one way for every service that runs a loop in the background."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` and wait until it has really finished, so a service's stop() returns only when its
    loop can no longer touch the database or the files (the box closes them next). A task that ended
    with an error is not raised again here: its loop logged it when it happened."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        # Python 3.11's asyncio.wait_for swallows a cancel that comes as what it waits for completes
        # (CPython gh-86296): a loop waiting for its wake event (TextIndex) went on for its next poll,
        # and the box's stop waited that long. Cancelled again until it has ended.
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task


RECANCEL_SECONDS = 0.05
