"""When a message cache row may be used without a stat of its file (issue 19).

A cache row is tied to the file it was computed from (size, modification time, inode:
message_cache.FileStamp). Checking that with a stat per file per command was half of a SEARCH
SUBJECT over 10k messages answered from the cache, and a share of every cached FETCH. Dovecot
trusts its index and cache and looks again only when a folder's directories change; that misses
a file rewritten in place (same name, same inode), which the box must catch (a test edits a file
in a Maildir and FETCH answers the new content).

The rule here: a row is used without a stat when, while the box watched the file's directory with
inotify (cur/ and new/ of the folder), a stat of that very path once matched that very row, and no
event has named the path since. Any write, truncation, attribute change (times, links), creation,
rename or removal in the directory names the file; a directory removed or moved, an event queue
that overflowed, or a directory that is not the inode that was watched (two stats per check) makes
every row of the folder checked by a stat again. Everything else is checked as before: rows of
paths an event named, rows never matched since the watch began (the first command after a start),
files with more than one link (a write through a name in another directory is an event there
only: the box's COPY makes such links, and forgets the marks of the files it links), and every
row where inotify is missing or its limits are reached. Not seen (as by Dovecot, which does not
look at a file it has indexed at all): a file changed through a shared writable mmap (no event),
a file given another link by another program and then changed through that link, or a change on
a network file system by another machine.

Events are read (without waiting) at the start of each check, so every change whose system call
returned before the check began is known to it. Checks of one folder take turns (its lock): a
check that matched a file before an event about it was read by another check does not mark the
file good after that event.

A name whose last event took its file away (removed, renamed away: the box's own expunges and flag
changes, or another program's) is kept only until the next check of the folder begins: then no
check that might have stat'ed the file before it went is still running, the marks made for that
name are dropped (each mark keeps a hash of its directory and name beside it to find them by), and
so is the name. A name used again is created or renamed to, an event that names it anew. So the
names kept are those of files still there (and MAX_DIRTY resets a folder only when that many live
files changed since their last stat), not every name the folder ever had: under imaptest's APPEND,
STORE and EXPUNGE the list filled up and reset the folder's marks every 20 s or so.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from appliance.store.inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    FolderWatches,
    WatchedFolder,
)

MAX_DIRTY = 4096  # paths named by events and not yet matched again, per folder, before it is all re-checked
# The marks are 12 octets per UID (a mark, and its name's hash) from the folder's lowest marked UID to its
# highest: a folder whose UIDs span more (a million messages, or UIDs far apart) has those above checked by
# a stat. A Maildir taken from a long-lived server often has high UIDs (UIDNEXT in the hundreds of thousands
# for a few thousand messages): counting from 0 would have cost 12 octets for every UID ever given.
MAX_TRACKED_SPAN = 1 << 20
_GONE = IN_DELETE | IN_MOVED_FROM  # the event took the name's file away


_Row = TypeVar("_Row", bound=tuple[Any, ...])  # a row with the stamp of its file first
_Value = TypeVar("_Value")
FilePath = str  # message file paths as the index gives them (one spelling per file: marks are by the string)


class Located(Protocol):
    """Where a message's file is (store.model.MessageInfo): its directory and its name in it."""

    @property
    def directory(self) -> os.PathLike[str]: ...
    @property
    def filename(self) -> str: ...


class _Folder(WatchedFolder):
    """What is known of one folder's files (its watched directories by path)."""

    __slots__ = ("base", "checking", "dirty", "epoch", "gone", "lock", "marks", "names")

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()  # one check at a time (see the module's docstring)
        self.marks = array("q")  # by UID - base: _mark of the last stat that matched its row; 0 none
        self.names = array("I")  # beside marks: _name_key of the file each mark was made for
        self.base = 0  # the UID of marks[0]
        self.dirty: dict[str, int] = {}  # path -> the drain that last saw an event name it
        self.gone: set[str] = set()  # the dirty paths whose last event took their file away
        self.checking = False  # a check of the folder runs (between its first drain and its end)
        self.epoch = 0  # raised whenever the marks are dropped: a check begun before commits none


class FileWatch(FolderWatches[_Folder]):
    """The inotify watches of the folders whose rows the box checks (one instance, opened at first
    use, for the whole box). Thread-safe: checks run in worker threads."""

    mask = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
    fallback = "message files are checked by a stat"

    @contextmanager
    def check(self, folder_id: int) -> Iterator[FolderCheck]:
        """One check of rows against files of a folder: `split` them, stat the rest, report the
        matches (`matched`); they are marked when the block ends without an error."""
        with self._lock:
            folder = self._use(folder_id)
        if folder is None:
            yield FolderCheck(self, folder_id, None, 0, 0)
            return
        with folder.lock:
            with self._lock:
                self._drain()
                _settle(folder)  # (no other check of the folder runs: its lock)
                folder.checking = True
            try:
                self._same_dirs(folder_id, folder)
                with self._lock:
                    check = FolderCheck(self, folder_id, folder, self._drains, folder.epoch)
                yield check
                check.commit()
            finally:
                with self._lock:
                    folder.checking = False

    def forget(self, folder_id: int, uids: Iterable[int]) -> None:
        """These messages' rows are to be checked by a stat again: their files were given another
        name (the box's COPY makes hard links; the link count changes with no event here). Call
        it after the links are made: a check whose stat came before them marks nothing then."""
        with self._lock:
            folder = self._folders.get(folder_id)
            if folder is None:
                return
            marks, base = folder.marks, folder.base
            for uid in uids:
                if 0 <= uid - base < len(marks):
                    marks[uid - base] = 0
            folder.epoch += 1

    # --- for FolderCheck ----------------------------------------------------------------------------

    def watch(self, folder_id: int, folder: _Folder, dirs: Iterable[str]) -> None:
        """Watch these directories of the folder (before its files are stat'ed: a change after the
        stat is then an event). A directory that cannot be (not there, no watch left) is not: its
        rows stay checked by a stat."""
        with self._lock:
            if self._fd is None or self._folders.get(folder_id) is not folder:
                return
            for directory in dirs:
                if directory not in folder.dirs:
                    self._watch(folder_id, folder, directory, directory)

    def commit(self, folder_id: int, folder: _Folder, drain: int, epoch: int,
               matched: Sequence[tuple[int, FilePath, tuple[int, int, int]]]) -> None:
        """Mark these (UID, path, stamp) as matched by a stat made after the drain `drain`."""
        with self._lock:
            if self._folders.get(folder_id) is not folder:
                return
            self._drain()  # (events of the check's own time: they keep their paths dirty)
            if folder.epoch != epoch:
                return
            _cover(folder, min(uid for uid, _, _ in matched))
            marks, names, dirty, dirs, base = folder.marks, folder.names, folder.dirty, folder.dirs, folder.base
            for uid, path, stamp in matched:
                index = uid - base
                directory, _, name = path.rpartition("/")
                if index < 0 or index >= MAX_TRACKED_SPAN or directory not in dirs:
                    continue
                seen = dirty.get(path)
                if seen is not None:
                    if seen > drain:
                        continue  # named by an event after this check's stat may have been made
                    del dirty[path]
                    folder.gone.discard(path)
                if index >= len(marks):
                    grown = min(max(index + 1, len(marks) * 3 // 2), MAX_TRACKED_SPAN)
                    marks.frombytes(bytes(marks.itemsize * (grown - len(marks))))
                    names.frombytes(bytes(names.itemsize * (grown - len(names))))
                marks[index] = _mark(directory, name, stamp)
                names[index] = _name_key(directory, name)

    # --- internals -------------------------------------------------------------------------------------

    def _new_folder(self) -> _Folder:
        return _Folder()

    def _invalidated(self, folder: _Folder) -> None:
        _reset(folder)

    def _named(self, folder: _Folder, key: str, mask: int, name: bytes) -> None:
        path = key + "/" + os.fsdecode(name)
        folder.dirty[path] = self._drains
        if mask & _GONE:
            folder.gone.add(path)
        else:
            folder.gone.discard(path)
        if len(folder.dirty) > MAX_DIRTY:
            if not folder.checking:  # (a folder no session checks: its gone names go here)
                _settle(folder)
            if len(folder.dirty) > MAX_DIRTY:
                _reset(folder)

    def _same_dirs(self, folder_id: int, folder: _Folder) -> None:
        """Drop the watched directories that are no longer at their paths (a folder's directory
        replaced by another without an event on it: its parent renamed), and the folder's marks
        with them. Outside self._lock: two stats."""
        watched = dict(folder.dirs)
        gone = self.replaced(watched, {directory: directory for directory in watched})
        if not gone:
            return
        with self._lock:
            for directory in gone:
                if folder.dirs.pop(directory, None) is not None:
                    self._unwatch(folder_id, directory, watched[directory][0])
            _reset(folder)


def _mark(directory: str, name: str, stamp: tuple[int, int, int]) -> int:
    """What the marks hold for a row whose file, `name` in `directory`, a stat matched (never 0).
    By the two parts, not the joined path: the index keeps a folder's directory and each message's
    name as string objects, whose hashes Python keeps with them, so a check over a whole folder
    (FolderCheck.sift) makes and hashes no path string per message (issue 19)."""
    return hash((directory, name, stamp)) or 1


def _name_key(directory: str, name: str) -> int:
    """What _Folder.names holds for a file (never 0, as where no mark is): two names of one key
    only cost a stat of the other when one goes."""
    return hash((directory, name)) & 0xFFFFFFFF or 1


def _settle(folder: _Folder) -> None:
    """Forget the names whose files are gone, with the marks made for them (under FileWatch._lock,
    with no check of the folder running: one that stat'ed such a file before it went would mark it
    after; FileWatch.commit skips the names evented after its check's stat, while they are dirty)."""
    if not folder.gone:
        return
    keys = set()
    for path in folder.gone:
        del folder.dirty[path]
        directory, _, name = path.rpartition("/")
        keys.add(_name_key(directory, name))
    folder.gone.clear()
    marks, names = folder.marks, folder.names
    # Over 100k marks: bytes.find 0.3 ms a name (array.index, which compares objects, took 4 ms),
    # the loop below 10 ms for any number of names.
    if len(keys) <= 32:
        raw = names.tobytes()
        width = names.itemsize
        for key in keys:
            needle = array("I", (key,)).tobytes()
            at = raw.find(needle)
            while at >= 0:
                if at % width == 0:
                    marks[at // width] = names[at // width] = 0
                at = raw.find(needle, at + 1)
    else:
        for at, key in enumerate(names):
            if key in keys:
                marks[at] = names[at] = 0
    # The marks from the lowest UID still marked: with UIDs ever rising (APPEND, EXPUNGE), those of
    # the messages gone would otherwise grow the marks to MAX_TRACKED_SPAN, new ones untracked above.
    first = 0
    while first < len(marks) and not marks[first]:
        first += 1
    if first:
        del marks[:first]
        del names[:first]
        folder.base += first


def _reset(folder: _Folder) -> None:
    """Every row of the folder is checked by a stat again (under FileWatch._lock)."""
    folder.marks = array("q")
    folder.names = array("I")
    folder.base = 0
    folder.dirty.clear()
    folder.gone.clear()
    folder.epoch += 1


def _cover(folder: _Folder, low: int) -> None:
    """Let the folder's marks start at UID `low` if they start above it and the span allows (under
    FileWatch._lock): a first check of the newest messages, then of older ones, keeps both."""
    marks = folder.marks
    if not marks:
        folder.base = low
    elif low < folder.base and folder.base - low + len(marks) <= MAX_TRACKED_SPAN:
        folder.marks = array("q", bytes(marks.itemsize * (folder.base - low))) + marks
        folder.names = array("I", bytes(folder.names.itemsize * (folder.base - low))) + folder.names
        folder.base = low


class FolderCheck:
    """One check of cached rows against their files (FileWatch.check)."""

    def __init__(self, watch: FileWatch, folder_id: int, folder: _Folder | None, drain: int, epoch: int) -> None:
        self._watch = watch
        self._folder_id = folder_id
        self._folder = folder
        self._drain = drain
        self._epoch = epoch
        self._matched: list[tuple[int, FilePath, tuple[int, int, int]]] = []

    def split(self, files: Sequence[tuple[int, FilePath]], known: dict[int, _Row]
              ) -> tuple[dict[int, _Row], list[tuple[int, FilePath, _Row | None]]]:
        """The rows of `files` (UID, path) that need no stat, and the rest (UID, path, row or None)
        to be stat'ed (then `matched`): their directories are watched from now on."""
        folder = self._folder
        if folder is None:
            return {}, [(uid, path, known.get(uid)) for uid, path in files]
        trusted: dict[int, _Row] = {}
        rest: list[tuple[int, FilePath, _Row | None]] = []
        marks, dirty, base = folder.marks, folder.dirty, folder.base
        tracked = len(marks)
        for uid, path in files:
            found = known.get(uid)
            if (found is not None and 0 <= uid - base < tracked and path not in dirty
                    and marks[uid - base] == _mark(*path.rpartition("/")[::2], found[0])):
                trusted[uid] = found
            else:
                rest.append((uid, path, found))
        if rest:
            self._watch.watch(self._folder_id, folder, {path.rpartition("/")[0] for _, path, _ in rest})
        return trusted, rest

    def sift(self, rows: Iterable[tuple[int, int, int, int, _Value]], files: Mapping[int, Located]
             ) -> tuple[list[int], int, list[tuple[int, FilePath, tuple[int, int, int], _Value]]]:
        """`split` for a folder's rows as SQLite gives them, (UID, size, mtime, inode, value), each
        message's file where `files` says (rows of messages not in it are left out): the UIDs of the
        rows that need no stat whose value is true, how many needed none, and (UID, path, stamp,
        value) of the rest, to be stat'ed (then `matched`). What `split` does a row at a time with a
        dict of rows and a path per message, for 100k rows at once (a SEARCH SUBJECT): no object
        per row but the stamp, and a path only for the rows that need a stat (issue 19)."""
        folder = self._folder
        wanted: list[int] = []
        rest: list[tuple[int, FilePath, tuple[int, int, int], _Value]] = []
        trusted = 0
        marks, dirty, base = (folder.marks, folder.dirty, folder.base) if folder is not None else (array("q"), {}, 0)
        tracked = len(marks)
        shown: object = None  # the last directory object and its string: a folder has two, shared
        text = ""
        for uid, size, mtime, inode, value in rows:
            info = files.get(uid)
            if info is None:
                continue
            name = info.filename
            if info.directory is not shown:
                shown = info.directory
                text = os.fspath(shown)
            stamp = (size, mtime, inode)
            index = uid - base
            # (_mark, inline: a call per row was a fifth of this loop.)
            if (0 <= index < tracked and marks[index] == (hash((text, name, stamp)) or 1)
                    and not (dirty and text + "/" + name in dirty)):
                trusted += 1
                if value:
                    wanted.append(uid)
            else:
                rest.append((uid, text + "/" + name, stamp, value))
        if rest and folder is not None:
            self._watch.watch(self._folder_id, folder, {path.rpartition("/")[0] for _, path, _, _ in rest})
        return wanted, trusted, rest

    def matched(self, uid: int, path: FilePath, stamp: tuple[int, int, int], links: int) -> None:
        """A stat made after `split` found the file at `path` to be the one the row was computed
        from, with `links` names. A file with other names is left to a stat each time: a write
        through a name in another directory (another folder's copy) is no event here."""
        if self._folder is not None and links == 1:
            self._matched.append((uid, path, stamp))

    def commit(self) -> None:
        if self._folder is not None and self._matched:
            self._watch.commit(self._folder_id, self._folder, self._drain, self._epoch, self._matched)
        self._matched = []
