"""restic as the off-box target of backups (issue 14), against a real local repository: the repository
set through the CLI (made when new), a backup sent and listed, fetched back and restored into a fresh
data directory with the mail in it; the daily run sends its backup by itself; the password appears in
no output, event or command line."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from appliance import backup, backup_restic
from appliance.accounts import Accounts
from appliance.config import DataLayout
from appliance.db import Database
from appliance.events import EventLog
from appliance.store.mailstore import MailStore
from tests.conftest import LETTERBOX, require_program

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ALICE = "alice@one.test"
REPO_PASSWORD = "restic repository password 42"


def run(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([LETTERBOX, "--data", str(data), *args], input=stdin, capture_output=True,
                            text=True, timeout=120)
    assert REPO_PASSWORD not in result.stdout + result.stderr
    return result


def make_box(root: Path) -> DataLayout:
    layout = DataLayout(root)
    layout.create()

    async def setup() -> None:
        db = await Database.open(layout.db)
        try:
            accounts = Accounts(db, data=layout)
            await accounts.add_domain("one.test")
            await accounts.add_user(ALICE, "a long password for alice")
            store = MailStore(layout.mail, db, accounts)
            for n in range(3):
                await store.deliver([ALICE], f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
        finally:
            await db.close()

    asyncio.run(setup())
    return layout


def messages(layout: DataLayout) -> int:
    async def count() -> int:
        db = await Database.open(layout.db)
        try:
            return len((await MailStore(layout.mail, db, Accounts(db)).snapshot(ALICE, "INBOX")).messages)
        finally:
            await db.close()

    return asyncio.run(count())


def events_text(layout: DataLayout) -> str:
    async def read() -> str:
        db = await Database.open(layout.db)
        try:
            return repr(await db.fetchall("SELECT * FROM events"))
        finally:
            await db.close()

    return asyncio.run(read())


def test_send_to_restic_fetch_back_and_restore(tmp_path: Path) -> None:
    require_program("restic")
    layout = make_box(tmp_path / "box" / "data")
    kit = tmp_path / "kit.txt"
    assert run(layout.root, "backup", "key", "--kit-to", str(kit)).returncode == 0
    password = tmp_path / "restic-password"
    password.write_text(REPO_PASSWORD + "\n")
    repo = tmp_path / "restic-repo"
    made = run(layout.root, "backup", "restic", "set", "--repo", str(repo), "--password-file", str(password))
    assert made.returncode == 0, made.stderr
    assert "made and set" in made.stdout
    assert (repo / "config").is_file()
    # Set again: the repository exists and opens with the password; a wrong one is refused.
    password.write_text("not the password\n")
    wrong = run(layout.root, "backup", "restic", "set", "--repo", str(repo), "--password-file", str(password))
    assert wrong.returncode == 1
    assert "does not open this repository" in wrong.stderr

    created = run(layout.root, "backup", "create")
    assert created.returncode == 0, created.stderr
    file = Path(created.stdout.split("\t")[0])
    sent = run(layout.root, "backup", "restic", "send", str(file))
    assert sent.returncode == 0, sent.stderr
    snapshot = sent.stdout.split()[-1]
    listed = run(layout.root, "backup", "restic", "list")
    assert snapshot in listed.stdout
    assert file.name in listed.stdout

    # The box is lost: a fresh data directory gets the backup back from restic, then restores it.
    fresh = DataLayout(tmp_path / "fresh" / "data")
    fresh.create()
    password.write_text(REPO_PASSWORD + "\n")
    assert run(fresh.root, "backup", "restic", "set", "--repo", str(repo), "--password-file",
               str(password)).returncode == 0
    fetched = run(fresh.root, "backup", "restic", "fetch", snapshot, "--to", str(tmp_path / "fetched"))
    assert fetched.returncode == 0, fetched.stderr
    back = Path(fetched.stdout.strip())
    assert back.read_bytes() == file.read_bytes()
    restored = run(fresh.root, "backup", "restore", str(back), "--key-file", str(kit))
    assert restored.returncode == 0, restored.stderr
    assert messages(fresh) == 3
    assert REPO_PASSWORD not in events_text(layout)
    assert REPO_PASSWORD not in events_text(fresh)


def test_the_daily_backup_is_sent_to_restic(tmp_path: Path) -> None:
    require_program("restic")
    layout = make_box(tmp_path / "data")
    repo = tmp_path / "repo"

    async def daily() -> tuple[str, list[backup_restic.Snapshot]]:
        db = await Database.open(layout.db)
        try:
            events = EventLog(db)
            await backup.make_key(db, events, "box")
            await backup_restic.configure(db, events, str(repo), REPO_PASSWORD)
            jobs = backup.BackupJobs()
            scheduler = backup.Scheduler(db, events, layout, jobs)
            await scheduler.run_once(await backup.read_schedule(db))
            last = await db.get_setting(backup.LAST_SETTING) or ""
            return last, await backup_restic.list_snapshots(db)
        finally:
            await db.close()

    last, snapshots = asyncio.run(daily())
    assert "sent to the restic repository" in last
    [snap] = snapshots
    assert snap.id in last
    [made] = backup.list_backups(layout.backups)
    assert snap.paths[0].endswith(made.path.name)
