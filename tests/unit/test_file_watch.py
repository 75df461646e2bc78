"""When the message cache uses a row without a stat of its file (appliance/store/file_watch.py):
only after a stat matched it while the folder's directories were watched, and never after an event
named the file, its directory went, or the directory at the path is another one."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import pytest

from appliance.store.file_watch import FileWatch
from appliance.store.message_cache import FileStamp, stamp_of
from tests.support.inotify import overflow, run_with_watch_limit

FOLDER = 7


@pytest.fixture
def watch() -> Iterator[FileWatch]:
    with closing(FileWatch()) as w:
        yield w


def folder(root: Path, count: int = 3) -> list[tuple[int, str]]:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    files = []
    for uid in range(1, count + 1):
        path = root / "cur" / f"170000000{uid}.M{uid}P1.host:2,S"
        path.write_bytes(b"Subject: %d\r\n\r\nbody\r\n" % uid)
        files.append((uid, str(path)))
    return files


def rows(files: list[tuple[int, str]]) -> dict[int, tuple[FileStamp, str]]:
    return {uid: (stamp_of(os.stat(path)), f"row {uid}") for uid, path in files}


def check(watch: FileWatch, files: list[tuple[int, str]], known: dict[int, tuple[FileStamp, str]],
          folder_id: int = FOLDER) -> set[int]:
    """One check as fetch_cache._current makes it: the UIDs trusted without a stat."""
    with watch.check(folder_id) as c:
        trusted, rest = c.split(files, known)
        for uid, path, found in rest:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if found is not None and found[0] == stamp_of(st):
                c.matched(uid, path, found[0], st.st_nlink)
    return set(trusted)


class _Info(NamedTuple):
    directory: Path
    filename: str


def sifted(watch: FileWatch, files: list[tuple[int, str]], known: dict[int, tuple[FileStamp, str]]) -> set[int]:
    """`check` made with FolderCheck.sift (SEARCH SUBJECT's whole-folder check): the rows as SQLite
    gives them, value true for the odd UIDs, plus a row of a message not among the files."""
    where = {uid: _Info(Path(os.path.dirname(path)), os.path.basename(path)) for uid, path in files}
    table = [(uid, *stamp, uid % 2) for uid, (stamp, _) in sorted(known.items())] + [(99, 1, 2, 3, 1)]
    with watch.check(FOLDER) as c:
        wanted, trusted, rest = c.sift(table, where)
        for uid, path, stamp, _ in rest:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if stamp == stamp_of(st):
                c.matched(uid, path, stamp, st.st_nlink)
    assert set(wanted) == {uid for uid in wanted if uid % 2}
    assert len(rest) + trusted == len(files)
    return {uid for uid in where if uid not in {r[0] for r in rest}}


@pytest.mark.parametrize("checked", [check, sifted])
def test_rows_are_trusted_after_a_matching_stat_while_watched(
        tmp_path: Path, watch: FileWatch, checked: Callable[..., set[int]]) -> None:
    check = checked
    files = folder(tmp_path)
    known = rows(files)
    assert check(watch, files, known) == set()  # the first check stats every file
    assert check(watch, files, known) == {1, 2, 3}
    assert check(watch, files, known) == {1, 2, 3}
    # A row of another stamp (written meanwhile) is not the one that matched.
    changed = {**known, 2: ((0, 0, 0), "another row")}
    assert check(watch, files, changed) == {1, 3}
    # Another path for the UID (a flag change renamed the file) is checked once.
    renamed = [(uid, path + "F" if uid == 3 else path) for uid, path in files]
    os.rename(files[2][1], renamed[2][1])
    assert check(watch, renamed, known) == {1, 2}
    assert check(watch, renamed, known) == {1, 2, 3}


def test_a_file_rewritten_in_place_is_checked_again(tmp_path: Path, watch: FileWatch) -> None:
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    with open(files[0][1], "r+b") as f:  # same name, same inode, same size
        f.write(b"Subject: 9")
    assert check(watch, files, known) == {2, 3}
    # Its new stamp no longer matches the row: it stays checked until a row of the new file comes.
    assert check(watch, files, known) == {2, 3}
    assert check(watch, files, rows(files)) == {2, 3}
    assert check(watch, files, rows(files)) == {1, 2, 3}


@pytest.mark.parametrize("how", ["rename", "touch", "remove"])
def test_other_changes_name_the_file(tmp_path: Path, watch: FileWatch, how: str) -> None:
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    path = Path(files[1][1])
    if how == "rename":  # replaced by another file (a new inode under the same name)
        (tmp_path / "tmp" / "x").write_bytes(b"Subject: other\r\n\r\n")
        os.rename(tmp_path / "tmp" / "x", path)
    elif how == "touch":
        os.utime(path, ns=(1, 1))
    else:
        path.unlink()
    assert check(watch, files, known) == {1, 3}


def test_a_directory_replaced_behind_the_box_drops_every_mark(tmp_path: Path, watch: FileWatch) -> None:
    root = tmp_path / ".Work"
    files = folder(root)
    known = rows(files)
    check(watch, files, known)
    assert check(watch, files, known) == {1, 2, 3}
    # The folder moved away and another made at its place with files of the same names and stamps
    # but for the inode: no event names them (the watched directory is the old one).
    os.rename(root, tmp_path / ".Old")
    again = folder(root)
    assert again == files
    assert check(watch, files, known) == set()
    # A new delivery's directory entry is seen in the new directory, watched from then on.
    assert check(watch, files, rows(files)) == set()
    assert check(watch, files, rows(files)) == {1, 2, 3}
    (root / "cur" / "1700000001.M1P1.host:2,S").write_bytes(b"Subject: changed\r\n\r\n")
    assert check(watch, files, rows(files)) == {2, 3}


def test_a_moved_directory_drops_every_mark(tmp_path: Path, watch: FileWatch) -> None:
    """cur/ moved away and another made holding the same files (the same stamps): the box watched
    the old directory, so the files are stat'ed again before they are trusted."""
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    cur = tmp_path / "cur"
    os.rename(cur, tmp_path / "old")
    cur.mkdir()
    for _, path in files:
        os.rename(tmp_path / "old" / Path(path).name, path)
    assert check(watch, files, known) == set()
    assert check(watch, files, known) == {1, 2, 3}
    Path(files[0][1]).write_bytes(b"Subject: rewritten\r\n\r\n")
    assert check(watch, files, known) == {2, 3}


def test_a_file_with_other_links_is_always_stated(tmp_path: Path, watch: FileWatch) -> None:
    """A write through another name of the file (another folder's copy) is no event here."""
    files = folder(tmp_path)
    os.link(files[0][1], tmp_path / "tmp" / "elsewhere")
    known = rows(files)
    check(watch, files, known)
    assert check(watch, files, known) == {2, 3}
    assert check(watch, files, known) == {2, 3}


def test_forgotten_rows_are_stated_again(tmp_path: Path, watch: FileWatch) -> None:
    """What the box's COPY does to the rows of the files it links (FileWatch.forget)."""
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    assert check(watch, files, known) == {1, 2, 3}
    watch.forget(FOLDER, [2, 3, 99])
    assert check(watch, files, known) == {1}


def test_without_inotify_every_row_is_checked(tmp_path: Path, watch: FileWatch) -> None:
    files = folder(tmp_path)
    known = rows(files)
    watch.close()
    for _ in range(3):
        assert check(watch, files, known) == set()


def test_high_uids_cost_marks_only_for_their_span(tmp_path: Path, watch: FileWatch) -> None:
    # A Maildir from a long-lived server: a few messages with UIDs near a million (UIDNEXT grew for years).
    files = [(900_000 + uid, path) for uid, path in folder(tmp_path, 6)]
    known = rows(files)
    newest, older = files[3:], files[:3]
    assert check(watch, newest, known) == set()
    assert check(watch, newest, known) == {uid for uid, _ in newest}
    assert check(watch, older, known) == set()  # the marks now start lower, the newest keep theirs
    assert check(watch, files, known) == {uid for uid, _ in files}
    marks = watch._folders[FOLDER].marks  # the memory this is about
    assert len(marks) <= 16


def test_an_overflowed_queue_drops_every_folders_marks(tmp_path: Path, watch: FileWatch) -> None:
    """Events lost to an overflow may have named any watched file: every folder is checked again."""
    files, others = folder(tmp_path / "a"), folder(tmp_path / "b")
    known, other_rows = rows(files), rows(others)
    for _ in range(2):
        check(watch, files, known)
        check(watch, others, other_rows, FOLDER + 1)
    assert check(watch, files, known) == {1, 2, 3}
    overflow(tmp_path / "b" / "cur")  # (no file of either folder named)
    assert check(watch, files, known) == set()
    assert check(watch, files, known) == {1, 2, 3}
    assert check(watch, others, other_rows, FOLDER + 1) == set()
    assert check(watch, others, other_rows, FOLDER + 1) == {1, 2, 3}


def test_a_directory_removed_and_made_again_is_watched_anew(tmp_path: Path, watch: FileWatch) -> None:
    """cur/ removed with its files and made again with the same names, sizes and times (the inodes
    may well be the old ones): nothing is trusted before a stat, and the new directory is watched."""
    files = folder(tmp_path)
    times = {path: os.stat(path).st_mtime_ns for _, path in files}
    check(watch, files, rows(files))
    assert check(watch, files, rows(files)) == {1, 2, 3}
    shutil.rmtree(tmp_path / "cur")
    assert folder(tmp_path) == files
    for path, mtime in times.items():
        os.utime(path, ns=(mtime, mtime))
    known = rows(files)
    assert check(watch, files, known) == set()
    assert check(watch, files, known) == {1, 2, 3}
    with open(files[0][1], "r+b") as f:  # in place: only the new directory's watch can tell
        f.write(b"Subject: 9")
    assert check(watch, files, known) == {2, 3}


def test_without_inotify_watches_left_rows_are_checked_by_a_stat(tmp_path: Path) -> None:
    """inotify's watch limit reached (one watch allowed: the first folder's cur/): the second
    folder's rows are checked by a stat every time, the first's are trusted as before."""
    folder(tmp_path / "a")
    folder(tmp_path / "b")
    out = run_with_watch_limit(1, textwrap.dedent(f"""
        import logging, os
        from pathlib import Path
        from appliance.store.file_watch import FileWatch
        from tests.unit.test_file_watch import check, rows
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        def listed(sub):
            cur = Path({str(tmp_path)!r}) / sub / "cur"
            return [(uid, str(cur / name)) for uid, name in enumerate(sorted(os.listdir(cur)), 1)]
        watch = FileWatch()
        a, b = listed("a"), listed("b")
        for _ in range(3):
            print(sorted(check(watch, a, rows(a), 1)), sorted(check(watch, b, rows(b), 2)))
    """))
    assert out.splitlines() == ["[] []", "[1, 2, 3] []", "[1, 2, 3] []"]


def _churn(root: Path, watch: FileWatch | None, rounds: int, first_uid: int) -> None:
    """What imaptest's APPEND, STORE and EXPUNGE do to a folder: a file put in cur/ from tmp/, renamed
    for a flag, removed; checked between the steps when `watch` is given (FETCH, SEARCH)."""
    for uid in range(first_uid, first_uid + rounds):
        tmp, path = root / "tmp" / f"{uid}.x", root / "cur" / f"17000{uid}.M{uid}P1.host:2,"
        tmp.write_bytes(b"Subject: %d\r\n\r\nbody\r\n" % uid)
        os.rename(tmp, path)
        if watch is not None:
            check(watch, [(uid, str(path))], rows([(uid, str(path))]))
        flagged = path.with_name(path.name + "S")
        os.rename(path, flagged)
        if watch is not None:
            check(watch, [(uid, str(flagged))], rows([(uid, str(flagged))]))
        flagged.unlink()


@pytest.mark.parametrize("checked_between", [True, False])
def test_names_of_files_gone_are_not_kept(tmp_path: Path, watch: FileWatch, checked_between: bool) -> None:
    """The names of files removed or renamed away leave the list (it held them until MAX_DIRTY of
    them reset the folder's marks: every 20 s under imaptest): the files still there stay trusted."""
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    assert check(watch, files, known) == {1, 2, 3}
    _churn(tmp_path, watch if checked_between else None, 2100, 100)  # 4,200 names gone
    assert check(watch, files, known) == {1, 2, 3}
    assert len(watch._folders[FOLDER].dirty) <= 2
    # The marks kept span the UIDs of the files there: once these go too, none (UIDs only rise).
    for _, path in files:
        os.unlink(path)
    assert check(watch, files, known) == set()
    assert len(watch._folders[FOLDER].marks) == 0


def test_a_name_used_again_after_its_file_went_is_checked(tmp_path: Path, watch: FileWatch) -> None:
    """The same file (same inode, size, times) taken away and put back under its name, while a
    check runs and between checks: its row is stat'ed before it is trusted again."""
    files = folder(tmp_path)
    known = rows(files)
    check(watch, files, known)
    path = files[0][1]
    keep = str(tmp_path / "tmp" / "kept")
    for during_a_check in (False, True):
        os.link(path, keep)
        if during_a_check:
            with watch.check(FOLDER) as c:
                c.matched(1, path, known[1][0], 1)  # stat'ed before it went
                os.unlink(path)
                os.rename(keep, path)
        else:
            os.unlink(path)
            assert check(watch, files, known) == {2, 3}  # (its name forgotten here, with its mark)
            os.rename(keep, path)
        assert check(watch, files, known) == {2, 3}
        assert check(watch, files, known) == {1, 2, 3}


@pytest.mark.parametrize("removed", [1, 40])
def test_the_marks_of_files_gone_are_dropped(tmp_path: Path, watch: FileWatch, removed: int) -> None:
    """Whether few names went between two checks (found one by one) or many (one pass over the marks)."""
    files = folder(tmp_path, 45)
    known = rows(files)
    check(watch, files, known)
    assert check(watch, files, known) == set(range(1, 46))
    for _, path in files[1:1 + removed]:
        os.unlink(path)
    assert check(watch, files, known) == set(range(1, 46)) - set(range(2, 2 + removed))
