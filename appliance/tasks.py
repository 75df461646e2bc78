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
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
