"""One `letterbox serve` per data directory, and no whole-box restore under a running box."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import LETTERBOX, ServedBox, pick_port_offset


def test_a_second_serve_on_the_same_data_is_refused_in_one_line(served_box: ServedBox) -> None:
    second = subprocess.run(
        [LETTERBOX, "serve", "--listen", "127.0.0.1", "--port-offset", str(pick_port_offset())],
        env=served_box.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode != 0
    assert "already running" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert served_box.proc is not None
    assert served_box.proc.poll() is None  # the first box goes on


def test_whole_box_restore_is_refused_while_serve_runs(served_box: ServedBox, tmp_path: Path) -> None:
    before = sorted(p.name for p in served_box.data.root.iterdir())
    kit = tmp_path / "kit.txt"
    kit.write_text("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n")
    run = subprocess.run(
        [LETTERBOX, "backup", "restore", str(tmp_path / "any.tar.zst.age"), "--key-file", str(kit)],
        env=served_box.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode != 0
    assert "serve is running on this data directory" in run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in served_box.data.root.iterdir()) == before


def test_the_lock_is_gone_with_the_process(served_box: ServedBox, tmp_path: Path) -> None:
    served_box.stop()
    run = subprocess.run(
        [LETTERBOX, "backup", "restore", str(tmp_path / "missing.tar.zst.age"), "--key-file",
         str(tmp_path / "no-kit")],
        env=served_box.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert "serve is running" not in run.stderr  # refused for its own reason, not the lock


def test_a_restore_killed_before_its_switch_over_leaves_nothing_after_the_next_start(served_box: ServedBox) -> None:
    """The staging directory of a restore killed midway (a whole copy of the box, in clear) stayed
    beside the data directory until the next restore, which may never come; serve removes it at
    start, under the data directory's lock (a CLI restore holds it while it runs)."""
    served_box.stop()
    root = served_box.data.root.resolve()
    staging = root.parent / f".{root.name}.restore-0badc0de"
    (staging / "mail").mkdir(parents=True)
    (staging / "letterbox.db").write_bytes(b"a staged copy")
    served_box.start()
    assert not staging.exists()
    assert (root / "letterbox.db").exists()
