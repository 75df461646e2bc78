"""Which file names of a big folder changed since its listing (appliance/store/dir_watch.py): every
name made, renamed or removed in new/ and cur/ since, and "not known" (list the folder) whenever an
event may have been missed: an overflowed queue, a directory removed or replaced, no watch to be had."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from appliance.store.dir_watch import DirWatch
from tests.support.inotify import overflow, run_with_watch_limit

FOLDER = 7


@pytest.fixture
def watch() -> Iterator[DirWatch]:
    with closing(DirWatch()) as w:
        yield w


def folder(root: Path) -> dict[str, Path]:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {sub: root / sub for sub in ("new", "cur")}


def changed(watch: DirWatch, dirs: dict[str, Path], folder_id: int = FOLDER) -> dict[tuple[str, str], bool] | None:
    """The names evented since the listing (consumed, as FolderIndex.unchanged_by_others does when
    they are where the index has them), or None: the folder must be listed."""
    seen = watch.changed(folder_id, dirs)
    if seen is None:
        return None
    watch.consumed(folder_id, seen[1])
    return seen[0]


def test_names_made_moved_and_removed_since_the_listing(tmp_path: Path, watch: DirWatch) -> None:
    dirs = folder(tmp_path)
    assert changed(watch, dirs) is None  # never listed
    watch.listing(FOLDER, dirs)
    assert changed(watch, dirs) == {}
    (tmp_path / "new" / "1.M1").write_bytes(b"x")
    os.rename(tmp_path / "new" / "1.M1", tmp_path / "cur" / "1.M1:2,S")
    assert changed(watch, dirs) == {("new", "1.M1"): False, ("cur", "1.M1:2,S"): True}
    assert changed(watch, dirs) == {}  # (consumed)
    (tmp_path / "cur" / "1.M1:2,S").unlink()
    assert changed(watch, dirs) == {("cur", "1.M1:2,S"): False}
    watch.forget(FOLDER)
    assert changed(watch, dirs) is None


def test_an_overflowed_queue_makes_every_folder_listed(tmp_path: Path, watch: DirWatch) -> None:
    dirs, others = folder(tmp_path / "a"), folder(tmp_path / "b")
    watch.listing(FOLDER, dirs)
    watch.listing(FOLDER + 1, others)
    overflow(others["cur"])  # (no name of the first folder)
    assert changed(watch, dirs) is None
    assert changed(watch, others, FOLDER + 1) is None
    watch.listing(FOLDER, dirs)
    assert changed(watch, dirs) == {}


def test_a_directory_removed_and_made_again_makes_the_folder_listed(tmp_path: Path, watch: DirWatch) -> None:
    """cur/ removed and made again (perhaps with the old inode): its events were lost in between;
    the next listing watches the new directory."""
    dirs = folder(tmp_path)
    watch.listing(FOLDER, dirs)
    shutil.rmtree(dirs["cur"])
    dirs["cur"].mkdir()
    assert changed(watch, dirs) is None
    watch.listing(FOLDER, dirs)
    assert changed(watch, dirs) == {}
    (dirs["cur"] / "2.M2:2,").write_bytes(b"x")
    assert changed(watch, dirs) == {("cur", "2.M2:2,"): True}


def test_a_directory_replaced_makes_the_folder_listed(tmp_path: Path, watch: DirWatch) -> None:
    """The folder moved away and another made at its place: no event on the watched directories
    says so (their parent moved), the directories at the paths are others."""
    dirs = folder(tmp_path / ".Work")
    watch.listing(FOLDER, dirs)
    os.rename(tmp_path / ".Work", tmp_path / ".Old")
    folder(tmp_path / ".Work")
    assert changed(watch, dirs) is None


def test_too_many_names_make_the_folder_listed(tmp_path: Path, watch: DirWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.store.dir_watch.MAX_NAMES", 5)
    dirs = folder(tmp_path)
    watch.listing(FOLDER, dirs)
    for n in range(6):
        (dirs["new"] / f"{n}.M{n}").write_bytes(b"x")
    assert changed(watch, dirs) is None


def test_without_inotify_watches_left_folders_are_listed(tmp_path: Path) -> None:
    """inotify's watch limit reached: a folder with only one of its two directories watched is
    listed each time (a change in the other would not be known)."""
    dirs = folder(tmp_path)
    out = run_with_watch_limit(1, textwrap.dedent(f"""
        from pathlib import Path
        from appliance.store.dir_watch import DirWatch
        root = Path({str(tmp_path)!r})
        dirs = {{sub: root / sub for sub in ("new", "cur")}}
        watch = DirWatch()
        for _ in range(3):
            watch.listing(7, dirs)
            print(watch.changed(7, dirs))
    """))
    assert out.splitlines() == ["None"] * 3
    assert dirs  # (made in the parent: the child only watches)
