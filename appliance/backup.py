"""Backups of the whole box: one encrypted file, made online, restorable with standard tools.

A backup is `letterbox-<host>-<UTC time>.tar.zst.age`: a tar stream, compressed with zstandard and
encrypted with age (pyrage) to the box's X25519 backup key, so that
`age -d -i kit.txt FILE | zstd -d | tar -x` unpacks it without Letterbox. Everything is streamed
(bounded memory whatever the size of the mail).

What it holds, in this order:
1. `letterbox-manifest.json`: format and schema versions, host, time, domains, mailboxes, counts.
2. `letterbox.db`: a snapshot of the database taken first, in one step (`VACUUM INTO`; the stepwise
   backup API restarts on every foreign write and never ends while mail arrives).
3. Every Maildir (the message files the snapshot indexes, plus each folder's own files such as
   `dovecot-keywords`), `dkim/`, `tls/` (ACME account included), `spool/` (the messages the
   snapshot's queue refers to), `srs.secret`, `setup-code`.
4. `letterbox-checksums.sha256`: the SHA-256 of every file above in `sha256sum -c` form. It comes
   last because the archive is written in one pass: a file's checksum is known only once it has
   been read. A restore refuses an archive without it (truncated) or that disagrees with it.

Consistency while mail arrives and clients move messages: the db snapshot is the index of the backup,
and the walk that follows takes every complete message file it finds (new/, then cur/, then both
listed again, each message once; tmp/ never), then lists every folder of the mailbox again, while
that finds more. A file renamed while the walk runs (new/ -> cur/, a
flag change) is looked for again under its base name. A message the snapshot indexes but whose file was expunged or moved away before the walk reached
it has its index row dropped at restore; a file the snapshot does not index (delivered, moved or
copied there after it, a folder renamed meanwhile, which the walk lists again) is restored beside
the index, and the store indexes it at its first look with a new UID. So every message acknowledged
before the backup began is in it, wherever a client moved it meanwhile (once; a message moved on
and on as the listings go could slip between them); one moved after the walk passed its old folder
is in it twice.

UIDs after a restore (RFC 3501 2.3.1.1: a UID is never reused under the same UIDVALIDITY): each folder
keeps its UIDVALIDITY and every UID of the backup (clients keep their caches, POP3 UIDLs stay), and its
UIDNEXT moves up by UID_MARGIN, past any UID the lost box could have handed out after the snapshot
(or to the restored-over box's own UIDNEXT, when that is higher). A folder whose UIDNEXT would not fit
in 32 bits gets a new UIDVALIDITY instead (clients then download it again, as the RFC intends).

Restore is staged and atomic: the archive is unpacked into a staging directory beside the data
directory (same file system), every checksum verified and the db checked and fixed up there; then the
staging directory and the data directory are swapped with one renameat2(RENAME_EXCHANGE), so a kill at
any moment leaves either the old or the new data complete. The old data is kept aside as
`<data>.before-restore-<time>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import functools
import gc
import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from appliance import __version__, age_stream, backup_stream, disk_full, time_zone
from appliance.account_errors import AccountError
from appliance.config import DataLayout
from appliance.db import DB_FILE_MODE, load_migrations
from appliance.libc import libc as c_library
from appliance.store import maildir
from appliance.store.model import INBOX, StoreError
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.db import Database
    from appliance.events import EventLog
    from appliance.services import Services

FORMAT_VERSION = 1
MANIFEST_NAME = "letterbox-manifest.json"
CHECKSUMS_NAME = "letterbox-checksums.sha256"
DB_NAME = "letterbox.db"
SUFFIX = ".tar.zst.age"
RECIPIENT_SETTING = "backup_recipient"  # the public half of the backup key; the secret is the kit
TOP_FILES = ("srs.secret", "setup-code")
TOP_TREES = ("dkim", "tls")
# How far UIDNEXT moves at a restore: more mail than one folder receives between a backup and the
# disaster that needs it. 2**32 / 10**6 leaves room for thousands of restores of the same folder.
UID_MARGIN = 1_000_000
MAX_UID = 2**32 - 1
ZSTD_LEVEL = backup_stream.ZSTD_LEVEL
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
VANISHED_RETRIES = 5
MAX_MANIFEST = 16 * 1024 * 1024
CHUNK = 1024 * 1024


class BackupError(Exception):
    """A backup or restore problem, in words fit for one line or a web page."""


# --- keys ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Secret:
    """What unlocks a backup: an age identity (the emergency kit) or a passphrase."""

    identity: str = ""
    passphrase: str = ""

    @classmethod
    def from_text(cls, text: str) -> Secret:
        """A kit file's text (its AGE-SECRET-KEY line) or else a passphrase (the first line)."""
        for line in text.splitlines():
            if line.strip().startswith("AGE-SECRET-KEY-"):
                return cls(identity=line.strip())
        first = text.splitlines()[0] if text.splitlines() else ""
        if not first:
            raise BackupError("the key file is empty: give the emergency kit or a passphrase")
        return cls(passphrase=first)


@dataclass(frozen=True)
class Kit:
    recipient: str
    text: str  # the emergency kit: shown once, never kept by the box


def new_kit(hostname: str) -> Kit:
    import pyrage  # here, not at the top: the box imports this module at every start (issue 19)

    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (
        f"# Letterbox emergency kit for {hostname}, made {made}\n"
        "# Keep this file somewhere safe, away from the box. Without it no backup can be opened.\n"
        "# Restore in the wizard's first screen ('Restore from a backup'), or by hand:\n"
        "#   age -d -i kit.txt letterbox-....tar.zst.age | zstd -d | tar -x\n"
        f"# public key: {recipient}\n"
        f"{identity}\n"
    )
    return Kit(recipient, text)


def recipient_of(text: str) -> str:
    """A recipient 'age1...' given directly, or the public half of a kit's identity."""
    import pyrage  # as in new_kit

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("age1"):
            pyrage.x25519.Recipient.from_str(line)
            return line
        if line.startswith("AGE-SECRET-KEY-"):
            return str(pyrage.x25519.Identity.from_str(line).to_public())
    raise BackupError("no age key in the key file (expected an 'age1...' or 'AGE-SECRET-KEY-...' line)")


# --- snapshot ------------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What the db snapshot says is in the backup."""

    path: Path
    schema: int
    hostname: str
    domains: list[str]
    mailboxes: dict[str, dict[str, int]]  # address -> folder name -> message count
    queue_ids: set[str]
    size: int


def take_snapshot(db_path: Path, into: Path) -> Snapshot:
    """VACUUM INTO: one consistent copy in one step, whatever writes go on meanwhile."""
    into.unlink(missing_ok=True)
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        old_umask = os.umask(0o077)
        try:
            conn.execute("VACUUM INTO ?", (str(into),))
        finally:
            os.umask(old_umask)
    finally:
        conn.close()
    return read_snapshot(into)


def read_snapshot(path: Path) -> Snapshot:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        schema = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        host_row = conn.execute("SELECT value FROM settings WHERE key = 'hostname'").fetchone()
        domains = [r[0] for r in conn.execute("SELECT name FROM domains ORDER BY name")]
        mailboxes: dict[str, dict[str, int]] = {}
        for local, domain in conn.execute(
            "SELECT m.local_part, d.name FROM mailboxes m JOIN domains d ON d.id = m.domain_id ORDER BY 2, 1"
        ):
            mailboxes[f"{local}@{domain}"] = {}
        size = 0
        for local, domain, folder, count, msize in conn.execute(
            "SELECT m.local_part, d.name, f.name, COUNT(*), SUM(g.size) FROM messages g"
            " JOIN folders f ON f.id = g.folder_id JOIN mailboxes m ON m.id = f.mailbox_id"
            " JOIN domains d ON d.id = m.domain_id GROUP BY f.id"
        ):
            mailboxes.setdefault(f"{local}@{domain}", {})[folder] = int(count)
            size += int(msize)
        queue_ids = {r[0] for r in conn.execute("SELECT id FROM queue_messages")}
    finally:
        conn.close()
    return Snapshot(path, int(schema), str(host_row[0]) if host_row else socket.getfqdn(), domains,
                    mailboxes, queue_ids, size)


@functools.lru_cache(maxsize=4096)
def _folder_key(domain: str, local: str, folder: str) -> str:
    # Cached: a restore's checks ask once per folder, for the same few mailboxes.
    rel = maildir.folder_path(Path(domain) / local, folder)
    return rel.as_posix()


# --- writing -------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Shared with a progress page: bytes done of an estimated total."""

    done: int = 0
    total: int = 0
    stage: str = ""
    cancelled: bool = False

    @property
    def percent(self) -> int:
        return min(100, self.done * 100 // self.total) if self.total else 0


@dataclass
class _Writer:
    """Tar members written into the compressing, encrypting sink (appliance/backup_stream.py), with
    the SHA-256 of each file for the checksum list."""

    out: backup_stream.Sink
    progress: Progress
    sums: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    now: int = field(default_factory=lambda: int(time.time()))

    def add_dir(self, name: str) -> None:
        self.out.write(backup_stream.header(name, mode=0o700, mtime=self.now, kind=backup_stream.DIRTYPE))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.out.write(backup_stream.header(name, len(data), mtime=self.now))
        self.out.write(data)
        self.out.write(backup_stream.padding(len(data)))
        self.sums.append((hashlib.sha256(data).hexdigest(), name))
        self.progress.done += len(data)

    def add_fd(self, name: str, fd: int) -> None:
        st = os.fstat(fd)
        if st.st_size <= CHUNK * 8:
            # A message: read whole (what the header says is what follows, even if the file changed).
            # One read of more than the size reaches the end of a regular file in one call.
            data = os.read(fd, st.st_size + 4096)
            if len(data) > st.st_size:
                rest = [data]
                while more := os.read(fd, CHUNK):
                    rest.append(more)
                data = b"".join(rest)
            size = len(data)
            self.out.write(backup_stream.header(name, size, mtime=int(st.st_mtime)))
            self.out.write(data)
            digest = hashlib.sha256(data).hexdigest()
        else:
            size = st.st_size
            self.out.write(backup_stream.header(name, size, mtime=int(st.st_mtime)))
            sha = hashlib.sha256()
            left = size
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    raise BackupError(f"{name} shrank while it was read")
                sha.update(chunk)
                self.out.write(chunk)
                left -= len(chunk)
            digest = sha.hexdigest()
        self.out.write(backup_stream.padding(size))
        self.sums.append((digest, name))
        self.files += 1
        self.progress.done += size

    def add_path(self, name: str, path: Path | str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            self.add_fd(name, fd)
        finally:
            os.close(fd)
        return True

    def add_tree(self, name: str, path: Path) -> None:
        """A small directory (dkim/, tls/, spool/...): regular files and subdirectories, no links."""
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        self.add_dir(name)
        for entry in entries:
            child = f"{name}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                self.add_tree(child, Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                self.add_path(child, Path(entry.path))


def _sum_line(digest: str, name: str) -> str:
    # sha256sum's escaping: a name with a backslash or newline is written escaped, the line starts '\'.
    if "\\" in name or "\n" in name:
        return "\\" + digest + "  " + name.replace("\\", "\\\\").replace("\n", "\\n") + "\n"
    return f"{digest}  {name}\n"


def _parse_sums(text: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in text.splitlines():
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise BackupError("the backup's checksum list is damaged")
        if escaped:
            name = _unescape(name)
        sums[name] = digest
    return sums


def _unescape(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name):
            out.append("\n" if name[i + 1] == "n" else name[i + 1])
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def file_name(hostname: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in hostname) or "box"
    return f"letterbox-{safe}-{stamp}{SUFFIX}"


def _walk_maildirs(w: _Writer, layout: DataLayout, snap: Snapshot) -> None:
    """Every Maildir folder directory under mail/, with the message files the snapshot indexes."""
    mail = layout.mail
    if not mail.is_dir():
        return
    w.add_dir("mail")
    for domain in sorted(p for p in mail.iterdir() if p.is_dir() and not p.is_symlink()):
        w.add_dir(f"mail/{domain.name}")
        for box in sorted(p for p in domain.iterdir() if p.is_dir() and not p.is_symlink()):
            rel_box = f"{domain.name}/{box.name}"
            # Every folder is listed again after the walk, and again while that finds more: a message a
            # client moves from a folder the walk has not reached into one it has passed is in the
            # next listing of the one it went to (it was in neither), and a folder renamed before the
            # walk reached it is walked under its new name. Folders are known by their directory's
            # inode and messages by their base names, so a folder renamed after its walk is not taken
            # again (a client renaming a folder as the walk went kept the backup going, a copy of the
            # folder more each time); FOLDER_LISTINGS listings at most.
            taken: dict[int, tuple[str, set[str]]] = {}  # inode -> (name in the archive, bases taken)
            for _ in range(FOLDER_LISTINGS):
                added = 0
                for folder, ino in _folder_dirs(box):
                    if ino not in taken:
                        name = f"mail/{rel_box}" if folder == box else f"mail/{rel_box}/{folder.name}"
                        if not _add_folder(w, folder, name):
                            added += 1  # renamed since the listing: taken under its new name next time
                            continue
                        taken[ino] = (name, set())
                        added += _add_messages(w, folder, name, taken[ino][1], ("new", "cur", "new", "cur"))
                    else:
                        added += _add_messages(w, folder, taken[ino][0], taken[ino][1], ("new", "cur"))
                if not added:
                    break


FOLDER_LISTINGS = 4  # listings of a mailbox's folders in one backup: the walk and those after it


def _folder_dirs(box: Path) -> list[tuple[Path, int]]:
    """The mailbox's folder directories (itself first), each with its inode."""
    found = []
    for p in [box, *sorted(box.iterdir())]:
        if p != box and maildir.folder_name(p.name) is None:
            continue
        with contextlib.suppress(FileNotFoundError):  # (renamed or removed since the listing)
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                found.append((p, st.st_ino))
    return found


def _add_folder(w: _Writer, folder: Path, name: str) -> bool:
    """The folder's directories and its own files (dovecot-uidlist, dovecot-keywords...); False when
    the folder is no longer there (renamed or deleted)."""
    w.add_dir(name)
    for sub in ("cur", "new", "tmp"):
        w.add_dir(f"{name}/{sub}")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return False
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            w.add_path(f"{name}/{entry.name}", Path(entry.path))
    return True


def _add_messages(w: _Writer, folder: Path, name: str, taken: set[str], subs: tuple[str, ...]) -> int:
    """The folder's message files whose base name is not in `taken` yet (then it is); how many.

    new/ before cur/, then both again: a message moves from new/ to cur/ only (a client's first look
    claims it), so one moved between the two listings is in the second; listed cur/ first, it was in
    neither and missing from the backup though acknowledged before it. The second round takes what
    a rename hid from a listing under way (a directory read while it changes may skip the name)."""
    added = 0
    for sub in subs:
        where = os.path.join(folder, sub)
        try:
            listing = os.listdir(where)
        except FileNotFoundError:
            continue
        # Every message file, the snapshot's or not: one moved to another folder after the snapshot
        # has a new name there (and its old one is gone), so taking only the names the snapshot
        # indexes left it out of the backup. A file the restored index lacks is indexed by the store at
        # its first look, with a new UID.
        for filename in sorted(listing):
            base = maildir.split_filename(filename)[0]
            if base not in taken and _add_message(w, folder, name, sub, filename, base):
                taken.add(base)
                added += 1
    return added


def _add_message(w: _Writer, folder: Path, name: str, sub: str, filename: str, base: str) -> bool:
    """A message file, looked for again under its base name when it was renamed under us; False
    when it is gone."""
    for _ in range(VANISHED_RETRIES):
        try:
            fd = os.open(os.path.join(folder, sub, filename), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            found = _find_base(folder, base)
            if found is None:
                return False  # expunged: its index row is dropped at restore
            sub, filename = found
            continue
        try:
            w.add_fd(f"{name}/{sub}/{filename}", fd)
        finally:
            os.close(fd)
        return True
    return False


def _find_base(folder: Path, base: str) -> tuple[str, str] | None:
    for sub in ("cur", "new"):
        with contextlib.suppress(FileNotFoundError):
            for filename in os.listdir(folder / sub):
                if maildir.split_filename(filename)[0] == base:
                    return sub, filename
    return None


def _manifest(snap: Snapshot, layout: DataLayout) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "letterbox": __version__,
        "schema": snap.schema,
        "host": snap.hostname,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_unix": int(time.time()),
        "domains": snap.domains,
        "mailboxes": [
            {"address": a, "messages": sum(f.values()), "folders": f} for a, f in snap.mailboxes.items()
        ],
        "messages": sum(sum(f.values()) for f in snap.mailboxes.values()),
        "mail_bytes": snap.size,
        "queued": len(snap.queue_ids),
        "checksums": CHECKSUMS_NAME,
    }


@dataclass(frozen=True)
class Created:
    path: Path
    manifest: dict[str, Any]
    files: int
    size: int  # of the encrypted file


def create_backup(layout: DataLayout, out: Path, *, recipient: str = "", passphrase: str = "",
                  progress: Progress | None = None) -> Created:
    """Write a backup of `layout` to `out` (made as `out.<random>.partial`, renamed when complete).
    Blocking: run it in a worker thread."""
    if not recipient and not passphrase:
        raise BackupError("no backup key: make one first (`letterbox backup key`) or give a passphrase")
    progress = progress or Progress()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The snapshot is the database in clear (password hashes, the restic and relay passwords): beside
    # the database, never in `out`'s folder, which may be a USB disk kept away from the box; it was
    # left there for good by a backup that was killed.
    _remove_stale(layout.root, f"{SNAPSHOT_PREFIX}*")
    _remove_stale(out.parent, f"letterbox-*{SUFFIX}.*partial")
    snap_path = layout.root / f"{SNAPSHOT_PREFIX}{secrets.token_hex(6)}.db"
    # A name of its own: two backups begun in the same second (the daily one and `letterbox backup
    # create`, two scripts) share `out`, and both wrote one `out.partial`, one reported made and damaged.
    partial = out.with_name(f"{out.name}.{secrets.token_hex(4)}.partial")
    try:
        progress.stage = "snapshot"
        snap = take_snapshot(layout.db, snap_path)
        progress.total = snap.size + snap_path.stat().st_size
        manifest = _manifest(snap, layout)
        progress.stage = "writing"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # This thread walks, reads and hashes; a worker compresses, encrypts and writes.
            sink = backup_stream.Sink(fd, recipient=recipient, passphrase=passphrase)
            try:
                w = _Writer(sink, progress)
                w.add_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
                w.add_path(DB_NAME, snap_path)
                _walk_maildirs(w, layout, snap)
                for tree in TOP_TREES:
                    w.add_tree(tree, layout.root / tree)
                _add_spool(w, layout, snap)
                for top in TOP_FILES:
                    w.add_path(top, layout.root / top)
                w.add_bytes(CHECKSUMS_NAME, "".join(_sum_line(d, n) for d, n in w.sums).encode())
                sink.write(backup_stream.END)
            except BaseException:
                sink.abort()
                raise
            sink.close()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, out)
        maildir.fsync_dir(out.parent)
        progress.stage = "done"
        return Created(out, manifest, w.files, out.stat().st_size)
    except BaseException:
        partial.unlink(missing_ok=True)
        progress.stage = "failed"
        raise
    finally:
        snap_path.unlink(missing_ok=True)


SNAPSHOT_PREFIX = ".backup-snapshot-"
STALE_AFTER = 3600.0  # seconds unchanged: what a backup killed midway left (a running one writes on)


def _remove_stale(folder: Path, pattern: str) -> None:
    """What killed backups left in `folder`: a snapshot, its journal, a partial backup file."""
    for p in folder.glob(pattern):
        with contextlib.suppress(OSError):
            if time.time() - p.lstat().st_mtime > STALE_AFTER:
                p.unlink()


def _add_spool(w: _Writer, layout: DataLayout, snap: Snapshot) -> None:
    w.add_dir("spool")
    for qid in sorted(snap.queue_ids):
        w.add_path(f"spool/{qid}.eml", layout.spool / f"{qid}.eml")


# --- age streams ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _encrypting(sink: IO[bytes], recipient: str, passphrase: str) -> Iterator[IO[bytes]]:
    """A writable stream whose bytes reach `sink` encrypted with age (for archives made by hand)."""
    with age_stream.writer(sink, recipients=(recipient,) if recipient else (), passphrase=passphrase) as plain:
        yield plain


def _age_error(exc: age_stream.AgeError) -> BackupError:
    if exc.damaged:
        return BackupError("the backup is damaged or incomplete (truncated or altered); nothing was changed")
    if exc.wrong_key and "passphrase" in str(exc):
        return BackupError(f"{exc}; nothing was changed")
    if exc.wrong_key:
        return BackupError("this backup was not made for this key: wrong emergency kit")
    if "key" in str(exc):
        return BackupError(f"the emergency kit's key is not valid ({exc})")
    return BackupError("this is not a Letterbox backup, or its first bytes are damaged")


def _payload_key(source: IO[bytes], secret: Secret) -> bytes:
    """Read the age header: the key of the payload that follows, or a refusal in plain words."""
    try:
        return age_stream.read_header(source, identity=secret.identity, passphrase=secret.passphrase)
    except age_stream.AgeError as exc:
        raise _age_error(exc) from exc


@contextlib.contextmanager
def _plain_members(source: IO[bytes], secret: Secret, *, whole: bool = True) -> Iterator[backup_stream.TarReader]:
    """The tar stream inside an age file. Damage and wrong keys surface as BackupError (at the header,
    or where the stream breaks). `whole`: the caller reads all of it (a restore), which the `unpack`
    child makes faster; for the first entry alone it is read here, since that child is a new
    interpreter: 0.1 s on a quiet machine and 1-2 s at load 12-18, for a few kilobytes."""
    child = backup_stream.unpack_child(source) if whole else None
    try:
        key = _payload_key(source, secret)
    except BaseException:
        if child is not None:
            child.close()
        raise
    reader, blocks = backup_stream.plain_tar(source, key, child)
    import zstandard  # not at the top: the box imports this module at every start (issue 19: idle memory)

    try:
        yield reader
    except age_stream.AgeError as exc:
        raise _age_error(exc) from exc
    except (backup_stream.TarFormatError, zstandard.ZstdError, EOFError, ValueError, UnicodeError) as exc:
        raise BackupError("the backup is damaged or incomplete (truncated or altered); nothing was changed"
                          ) from exc
    finally:
        blocks.close()


# --- reading -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unpacked:
    manifest: dict[str, Any]
    root: Path  # the staged data directory
    files: int


# What Linux holds (NAME_MAX, PATH_MAX): a longer name can never have been a file of a box. A pax header
# names a member in up to a MiB, and the name of every member is kept until the checksums are compared:
# those a restore of one mailbox does not write were not stopped by the file system, so each few hundred
# octets of zstd held a MiB of the box's memory.
NAME_MAX, PATH_MAX = 255, 4096


def _octets(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _fits(part: str) -> bool:
    return len(part) <= NAME_MAX and (part.isascii() or len(_octets(part)) <= NAME_MAX)


def _safe_name(name: str) -> str:
    if name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\\" in parts[0]:
        raise BackupError(f"refused: the entry {name[:80]!r} would land outside the data directory")
    if "" in parts or "." in parts:
        raise BackupError(f"refused: the entry {name[:80]!r} is not a plain path")
    if len(name) > PATH_MAX or not all(_fits(part) for part in parts) or len(_octets(name)) > PATH_MAX:
        raise BackupError(f"refused: an entry's name is longer than a file system holds ({name[:40]!r}...)")
    return name


@dataclass
class _Unpacking:
    """What one pass over a backup's members has seen so far."""

    staging: str
    known_schema: int
    only: Callable[[str], bool] | None
    progress: Progress
    early: _EarlyWriteback | None = None
    sums: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    listed: dict[str, str] | None = None
    files: int = 0
    made: set[str] = field(default_factory=set)
    # The SHA-256 of every file's data (its name as the archive's octets, checked), of the very bytes
    # written (hashed here from the view they are written from), compared with the checksum list at
    # the end.
    digests: dict[bytes, bytes] = field(default_factory=dict)
    dir_path: str = ""  # the directory of the last file written, open as dir_fd
    dir_fd: int = -1
    dir_raw: str = ""  # that directory as the archive spelled it ("" when it is the staging root)
    dir_name: str = ""  # and as checked (_safe_name), with a '/' after it
    # What the files written may still take of the staging file system: its free space but the reserve
    # the box keeps for new mail (disk_full.RESERVE_OCTETS). A zstd frame of zeros unpacks 10 GB from
    # a few hundred KiB, and the staging directory shares its file system with the running box. Each
    # file is charged its whole blocks and each directory one block: a tar header of a 1-octet file is a
    # few octets of zstd, and the file takes a block (4 KiB) on the disk; counting octets alone, 100 000
    # of them were charged 100 KB and took 400 MB. `inodes`: the file system's free inodes but a reserve,
    # one taken by every file and directory (empty files cost no block, and each took one of the inodes
    # the box's new mail needs too). Unlimited when the file system does not count them (btrfs: 0).
    room: int = 2**63
    block: int = 4096
    inodes: int = 2**63

    def close_dir(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd, self.dir_path, self.dir_raw = -1, "", ""

    def member(self, tar: backup_stream.TarReader, raw_name: str, kind: bytes, size: int) -> None:
        # The usual member (tens of thousands of them) in few steps: a file in the directory of the
        # file before it. That directory's path passed _safe_name when it was opened, the manifest
        # came before it (nothing is written until then), so only the last part of the name is left
        # to check here; anything else takes the full way below.
        if kind == backup_stream.REGTYPE and self.dir_raw and self.listed is None:
            parent, _, base = raw_name.rpartition("/")
            if parent == self.dir_raw and base not in _NOT_A_NAME and _fits(base):
                self._file(tar, self.dir_name + base, base, size)
                return
        self._checked(tar, raw_name, kind, size)

    def kick(self) -> None:
        """The early writeback started when WRITEBACK_STEP more bytes were written."""
        if self.early is not None and self.progress.done >= self.early.next_at:
            self.early.kick(self.progress.done)

    def _checked(self, tar: backup_stream.TarReader, raw_name: str, kind: bytes, size: int) -> None:
        """Any member, every check made."""
        if self.listed is not None:
            raise BackupError("refused: entries after the checksum list")
        name = _safe_name(raw_name)
        if self.manifest is None and name != MANIFEST_NAME:
            raise BackupError("this is not a Letterbox backup (no manifest first)")
        if kind == backup_stream.DIRTYPE:
            self._make_dir(os.path.join(self.staging, name))
            return
        if kind != backup_stream.REGTYPE:
            raise BackupError(f"refused: {name[:80]!r} is a link or device, which a backup never holds")
        if name == MANIFEST_NAME:
            if size > MAX_MANIFEST:
                raise BackupError("refused: the manifest is too large")
            data = b"".join(tar.data(size))
            self.manifest = _check_manifest(data, self.known_schema)
            self.sums[name] = tar.digest().hex()
            return
        if name == CHECKSUMS_NAME:
            if size > 512 * 1024 * 1024:
                raise BackupError("refused: the checksum list is too large")
            self.listed = _parse_sums(b"".join(tar.data(size)).decode("utf-8", "replace"))
            return
        parent, _, base = name.rpartition("/")
        if self.only is None or self.only(name):
            self._open_dir(parent, raw_name[: -len(base) - 1] if parent and raw_name.endswith(base) else "")
        self._file(tar, name, base, size)

    def _file(self, tar: backup_stream.TarReader, name: str, base: str, size: int) -> None:
        """A regular file into the directory open as dir_fd, `name` checked."""
        key = name.encode("utf-8", "surrogateescape")
        if key in self.digests or name in self.sums:
            raise BackupError(f"refused: {name[:80]!r} appears twice")
        # The SHA-256 of the very bytes written here, compared with the checksum list at the end
        # (unpack). Files are written relative to the directory's descriptor (the archive keeps a
        # folder's files together): the kernel does not walk the whole path again for each of
        # thousands of files.
        write = self.only is None or self.only(name)
        if write:
            self._charge(size)
        view = tar.whole(size)
        if view is not None:  # the usual file: its data lies in one block of the stream, one call
            self.digests[key] = b""  # taken now (a second file of that name is refused above)
            tar.hash_later(view, key, self.digests)
            if write:
                _write_file(base, self.dir_fd, view)
        else:
            pieces = tar.data(size)
            if write:
                fd = os.open(base, _CREATE, 0o600, dir_fd=self.dir_fd)
                try:
                    for piece in pieces:
                        _write_all(fd, piece)
                finally:
                    os.close(fd)
            else:
                for _ in pieces:  # read (and hashed) all the same
                    pass
            self.digests[key] = tar.digest()
        self.progress.done += size
        self.files += 1
        self.kick()

    def _charge(self, size: int, *, directories: int = 0) -> None:
        """Take what a file of `size` octets (or, with `directories`, that many new directories) will
        take of the disk from what is left, before it is written."""
        self.room -= -(-size // self.block) * self.block + directories * self.block
        self.inodes -= directories or 1
        if self.room < 0 or self.inodes < 0:
            raise BackupError("refused: the backup unpacks to more than the free space beside the data directory"
                              f" (less {disk_full.RESERVE_OCTETS >> 20} MiB kept for new mail); nothing was changed")

    def _make_dir(self, path: str) -> None:
        """The directory at `path` (inside the staging root) and those above it, each new one charged."""
        new = []
        above = path
        while above != self.staging and above not in self.made:
            new.append(above)
            above = os.path.dirname(above)
        if new:
            self._charge(0, directories=len(new))
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.made.update(new)

    def _open_dir(self, parent: str, raw: str) -> None:
        """The directory `parent` (checked, relative to the staging root) made and open as dir_fd;
        `raw` is how the archive spelled it, which the next members' names are compared with."""
        path = os.path.join(self.staging, parent) if parent else self.staging
        if path != self.dir_path:
            self._make_dir(path)
            self.close_dir()
            self.dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.dir_path = path
        # Never the staging root: its files (the manifest, the checksum list) take the full way.
        self.dir_raw = raw if parent else ""
        self.dir_name = parent + "/"


def _write_file(name: str, dir_fd: int, data: memoryview) -> None:
    """A new file `name` in the directory open as `dir_fd`, holding `data`."""
    fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


_NOT_A_NAME = frozenset(("", ".", ".."))
# Inodes a restore leaves free for the running box's new mail (a file each) and its database's
# journal: at least this many, or a hundredth of the file system's.
INODE_RESERVE = 10_000
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def unpack(source: IO[bytes], secret: Secret, staging: Path, *, known_schema: int | None = None,
           only: Callable[[str], bool] | None = None, progress: Progress | None = None,
           writeback: bool = False) -> Unpacked:
    """Decrypt, decompress and unpack into `staging` (made here, 0700), verifying every checksum.
    `only` limits which files are written (all are still read and verified). Nothing is synced here:
    the caller syncs the staging directory once before it switches over (stage_full); `writeback`
    starts the disk writing meanwhile (_EarlyWriteback), so that sync finds little left to do."""
    progress = progress or Progress()
    known = known_schema if known_schema is not None else len(load_migrations())
    staging.mkdir(mode=0o700)
    state = _Unpacking(str(staging), known, only, progress, _EarlyWriteback(staging) if writeback else None)
    st = os.statvfs(staging)
    state.room, state.block = st.f_bavail * st.f_frsize - disk_full.RESERVE_OCTETS, max(st.f_frsize, 512)
    if st.f_files:
        state.inodes = st.f_favail - max(INODE_RESERVE, st.f_files // 100)
    try:
        with _plain_members(source, secret) as tar, _no_cycle_collection():
            for name, kind, size in tar.members():
                state.member(tar, name, kind, size)
            # Read to the end so age authenticates the last chunk (a truncation shows there).
            tar.drain()
    except BackupError:
        raise
    except OSError as exc:
        raise BackupError(f"the backup could not be unpacked: {exc.strerror or exc}") from exc
    finally:
        state.close_dir()
        if state.early is not None:
            state.early.stop()
    if state.manifest is None:
        raise BackupError("this is not a Letterbox backup (no manifest)")
    if state.listed is None:
        raise BackupError("the backup is incomplete: its checksum list is missing (truncated?)")
    sums = state.sums | {name.decode("utf-8", "surrogateescape"): digest.hex() for name, digest in state.digests.items()}
    if state.listed != sums:
        listed = state.listed
        wrong = sorted(set(listed) ^ set(sums)) or [n for n in sums if listed.get(n) != sums[n]]
        raise BackupError(f"refused: the files do not match the manifest's checksums (e.g. {wrong[0][:80]!r})")
    return Unpacked(state.manifest, staging, state.files)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while a restore unpacks: it makes no cycles, but its
    tens of thousands of small objects kept triggering full collections (measured: 4% of the
    restoring process's CPU). Reference counting still frees everything."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


WRITEBACK_STEP = 64 * 1024 * 1024  # bytes unpacked between two early syncs of the staging file system


class _EarlyWriteback:
    """Writes the staged files to disk while the rest is still being unpacked. Linux only starts
    writing dirty pages after 30 s or above a tenth of the memory, so without this the whole backup
    would wait in the page cache for the sync before the switch-over, and that sync would be serial
    time at the end of a restore. Here a thread calls syncfs(2) after every WRITEBACK_STEP bytes (the
    call blocks in the kernel without the interpreter lock; the kernel's flusher threads do the
    writing), and the final sync (_fsync_tree_dirs) only waits for the rest. It is only a head start:
    durability still comes from that final sync."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.next_at = WRITEBACK_STEP
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="restore-writeback", daemon=True)
        self.thread.start()

    def kick(self, done: int) -> None:
        self.next_at = done + WRITEBACK_STEP
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return
            _syncfs(self.staging)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()


def _check_manifest(data: bytes, known_schema: int) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        fmt, schema = int(manifest["format"]), int(manifest["schema"])
    # OverflowError: a number JSON reads as infinity (1e999); RecursionError: arrays nested too deep.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise BackupError("the backup's manifest is damaged") from exc
    if fmt > FORMAT_VERSION:
        raise BackupError(f"this backup has format {fmt}, newer than this Letterbox reads ({FORMAT_VERSION})")
    if schema > known_schema:
        raise BackupError(
            f"this backup comes from a newer Letterbox (schema {schema}, this one knows up to {known_schema}):"
            " upgrade Letterbox first; nothing was changed")
    return _described(manifest)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _described(manifest: object) -> dict[str, Any]:
    """The manifest with the fields the console's confirmation page, the CLI and the restore read, each
    of its type: what was missing or of another type is 'unknown', 0 or empty. The manifest is the
    archive's word (anyone may make one that opens with a kit they hold): a 'created' missing, 'domains'
    a number or a mailbox a string was a 500 with a traceback on the confirmation page, a TypeError in
    `letterbox backup verify`, and a failed job for one mailbox put back."""
    found = dict(manifest) if isinstance(manifest, dict) else {}
    for key in ("created", "host", "letterbox"):
        if not isinstance(found.get(key), str):
            found[key] = "unknown"
    for key in ("messages", "mail_bytes", "queued"):
        found[key] = _count(found.get(key))
    domains, boxes = found.get("domains"), found.get("mailboxes")
    found["domains"] = [d for d in domains if isinstance(d, str)] if isinstance(domains, list) else []
    found["mailboxes"] = [
        {**box, "messages": _count(box.get("messages"))} for box in (boxes if isinstance(boxes, list) else [])
        if isinstance(box, dict) and isinstance(box.get("address"), str)
    ]
    return found


def read_manifest(source: IO[bytes], secret: Secret) -> dict[str, Any]:
    """Only the manifest (the first entry): what the restore page shows before asking to confirm."""
    with _plain_members(source, secret, whole=False) as tar:
        for name, kind, size in tar.members():
            if name != MANIFEST_NAME or kind != backup_stream.REGTYPE:
                break
            if size > MAX_MANIFEST:
                raise BackupError("refused: the manifest is too large")
            return _check_manifest(b"".join(tar.data(size)), 10**9)
    raise BackupError("this is not a Letterbox backup (no manifest first)")


# --- fix-up and switch-over ----------------------------------------------------------------------

@contextlib.contextmanager
def _damaged_db() -> Iterator[None]:
    """A staged database SQLite cannot read, or without the tables a box has, is refused in words: its
    checksums match (whoever made the archive listed them), so only opening it shows the damage."""
    try:
        yield
    except sqlite3.Error as exc:
        raise BackupError(f"the backup's database is damaged or not a Letterbox database ({exc}); nothing was changed"
                          ) from exc


def reconcile(root: Path, *, previous_db: Path | None = None) -> dict[str, int]:
    """Make the staged db agree with the staged files, and move each folder's UIDNEXT past any UID the
    lost box may have handed out since the snapshot. `root` is a staging directory: its caller syncs
    it before the switch-over (stage_full)."""
    db = root / DB_NAME
    conn = sqlite3.connect(str(db), isolation_level=None)
    dropped = queue_dropped = bumped = renewed = 0
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        # No fsync at the commit: this db is staged, and the syncfs before the switch-over
        # (_fsync_tree_dirs) makes it durable with everything else. Measured under load, the commit's
        # fsyncs were most of this step's time, serial at the end of a restore.
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN IMMEDIATE")
        _check_path_names(conn)
        rows = conn.execute(_FOLDERS).fetchall()
        previous = _previous_uidnext(previous_db)
        used_validity = {r[4] for r in rows} | {v for v, _ in previous.values()}
        for fid, domain, local, name, validity, uidnext in rows:
            folder = root / "mail" / _folder_key(domain, local, name)
            # A file's unique name is what precedes its info (maildir.split_filename), inline here:
            # a call per message was a third of this step, serial at the end of a restore.
            present = {n.partition(":")[0] for sub in ("cur", "new") for n in _listdir(folder / sub)}
            rows_here = conn.execute("SELECT basename FROM messages WHERE folder_id = ?", (fid,)).fetchall()
            for base in {base for (base,) in rows_here} - present:
                conn.execute("DELETE FROM messages WHERE folder_id = ? AND basename = ?", (fid, base))
                dropped += 1
            target = uidnext + UID_MARGIN
            before = previous.get((domain, local, name))
            if before is not None and before[0] == validity:
                target = max(target, before[1])
            if target <= MAX_UID:
                conn.execute("UPDATE folders SET uidnext = ? WHERE id = ?", (target, fid))
                bumped += 1
            else:  # no room left above: a new UIDVALIDITY, and the UIDs start over (RFC 3501 2.3.1.1)
                fresh = max([int(time.time()), *used_validity]) + 1
                used_validity.add(fresh)
                conn.execute("UPDATE folders SET uidvalidity = ?, uidnext = 1 WHERE id = ?", (fresh, fid))
                conn.execute("DELETE FROM messages WHERE folder_id = ?", (fid,))  # re-indexed from the files
                renewed += 1
        spool = root / "spool"
        for (qid,) in conn.execute("SELECT id FROM queue_messages").fetchall():
            if not (spool / f"{qid}.eml").is_file():
                conn.execute("DELETE FROM queue_messages WHERE id = ?", (qid,))
                queue_dropped += 1
        conn.execute("COMMIT")
    finally:
        conn.close()
    os.chmod(db, DB_FILE_MODE)
    return {"dropped_rows": dropped, "dropped_queue": queue_dropped, "folders_bumped": bumped,
            "folders_renewed": renewed}


_FOLDERS = ("SELECT f.id, d.name, m.local_part, f.name, f.uidvalidity, f.uidnext FROM folders f"
            " JOIN mailboxes m ON m.id = f.mailbox_id JOIN domains d ON d.id = m.domain_id")


def _require_db(staging: Path) -> Path:
    db = staging / DB_NAME
    if not db.is_file():
        raise BackupError("refused: the backup holds no database")
    return db


def _check_staged_db(staging: Path) -> None:
    """What a restore reads of the database before its switch-over (reconcile), read here without
    changing it: `verify` said "every checksum matches" of a backup a restore then refused."""
    db = _require_db(staging)
    with _damaged_db(), contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        _check_path_names(conn)
        conn.execute(_FOLDERS).fetchall()
        conn.execute("SELECT basename FROM messages LIMIT 1").fetchall()
        conn.execute("SELECT id FROM queue_messages").fetchall()


def _check_path_names(conn: sqlite3.Connection) -> None:
    """The names the box makes paths of (mail/<domain>/<local>/.<folder>) are each one plain name, checked
    before the data is switched in: a database whose domain was '../../x' was restored (the store then
    refused that mailbox in tracebacks at every start), one whose folder name cannot be a Maildir++
    folder ended the restore in a StoreError traceback."""
    for what, query in (("domain", "SELECT name FROM domains"), ("mailbox", "SELECT local_part FROM mailboxes")):
        for (name,) in conn.execute(query):
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
                raise BackupError(f"refused: the backup's database names a {what} {str(name)[:80]!r}, which is not"
                                  " a plain name; nothing was changed")
    for domain, local, folder in conn.execute(
        "SELECT d.name, m.local_part, f.name FROM folders f JOIN mailboxes m ON m.id = f.mailbox_id"
        " JOIN domains d ON d.id = m.domain_id"
    ):
        try:
            _folder_key(domain, local, folder)
        except (StoreError, TypeError, AttributeError) as exc:  # a name that is no text at all, too
            raise BackupError(f"refused: the backup's database has a folder the box cannot hold ({exc});"
                              " nothing was changed") from exc


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _previous_uidnext(db: Path | None) -> dict[tuple[str, str, str], tuple[int, int]]:
    if db is None or not db.is_file():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT d.name, m.local_part, f.name, f.uidvalidity, f.uidnext FROM folders f"
                " JOIN mailboxes m ON m.id = f.mailbox_id JOIN domains d ON d.id = m.domain_id"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return {(d, lp, n): (int(v), int(u)) for d, lp, n, v, u in rows}


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE, Linux >= 3.15)."""
    libc = c_library()
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def staging_dir(data_root: Path) -> Path:
    root = data_root.resolve()
    return root.parent / f".{root.name}.restore-{secrets.token_hex(4)}"


def upload_path(data_root: Path) -> Path:
    """Where a backup uploaded in the console waits for its confirmation: beside the data directory,
    on the file system its staging directory will be on."""
    root = data_root.resolve()
    return root.parent / f".{root.name}.upload-{secrets.token_hex(4)}"


def clean_stale_uploads(data_root: Path) -> None:
    """Uploads of an earlier run: their confirmations lived in its memory, so none can come now (each
    is the size of a backup, and was left on the disk for good)."""
    root = data_root.resolve()
    for p in root.parent.glob(f".{root.name}.upload-*"):
        p.unlink(missing_ok=True)


# Put in the old data directory just before a switch-over's exchange: a staging directory's name that
# holds it holds the old box (a switch-over killed between its exchange and its rename aside).
OLD_DATA_MARK = ".letterbox-replaced-by-restore"


def clean_stale_staging(data_root: Path) -> None:
    """Staging directories of restores that were killed before their switch-over; one killed within it,
    after its exchange, left the old box under the staging name: that is put aside, as it would have been."""
    root = data_root.resolve()
    for p in root.parent.glob(f".{root.name}.restore-*"):
        if (p / OLD_DATA_MARK).exists():
            import logging

            aside = _aside_name(root)
            os.rename(p, aside)
            (aside / OLD_DATA_MARK).unlink(missing_ok=True)
            if (root / "backups").is_dir():
                _carry_backups(aside, root)  # as switch_over does: the backup files stay with the box
            logging.getLogger("letterbox.backup").warning(
                "backup: a restore was stopped during its switch-over; the data it replaced is kept in %s", aside)
            continue
        shutil.rmtree(p, ignore_errors=True)


def _aside_name(root: Path) -> Path:
    return root.parent / f"{root.name}.before-restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


@dataclass(frozen=True)
class Restored:
    manifest: dict[str, Any]
    files: int
    kept_aside: Path | None
    fixes: dict[str, int]


@dataclass(frozen=True)
class Staged:
    """A backup unpacked, verified and fixed up beside the data directory, ready to switch in."""

    path: Path
    manifest: dict[str, Any]
    files: int
    fixes: dict[str, int]


def stage_full(backup: Path, secret: Secret, data_root: Path, *, progress: Progress | None = None,
               check: Callable[[Path], None] | None = None) -> Staged:
    """Unpack and verify a whole backup into a staging directory beside the data directory (the same
    file system, so the switch-over is one rename). The data directory is not touched."""
    progress = progress or Progress()
    root = data_root.resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(root)
    staging = staging_dir(root)
    progress.total = backup.stat().st_size * 2
    progress.stage = "unpacking"
    try:
        with open(backup, "rb") as source:
            unpacked = unpack(source, secret, staging, progress=progress, writeback=True)
        _require_db(staging)
        for sub in ("mail", "spool", "tls", "dkim", "backups", "deleted"):
            (staging / sub).mkdir(exist_ok=True, mode=0o700)
        progress.stage = "checking"
        with _damaged_db():
            fixes = reconcile(staging, previous_db=root / DB_NAME if root.exists() else None)
        for name in (MANIFEST_NAME, CHECKSUMS_NAME):
            (staging / name).unlink(missing_ok=True)
        if check is not None:
            check(staging)
        _fsync_tree_dirs(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.stage = "staged"
    return Staged(staging, unpacked.manifest, unpacked.files, fixes)


def switch_over(staged: Staged, data_root: Path) -> Path | None:
    """The one step: the staged data becomes the data directory; the old one is kept aside (returned)."""
    root = data_root.resolve()
    aside: Path | None = None
    if root.exists():
        # Marked first: killed after the exchange and before the rename, the old data is under the
        # staging directory's name, which the next start removed as a staging directory (the box the
        # restore replaced, kept to go back to, gone); marked, it is put aside there instead.
        (root / OLD_DATA_MARK).touch()
        maildir.fsync_dir(root)
        _exchange(staged.path, root)  # before it the old data, after it the new
        aside = _aside_name(root)
        os.rename(staged.path, aside)
        (aside / OLD_DATA_MARK).unlink(missing_ok=True)
        _carry_backups(aside, root)
    else:
        os.rename(staged.path, root)
    maildir.fsync_dir(root.parent)
    return aside


def restore_full(backup: Path, secret: Secret, data_root: Path, *, progress: Progress | None = None,
                 check: Callable[[Path], None] | None = None) -> Restored:
    """Replace the whole data directory with the backup's. Blocking; the box must not be serving
    this data directory meanwhile (`letterbox serve` switches over between a stop and a start)."""
    progress = progress or Progress()
    staged = stage_full(backup, secret, data_root, progress=progress, check=check)
    progress.stage = "switching"
    aside = switch_over(staged, data_root)
    progress.stage = "done"
    return Restored(staged.manifest, staged.files, aside, staged.fixes)


def undo_restore(data_root: Path, aside: Path) -> None:
    """Put the data kept aside back (the restored box did not come up)."""
    root = data_root.resolve()
    _exchange(aside, root)
    failed = root.parent / f".{root.name}.failed-restore-{secrets.token_hex(4)}"
    os.rename(aside, failed)
    shutil.rmtree(failed, ignore_errors=True)


def _carry_backups(old: Path, new: Path) -> None:
    """The backup files under the old backups/ stay with the box."""
    src = old / "backups"
    if not src.is_dir():
        return
    for p in src.iterdir():
        if p.is_file() and p.name.endswith(SUFFIX):
            with contextlib.suppress(OSError):
                os.rename(p, new / "backups" / p.name)


def _syncfs(root: Path) -> bool:
    """syncfs(2) of the file system that holds `root`; False when the C library has no syncfs or it
    failed."""
    libc = c_library()
    if not hasattr(libc, "syncfs"):
        return False
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(libc.syncfs(fd) == 0)
    finally:
        os.close(fd)


def _fsync_tree_dirs(root: Path) -> None:
    """Everything staged is on disk before the switch-over: one syncfs(2) for the file system when
    the C library has it (one call instead of an fsync per message), else each file and directory."""
    if _syncfs(root):
        return
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        maildir.fsync_dir(Path(dirpath))


# --- listing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackupFile:
    path: Path
    size: int
    mtime: float


def list_backups(folder: Path) -> list[BackupFile]:
    found = []
    for p in _listdir(folder):
        if p.endswith(SUFFIX) and p.startswith("letterbox-"):
            with contextlib.suppress(FileNotFoundError):
                st = (folder / p).stat()
                if stat.S_ISREG(st.st_mode):
                    found.append(BackupFile(folder / p, st.st_size, st.st_mtime))
    return sorted(found, key=lambda b: b.path.name, reverse=True)


def prune(folder: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` backups in `folder`; returns what was removed."""
    removed = []
    for b in list_backups(folder)[max(keep, 1):]:
        with contextlib.suppress(FileNotFoundError):
            b.path.unlink()
            removed.append(b.path)
    return removed


# --- one mailbox into the running box -----------------------------------------------------------

@dataclass(frozen=True)
class MailboxRestored:
    address: str
    created: bool
    messages: int  # files put back (already present ones are skipped)


def restore_mailbox_files(backup: Path, secret: Secret, layout: DataLayout, address: str,
                          folder: str | None = None, *, progress: Progress | None = None
                          ) -> tuple[dict[str, Any], Path]:
    """Unpack and verify the whole backup, writing only the db and the mailbox's Maildir, into a
    staging directory; returns the manifest and the staging path (the caller removes it)."""
    local, _, domain = address.rpartition("@")
    prefix = f"mail/{domain}/{local}/"
    staging = staging_dir(layout.root)
    progress = progress or Progress()
    progress.total, progress.stage = backup.stat().st_size * 2, "unpacking"
    try:
        with open(backup, "rb") as source:
            unpacked = unpack(source, secret, staging, progress=progress,
                              only=lambda n: n == DB_NAME or n.startswith(prefix))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not any(m.get("address") == address for m in unpacked.manifest.get("mailboxes", [])):
        shutil.rmtree(staging, ignore_errors=True)
        raise BackupError(f"the backup holds no mailbox {address}")
    # A mistyped folder said "restored 0 messages" as if all went well (and made a removed mailbox again).
    names = [name for name, _ in staged_folders(staging / "mail" / domain / local)]
    if folder is not None and folder not in names:
        shutil.rmtree(staging, ignore_errors=True)
        raise BackupError(f"the backup holds no folder {folder} in {address} (its folders: {', '.join(names)})")
    return unpacked.manifest, staging


def mailbox_row(staged_db: Path, address: str) -> tuple[str, str, int, int]:
    """(display name, password hash, quota, enabled) of a mailbox in a staged db."""
    local, _, domain = address.rpartition("@")
    with _damaged_db(), contextlib.closing(sqlite3.connect(f"file:{staged_db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT m.display_name, m.password_hash, m.quota_bytes, m.enabled FROM mailboxes m"
            " JOIN domains d ON d.id = m.domain_id WHERE d.name = ? AND m.local_part = ?", (domain, local)
        ).fetchone()
    if row is None:
        raise BackupError(f"the backup holds no mailbox {address}")
    return str(row[0]), str(row[1]), int(row[2]), int(row[3])


def staged_folders(staged_box: Path) -> list[tuple[str, Path]]:
    """(IMAP name, directory) of each folder of a staged mailbox, INBOX first."""
    if not staged_box.is_dir():
        return []
    found = sorted((name, p) for p in staged_box.iterdir()
                   if p.is_dir() and (name := maildir.folder_name(p.name)) is not None)
    return [(INBOX, staged_box), *found]


def copy_mailbox(staged_box: Path, live_box: Path, folder: str | None) -> int:
    """Put the staged mailbox's messages into the live Maildir, beside what is there: files whose
    base name the live folder already has are skipped. The running store indexes the new files at
    its next look (new UIDs above the folder's UIDNEXT, so no client cache is contradicted)."""
    count = 0
    for name, src in staged_folders(staged_box):
        if folder is not None and name != folder:
            continue
        dst = live_box if src == staged_box else live_box / src.name
        maildir.make_maildir(dst, folder=src != staged_box)
        kw = src / maildir.KEYWORDS_FILE
        if kw.is_file() and not (dst / maildir.KEYWORDS_FILE).exists():
            shutil.copy2(kw, dst / maildir.KEYWORDS_FILE)
        present = {maildir.split_filename(n)[0] for sub in ("cur", "new") for n in _listdir(dst / sub)}
        for sub in ("cur", "new"):
            for filename in sorted(_listdir(src / sub)):
                if maildir.split_filename(filename)[0] in present:
                    continue
                tmp = dst / "tmp" / filename
                shutil.copyfile(src / sub / filename, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, dst / sub / filename)
                count += 1
        for sub in ("cur", "new"):
            maildir.fsync_dir(dst / sub)
    return count


# --- the use-cases the CLI and the web share ---------------------------------------------------

async def make_key(db: Database, events: EventLog, hostname: str) -> Kit:
    """A new backup key: the box keeps the public half (in the settings, so a restored box keeps it
    too); the secret half is the emergency kit, handed out once."""
    kit = new_kit(hostname)
    await db.set_setting(RECIPIENT_SETTING, kit.recipient)
    await events.record("backup", f"new backup key {kit.recipient[:16]}...; emergency kit handed out")
    return kit


async def create(db: Database, events: EventLog, layout: DataLayout, *, to: Path | None = None,
                 key_text: str = "", passphrase: str = "", progress: Progress | None = None,
                 keep: int | None = None) -> Created:
    """Make a backup now, online. `to` is a folder or a file name (default: backups/)."""
    recipient = recipient_of(key_text) if key_text else ""
    if not recipient and not passphrase:
        recipient = await db.get_setting(RECIPIENT_SETTING) or ""
    hostname = await db.get_setting("hostname") or socket.getfqdn()
    if to is not None and not to.name.endswith(SUFFIX):
        out = to / file_name(hostname)  # a folder, e.g. a mounted USB disk
    else:
        out = to or layout.backups / file_name(hostname)
    try:
        made = await asyncio.to_thread(create_backup, layout, out, recipient=recipient,
                                       passphrase=passphrase, progress=progress)
    except (BackupError, OSError) as exc:
        await events.record("backup", f"backup failed: {exc}")
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"the backup could not be written: {exc}") from exc
    if keep is not None:
        await asyncio.to_thread(prune, out.parent, keep)
    await events.record("backup", f"backup made: {out.name} ({made.manifest['messages']} messages,"
                                  f" {made.size} bytes)")
    # Any backup made counts for the status page, not only the daily one: after "Back up now" or
    # `letterbox backup create` it said "No backup has been made".
    await db.set_setting(LAST_SETTING, json.dumps({"at": int(time.time()), "ok": True,
                                                   "text": f"Backup made: {shown_path(out, layout)}"}))
    return made


def shown_path(path: Path, layout: DataLayout) -> str:
    """A backup file as the Backups page names it: 'backups/letterbox-....tar.zst.age' in the data
    directory (the page's own words for that folder), the whole path elsewhere (a mounted disk). The
    data directory's own path said nothing to the person reading it, and took a line of the card."""
    try:
        return str(path.relative_to(layout.root))
    except ValueError:
        return str(path)


async def verify(path: Path, secret: Secret, layout: DataLayout) -> Unpacked:
    """Read the whole backup, check every checksum and the database as a restore would, keep nothing."""
    staging = staging_dir(layout.root)

    def run() -> Unpacked:
        with open(path, "rb") as source:
            unpacked = unpack(source, secret, staging, only=lambda n: n == DB_NAME)
        _check_staged_db(staging)
        return unpacked

    try:
        return await asyncio.to_thread(run)
    except FileNotFoundError as exc:
        raise BackupError(f"no such backup: {path}") from exc
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)


async def restore_mailbox(db: Database, events: EventLog, layout: DataLayout, path: Path, secret: Secret,
                          address: str, folder: str | None = None, *,
                          progress: Progress | None = None) -> MailboxRestored:
    """Put one mailbox (or one folder of it) back from a backup into the running box, beside its
    current mail; the mailbox is made again (same password) when it was deleted."""
    from appliance.accounts import Accounts
    from appliance.address import parse_address

    try:  # as `user add` reads it: 'bob@bücher.example' names bob@xn--bcher-kva.example, a root dot goes
        address = parse_address(address.strip()).canonical
    except AccountError as exc:
        raise BackupError(str(exc)) from exc
    if folder is not None and folder.upper() == INBOX:
        folder = INBOX  # any case names the inbox (RFC 3501 5.1)
    progress = progress or Progress()
    manifest, staging = await asyncio.to_thread(restore_mailbox_files, path, secret, layout, address, folder,
                                                progress=progress)
    progress.stage = "copying"
    try:
        display, pw_hash, quota, enabled = await asyncio.to_thread(mailbox_row, staging / DB_NAME, address)
        local, _, domain = address.rpartition("@")
        accounts = Accounts(db, data=layout)
        created = False
        if not await db.fetchone(
            "SELECT 1 FROM mailboxes m JOIN domains d ON d.id = m.domain_id WHERE d.name = ? AND m.local_part = ?",
            (domain, local),
        ):
            if domain not in await accounts.list_domains():
                await accounts.add_domain(domain)
            # The account comes back as it was, password hash included: its owner logs in as before.
            await accounts.add_user(address, "", display_name=display, quota_bytes=quota, password_hash=pw_hash,
                                    enabled=bool(enabled))
            created = True
        count = await asyncio.to_thread(
            copy_mailbox, staging / "mail" / domain / local, layout.mail / domain / local, folder)
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    progress.stage = "done"
    what = f"folder {folder} of {address}" if folder else address
    await events.record("backup", f"restored {what} from {path.name} ({manifest.get('created')}):"
                                  f" {count} messages put back")
    return MailboxRestored(address, created, count)


async def restore(layout: DataLayout, path: Path, secret: Secret, *, progress: Progress | None = None) -> Restored:
    """Replace the box's data with a backup's (staged, verified, switched in one step). The services
    must be stopped; the restored db is opened (and migrated) before the old data is let go, and the
    old data comes back if that fails."""
    from appliance.db import Database, DatabaseError
    from appliance.events import EventLog

    if not await asyncio.to_thread(path.is_file):
        raise BackupError(f"no such backup: {path}")
    restored = await asyncio.to_thread(restore_full, path, secret, layout.root, progress=progress)
    try:
        db = await Database.open(layout.db)
        try:
            await EventLog(db).record(
                "backup", f"restored from {path.name} (made {restored.manifest.get('created')} on"
                          f" {restored.manifest.get('host')}); old data kept in {restored.kept_aside}")
        finally:
            await db.close()
    except (DatabaseError, sqlite3.Error, OSError) as exc:
        if restored.kept_aside is not None:
            await asyncio.to_thread(undo_restore, layout.root, restored.kept_aside)
        raise BackupError(f"the restored data did not open ({exc}); the old data is back") from exc
    return restored


# --- background work the console watches ---------------------------------------------------------

KEEP_SETTING = "backup_keep"  # how many backups backups/ keeps
DEFAULT_KEEP = 7


@dataclass
class BackupJob:
    """One backup or restore running in the background; the console shows its progress, which lives
    in the serving process and so survives a reload of the page."""

    kind: str
    progress: Progress
    started: float
    task: asyncio.Task[None] | None = None
    result: str = ""
    error: str = ""

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


@dataclass(frozen=True)
class PendingRestore:
    """A backup uploaded in the console, its manifest read, waiting for the administrator to confirm.
    The secret stays here, in the serving process: the confirmation page never carries it."""

    path: Path
    secret: Secret
    manifest: dict[str, Any]
    address: str = ""  # one mailbox ('' = the whole box)
    folder: str | None = None
    made: float = field(default_factory=time.time)


PENDING_TTL = 3600.0  # an upload nobody confirms is removed after an hour


@dataclass
class Transfer:
    """A download in flight, for the progress the page polls."""

    name: str
    progress: Progress


@dataclass
class BackupJobs:
    current: BackupJob | None = None
    pending: dict[str, PendingRestore] = field(default_factory=dict)
    download: Transfer | None = None
    arriving: int = 0  # bytes of the console's uploads being received now (web/routes/restore.py)
    # A whole-box restore staged by the web: `letterbox serve` stops the services, switches the data
    # directory over and starts them again on the restored data (appliance/app.py).
    staged: Staged | None = None
    restart: asyncio.Event = field(default_factory=asyncio.Event)
    # The job the first-run wizard's restore started: the only one the wizard's pages (open to anyone
    # while the box has no administrator) show. A console job's progress and result are not theirs.
    wizard: BackupJob | None = None
    # The browser session that started it (web/routes/restore.py): its progress and result line (the
    # backup's host name, file count) are that session's alone; any other visitor sees only that one runs.
    wizard_owner: str = ""
    # When this start came from a whole-box restore (appliance/app.py): the login page says so for a
    # while, since every session of the old data is gone and the backup's passwords are the ones now.
    restored_at: float | None = None

    def wizard_job(self) -> BackupJob | None:
        """The current job when the wizard started it, else None."""
        return self.current if self.current is not None and self.current is self.wizard else None

    def hold(self, pending: PendingRestore) -> str:
        """Keep an uploaded backup until it is confirmed; returns the token the page confirms with."""
        self.expire()
        token = secrets.token_urlsafe(18)
        self.pending[token] = pending
        # Expired by time too, not only at the next upload or confirmation, which may never come.
        asyncio.get_running_loop().call_later(PENDING_TTL + 1, self.expire)
        return token

    def take(self, token: str) -> PendingRestore | None:
        self.expire()
        return self.pending.pop(token, None)

    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for token, item in list(self.pending.items()):
            if now - item.made > PENDING_TTL:
                del self.pending[token]
                item.path.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        """What the page polls: the current job and the download in flight."""
        job, down = self.current, self.download
        return {
            "job": None if job is None else {
                "kind": job.kind, "running": job.running, "percent": job.progress.percent,
                "done": job.progress.done, "total": job.progress.total, "stage": job.progress.stage,
                "result": job.result, "error": job.error,
            },
            "download": None if down is None else {
                "name": down.name, "percent": down.progress.percent, "done": down.progress.done,
                "total": down.progress.total, "stage": down.progress.stage,
            },
        }

    def switch_to(self, staged: Staged) -> None:
        self.staged = staged
        self.restart.set()

    def start(self, kind: str, work: Callable[[Progress], Any]) -> BackupJob | None:
        """Start `work(progress)` (a coroutine function returning a line for the page), unless a job
        already runs (None then)."""
        if self.current is not None and self.current.running:
            return None
        job = BackupJob(kind, Progress(), time.time())

        async def run() -> None:
            try:
                job.result = str(await work(job.progress))
            except BackupError as exc:
                job.error = str(exc)
            except Exception as exc:
                import logging

                logging.getLogger("letterbox.backup").exception("backup job failed")
                job.error = f"failed: {exc.__class__.__name__}"

        job.task = asyncio.get_running_loop().create_task(run())
        self.current = job
        return job


# --- the daily schedule ----------------------------------------------------------------------------

SCHEDULE_SETTING = "backup_schedule"  # "daily" or "" (off)
HOUR_SETTING = "backup_hour"  # local hour 0-23 of the daily run; 3 by default (a quiet hour)
TARGET_SETTING = "backup_target"  # a folder such as a mounted USB disk; '' = backups/
LAST_SETTING = "backup_last"  # JSON: {"at": unix time, "ok": bool, "text": "..."}
DEFAULT_HOUR = 3
SCHEDULE_POLL = 60.0  # settings changed in the console are seen within this


def next_run(now: float, hour: int, zone: dt.tzinfo | None = None) -> float:
    """The next `hour`:00 after `now` in `zone` (the box's time zone, which the console shows every time
    in; the system's when None). The system's alone made "at 3" run at 04:00 Berlin time on a UTC box
    whose console said "Next backup 04:00 CET"."""
    local = dt.datetime.fromtimestamp(now, zone or dt.datetime.now().astimezone().tzinfo)
    for day in (local.date(), local.date() + dt.timedelta(days=1)):
        at = dt.datetime.combine(day, dt.time(hour), tzinfo=local.tzinfo).timestamp()
        if at > now:
            return at
    raise AssertionError("tomorrow's hour is always after now")


@dataclass(frozen=True)
class Schedule:
    enabled: bool
    hour: int
    target: str
    keep: int
    last: dict[str, Any]
    next_at: float | None


async def box_zone(db: Database) -> dt.tzinfo:
    """The time zone the console shows times in (the wizard's step 1), in which the daily hour is meant.
    Imported here: appliance.settings brings the queue's modules, which `letterbox backup` needs not."""
    from appliance.settings import TIME_ZONE

    return time_zone.zone(await db.get_setting(TIME_ZONE) or "")


async def read_schedule(db: Database, now: float | None = None) -> Schedule:
    enabled = (await db.get_setting(SCHEDULE_SETTING) or "") == "daily"
    hour_text = await db.get_setting(HOUR_SETTING) or ""
    hour = int(hour_text) if hour_text.isascii() and hour_text.isdigit() and int(hour_text) < 24 else DEFAULT_HOUR
    keep_text = await db.get_setting(KEEP_SETTING) or ""
    keep = int(keep_text) if keep_text.isascii() and keep_text.isdigit() and int(keep_text) > 0 else DEFAULT_KEEP
    try:
        last = json.loads(await db.get_setting(LAST_SETTING) or "{}")
    except ValueError:
        last = {}
    at = next_run(time.time() if now is None else now, hour, await box_zone(db)) if enabled else None
    return Schedule(enabled, hour, await db.get_setting(TARGET_SETTING) or "", keep,
                    last if isinstance(last, dict) else {}, at)


async def set_schedule(db: Database, events: EventLog, *, enabled: bool, hour: int, target: str) -> None:
    """The console's and the CLI's schedule form: daily at `hour` into `target` (or backups/)."""
    if not 0 <= hour < 24:
        raise BackupError("the hour is 0 to 23")
    if target and not Path(target).is_absolute():
        raise BackupError("the folder must be an absolute path, e.g. /media/usb/backups")
    await db.set_setting(SCHEDULE_SETTING, "daily" if enabled else "")
    await db.set_setting(HOUR_SETTING, str(hour))
    await db.set_setting(TARGET_SETTING, target)
    what = f"at {hour:02d}:00 into {target or 'backups/'}" if enabled else "off"
    await events.record("backup", f"daily backups {what}")


class Scheduler:
    """Makes the daily backup while the box runs; the result goes into the settings for the status page."""

    def __init__(self, db: Database, events: EventLog, layout: DataLayout, jobs: BackupJobs) -> None:
        self.db, self.events, self.layout, self.jobs = db, events, layout, jobs
        self._task: asyncio.Task[None] | None = None
        self._due: float | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="letterbox-backup-schedule")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            schedule = await read_schedule(self.db)
            now = time.time()
            if not schedule.enabled:
                self._due = None
            elif self._due is None or abs(self._due - (schedule.next_at or now)) > 86400:
                self._due = schedule.next_at
            if self._due is not None and now >= self._due:
                self._due = next_run(now + 1, schedule.hour, await box_zone(self.db))
                await self.run_once(schedule)
            await asyncio.sleep(SCHEDULE_POLL if self._due is None else min(SCHEDULE_POLL, max(1.0, self._due - now)))

    async def run_once(self, schedule: Schedule) -> None:
        target = Path(schedule.target) if schedule.target else None
        done = asyncio.get_running_loop().create_future()

        async def work(progress: Progress) -> str:
            from appliance import backup_restic

            made = await create(self.db, self.events, self.layout, to=target, progress=progress, keep=schedule.keep)
            shown = shown_path(made.path, self.layout)
            if await backup_restic.read_target(self.db) is None:
                return f"Backup made: {shown}"
            # The off-box copy: a failure here is the run's failure (the local backup stays made).
            progress.stage = "sending to restic"
            try:
                snapshot = await backup_restic.send_file(self.db, self.events, made.path)
            except BackupError as exc:
                raise BackupError(f"backup made ({made.path.name}) but not sent to restic: {exc}") from exc
            return f"Backup made: {shown}; sent to the restic repository (snapshot {snapshot})"

        job = self.jobs.start("backup", work)
        if job is None or job.task is None:
            result = {"at": int(time.time()), "ok": False, "text": "skipped: another backup or restore was running"}
        else:
            job.task.add_done_callback(lambda _t: done.set_result(None))
            await done
            result = {"at": int(time.time()), "ok": not job.error, "text": job.error or job.result}
        await self.db.set_setting(LAST_SETTING, json.dumps(result))


async def start_scheduler(svc: Services) -> Scheduler:
    scheduler = Scheduler(svc.db, svc.events, svc.config.data, svc.backups)
    scheduler.start()
    return scheduler
