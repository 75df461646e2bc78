"""restic as an optional off-box target for backups (issue 14).

restic (Debian package `restic`) keeps deduplicated, encrypted snapshots in a repository on a local
path, SFTP, S3, a REST server and more; here it receives the backup files the box makes (already
encrypted with age: restic's own encryption is a second layer, its deduplication still finds the
unchanged parts of the age file only by chance, so each snapshot costs about one backup's size).

The repository and its password are settings, kept like the backup key's public half: in the box's
database, shown to administrators only (the password never, once set). Neither ever goes into a log
line, an event, an URL or a command line: restic gets both through its environment
(RESTIC_REPOSITORY, RESTIC_PASSWORD), which only the box's own user can read.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.backup import BackupError

if TYPE_CHECKING:
    from appliance.db import Database
    from appliance.events import EventLog

REPO_SETTING = "backup_restic_repo"
PASSWORD_SETTING = "backup_restic_password"  # noqa: S105  the name of a setting, not a password
TAG = "letterbox"
TIMEOUT = 6 * 3600  # one off-box copy of a large backup over a slow link


@dataclass(frozen=True)
class Target:
    repo: str
    password: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    time: str
    paths: list[str]


def _restic() -> str:
    found = shutil.which("restic")
    if found is None:
        raise BackupError("restic is not installed (Debian package 'restic')")
    return found


def _run(target: Target, *args: str, stdout: int | None = subprocess.PIPE, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
    env.update(RESTIC_REPOSITORY=target.repo, RESTIC_PASSWORD=target.password)
    result = subprocess.run([_restic(), *args], env=env, stdout=stdout,  # noqa: S603  restic, fixed arguments
                            stderr=subprocess.PIPE, cwd=cwd, timeout=TIMEOUT, check=False)
    if check and result.returncode != 0:
        raise BackupError(f"restic: {_last_line(result.stderr)}")
    return result


def _last_line(err: bytes) -> str:
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "failed"


def open_or_init(target: Target) -> bool:
    """True when the repository was made now; a repository that exists must open with the password."""
    probe = _run(target, "cat", "config", check=False, stdout=subprocess.DEVNULL)
    if probe.returncode == 0:
        return False
    text = probe.stderr.decode("utf-8", "replace").lower()
    if "wrong password" in text or "no key found" in text:
        raise BackupError("restic: the password does not open this repository")
    _run(target, "init")
    return True


def send(target: Target, file: Path) -> str:
    """One snapshot holding `file`; returns its id."""
    result = _run(target, "backup", "--json", "--tag", TAG, file.name, cwd=file.parent)
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("message_type") == "summary":
            return str(item.get("snapshot_id", ""))[:8]
    raise BackupError("restic: no snapshot was reported")


def snapshots(target: Target) -> list[Snapshot]:
    result = _run(target, "snapshots", "--json", "--tag", TAG)
    items = json.loads(result.stdout or b"[]")
    return [Snapshot(str(s.get("short_id") or s["id"][:8]), str(s.get("time", ""))[:19], list(s.get("paths", [])))
            for s in items]


def fetch(target: Target, snapshot: str, into: Path) -> Path:
    """The backup file of a snapshot, written into the folder `into` under its own name."""
    found = next((s for s in snapshots(target) if s.id == snapshot or s.id.startswith(snapshot)), None)
    if found is None or not found.paths:
        raise BackupError(f"restic: no Letterbox snapshot {snapshot}")
    name = Path(found.paths[0]).name  # sent by its bare name, so it sits at the snapshot's root
    into.mkdir(parents=True, exist_ok=True)
    out = into / name
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _run(target, "dump", found.id, "/" + name, stdout=fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        out.unlink(missing_ok=True)
        raise
    os.close(fd)
    return out


# --- the use-cases the CLI and the web share ---------------------------------------------------

async def read_target(db: Database) -> Target | None:
    repo = await db.get_setting(REPO_SETTING) or ""
    password = await db.get_setting(PASSWORD_SETTING) or ""
    return Target(repo, password) if repo and password else None


async def configure(db: Database, events: EventLog, repo: str, password: str) -> bool:
    """Set (made if new, else opened with the password) or, with an empty repo, forget the target.
    Returns True when a new repository was made."""
    repo = repo.strip()
    if not repo:
        await db.set_setting(REPO_SETTING, "")
        await db.set_setting(PASSWORD_SETTING, "")
        await events.record("backup", "restic copies off")
        return False
    if not password:
        raise BackupError("the restic repository needs a password")
    if "\n" in repo or "\0" in repo:
        raise BackupError("that is not a restic repository")
    made = await asyncio.to_thread(open_or_init, Target(repo, password))
    await db.set_setting(REPO_SETTING, repo)
    await db.set_setting(PASSWORD_SETTING, password)
    # The repository may carry credentials (rest:https://user:pass@...): the event does not name it.
    await events.record("backup", "restic repository " + ("made and set" if made else "set")
                        + " for off-box copies of the backups")
    return made


async def send_file(db: Database, events: EventLog, file: Path) -> str:
    target = await read_target(db)
    if target is None:
        raise BackupError("no restic repository is set")
    if not await asyncio.to_thread(file.is_file):
        raise BackupError(f"no such backup: {file}")
    snapshot = await asyncio.to_thread(send, target, file)
    await events.record("backup", f"{file.name} sent to the restic repository (snapshot {snapshot})")
    return snapshot


async def list_snapshots(db: Database) -> list[Snapshot]:
    target = await read_target(db)
    if target is None:
        raise BackupError("no restic repository is set")
    return await asyncio.to_thread(snapshots, target)


async def fetch_file(db: Database, events: EventLog, snapshot: str, into: Path) -> Path:
    target = await read_target(db)
    if target is None:
        raise BackupError("no restic repository is set")
    out = await asyncio.to_thread(fetch, target, snapshot, into)
    await events.record("backup", f"{out.name} fetched from the restic repository (snapshot {snapshot})")
    return out
