"""Maildir++ on disk: folder names, unique file names, flags in the ':2,' info, durable writes.

Everything here is plain blocking file work with no database and no event loop; the facade
(mailstore.py) runs it in worker threads. The layout is Dovecot's, so either program reads the
other's Maildir:

- `<root>/{cur,new,tmp}` is INBOX; folder `A/B` is the directory `<root>/.A.B` with its own
  `cur new tmp` and an empty `maildirfolder` file. A '.' inside a name level cannot be stored.
- A message file is `<unique>` in new/ and `<unique>:2,<letters>` in cur/. Upper-case letters are
  flags (D F P R S T), lower-case ones are keywords mapped in the folder's `dovecot-keywords` file
  (`<index> <name>` per line, 'a' = 0), exactly as Dovecot keeps them.
- A message is written to tmp/, fsynced, renamed into new/ (or cur/) and the directory fsynced:
  a reader never sees a partial file, and a crash leaves at most debris in tmp/.
- A message's size on the wire (IMAP RFC822.SIZE, POP3 LIST) has every line end as CRLF, while
  files other programs write may use bare LF: Dovecot puts that size in the name as ',W=<size>'
  (',S=<size>' is the size on disk); without it the bare LFs are counted (`wire_size`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import socket
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import BinaryIO

from appliance.durable import fsync_dir as fsync_dir  # (maildir.fsync_dir: the name its callers use)
from appliance.durable import replace_file, write_file
from appliance.store.model import INBOX, SEPARATOR, StoreError

log = logging.getLogger("letterbox.store")

SUBDIRS = ("cur", "new", "tmp")
INFO = ":2,"  # Maildir info for version 2: flags follow
FOLDER_MARKER = "maildirfolder"  # Dovecot (and Courier) mark folder directories with it
KEYWORDS_FILE = "dovecot-keywords"
UIDLIST_FILE = "dovecot-uidlist"
TRASH_DIR = ".DOVECOT-TRASHED"  # Dovecot's name for a folder being deleted; both skip it
KEYWORD_LETTERS = string.ascii_lowercase  # Maildir has room for 26 keywords per folder
MAX_DIRNAME = 255  # NAME_MAX: the whole '.A.B' directory name must fit
WIRE_CHUNK = 1024 * 1024  # octets read at once while counting a message's line ends

# RFC 3501 2.3.2 system flags and their Maildir letters. 'P' (passed/forwarded) has no IMAP flag;
# it stays in the file name untouched.
FLAG_OF_LETTER = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}
LETTER_OF_FLAG = {flag.lower(): letter for letter, flag in FLAG_OF_LETTER.items()}

_counter = itertools.count(1)


def _host() -> str:
    # Maildir: '/' and ':' in the host name are written as \057 and \072; ',' too, because
    # ',S=<size>' follows the host.
    name = socket.gethostname() or "localhost"
    return name.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_HOST = _host()


# --- names --------------------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """INBOX in any case is INBOX (RFC 3501 5.1), also as the first level of a longer name."""
    head, sep, rest = name.partition(SEPARATOR)
    return INBOX + sep + rest if head.upper() == INBOX else name


def name_levels(name: str) -> list[str]:
    """The levels of a folder name other than INBOX, checked for what the disk layout can hold."""
    levels = name.split(SEPARATOR)
    for level in levels:
        if not level:
            raise StoreError(f"folder name {name!r} has an empty level")
        if "." in level:
            raise StoreError(
                f"folder name {name!r}: '.' cannot be used in a name (Maildir++ stores the "
                f"hierarchy as dots in directory names)"
            )
        if any(ord(c) < 0x20 or c == "\x7f" for c in level):
            raise StoreError(f"folder name {name!r} contains control characters")
    if len(("." + ".".join(levels)).encode("utf-8")) > MAX_DIRNAME:
        raise StoreError(f"folder name {name[:40]!r}... is too long")
    return levels


def folder_path(root: Path, name: str) -> Path:
    if name == INBOX:
        return root
    return root / ("." + ".".join(name_levels(name)))


def folder_name(dirname: str) -> str | None:
    """The IMAP name of a directory in a Maildir++ root, or None when it is not a folder."""
    if not dirname.startswith(".") or dirname in (".", "..", TRASH_DIR):
        return None
    levels = dirname[1:].split(".")
    if any(not level for level in levels) or (len(levels) == 1 and levels[0].upper() == INBOX):
        return None
    return SEPARATOR.join(levels)


_TIMED_NAME = re.compile(r"(\d+)\.M(\d+)")


def delivery_order(base: str) -> tuple[int, int, str]:
    """Sort key for unique names in delivery order. The microseconds after `M` have no leading zeros (Dovecot
    writes them so too), so within one second plain name order is not time order (M99999 > M100000)."""
    timed = _TIMED_NAME.match(base)
    if timed:
        return int(timed.group(1)), int(timed.group(2)), base
    digits = re.match(r"\d+", base)
    return (int(digits.group()) if digits else 0), 0, base


# A name as Dovecot writes it with both sizes: <seconds>.M<microseconds><rest of the id>,S=<size>,W=<wire size>
# [,other fields][:info]. Its match gives what delivery_order, name_size and name_wire_size read from it
# (the same values: the id before ',S=' has no comma, so both fields are the first of their kind), in
# one call instead of three: the first listing of a Maildir copied in reads every name (issue 19).
# Any other name goes the general way.
# The microseconds are at most 9 digits here (10**9 * seconds + microseconds orders as delivery_order does).
sized_name = re.compile(r"([0-9]+)\.M([0-9]{1,9})(?![0-9])[^,:]*,S=([0-9]+),W=([0-9]+)(?:,[^:]*)?(?::.*)?",
                        re.DOTALL).fullmatch
ORDER_SCALE = 10**9
# sized_name for many names at once: over a directory's names joined by newlines, one findall gives
# the fields of every name in C, where a match per name made most of a first listing's loop (issue 19).
# Each match is one whole line (no class in it takes a newline), so equal counts mean every name matched.
_SIZED_LINES = re.compile(r"^(([0-9]+)\.M([0-9]{1,9})(?![0-9])[^,:\n]*,S=([0-9]+),W=([0-9]+)(?:,[^:\n]*)?)(?::([^\n]*))?$",
                          re.MULTILINE)
# The same without the microseconds, for names sorted as strings, which are in delivery order without
# them when no two share a second (index._found_sized): a group fewer is a string fewer per name, 2 ms
# of a 10k listing's 17 (issue 19). sized_micros reads them when two do.
_SIZED_SORTED_LINES = re.compile(
    r"^(([0-9]+)\.M[0-9]{1,9}(?![0-9])[^,:\n]*,S=([0-9]+),W=([0-9]+)(?:,[^:\n]*)?)(?::([^\n]*))?$", re.MULTILINE)
_MICROS_LINES = re.compile(r"^[0-9]+\.M([0-9]+)", re.MULTILINE)


def sized_names(names: list[str]) -> list[tuple[str, str, str, str, str, str]] | None:
    """(unique name, seconds, microseconds, size, wire size, info) of each of `names` as sized_name
    reads them (info: what follows the first ':'), in their order; None when any is not of that form (a dot file, another
    program's name, a newline in it)."""
    joined = _joined(names)
    if joined is None:
        return None
    matched: list[tuple[str, str, str, str, str, str]] = _SIZED_LINES.findall(joined)
    return matched if len(matched) == len(names) else None


def sized_names_sorted(names: list[str]) -> list[tuple[str, str, str, str, str]] | None:
    """sized_names without the microseconds: (unique name, seconds, size, wire size, info)."""
    joined = _joined(names)
    if joined is None:
        return None
    matched: list[tuple[str, str, str, str, str]] = _SIZED_SORTED_LINES.findall(joined)
    return matched if len(matched) == len(names) else None


def sized_micros(bases: Sequence[str]) -> list[str]:
    """The microseconds of unique names sized_names_sorted read (each is of its form)."""
    return _MICROS_LINES.findall("\n".join(bases))


def _joined(names: list[str]) -> str | None:
    """The names joined by newlines, or None when one holds a newline itself."""
    joined = "\n".join(names)
    return joined if joined.count("\n") == max(len(names) - 1, 0) else None


def unique_name(size: int) -> str:
    """Maildir unique name: time.M<usec>P<pid>Q<counter>.<host>,S=<size> (Dovecot's form)."""
    usecs = time.time_ns() // 1000
    sec, usec = divmod(usecs, 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{_HOST},S={size}"


def split_filename(filename: str) -> tuple[str, str]:
    """(unique name, info letters). A name without ':2,' has no flags."""
    base, sep, info = filename.partition(":")
    if sep and info.startswith("2,"):
        return base, info[2:]
    return base, ""


def name_wire_size(base: str) -> int | None:
    """Dovecot's ',W=<size>' in a unique name (the size with CRLF line ends), or None."""
    return _name_field(base, ",W=")


def name_size(base: str) -> int | None:
    """',S=<size>' in a unique name (the size on disk), or None."""
    return _name_field(base, ",S=")


def _name_field(base: str, key: str) -> int | None:
    # The host is before the first ',' (its own commas are \054): the first ',W=' starts the field.
    at = base.find(key)
    if at < 0:
        return None
    digits = base[at + 3:].partition(",")[0]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def cur_filename(base: str, letters: str) -> str:
    return base + INFO + letters


def sorted_letters(letters: Iterable[str]) -> str:
    return "".join(sorted(set(letters)))  # Maildir: letters in ASCII order


# --- flags and keywords -------------------------------------------------------------------------

@dataclass(frozen=True)
class Keywords:
    """A folder's keyword letters: names[i] is the keyword of letter chr(ord('a') + i), '' if unused."""

    names: tuple[str, ...] = ()

    def name_of(self, letter: str) -> str | None:
        i = ord(letter) - ord("a")
        return self.names[i] or None if 0 <= i < len(self.names) else None

    def letter_of(self, keyword: str) -> str | None:
        folded = keyword.lower()  # keywords match case-insensitively, the first spelling is kept
        for i, name in enumerate(self.names):
            if name.lower() == folded:
                return KEYWORD_LETTERS[i]
        return None

    def with_keywords(self, keywords: Iterable[str]) -> Keywords:
        """This map plus letters for keywords it lacks; StoreError when the 26 letters run out."""
        names = list(self.names)
        known = {name.lower() for name in names if name}
        for keyword in sorted(keywords):
            if keyword.lower() in known:
                continue
            if not keyword or any(c.isspace() or ord(c) < 0x20 for c in keyword):
                raise StoreError(f"keyword {keyword!r} cannot be stored")
            if "" in names:
                names[names.index("")] = keyword
            elif len(names) < len(KEYWORD_LETTERS):
                names.append(keyword)
            else:
                raise StoreError(f"too many keywords in this folder (Maildir has room for {len(KEYWORD_LETTERS)})")
            known.add(keyword.lower())
        return Keywords(tuple(names))


def split_flags(flags: Iterable[str]) -> tuple[str, frozenset[str]]:
    """IMAP flags -> (system flag letters, keywords). \\Recent and unknown system flags are ignored
    (\\Recent is the server's to set, RFC 3501 2.3.2)."""
    letters = []
    keywords = set()
    for flag in flags:
        if flag.startswith("\\"):
            letter = LETTER_OF_FLAG.get(flag.lower())
            if letter:
                letters.append(letter)
        elif flag:
            keywords.add(flag)
    return sorted_letters(letters), frozenset(keywords)


@lru_cache(maxsize=4096)
def imap_flags(letters: str, keywords: tuple[str, ...]) -> frozenset[str]:
    """The IMAP flags of upper-case letters and keyword names (shared frozensets, small memory)."""
    return frozenset([FLAG_OF_LETTER[c] for c in letters if c in FLAG_OF_LETTER] + list(keywords))


def decode_letters(letters: str, keywords: Keywords) -> tuple[str, tuple[str, ...]]:
    """Info letters -> (upper-case flag letters, keyword names). Unmapped keyword letters are left out."""
    if letters.isupper() or not letters:
        return _upper_letters(letters), ()  # the usual name: no keyword letters
    upper = sorted_letters(c for c in letters if c.isupper())
    names = tuple(sorted(n for c in letters if c.islower() and (n := keywords.name_of(c))))
    return upper, names


@lru_cache(maxsize=256)
def _upper_letters(letters: str) -> str:
    """The upper-case letters of a name's info, sorted (one shared string per distinct set)."""
    return sorted_letters(c for c in letters if c.isupper())


def encode_letters(upper: str, keyword_names: Iterable[str], keywords: Keywords, keep: str = "") -> str:
    """Info letters for flag letters plus keywords (all mapped in `keywords`). `keep` are letters of
    the old name to carry over: 'P' and anything this program does not understand."""
    letters = set(upper) | set(keep)
    for name in keyword_names:
        letter = keywords.letter_of(name)
        if letter is None:
            raise StoreError(f"keyword {name!r} has no letter")  # callers map keywords first
        letters.add(letter)
    return sorted_letters(letters)


def kept_letters(letters: str, keywords: Keywords) -> str:
    """Letters an IMAP flag change must not drop: P, unknown flags, keyword letters with no name."""
    return "".join(c for c in letters
                   if (c.isupper() and c not in FLAG_OF_LETTER) or (c.islower() and keywords.name_of(c) is None))


def read_keywords(folder: Path) -> Keywords:
    try:
        text = (folder / KEYWORDS_FILE).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Keywords()
    names = [""] * len(KEYWORD_LETTERS)
    for line in text.splitlines():
        index, _, name = line.partition(" ")
        if index.isdigit() and int(index) < len(KEYWORD_LETTERS) and name.strip():
            names[int(index)] = name.strip()
    while names and not names[-1]:
        names.pop()
    return Keywords(tuple(names))


def write_keywords(folder: Path, keywords: Keywords) -> None:
    text = "".join(f"{i} {name}\n" for i, name in enumerate(keywords.names) if name)
    # Atomic (a reader sees the old map or the new one) and durable: the letters of a STORE answered
    # OK name the same keywords after a power cut.
    replace_file(folder / KEYWORDS_FILE, text.encode("utf-8"), tmp=folder / f"{KEYWORDS_FILE}.{unique_name(len(text))}")


@lru_cache(maxsize=1024)
def _looked_at(folder: Path) -> tuple[str, str, str]:
    """A folder's new/, cur/ and keywords file as strings. A look at a folder (dir_stamp and
    keywords_mtime: every STATUS, NOOP and catch-up of a session, every STORE's and delivery's
    stamps on the database's thread) made three Paths and three strings of them: most of a NOOP's
    look, more than its three stats (issue 19)."""
    base = os.fspath(folder)
    return f"{base}/new", f"{base}/cur", f"{base}/{KEYWORDS_FILE}"


def keywords_mtime(folder: Path) -> int:
    try:
        return os.stat(_looked_at(folder)[2]).st_mtime_ns
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class UidList:
    uidvalidity: int
    uidnext: int
    uids: Mapping[str, int]  # unique name -> UID


def read_uidlist(folder: Path) -> UidList | None:
    """Dovecot's `dovecot-uidlist` (versions 1 and 3), or None when absent or unreadable."""
    try:
        lines = (folder / UIDLIST_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not lines:
        return None
    header = lines[0].split()
    try:
        if header[0] == "1":
            uidvalidity, uidnext = int(header[1]), int(header[2])
        elif header[0] == "3":
            fields = {h[0]: h[1:] for h in header[1:] if h}
            uidvalidity, uidnext = int(fields["V"]), int(fields["N"])
        else:
            return None
    except (IndexError, KeyError, ValueError):
        return None
    uids: dict[str, int] = {}
    for line in lines[1:]:
        uid_text, _, rest = line.partition(" ")
        if not uid_text.isdigit():
            continue
        if header[0] == "3":
            _, colon, name = rest.partition(":")  # '<uid> [<ext> ...] :<name>'
            if not colon:
                continue
        else:
            name = rest
        base = split_filename(name.strip())[0]
        if base:
            uids[base] = int(uid_text)
    if not 0 < uidvalidity < 2**32:
        return None
    uidnext = max([uidnext, *[u + 1 for u in uids.values()]])
    return UidList(uidvalidity, uidnext, uids)


UidListStamp = tuple[int, int, int]  # (inode, size, mtime_ns) of the dovecot-uidlist last written


def write_uidlist(folder: Path, uidvalidity: int, uidnext: int, names: Iterable[tuple[int, str]]) -> UidListStamp:
    """Dovecot's `dovecot-uidlist`, version 3, replaced atomically (a reader sees the old file or the
    new one): header `3 V<uidvalidity> N<uidnext> G<guid>`, then `<uid> :<unique name>` in UID order.
    Dovecot taking the Maildir back keeps UIDVALIDITY and every UID (issue 17). The folder's GUID
    (Dovecot's "mailbox GUID") of an existing file is kept. Not fsynced: after a crash the index (the reference) writes it again
    at the folder's first use. Returns the stamp append_uidlist checks."""
    guid = _uidlist_guid(folder) or os.urandom(16).hex()
    text = f"3 V{uidvalidity} N{uidnext} G{guid}\n" + "".join(f"{uid} :{name}\n" for uid, name in names)
    tmp = folder / f"{UIDLIST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / UIDLIST_FILE)
    return _uidlist_stamp(os.stat(folder / UIDLIST_FILE))


def append_uidlist(folder: Path, names: Sequence[tuple[int, str]], expected: UidListStamp) -> UidListStamp | None:
    """Add lines for new messages (UIDs above every one in the file) at the end of the file, as
    Dovecot itself does: a reader takes UIDNEXT as the larger of the header's N and the last UID + 1.
    None, with nothing written, when the file is not the one last written (`expected`): the caller
    then writes it whole. One write() with O_APPEND, so a reader sees whole lines or none of them."""
    try:
        fd = os.open(folder / UIDLIST_FILE, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return None
    try:
        if _uidlist_stamp(os.fstat(fd)) != expected:
            return None
        data = "".join(f"{uid} :{name}\n" for uid, name in names).encode("utf-8")
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {folder / UIDLIST_FILE}")
        return _uidlist_stamp(os.fstat(fd))
    finally:
        os.close(fd)


def _uidlist_stamp(st: os.stat_result) -> UidListStamp:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _uidlist_guid(folder: Path) -> str | None:
    try:
        with (folder / UIDLIST_FILE).open("rb") as f:
            first = f.readline(4096).decode("utf-8", "replace").split()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    fields = {h[0]: h[1:] for h in first[1:] if h} if first and first[0] == "3" else {}
    guid = fields.get("G", "")
    return guid if len(guid) == 32 and all(c in string.hexdigits for c in guid) else None


# --- directories --------------------------------------------------------------------------------

def make_maildir(path: Path, *, folder: bool) -> bool:
    """Create the Maildir (and parents) where parts are missing; True when anything was made."""
    made = False
    for sub in SUBDIRS:
        if not (path / sub).is_dir():
            (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            made = True
    if folder and not (path / FOLDER_MARKER).exists():
        (path / FOLDER_MARKER).touch(mode=0o600)
        made = True
    if made:
        for sub in SUBDIRS:
            fsync_dir(path / sub)
        fsync_dir(path)
        fsync_dir(path.parent)
    return made


def discover_folders(root: Path) -> list[str]:
    """Names of the folders in a Maildir++ root (without INBOX)."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            name = folder_name(entry.name)
            if name is not None and entry.is_dir(follow_symlinks=False):
                found.append(name)
    return sorted(found)


def remove_folder(path: Path) -> None:
    """Delete a folder directory: first renamed aside (atomic, so it is gone for every reader at
    once), then removed. A crash in between leaves TRASH_DIR, removed by clean_debris()."""
    trash = path.parent / TRASH_DIR
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


# What this code writes beside a Maildir's files and renames over them (write_uidlist, write_keywords,
# subscriptions.py): a crash between the write and the rename leaves it for good.
_OWN_TEMPORARY = re.compile(r"(dovecot-uidlist|subscriptions)\.\d+\.tmp|dovecot-keywords\.\d+\.M\d+P\d+Q\d+\..*")


def clean_debris(root: Path) -> int:
    """At start, when no delivery is in flight: remove every file in tmp/ of every Maildir under
    `root` (mail/<domain>/<local>/), half-deleted folders, and the temporary files of this code's
    replaced-whole files (_OWN_TEMPORARY) a crash left beside them. Returns how many entries went."""
    removed = 0
    for domain in _subdirs(root):
        for mailbox in _subdirs(domain):
            trash = mailbox / TRASH_DIR
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
                removed += 1
            maildirs = [mailbox] + [d for d in _subdirs(mailbox) if folder_name(d.name)]
            for maildir in maildirs:
                leftovers = [e for e in _entries(maildir) if _OWN_TEMPORARY.fullmatch(e.name)]
                for entry in [*_entries(maildir / "tmp"), *leftovers]:
                    if entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            removed += 1
    return removed


def _subdirs(path: Path) -> list[Path]:
    return [Path(e.path) for e in _entries(path) if e.is_dir(follow_symlinks=False)]


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


# --- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WriteJob:
    maildir: Path
    base: str  # unique name, chosen by the caller (who marks it pending first)
    sub: str  # 'new' or 'cur'
    filename: str
    mtime: int | None  # INTERNALDATE; Dovecot reads it from the file's mtime

    @property
    def tmp(self) -> str:
        """Where the file is written first."""
        return os.path.join(self.maildir, "tmp", self.base)

    @property
    def target(self) -> str:
        """Where it is renamed to (new/ or cur/)."""
        return os.path.join(self.maildir, self.sub, self.filename)


def write_tmp(job: WriteJob, data: bytes | bytearray) -> None:
    """The file written whole into tmp/ and fsynced, with its INTERNALDATE; nothing left in tmp/ when
    it fails. Not visible to any reader until renamed (the group commit does it: store/arrivals.py)."""
    try:
        write_file(job.tmp, data)
        if job.mtime is not None:
            os.utime(job.tmp, (job.mtime, job.mtime))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(job.tmp)
        raise


def write_message(job: WriteJob, data: bytes) -> None:
    """tmp/ -> fsync -> rename into new/ or cur/ -> fsync the directory: durable when it returns.
    (The box's deliveries use write_tmp and the group commit's renames, store/arrivals.py.)"""
    write_tmp(job, data)
    try:
        os.rename(job.tmp, job.target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(job.tmp)
        raise
    fsync_dir(job.maildir / job.sub)


def copy_message(src: Path, job: WriteJob) -> None:
    """A hard link when possible (the file is never changed in place, so sharing is safe, as
    Dovecot does); else a real copy through tmp/. The caller fsyncs the target directory."""
    target = job.maildir / job.sub / job.filename
    try:
        os.link(src, target)
        return
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not src.exists():
            raise
    data = src.read_bytes()
    tmp = job.maildir / "tmp" / job.base
    try:
        write_file(tmp, data)
        st = os.stat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def bare_lfs(data: bytes | bytearray, prev_cr: bool = False) -> int:
    """How many LFs of `data` have no CR before them; `prev_cr`: the octet before `data` was a CR
    (a CRLF cut in two by a read)."""
    lfs = data.count(b"\n")
    if not lfs:
        return 0
    bare = lfs - data.count(b"\r\n")
    if prev_cr and data[:1] == b"\n":
        bare -= 1
    return bare


def count_wire_size(read: Callable[[int], bytes], chunk: int = WIRE_CHUNK) -> int:
    """The size of a message with every bare LF written as CRLF, read in chunks through `read(n)`
    (a file's read, or os.read on a descriptor; b'' at the end): a 50 MB message is never held
    whole. A lone CR stays one octet, as the protocols send it."""
    size = bare = 0
    prev_cr = False
    while data := read(chunk):
        size += len(data)
        bare += bare_lfs(data, prev_cr)
        prev_cr = data[-1] == 0x0D
    return size + bare


def measure_file(path: str | Path) -> tuple[os.stat_result, int]:
    """A message file's stat and its counted wire size, from one open. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.fstat(fd), count_wire_size(partial(os.read, fd))
    finally:
        os.close(fd)


def wire_size(path: Path) -> int:
    """A message file's size on the wire: ',W=' in its name when there, else counted from the file.
    Raises OSError (FileNotFoundError when it is gone)."""
    known = name_wire_size(split_filename(path.name)[0])
    return known if known is not None else measure_file(path)[1]


def dir_stamp(folder: Path) -> tuple[int, int]:
    """mtimes of new/ and cur/: a file added, removed or renamed there changes them."""
    new, cur, _ = _looked_at(folder)
    return os.stat(new).st_mtime_ns, os.stat(cur).st_mtime_ns


def list_messages(folder: Path) -> dict[str, tuple[str, str]]:
    """unique name -> (sub, file name) for every message file. new/ is read before cur/, so a file
    another program moves from new/ to cur/ meanwhile is seen at least once; cur/ wins."""
    found: dict[str, tuple[str, str]] = {}
    for sub in ("new", "cur"):
        for filename in os.listdir(folder / sub):
            if filename[0] != ".":  # Maildir readers skip dot files
                found[filename.partition(":")[0]] = (sub, filename)  # split_filename, inlined: hot
    return found


def open_message(path: Path | str) -> BinaryIO:
    """Open a message file; when a flag change renamed it since `path` was read, find it by its
    unique name in cur/ or new/. A string is opened as it is: a Path made per message, and its
    open(), were a fifth of answering Thunderbird's header list from the files (issue 19)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        path = Path(path)
        found = where_now(path.parent.parent, split_filename(path.name)[0])
        if found is None:
            raise
        return open(found, "rb")


def where_now(folder: str | Path, base: str) -> str | None:
    """The path of the message file of unique name `base` in the folder's cur/ or new/, whatever its
    flags are now (another program renamed it), or None when there is none."""
    for sub in ("cur", "new"):
        directory = os.path.join(folder, sub)
        with contextlib.suppress(FileNotFoundError):
            for filename in os.listdir(directory):
                if filename.partition(":")[0] == base:
                    return os.path.join(directory, filename)
    return None


def read_message(path: str, limit: int) -> bytes:
    """open_message(path).read(limit): with os.open, one fstat and one read() of the file's size (a
    buffered file object's read(limit) of a big limit allocated the whole limit first: 8 MiB for
    the full-text index's, 37-57 us a corpus message against 8 us this way; issue 19)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        with open_message(path) as f:  # renamed by a flag change since the index was read
            return f.read(limit)
    try:
        return read_to_end(fd, os.fstat(fd).st_size, limit)
    finally:
        os.close(fd)


def read_to_end(fd: int, size: int, limit: int | None = None) -> bytes:
    """The file's content from its start, at most `limit` octets, `size` octets by its fstat: one
    read() but when it grew since (a short read of a regular file is its end)."""
    data = os.read(fd, size + 1 if limit is None else min(size + 1, limit))
    if len(data) <= size or (limit is not None and len(data) >= limit):
        return data
    parts, got = [data], len(data)
    while limit is None or got < limit:
        chunk = os.read(fd, 1 << 16 if limit is None else min(1 << 16, limit - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def rename_files(moves: Iterable[tuple[str | Path, str | Path]], *, durable: bool = True) -> list[bool]:
    """Rename each (source, target); False where the source is gone (expunged or renamed by
    another program meanwhile). With `durable`, the directories touched are fsynced once each.
    Give strings where there are many: a Path made per file was most of a 20k STORE's time on the
    event loop (issue 19)."""
    done: list[bool] = []
    touched: set[str] = set()
    for source, target in moves:
        try:
            os.rename(source, target)
        except FileNotFoundError:
            done.append(False)
            continue
        done.append(True)
        if durable:
            touched.update((os.path.dirname(source), os.path.dirname(target)))
    for directory in touched:
        fsync_dir(directory)
    return done


def unlink_files(paths: Iterable[str | Path], *, durable: bool = True) -> list[bool]:
    """Remove each file; False where it was not there (renamed or removed by another program). With
    `durable`, the directories touched are fsynced once each."""
    touched: set[str] = set()
    found: list[bool] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            found.append(False)
            continue
        found.append(True)
        if durable:
            touched.add(os.path.dirname(path))
    for directory in touched:
        fsync_dir(directory)
    return found


# How many times one flag change or expunge lists the folder for files another program renamed
# (rename_flagged, unlink_messages).
FIND_TRIES = 20


class _Wherever:
    """Where the files of one flag change or expunge are now, by their unique names: one listing of
    the folder serves every file that missed, and the folder is listed again only for a file that
    moved since (FIND_TRIES listings at most). A listing per file missed held the database's thread
    4 s for a slice of 256 in a folder of 20k files another program had just marked seen."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.listing: dict[str, tuple[str, str]] | None = None
        self.listings = 0

    def find(self, path: str, *, again: bool) -> str | None:
        """Where the file of `path`'s unique name is now: None, nowhere; raises _GaveUp. `again`:
        it was not where the last listing said either."""
        if self.listing is None or again:
            if self.listings == FIND_TRIES:
                raise _GaveUp
            self.listings += 1
            try:
                self.listing = list_messages(self.folder)
            except FileNotFoundError:  # the folder is gone (deleted meanwhile): so are its files
                self.listing = {}
        where = self.listing.get(os.path.basename(path).partition(":")[0])
        return None if where is None else os.path.join(self.folder, *where)


class _GaveUp(Exception):
    """The folder was listed FIND_TRIES times: a file another program keeps moving is left."""


def unlink_messages(folder: str | Path, paths: Sequence[str]) -> list[bool | None]:
    """Remove the message files at `paths` (the folder's new/ or cur/), not fsynced: an expunge's.
    A file not there was renamed by another program (its flags, new/ to cur/) or removed: it is
    looked for by its unique name and removed where it is now, again while it keeps moving (_Wherever).
    For each: True, removed where given; None, removed where it was found (the folder changed);
    False, maybe still there (it kept moving, its unlink failed: EPERM, EIO, or no listing showed
    it: a listing of a directory another program renames in can miss a file, 3 in 100 expunges of a
    file renamed as fast as can be in a folder of 3,000), for the caller to remove later: a message
    whose expunge other sessions were told of must not come back (mailstore.expunge)."""
    wherever = _Wherever(folder)
    return [_unlink_wherever(wherever, path) for path in paths]


def _unlink_wherever(wherever: _Wherever, path: str) -> bool | None:
    now: str | None = path
    while now is not None:
        try:
            os.unlink(now)
            return True if now is path else None
        except FileNotFoundError:
            try:
                now = wherever.find(path, again=now is not path)
            except _GaveUp:
                return False
        except OSError as exc:
            log.warning("store: cannot remove %s (%s); tried again at the folder's next listing", now, exc.strerror or exc)
            return False
    return False  # in no listing: gone, or missed (the next listing forgets its name, or removes it)


def rename_flagged(folder: str | Path, moves: Sequence[tuple[str, str]]) -> list[bool]:
    """A flag change's renames (source, target in cur/) within the folder, not fsynced. A source not
    there was renamed by another program (a flag change of its own): it is looked for by its unique
    name and renamed from where it is now, its letters the other program's with this change's made
    on them (the letters the target adds to the source's, less those it drops), again while it keeps
    moving (_Wherever); so the change is on the file even when that program moves it again before
    the folder is listed. For each, whether it was renamed as planned: False when the file was
    elsewhere (the change made there, the name has the other program's letters too) or nowhere
    (removed): the caller reads the folder again (index.commit_pipelined)."""
    wherever = _Wherever(folder)
    return [_rename_wherever(wherever, source, target) for source, target in moves]


def _rename_wherever(wherever: _Wherever, source: str, target: str) -> bool:
    try:
        os.rename(source, target)
        return True
    except FileNotFoundError:
        pass
    base, was = split_filename(os.path.basename(source))
    wanted = split_filename(os.path.basename(target))[1]
    added, dropped = set(wanted) - set(was), set(was) - set(wanted)
    again = False
    while True:
        try:
            now = wherever.find(source, again=again)
        except _GaveUp:
            return False
        if now is None:
            return False
        letters = sorted_letters((set(split_filename(os.path.basename(now))[1]) - dropped) | added)
        try:
            os.rename(now, os.path.join(os.path.dirname(target), cur_filename(base, letters)))
            return False
        except FileNotFoundError:
            again = True


def copy_messages(copies: Iterable[tuple[Path, WriteJob]]) -> None:
    """All copies or none (RFC 3501 6.4.7: a failed COPY leaves the target as it was)."""
    made: list[Path] = []
    try:
        for source, job in copies:
            copy_message(source, job)
            made.append(job.maildir / job.sub / job.filename)
        for directory in {path.parent for path in made}:
            fsync_dir(directory)
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
