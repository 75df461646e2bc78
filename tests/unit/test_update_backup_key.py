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
