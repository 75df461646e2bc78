"""A restore killed within its switch-over is put aside at the next start (clean_stale_staging); its
backups/ files come across to the box, as switch_over carries them when it is not killed."""

from __future__ import annotations

from pathlib import Path

from appliance.backup import OLD_DATA_MARK, SUFFIX, clean_stale_staging


def test_recovered_switch_over_carries_backups(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "backups").mkdir(parents=True)
    old = tmp_path / ".data.restore-killed"
    (old / "backups").mkdir(parents=True)
    (old / OLD_DATA_MARK).touch()
    (old / "backups" / f"box-1{SUFFIX}").write_bytes(b"backup")
    clean_stale_staging(root)
    assert (root / "backups" / f"box-1{SUFFIX}").read_bytes() == b"backup"
    (aside,) = tmp_path.glob("data.before-restore-*")
    assert not (aside / "backups" / f"box-1{SUFFIX}").exists()
