"""letterbox-update for real: venvs under a temporary prefix, a real `letterbox serve` started, stopped and
restarted through a service manager that speaks sd_notify as systemd does (tests/support/service_manager),
and the real image script image/overlay/usr/local/sbin/letterbox-update.

Three releases of this checkout (tests/support/releases.py): 1.0.0 is installed and holds data (a
mailbox with a delivered message, made with the current schema); 1.0.2 adds a migration and then cannot
start (rolled back: old venv, the database copy put back, the old box serving the same mail); 1.0.1
adds a migration and starts (the data from 1.0.0's older schema is migrated and still served).
The bundles are built once for the file; each test installs 1.0.0 on a prefix and data of its own, so
either runs alone or in any order (they shared one prefix and passed only in file order: the good
update run first left 1.0.1 and a backup key behind, and the failed one then rolled back to 1.0.1).
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bundle import write_bundle
from appliance.db import load_migrations
from tests.conftest import pick_port_offset
from tests.support import service_manager
from tests.support.releases import BROKEN_START, ROOT, build_wheel, dependency_wheels, extra_wheel
from tests.support.tls_probe import unverified_context

pytestmark = [pytest.mark.slow(seconds=300), pytest.mark.timeout(600)]

UPDATE_SCRIPT = ROOT / "image" / "overlay" / "usr" / "local" / "sbin" / "letterbox-update"
ADDRESS = "alice@example.test"
PASSWORD = "a long update passphrase"
NEXT = len(load_migrations()) + 1
PROBE_MIGRATION = {f"{NEXT:04d}_update_probe.sql": "CREATE TABLE update_probe (note TEXT NOT NULL);\n"
                                                  "INSERT INTO update_probe VALUES ('made by the update');\n"}



@dataclass
class Installed:
    prefix: Path
    data: Path
    state: Path
    offset: int
    bundles: dict[str, Path]

    def port(self, standard: int) -> int:
        return standard + self.offset

    def update(self, version: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LETTERBOX_PREFIX": str(self.prefix), "PIP_NO_COMPILE": "1"}
        return subprocess.run(
            [str(UPDATE_SCRIPT), str(self.bundles[version]), "--data", str(self.data), "--user", "",
             "--python", _system_python(),
             "--systemctl", " ".join(service_manager.command(self.state)),
             "--health-url", f"http://127.0.0.1:{self.port(80)}/", "--timeout", "120"],
            capture_output=True, text=True, env=env, timeout=500, check=False)

    def letterbox(self, *args: str, stdin: str = "") -> str:
        done = subprocess.run([str(self.prefix / "venv" / "bin" / "letterbox"), "--data", str(self.data), *args],
                              input=stdin, capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    def events(self) -> list[str]:
        conn = sqlite3.connect(f"file:{self.data / 'letterbox.db'}?mode=ro", uri=True)
        try:
            return [str(row[0]) for row in conn.execute("SELECT text FROM events WHERE kind = 'update'")]
        finally:
            conn.close()

    def schema(self) -> int:
        conn = sqlite3.connect(f"file:{self.data / 'letterbox.db'}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])
        finally:
            conn.close()


def _system_python() -> str:
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def _make_venv(prefix: Path, version: str, wheels: Path) -> Path:
    venv = prefix / f"venv-{version}"
    subprocess.run([_system_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), "--only-binary=:all:",
                    str(wheels / f"letterbox-{version}-py3-none-any.whl"), "pip"],
                   check=True, timeout=300, env={**os.environ, "PIP_NO_COMPILE": "1"})
    return venv


@dataclass(frozen=True)
class Releases:
    root: Path
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("update")
    deps = dependency_wheels()
    bundles = {}
    for version, extra, patches in (("1.0.0", {}, {}), ("1.0.1", PROBE_MIGRATION, {}),
                                    ("1.0.2", PROBE_MIGRATION, BROKEN_START)):
        wheels = root / f"wheels-{version}"
        shutil.copytree(deps, wheels, ignore=shutil.ignore_patterns(".complete"))
        build_wheel(wheels, version, migrations=extra, patches=patches)
        if version == "1.0.2":  # a dependency set unlike 1.0.0's: every wheel installed, not the quick path
            extra_wheel(wheels, "letterbox_probe_dependency", "1.0")
        bundles[version] = write_bundle(wheels, root / "bundles")
    return Releases(root, bundles)


@pytest.fixture
def installed(releases: Releases, tmp_path: Path) -> Iterator[Installed]:
    """1.0.0 installed and serving, holding a mailbox and a message: for one test alone."""
    prefix = tmp_path / "opt"
    prefix.mkdir()
    venv = _make_venv(prefix, "1.0.0", releases.root / "wheels-1.0.0")
    os.symlink(venv.name, prefix / "venv")
    box = Installed(prefix, tmp_path / "var" / "data", tmp_path / "service", 0, releases.bundles)
    box.letterbox("domain", "add", "example.test")
    box.letterbox("user", "add", ADDRESS, "--password-stdin", stdin=PASSWORD + "\n")
    for _ in range(3):  # a port block found free can be taken by another program before serve binds it
        box.offset = pick_port_offset()
        # The unit's command line, through the venv symlink as in letterbox.service.
        service_manager.write_unit(box.state, [str(prefix / "venv" / "bin" / "letterbox"), "--data", str(box.data),
                                               "serve", "--listen", "127.0.0.1", "--port-offset", str(box.offset),
                                               "--hostname", "mail.example.test"])
        started = subprocess.run([*service_manager.command(box.state), "start", "letterbox"], timeout=200, check=False)
        if started.returncode == 0 or "address already in use" not in (box.state / "serve.log").read_text():
            break
    assert started.returncode == 0, (box.state / "serve.log").read_text()
    try:
        with smtplib.SMTP("127.0.0.1", box.port(25), timeout=30) as smtp:
            smtp.sendmail("bob@elsewhere.test", [ADDRESS],
                          b"From: bob@elsewhere.test\r\nSubject: kept across updates\r\n\r\nhello\r\n")
        yield box
    finally:
        subprocess.run([*service_manager.command(box.state), "stop", "letterbox"], timeout=60, check=False)


def _subjects(box: Installed) -> list[str]:
    with imaplib.IMAP4_SSL("127.0.0.1", box.port(993), ssl_context=unverified_context(), timeout=30) as imap:
        imap.login(ADDRESS, PASSWORD)
        imap.select("INBOX")
        _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [bytes(part[1]).decode().strip() for part in data if isinstance(part, tuple)]


def _status(box: Installed) -> dict[str, object]:
    value = json.loads((box.data / "updates" / "status.json").read_text())
    assert isinstance(value, dict)
    return value


def test_an_update_that_cannot_start_is_rolled_back_with_the_data(installed: Installed) -> None:
    box = installed
    schema = box.schema()
    done = box.update("1.0.2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1.0.2 did not come up" in done.stderr
    assert "only Letterbox installed" not in done.stdout  # its dependencies differ: installed from its wheels
    assert "rolled back to 1.0.0" in done.stderr
    assert "no backup key on this box" in done.stdout  # the database copy stood in for the backup
    assert os.readlink(box.prefix / "venv") == "venv-1.0.0"
    # 1.0.2 had migrated the database before failing: the copy taken before it is back.
    assert box.schema() == schema
    assert "put back" in done.stdout
    assert list((box.data / "updates").glob("failed-1.0.2-*/letterbox.db"))
    assert subprocess.run([*service_manager.command(box.state), "is-active", "letterbox"], check=False).returncode == 0
    assert box.letterbox("user", "list").startswith(ADDRESS)
    assert _subjects(box) == ["Subject: kept across updates"]
    status = _status(box)
    assert status["state"] == "failed"
    assert status["previous"] == "1.0.0"
    assert "rolled back to 1.0.0" in str(status["message"])
    assert "cannot start (update test)" in (box.state / "serve.log").read_text()
    # The old version, started again, put the outcome into the box's events.
    assert any("rolled back to 1.0.0" in text for text in box.events())


def test_an_update_migrates_the_older_data_and_keeps_the_mail(installed: Installed) -> None:
    box = installed
    kit = box.data.parent / "kit.txt"
    box.letterbox("backup", "key", "--kit-to", str(kit))
    stale = box.prefix / "venv-0.9.0"  # an older version's venv, as a box updated twice before has
    (stale / "bin").mkdir(parents=True)
    schema = box.schema()
    done = box.update("1.0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(box.prefix / "venv") == "venv-1.0.1"
    # 1.0.0's dependencies are 1.0.1's: its venv was copied and only Letterbox installed over the copy,
    # which runs its own Python and its own files (1.0.0's stay as they were, for a rollback).
    assert "only Letterbox installed" in done.stdout
    assert "without pip did not work" not in done.stdout  # unpacked by appliance/wheel_install.py
    old, new = (box.prefix / f"venv-{v}" for v in ("1.0.0", "1.0.1"))
    assert (new / "bin" / "letterbox").read_text().startswith(f"#!{new}/bin/python")
    assert (old / "bin" / "letterbox").read_text().startswith(f"#!{old}/bin/python")
    site = Path("lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    assert (new / site / "starlette" / "__init__.py").read_bytes() == (old / site / "starlette" / "__init__.py").read_bytes()
    # The copy is made of hard links (nothing written into a shared file): 1.0.0's venv runs 1.0.0 still.
    assert (new / site / "starlette" / "__init__.py").samefile(old / site / "starlette" / "__init__.py")
    assert not (new / "bin" / "letterbox").samefile(old / "bin" / "letterbox")
    assert subprocess.run([str(old / "bin" / "letterbox"), "--version"], capture_output=True, text=True,
                          check=True).stdout.split()[-1] == "1.0.0"
    assert sorted(p.name for p in (new / site).glob("letterbox-*.dist-info")) == ["letterbox-1.0.1.dist-info"]
    assert (new / site / "letterbox-1.0.1.dist-info" / "INSTALLER").read_text() == "letterbox-update\n"
    assert sorted(p.name for p in (old / site).glob("letterbox-*.dist-info")) == ["letterbox-1.0.0.dist-info"]
    assert box.letterbox("user", "list").startswith(ADDRESS)
    version = subprocess.run([str(box.prefix / "venv" / "bin" / "letterbox"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.strip() == "letterbox 1.0.1"
    # The new release's migration ran on the data 1.0.0 made, at start.
    assert box.schema() == schema + 1
    conn = sqlite3.connect(f"file:{box.data / 'letterbox.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT note FROM update_probe").fetchall() == [("made by the update",)]
    finally:
        conn.close()
    assert _subjects(box) == ["Subject: kept across updates"]
    # A backup key exists now, so a real backup was made first, and it verifies with the kit.
    backups = list((box.data / "backups").glob("letterbox-*.tar.zst.age"))
    assert len(backups) == 1, done.stdout
    box.letterbox("backup", "verify", str(backups[0]), "--key-file", str(kit))
    # The new venv has its own pip (from the bundle), which the next update runs.
    subprocess.run([str(box.prefix / "venv-1.0.1" / "bin" / "python"), "-m", "pip", "--version"], check=True,
                   capture_output=True)
    assert (box.prefix / "venv-1.0.0").is_dir()  # kept for a manual rollback
    assert not stale.exists()  # only the venv in force and the one before it stay
    status = _status(box)
    assert status["state"] == "done"
    assert status["version"] == "1.0.1"
    assert status["previous"] == "1.0.0"
    assert "updated from 1.0.0 to 1.0.1" in box.events()
    again = box.update("1.0.1")
    assert again.returncode == 1
    assert "already running" in again.stderr
    older = box.update("1.0.0")
    assert older.returncode == 1
    assert "older than the running 1.0.1" in older.stderr
