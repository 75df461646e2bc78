"""Deadline-bounded polling: how a test waits for a state instead of sleeping a guessed time.

A fixed sleep is either too short on a loaded machine (a flake) or too long everywhere (a slow suite);
polling returns as soon as the state holds and fails with words when it never does."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.02


def wait_until(condition: Callable[[], T], *, seconds: float = 30.0, what: str = "",
               interval: float = INTERVAL) -> T:
    """Call `condition` until it returns something true and return that; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what or condition}")
        time.sleep(interval)


def retry(action: Callable[[], T], *, retry_on: tuple[type[BaseException], ...], seconds: float = 30.0,
          interval: float = INTERVAL) -> T:
    """Call `action` until it returns instead of raising one of `retry_on` (a server still starting,
    a certificate not yet picked up) and return what it returned; after `seconds` the last such error
    goes on to the caller. Any other exception goes on at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except retry_on:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """A condition for wait_until: the process `pid` (one the test started) has ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def async_wait_until(condition: Callable[[], T | Awaitable[T]], *, seconds: float = 30.0,
                           what: str = "", interval: float = INTERVAL) -> T:
    """The same on an event loop: `condition` may be a plain or an async function."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what or condition}")
        await asyncio.sleep(interval)
