"""letterbox-update's rollback puts the pre-update database copy back (Updater.restore_db). Killed at
any step, the data directory holds a whole database: the migrated one or the copy, never none (the box
would start as a new one, at the setup wizard) and never one file's WAL beside another's database."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import update
from appliance.update import DB_FILES, Options, Updater


class Killed(BaseException):
    """The program stops here (as a SIGKILL would: nothing after this step runs)."""


def with_wal(path: Path, rows: list[tuple[str, str]], schema: str) -> None:
    """A database whose last transactions are still in its WAL, as a stopped box may leave it."""
    work = path.parent / "work"
    work.mkdir()
    conn = sqlite3.connect(work / "letterbox.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(schema)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.executemany("INSERT INTO t (k, v) VALUES (?, ?)", rows)  # these stay in the WAL
    conn.commit()
    for name in DB_FILES:
        shutil.copy2(work / name, path.parent / name)
    conn.close()
    shutil.rmtree(work)


def state(data: Path) -> tuple[str, ...]:
    conn = sqlite3.connect(data / "letterbox.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return tuple(sorted(str(r[0]) for r in conn.execute("SELECT v FROM t")))
    finally:
        conn.close()


@pytest.fixture
def rolled_back(tmp_path: Path) -> tuple[Updater, Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    with_wal(data / "letterbox.db", [("1", "old")], "CREATE TABLE t (k TEXT, v TEXT)")
    updater = Updater(Options(data=data, user=""))
    snap = updater.snapshot_db("9.9")
    for name in DB_FILES:
        (data / name).unlink()
    with_wal(data / "letterbox.db", [("1", "migrated"), ("2", "migrated")],
             "CREATE TABLE t (k TEXT, v TEXT, extra TEXT)")
    return updater, data, snap


OLD, MIGRATED = ("old",), ("migrated", "migrated")


def test_the_copy_comes_back_and_the_migrated_one_is_kept(rolled_back: tuple[Updater, Path, Path]) -> None:
    updater, data, snap = rolled_back
    assert state(data) == MIGRATED
    updater.restore_db(snap, "9.9")
    assert state(data) == OLD
    [kept] = (data / update.UPDATES).glob("failed-9.9-*")
    shutil.copytree(kept, data.parent / "kept")
    assert state(data.parent / "kept") == MIGRATED


def test_killed_at_any_step_a_whole_database_is_in_place(
    rolled_back: tuple[Updater, Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    updater, data, snap = rolled_back
    pristine = data.parent / "pristine"
    shutil.copytree(data, pristine)
    steps = 0
    for kill_at in range(1, 50):
        shutil.rmtree(data)
        shutil.copytree(pristine, data)
        calls = [0]

        def step(real: Callable[..., object], kill_at: int = kill_at, calls: list[int] = calls) -> Callable[..., object]:
            def wrapped(*args: object, **kwargs: object) -> object:
                calls[0] += 1
                if calls[0] == kill_at:
                    raise Killed
                return real(*args, **kwargs)
            return wrapped

        with monkeypatch.context() as m:
            m.setattr(os, "replace", step(os.replace))
            m.setattr(os, "unlink", step(os.unlink))
            m.setattr(Path, "unlink", step(Path.unlink))
            try:
                updater.restore_db(snap, "9.9")
            except Killed:
                assert (data / "letterbox.db").exists(), f"no database after step {kill_at}"
                assert state(data) in (OLD, MIGRATED, ()), f"after step {kill_at}"
                steps += 1
                continue
        assert state(data) == OLD
        break
    assert steps >= 3  # the unlinks of the WAL and -shm, and the two renames
