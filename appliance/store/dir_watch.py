"""Which message file names of a big folder changed since its last listing, by inotify (issue 19).

A folder's directory stamp (the mtimes of new/ and cur/) cannot show a change another program made
within the same mtime tick as one of ours, so a folder that changed recently is listed once more
DIRTY_WINDOW_NS later (FolderIndex.recheck_ns). With mail arriving every few seconds into a 100k
folder that sessions have selected, that recheck listed the whole folder about once every 2 s,
for as long as the mail went on: a fifth of the event loop, a cost per folder size, not per message.

Here the recheck is answered from the events instead: new/ and cur/ of a folder listed in a worker
thread are watched from just before its listing on, and every name created, renamed or removed
there since is remembered with what its last event left (a file by that name, or none). When each
such name is where the index says (FolderIndex.unchanged_by_others: indexed there when a file is
there, not indexed there when none is), the directories hold what the index holds, whoever made the
changes: every change since the listing, ours and any other program's, is an event. Our own
deliveries, claims, flag changes, expunges and copies need no bookkeeping of their own: the index
has them when the check runs (folder lock held). Any doubt lists the folder as before: no watch
(inotify missing, its limits reached), an overflowed queue, too many names, or a directory removed,
moved or replaced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from appliance.store.inotify import (
    DIR_GONE,
    IN_CREATE,
    IN_DELETE,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    FolderWatches,
    WatchedFolder,
)

_THERE = IN_CREATE | IN_MOVED_TO  # the name has a file after the event
_NAMES = _THERE | IN_DELETE | IN_MOVED_FROM
MAX_NAMES = 10_000  # names remembered per folder before it is listed again instead


class _Folder(WatchedFolder):
    """A folder's watched new/ and cur/ (by "new", "cur") and the names evented since its listing."""

    __slots__ = ("names", "seq", "valid")

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[tuple[str, str], tuple[bool, int]] = {}  # (sub, name) -> (a file there, seq)
        self.seq = 0
        self.valid = False  # watched since a listing, nothing missed since


class DirWatch(FolderWatches[_Folder]):
    """The box's watches of big folders' new/ and cur/ (one instance, by OpenMailboxes). Thread-safe:
    listings run in worker threads."""

    mask = _NAMES | DIR_GONE
    fallback = "big folders are listed again to recheck"

    def listing(self, folder_id: int, dirs: Mapping[str, Path]) -> None:
        """Called just before a listing of the folder's `dirs` ("new", "cur"): watched from now on
        (every change after this is an event), and the names evented so far forgotten (the listing
        sees what they did)."""
        with self._lock:
            folder = self._use(folder_id)
            if folder is None:
                return
            self._drain()
            if self._fd is None:
                return
            folder.names.clear()
            folder.valid = True
            for sub, path in dirs.items():
                try:
                    st = os.stat(path)
                except OSError:
                    folder.valid = False
                    continue
                old = folder.dirs.pop(sub, None)
                if old is not None:
                    if old[1:] == (st.st_dev, st.st_ino):
                        folder.dirs[sub] = old
                        continue  # watched already
                    self._unwatch(folder_id, sub, old[0])  # another directory than the one watched
                if not self._watch(folder_id, folder, sub, path):
                    folder.valid = False
            folder.valid = folder.valid and len(folder.dirs) == len(dirs)

    def changed(self, folder_id: int, dirs: Mapping[str, Path]) -> tuple[dict[tuple[str, str], bool], int] | None:
        """((sub, name) -> whether a file by that name is there, for each name an event named since
        the folder's last listing or consumed check; the sequence number to consume them up to), or
        None when that is not known: the folder must be listed."""
        with self._lock:
            folder = self._folders.get(folder_id)
            if folder is None or not folder.valid or self._fd is None:
                return None
            self._drain()
            if not folder.valid:
                return None
            watched = dict(folder.dirs)
        if self.replaced(watched, dirs):  # (outside the lock: two stats) the directories watched are those there now
            return None
        with self._lock:
            if not folder.valid or self._folders.get(folder_id) is not folder:
                return None
            return {key: there for key, (there, _) in folder.names.items()}, folder.seq

    def consumed(self, folder_id: int, seq: int) -> None:
        """The names `changed` gave up to `seq` were found where the index has them: forget them
        (a name evented again since stays)."""
        with self._lock:
            folder = self._folders.get(folder_id)
            if folder is not None:
                folder.names = {key: value for key, value in folder.names.items() if value[1] > seq}

    def forget(self, folder_id: int) -> None:
        """The folder's index left memory or its directories moved: no watch for it until its next listing."""
        with self._lock:
            folder = self._folders.pop(folder_id, None)
            if folder is not None:
                self._forget(folder_id, folder)

    # --- the hooks (under self._lock) -------------------------------------------------------------

    def _new_folder(self) -> _Folder:
        return _Folder()

    def _invalidated(self, folder: _Folder) -> None:
        folder.valid = False
        folder.names.clear()

    def _named(self, folder: _Folder, key: str, mask: int, name: bytes) -> None:
        if mask & _NAMES:
            folder.seq += 1
            folder.names[(key, os.fsdecode(name))] = (bool(mask & _THERE), folder.seq)
            if len(folder.names) > MAX_NAMES:
                self._invalidated(folder)
