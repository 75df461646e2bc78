"""letterbox-update on a full disk (a first boot still growing the root, a full SD card): one line that
says so and exit 1, never a traceback, and nothing left behind under the prefix."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import update
from appliance.bundle import write_bundle
from tests.support.releases import build_wheel


@pytest.fixture
def full_prefix(tmp_path: Path) -> Iterator[Path]:
    """A prefix on a 64 KiB tmpfs holding the version in force: smaller than any bundle's wheels."""
    prefix = tmp_path / "opt"
    prefix.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(prefix)], check=True)
    try:
        (prefix / "venv-0.1.0").mkdir()
        (prefix / "venv").symlink_to("venv-0.1.0")
        yield prefix
    finally:
        subprocess.run(["umount", str(prefix)], check=True)


def test_a_full_disk_is_one_clear_line_and_changes_nothing(full_prefix: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "9.9.9")
    bundle = write_bundle(wheels, tmp_path)
    before = sorted(p.name for p in full_prefix.iterdir())
    code = update.main([str(bundle), "--prefix", str(full_prefix), "--data", str(tmp_path / "data"),
                        "--systemctl", "true", "--user", ""])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert "the disk is full" in err, err
    assert "nothing was changed" in err, err
    assert sorted(p.name for p in full_prefix.iterdir() if p.name != ".update.lock") == before  # the lock stays, as after any update
