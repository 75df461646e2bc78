"""A whole-box restore killed inside its switch-over: the staged data and the data directory are swapped
in one step (renameat2 RENAME_EXCHANGE), then the old data, now under the staging directory's name, is
renamed aside as <data>.before-restore-<time>. A kill between the two left the old box under the
staging name, and the next start (backup.clean_stale_staging, since 48da6e4) removed it as a staging
directory: the box the restore replaced, kept aside to go back to, was gone. The kill is placed there
by strace: SIGKILL at the restore's first rename(2) (the exchange is renameat2)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LETTERBOX, ServedBox

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
BOB = "bob@ourdomain.test"


def mailboxes(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {local for (local,) in conn.execute("SELECT local_part FROM mailboxes")}
    finally:
        conn.close()


def test_a_restore_killed_between_its_exchange_and_its_rename_keeps_the_old_box(
        served_box: ServedBox, tmp_path: Path) -> None:
    served_box.add_user(ALICE, PASSWORD)
    kit = tmp_path / "kit.txt"
    served_box.cli("backup", "key", "--kit-to", str(kit))
    made = tmp_path / "made"
    served_box.cli("backup", "create", "--to", str(made))
    [file] = made.iterdir()
    served_box.add_user(BOB, PASSWORD)  # only in the box the restore replaces
    served_box.stop()
    root = served_box.data.root.resolve()

    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "signal=none", "-e", "trace=rename",
         "-e", "inject=rename:signal=SIGKILL", LETTERBOX, "backup", "restore", str(file), "--key-file", str(kit)],
        capture_output=True, text=True, env={**served_box.env(), "PYTHONDONTWRITEBYTECODE": "1"}, timeout=120,
    )
    assert result.returncode in (-9, 137), (result.returncode, result.stdout, result.stderr)
    assert mailboxes(root / "letterbox.db") == {"alice"}, "the kill came before the exchange"
    [old] = root.parent.glob(f".{root.name}.restore-*")
    assert mailboxes(old / "letterbox.db") == {"alice", "bob"}

    served_box.start()
    served_box.stop()
    assert not list(root.parent.glob(f".{root.name}.restore-*"))
    [aside] = root.parent.glob(f"{root.name}.before-restore-*")
    assert mailboxes(aside / "letterbox.db") == {"alice", "bob"}
    assert not [p for p in os.listdir(aside) if p.startswith(".letterbox-")]  # no marker left behind
