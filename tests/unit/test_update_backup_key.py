"""letterbox-update asks for a backup only on a box with a backup key (appliance/update.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance import backup, update


def test_the_setting_is_the_backup_modules() -> None:
    assert update.BACKUP_KEY_SETTING == backup.RECIPIENT_SETTING


def test_has_backup_key(tmp_path: Path) -> None:
    db = tmp_path / "letterbox.db"
    assert not update.has_backup_key(db)  # no database yet
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.commit()
    assert not update.has_backup_key(db)
    conn.execute("INSERT INTO settings VALUES (?, ?)", (backup.RECIPIENT_SETTING, "age1example"))
    conn.commit()
    assert update.has_backup_key(db)
    conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["letterbox.db"]  # read from a copy: no -shm left


def wal_database(db: Path, version: int) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE schema_migrations (version INTEGER)")
    conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
    conn.commit()
    return conn


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_reading_creates_nothing_beside_the_database_whatever_its_state(tmp_path: Path) -> None:
    db = tmp_path / "letterbox.db"
    conn = wal_database(db, 20)
    conn.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.commit()
    # The box running: its -wal and -shm are there, and the newest rows only in the -wal.
    conn.execute("INSERT INTO settings VALUES (?, ?)", (backup.RECIPIENT_SETTING, "age1example"))
    conn.commit()
    running = files(tmp_path)
    assert running == ["letterbox.db", "letterbox.db-shm", "letterbox.db-wal"]
    assert update.has_backup_key(db)
    assert update.schema_version(db) == 20
    assert files(tmp_path) == running
    # Stopped: the last close checkpoints and removes them; reading must not make them again.
    conn.close()
    assert files(tmp_path) == ["letterbox.db"]
    assert update.has_backup_key(db)
    assert update.schema_version(db) == 20
    assert files(tmp_path) == ["letterbox.db"]


def test_a_wal_left_without_its_shm_is_read_from_a_copy(tmp_path: Path) -> None:
    db = tmp_path / "letterbox.db"
    conn = wal_database(db, 7)
    saved = {name: (tmp_path / name).read_bytes() for name in ("letterbox.db", "letterbox.db-wal")}
    conn.close()
    for name, data in saved.items():  # what a crash leaves: the -wal holds the last commit, no -shm
        (tmp_path / name).write_bytes(data)
    assert update.schema_version(db) == 7
    assert files(tmp_path) == ["letterbox.db", "letterbox.db-wal"]
