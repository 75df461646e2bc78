"""The store's change bus: who waits for changes to which folder, woken after each committed change
(delivery, flags, expunge, rename by any session or by the rescan that finds another program's work).
Apart from MailStore so the writing code and the waiting code only meet here (IMAP IDLE and NOOP,
POP3's maildrop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class ChangeBus:
    """Watchers keyed by (canonical mailbox address, canonical folder name)."""

    def __init__(self) -> None:
        self._watchers: dict[tuple[str, str], set[Watcher]] = {}
        # Called after every change to any folder (the full-text indexer looks for new mail); each
        # must return at once.
        self.any_change: list[Callable[[], None]] = []
        # Called when the last watcher of a folder goes (the store may unload its index then).
        self.on_unwatched: list[Callable[[], None]] = []

    def watched(self, owner: str, folder: str) -> bool:
        return (owner, folder) in self._watchers

    def owners(self) -> set[str]:
        """The mailboxes someone watches a folder of."""
        return {owner for owner, _ in self._watchers}

    def watch(self, owner: str, folder: str) -> Watcher:
        key = (owner, folder)
        watchers = self._watchers.setdefault(key, set())

        def unregister(watcher: Watcher) -> None:
            watchers.discard(watcher)
            if not watchers and self._watchers.get(key) is watchers:
                del self._watchers[key]
                for listener in self.on_unwatched:
                    listener()

        watcher = Watcher(unregister)
        watchers.add(watcher)
        return watcher

    def changed(self, owner: str, *folders: str) -> None:
        for listener in self.any_change:
            listener()
        for folder in folders:
            for watcher in self._watchers.get((owner, folder), ()):
                watcher.notify()

    def mailbox_gone(self, owner: str) -> None:
        """Every watcher of the mailbox looks again (and finds it gone)."""
        for (who, _folder), watchers in list(self._watchers.items()):
            if who == owner:
                for watcher in list(watchers):
                    watcher.notify()


class Watcher:
    """Woken after any committed change to one folder (delivery, flags, expunge by any session)."""

    def __init__(self, unregister: Callable[[Watcher], None]) -> None:
        self._event = asyncio.Event()
        self._unregister = unregister
        self._closed = False
        # Also called at each change: for one who follows many folders and waits on them all at once
        # (NOTIFY's), instead of a wait() per folder.
        self.on_change: Callable[[], None] | None = None
        self._woken: asyncio.Future[None] | None = None

    def notify(self) -> None:
        self._event.set()
        if self._woken is not None:
            if not self._woken.done():
                self._woken.set_result(None)
            self._woken = None
        if self.on_change is not None:
            self.on_change()

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (the contract's shape)
        """True if the folder changed since the last wait; waits up to `timeout` (None: forever,
        0: just look)."""
        if not self._event.is_set() and timeout != 0 and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        changed = self._event.is_set()
        self._event.clear()
        return changed

    def woken(self) -> asyncio.Future[None]:
        """A future done at the next change (at once when one is pending or the watch is closed); then
        wait(0) tells it. IDLE's wait for a change without the task, inner task and timer of a wait()
        per session per delivery (issue 19): the caller times it out and cancels it (one at a time)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._event.is_set() or self._closed:
            future.set_result(None)
        else:
            self._woken = future
        return future

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unregister(self)
