"""letterbox-update runs as root and writes into the data directory, which the box's user owns: what
that user put there (a link in place of DATA/updates, of the database, of the database's copy) must
not make root change or copy files outside it. The box's user starts letterbox-update itself, by
writing DATA/updates/incoming.tar (letterbox-update.path); a file that is no bundle is enough to have
the failure written into DATA/updates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.update import DB_FILES, STATUS, Options, UpdateError, Updater

BOX_USER = 65534  # nobody: the data directory's owner, as `letterbox` owns the image's
SECRET = b"root:$y$j9T$a-hash-only-root-may-read:20000:0:99999:7:::\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="what root does with the box user's links")


def updater(tmp_path: Path) -> Updater:
    data, prefix = tmp_path / "data", tmp_path / "opt"
    data.mkdir(mode=0o700)
    prefix.mkdir()
    os.chown(data, BOX_USER, BOX_USER)
    return Updater(Options(prefix=prefix, data=data, user="", say=lambda _line: None))


def secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return secret


def leaked(data: Path) -> list[Path]:
    return [p for p in data.rglob("*") if p.is_file() and not p.is_symlink() and SECRET in p.read_bytes()]


def test_a_link_in_place_of_the_updates_folder_is_not_followed(tmp_path: Path) -> None:
    """DATA/updates made a link to a folder of root's: root gave that folder to the box's user (chown
    follows links) and wrote the status file into it."""
    up = updater(tmp_path)
    victim = tmp_path / "etc"
    victim.mkdir(mode=0o755)
    (up.o.data / "updates").symlink_to(victim)
    up._write_status(state="failed", version="", previous="", message="not a Letterbox bundle")
    assert (victim.stat().st_uid, list(victim.iterdir())) == (0, [])
    updates = up.o.data / "updates"
    assert updates.is_dir()
    assert not updates.is_symlink()
    assert (updates / STATUS).stat().st_uid == BOX_USER


def test_a_database_that_is_a_link_is_not_copied_before_the_update(tmp_path: Path) -> None:
    up = updater(tmp_path)
    (up.o.data / DB_FILES[0]).symlink_to(secret_file(tmp_path))
    with pytest.raises(UpdateError, match="is a link"):
        up.snapshot_db("9.9")
    assert leaked(up.o.data) == []


def test_a_database_copy_that_became_a_link_is_not_put_back(tmp_path: Path) -> None:
    """The copy in DATA/updates/before-VERSION is the box user's while the new version runs; a rollback
    copied what it pointed at into DATA/letterbox.db."""
    up = updater(tmp_path)
    (up.o.data / DB_FILES[0]).write_bytes(b"the migrated database")
    snap = up.snapshot_db("9.9")
    (snap / DB_FILES[0]).unlink()
    (snap / DB_FILES[0]).symlink_to(secret_file(tmp_path))
    with pytest.raises(UpdateError, match="is a link"):
        up.restore_db(snap, "9.9")
    assert leaked(up.o.data) == []
    assert (up.o.data / DB_FILES[0]).read_bytes() == b"the migrated database"
