"""What a removal leaves behind, moved aside under `<data>/deleted/` and purged after a while.

A removed mailbox's Maildir must not stay at `mail/<domain>/<local>/`: a mailbox created later under
the same address would open it and read the old owner's mail (issue 10 item 1). A removed domain's
DKIM keys must not stay in `dkim/<domain>/` either: a domain added again under that name would sign
with a key nobody meant to keep. Both are renamed, in one step each, into an entry named

    deleted/<UTC time>-<kind>-<name>/       e.g. deleted/20261128T170102Z-mailbox-jonh@example.org/

so an administrator who removed the wrong thing can still move it back by hand, and `purge()` removes
entries older than RETENTION_DAYS (at start and once a day while serving). The move happens inside
the removal's transaction; the entry records the row (PENDING) so a removal killed before its commit
is found at the next start (unfinished()) and its files put back (appliance/accounts/files.py). The time in the name, not
the directory's mtime (which rename keeps), says when it was removed. Every function here blocks:
call it through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.durable import fsync_dir, write_file
from appliance.store import maildir
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.store.trash")

RETENTION_DAYS = 30
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_ENTRY = re.compile(r"^(\d{8}T\d{6}Z)-(mailbox|domain)-")
_SAFE_NAME = re.compile(r"[a-z0-9@._+-]+")  # what a mailbox address or an A-label domain is made of
PENDING = ".removal"  # in an entry: kind, row id and name of the removal, until it is known to have committed


def move_aside(sources: Mapping[str, Path], deleted_root: Path, kind: str, name: str,
               now: float | None = None, *, row_id: int | None = None) -> Path | None:
    """Move each existing source into `deleted/<stamp>-<kind>-<name>/<label>`; returns the entry, or
    None when none of the sources exists (nothing was ever stored). With `row_id`, the row whose
    removal this is is written in the entry first (PENDING), for unfinished() after a crash."""
    if kind not in ("mailbox", "domain") or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"not a name to file under deleted/: {kind} {name[:100]!r}")
    present = {label: path for label, path in sources.items() if path.exists()}
    if not present:
        return None
    deleted_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime(_STAMP_FORMAT, time.gmtime(time.time() if now is None else now))
    entry = deleted_root / f"{stamp}-{kind}-{name}"
    n = 2
    while True:
        try:
            entry.mkdir(mode=0o700)
            break
        except FileExistsError:  # removed, re-created and removed again within one second
            entry = deleted_root / f"{stamp}-{kind}-{name}-{n}"
            n += 1
    if row_id is not None:
        write_file(entry / PENDING, f"{kind}\n{row_id}\n{name}\n".encode(), exclusive=False)
    for label, path in present.items():
        # A rename when both are on one file system (the usual case: one data directory), which is
        # atomic: the address never has half a Maildir.
        shutil.move(str(path), str(entry / label))
        fsync_dir(path.parent, quiet=True)
    fsync_dir(entry, quiet=True)
    fsync_dir(deleted_root, quiet=True)
    return entry


def restore(entry: Path, sources: Mapping[str, Path]) -> list[str]:
    """Undo move_aside (used when the db change it went with did not commit); returns the labels
    left in the entry because their place was taken meanwhile (the entry then stays)."""
    left = []
    for label, path in sources.items():
        moved = entry / label
        if moved.exists() and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(moved), str(path))
            fsync_dir(path.parent, quiet=True)
        elif moved.exists():
            left.append(label)
    if not left:
        (entry / PENDING).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            entry.rmdir()
    return left


def merge_maildir(old: Path, into: Path) -> int:
    """Move the messages of the Maildir++ `old` into `into`, made meanwhile: a folder `into` lacks
    goes whole (its dovecot-uidlist, and so its UIDs, with it), the messages of one it has go into
    its cur/ and new/ (the store indexes them at its next look). Returns how many entries moved."""
    moved = 0
    folders = [old, *sorted(p for p in old.iterdir() if p.is_dir() and maildir.folder_name(p.name))]
    for folder in folders:
        target = into if folder == old else into / folder.name
        if folder != old and not target.exists():
            os.rename(folder, target)
            moved += 1
            continue
        for sub in ("cur", "new"):
            with contextlib.suppress(FileNotFoundError):
                names = os.listdir(folder / sub)
                (target / sub).mkdir(parents=True, exist_ok=True)
                for name in names:
                    if not (target / sub / name).exists():  # unique names: never another message's
                        os.rename(folder / sub / name, target / sub / name)
                        moved += 1
                fsync_dir(target / sub, quiet=True)
    fsync_dir(into, quiet=True)
    return moved


@dataclass(frozen=True)
class Pending:
    """An entry whose removal may not have committed: the row it was moved aside for."""

    entry: Path
    kind: str
    row_id: int
    name: str


def unfinished(deleted_root: Path) -> list[Pending]:
    """The entries move_aside wrote a PENDING record in: a removal killed between its move and its
    commit left the row (and no files). The caller asks the database which rows are still there."""
    if not deleted_root.is_dir():
        return []
    found = []
    for entry in sorted(deleted_root.iterdir()):
        try:
            kind, row_id, name = (entry / PENDING).read_text().splitlines()
            found.append(Pending(entry, kind, int(row_id), name))
        except (OSError, ValueError):  # no record (an older entry, one made by hand) or a torn one
            continue
    return found


def settled(pending: Pending) -> None:
    """The row is gone: the removal committed, and the record is no longer needed."""
    (pending.entry / PENDING).unlink(missing_ok=True)


def entry_time(entry: Path) -> float | None:
    """When the entry was moved aside (from its name), None for a name this module did not make."""
    m = _ENTRY.match(entry.name)
    if not m:
        return None
    try:
        return float(calendar.timegm(time.strptime(m.group(1), _STAMP_FORMAT)))
    except ValueError:
        return None


def purge(deleted_root: Path, *, retention_days: float = RETENTION_DAYS, now: float | None = None) -> list[Path]:
    """Remove the entries moved aside more than `retention_days` ago (0: all of them); returns them.
    Anything else an administrator put there is left alone."""
    if not deleted_root.is_dir():
        return []
    limit = (time.time() if now is None else now) - retention_days * 86400
    removed = []
    for entry in sorted(deleted_root.iterdir()):
        when = entry_time(entry)
        if when is None or when > limit or entry.is_symlink() or not entry.is_dir():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.info("deleted/: purged %s", entry.name)
    return removed


PURGE_INTERVAL = 86400.0  # once a day while serving, besides once at start


class Purger:
    """The background task of `letterbox serve` that empties deleted/ of expired entries."""

    def __init__(self, deleted_root: Path, interval: float = PURGE_INTERVAL) -> None:
        self.deleted_root = deleted_root
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> list[Path]:
        try:
            return await asyncio.to_thread(purge, self.deleted_root)
        except OSError as exc:  # a full or read-only disk must not stop the box; tried again later
            log.warning("deleted/: purge failed: %s", exc)
            return []

    async def start(self) -> None:
        await self.run_once()
        self._task = asyncio.create_task(self._loop(), name="letterbox-trash-purge")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


async def start_purger(services: Services) -> Purger:
    purger = Purger(services.config.data.deleted)
    await purger.start()
    return purger
