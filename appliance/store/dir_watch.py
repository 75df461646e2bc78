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

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from appliance.libc import libc
from appliance.store.file_watch import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    inotify_events,
    inotify_open,
    inotify_watch,
)

log = logging.getLogger("letterbox.store")

_THERE = IN_CREATE | IN_MOVED_TO  # the name has a file after the event
_NAMES = _THERE | IN_DELETE | IN_MOVED_FROM
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
MAX_FOLDERS = 32  # folders watched at once (two watches each), the least recently listed go first
MAX_NAMES = 10_000  # names remembered per folder before it is listed again instead


class _Folder:
    __slots__ = ("dirs", "names", "seq", "valid")

    def __init__(self) -> None:
        self.dirs: dict[str, tuple[int, int, int]] = {}  # "new"/"cur" -> (wd, st_dev, st_ino)
        self.names: dict[tuple[str, str], tuple[bool, int]] = {}  # (sub, name) -> (a file there, seq)
        self.seq = 0
        self.valid = False  # watched since a listing, nothing missed since


class DirWatch:
    """The box's watches of big folders' new/ and cur/ (one instance, by OpenMailboxes). Thread-safe:
    listings run in worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._broken = False
        self._folders: OrderedDict[int, _Folder] = OrderedDict()  # by folder row id, never reused
        self._wds: dict[int, tuple[int, str]] = {}  # wd -> (folder id, "new"/"cur")

    def listing(self, folder_id: int, dirs: Mapping[str, Path]) -> None:
        """Called just before a listing of the folder's `dirs` ("new", "cur"): watched from now on
        (every change after this is an event), and the names evented so far forgotten (the listing
        sees what they did)."""
        with self._lock:
            if self._open() is None:
                return
            folder = self._folders.pop(folder_id, None) or _Folder()
            self._folders[folder_id] = folder
            while len(self._folders) > MAX_FOLDERS:
                self._forget(*self._folders.popitem(last=False))
            self._drain()
            fd = self._fd
            if fd is None:
                return
            folder.names.clear()
            folder.valid = True
            for sub, path in dirs.items():
                try:
                    st = os.stat(path)
                    old = folder.dirs.pop(sub, None)
                    if old is not None:
                        if old[1:] == (st.st_dev, st.st_ino):
                            folder.dirs[sub] = old
                            continue  # watched already
                        self._unwatch(folder_id, sub, old[0])  # another directory than the one watched
                    wd = inotify_watch(fd, path, _NAMES | _GONE)
                    st = os.stat(path)  # (the directory watched, should it have been replaced meanwhile)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                        log.info("store: no more inotify watches (%s): big folders are listed again to recheck", exc)
                    folder.valid = False
                    continue
                self._wds[wd] = (folder_id, sub)
                folder.dirs[sub] = (wd, st.st_dev, st.st_ino)
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
            dir_ids = {sub: (dev, ino) for sub, (_, dev, ino) in folder.dirs.items()}
        for sub, path in dirs.items():  # (outside the lock: two stats) the directories watched are those there now
            try:
                st = os.stat(path)
            except OSError:
                return None
            if dir_ids.get(sub) != (st.st_dev, st.st_ino):
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

    def close(self) -> None:
        with self._lock:
            self._close()

    # --- internals (under self._lock) ----------------------------------------------------------

    def _open(self) -> int | None:
        if self._fd is None and not self._broken:
            self._fd = inotify_open()
            self._broken = self._fd is None
        return self._fd

    def _drain(self) -> None:
        if self._fd is None:
            return
        try:
            for wd, mask, name in inotify_events(self._fd):
                self._event(wd, mask, name)
        except OSError:
            log.warning("store: the inotify events of folders cannot be read: big folders are listed again to recheck",
                        exc_info=True)
            self._close()

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            for each in self._folders.values():
                each.valid = False
            return
        owner = self._wds.get(wd)
        if owner is None:
            return
        folder = self._folders.get(owner[0])
        if mask & _GONE:
            del self._wds[wd]
            if folder is not None:
                folder.dirs.pop(owner[1], None)
                folder.valid = False
            if not mask & IN_IGNORED and self._fd is not None:
                libc().inotify_rm_watch(self._fd, wd)
        elif folder is not None and name and mask & _NAMES:
            folder.seq += 1
            folder.names[(owner[1], os.fsdecode(name))] = (bool(mask & _THERE), folder.seq)
            if len(folder.names) > MAX_NAMES:
                folder.valid = False
                folder.names.clear()

    def _close(self) -> None:
        for folder_id, folder in list(self._folders.items()):
            self._forget(folder_id, folder)
        self._folders.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._broken = True

    def _forget(self, folder_id: int, folder: _Folder) -> None:
        for sub, (wd, _, _) in folder.dirs.items():
            self._unwatch(folder_id, sub, wd)
        folder.dirs.clear()
        folder.valid = False
        folder.names.clear()

    def _unwatch(self, folder_id: int, sub: str, wd: int) -> None:
        if self._wds.get(wd) == (folder_id, sub):
            del self._wds[wd]
            if self._fd is not None:
                libc().inotify_rm_watch(self._fd, wd)
