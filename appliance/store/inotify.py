"""inotify for the store: its system calls, and the watches of folders' directories that both of the
box's watchers keep (file_watch.FileWatch: when a message cache row needs no stat of its file;
dir_watch.DirWatch: which names of a big folder changed since its listing).

What they share: one inotify instance each (opened at first use, for the whole box), the
directories watched per folder (by the folder's row id, never reused; the least recently used of
MAX_FOLDERS forgotten first), and what makes a folder's events not to be trusted: a queue that
overflowed (every folder), a watched directory removed or moved, a directory at the path that is
not the one watched (FolderWatches.replaced), no watch to be had. Each watcher says through two
hooks what that means for it (_invalidated) and what an event naming a file in a folder's
directory means (_named).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from appliance.libc import libc

log = logging.getLogger("letterbox.store")

# <sys/inotify.h>
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
DIR_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED  # the watched directory itself went
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

MAX_FOLDERS = 32  # folders watched at once (two watches each), the least recently used go first


def inotify_open() -> int | None:
    """A non-blocking inotify instance, or None where inotify is not to be had."""
    try:
        fd = libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    return fd if fd >= 0 else None


def inotify_watch(fd: int, directory: str | os.PathLike[str], mask: int) -> int:
    """The watch descriptor of `directory` (only a directory) on the instance `fd`; raises OSError."""
    wd: int = libc().inotify_add_watch(fd, os.fsencode(directory), mask | IN_ONLYDIR)
    if wd < 0:
        raise OSError(ctypes.get_errno(), "inotify_add_watch")
    return wd


def inotify_events(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """(watch descriptor, mask, name) of each event queued on `fd`, never waiting for more. Raises
    OSError when the events cannot be read."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        at = 0
        while at + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, at)
            yield wd, mask, data[at + _EVENT.size:at + _EVENT.size + length].rstrip(b"\0")
            at += _EVENT.size + length


class WatchedFolder:
    """A folder's watched directories, by the watcher's key for each (a path, or "new"/"cur")."""

    __slots__ = ("dirs",)

    def __init__(self) -> None:
        self.dirs: dict[str, tuple[int, int, int]] = {}  # key -> (wd, st_dev, st_ino)


_Folder = TypeVar("_Folder", bound=WatchedFolder)


class FolderWatches(Generic[_Folder]):
    """One inotify instance and the folders whose directories it watches. Thread-safe: the
    subclasses' public methods take self._lock; every method here but close() runs under it."""

    mask = 0  # the events watched
    fallback = ""  # what the box does where it has no watch, for the log

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._broken = False  # inotify is not to be had here (or its events could not be read)
        self._folders: OrderedDict[int, _Folder] = OrderedDict()
        self._wds: dict[int, tuple[int, str]] = {}  # wd -> (folder id, key)
        self._drains = 0  # events read so far, in rounds: a name's event is known by its round
        self._limit_logged = False

    def close(self) -> None:
        with self._lock:
            self._close()

    # --- the hooks --------------------------------------------------------------------------------------

    def _new_folder(self) -> _Folder:
        raise NotImplementedError

    def _invalidated(self, folder: _Folder) -> None:
        """Events of the folder may have been missed: nothing known from its events holds."""
        raise NotImplementedError

    def _named(self, folder: _Folder, key: str, mask: int, name: bytes) -> None:
        """An event (`mask`) named `name` in the folder's directory `key`, in drain self._drains."""
        raise NotImplementedError

    # --- for the watchers (under self._lock) -------------------------------------------------------

    def _use(self, folder_id: int) -> _Folder | None:
        """The folder's watches, made the most recently used; None without inotify."""
        if self._open() is None:
            return None
        folder = self._folders.get(folder_id)
        if folder is None:
            folder = self._folders[folder_id] = self._new_folder()
            while len(self._folders) > MAX_FOLDERS:
                self._forget(*self._folders.popitem(last=False))
        else:
            self._folders.move_to_end(folder_id)
        return folder

    def _watch(self, folder_id: int, folder: _Folder, key: str, path: str | os.PathLike[str]) -> bool:
        """Watch the directory at `path` as the folder's `key`; False when it cannot be (it is not
        there, or no watch is left: inotify's limits)."""
        if self._fd is None:
            return False
        try:
            wd = inotify_watch(self._fd, path, self.mask)
            st = os.stat(path)  # (after the watch: the directory watched, should it be replaced meanwhile)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM) and not self._limit_logged:
                self._limit_logged = True  # (once: at the limit, every look at a folder would say it)
                log.info("store: no more inotify watches (%s): %s", exc, self.fallback)
            return False
        owner = self._wds.get(wd)
        if owner is not None and owner != (folder_id, key):
            # The same directory under another name (a folder renamed): watched for this one now.
            other = self._folders.get(owner[0])
            if other is not None:
                other.dirs.pop(owner[1], None)
                self._invalidated(other)
        self._wds[wd] = (folder_id, key)
        folder.dirs[key] = (wd, st.st_dev, st.st_ino)
        return True

    def _drain(self) -> None:
        """Read the events there are, never waiting."""
        if self._fd is None:
            return
        self._drains += 1
        try:
            for wd, mask, name in inotify_events(self._fd):
                self._event(wd, mask, name)
        except OSError:
            log.warning("store: the inotify events cannot be read: %s", self.fallback, exc_info=True)
            self._close()

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            for each in self._folders.values():
                self._invalidated(each)
            return
        owner = self._wds.get(wd)
        if owner is None:
            return
        folder = self._folders.get(owner[0])
        if mask & DIR_GONE:
            del self._wds[wd]
            if folder is not None:
                folder.dirs.pop(owner[1], None)
                self._invalidated(folder)
            if not mask & IN_IGNORED and self._fd is not None:
                libc().inotify_rm_watch(self._fd, wd)
        elif folder is not None and name:
            self._named(folder, owner[1], mask, name)

    def _unwatch(self, folder_id: int, key: str, wd: int) -> None:
        if self._wds.get(wd) == (folder_id, key):
            del self._wds[wd]
            if self._fd is not None:
                libc().inotify_rm_watch(self._fd, wd)

    def _forget(self, folder_id: int, folder: _Folder) -> None:
        for key, (wd, _, _) in folder.dirs.items():
            self._unwatch(folder_id, key, wd)
        folder.dirs.clear()
        self._invalidated(folder)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (every watch with it)
            self._fd = None
        self._broken = True
        for folder in self._folders.values():
            folder.dirs.clear()
            self._invalidated(folder)
        self._folders.clear()
        self._wds.clear()

    def _open(self) -> int | None:
        if self._fd is None and not self._broken:
            self._fd = inotify_open()
            if self._fd is None:
                log.info("store: inotify is not available: %s", self.fallback)
                self._broken = True
        return self._fd

    @staticmethod
    def replaced(watched: Mapping[str, tuple[int, int, int]], paths: Mapping[str, str | os.PathLike[str]]) -> list[str]:
        """The keys of `paths` whose directory is not the one `watched` has for them (another is at
        the path, none is, or none is watched): a stat each, outside self._lock. A directory whose
        parent was renamed away is replaced without an event on it."""
        moved = []
        for key, path in paths.items():
            known = watched.get(key)
            try:
                st = os.stat(path)
                if known is not None and known[1:] == (st.st_dev, st.st_ino):
                    continue
            except OSError:
                pass
            moved.append(key)
        return moved
