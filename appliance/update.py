"""letterbox-update: move the box to a newer Letterbox, keep its data, and roll back if it does not come up.

Run as root by `/usr/local/sbin/letterbox-update BUNDLE` (or `--incoming` for a bundle uploaded in the
console, started by letterbox-update.path). A bundle is `letterbox-bundle-<version>-<machine>.tar`, built
by `make bundle` (appliance/bundle.py); a bare Letterbox wheel works too when the box can reach PyPI.

The layout the image, install.sh, letterbox.service and this module share:

    /opt/letterbox/venv              symlink to the venv in force
    /opt/letterbox/venv-<version>/   one complete venv per installed version (the last two are kept)
    /var/lib/letterbox/data/         the data directory (owned by the `letterbox` user)
    DATA/updates/incoming.tar        a bundle uploaded in the console, waiting for this program
    DATA/updates/status.json         the outcome of the last update, shown in the console
    DATA/updates/before-<version>/   the database as it was before the update to <version>

The steps, each one reversible until the new version has answered:
1. check the bundle (appliance/bundle.py: sizes, names, SHA-256 of every wheel) and its version (newer
   than the running one; `--allow-downgrade` to go back on purpose, which only works while the schema
   did not change);
2. install it into a NEW venv, /opt/letterbox/venv-<version>, from the bundle's wheels only (no network,
   binary wheels only: pip unpacks them and runs none of their code as root), and check that it runs
   (`letterbox --version`, as the `letterbox` user). When the venv in force holds exactly the bundle's
   dependencies (names and versions) for the same Python, the new venv is a copy of it with only the
   Letterbox wheel installed over it (`Updater._install_beside`); otherwise every wheel is installed;
3. take a backup with the running version (`letterbox backup create`, as the `letterbox` user) when the
   box has a backup key; without one this is said and only step 5's snapshot is taken;
4. stop the service;
5. copy the database aside (DATA/updates/before-<version>/): migrations run when the new version
   starts (appliance/db.py), and the old version refuses a database newer than itself;
6. switch the symlink in one rename (a new symlink renamed over the old one);
7. start the service and wait until it is active (Type=notify: READY=1 once every port serves) and its
   web port answers;
8. if it does not within the time allowed: stop it, switch the symlink back, put the database copy back
   when its schema changed, start the old version again, and exit 1 with the reason.
The old venv stays for a manual rollback (`ln -sfn venv-OLD /opt/letterbox/venv.new && mv -T ...`).

Tests (tests/integration/test_update.py) run all of it with real venvs in a temporary prefix and a real
`letterbox serve` behind a small service manager of their own (tests/support/service_manager.py), which
speaks sd_notify as systemd does; `--systemctl` and `--user ''` are there for them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import http.client
import json
import os
import pwd
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from appliance.durable import fsync_dir, fsync_file, replace_file
from appliance.version import running_version as running_version  # moved there; re-exported

# The bundle reader (tarfile) is imported where a bundle is installed: the box imports this module at
# every start for read_status (the last update's outcome), and never installs anything itself.
if TYPE_CHECKING:
    from packaging.version import Version

    from appliance.bundle import BundleInfo

DEFAULT_PREFIX = Path("/opt/letterbox")
DEFAULT_DATA = Path("/var/lib/letterbox/data")
UPDATES = "updates"
INCOMING = "incoming.tar"
STATUS = "status.json"
DB_FILES = ("letterbox.db", "letterbox.db-wal")
NO_SPACE_HINT = ": the disk is full; free some space (or wait for a first boot to finish growing the disk) and try again"
# appliance/backup.py RECIPIENT_SETTING, not imported: that module imports the backup's whole machinery.
BACKUP_KEY_SETTING = "backup_recipient"
KEEP_VENVS = 2  # the one in force and the one before it
HEALTH_POLL = 0.5
# How long the box in force has to record the outcome itself (appliance/update_outcome.py looks every
# 0.5 s) before `letterbox update status` does it for a version without that follower.
RECORDED_WAIT = 20.0
INSTALL_TIMEOUT = 3600.0  # pip unpacks and byte-compiles ~40 wheels: minutes under TCG (more than 5 seen)
BACKUP_TIMEOUT = 6 * 3600.0  # a backup streams every message: a large box on a Pi takes a while


class UpdateError(Exception):
    """The update did not happen (or was rolled back); one line for a person."""


@dataclass
class Options:
    prefix: Path = DEFAULT_PREFIX
    data: Path = DEFAULT_DATA
    service: str = "letterbox"
    systemctl: Sequence[str] = ("systemctl",)
    user: str = "letterbox"  # runs the new code and the backup; '' = as whoever runs this (tests)
    python: str = "/usr/bin/python3"
    health_url: str = "http://127.0.0.1:80/"
    timeout: float = 900.0  # as letterbox.service's TimeoutStartSec: a VM under TCG starts slowly
    allow_downgrade: bool = False
    say: Callable[[str], None] = field(default=print)


def version_key(version: str) -> Version | None:
    """The version in PEP 440's order (packaging's: epochs, X.devN < X.aN < X.bN < X.rcN < X < X.postN,
    pre-releases of dev releases...); None when it is no PEP 440 version (then any order is allowed).
    A release candidate of 1.0.0 was taken for newer than a running 1.0.1 when only plain numbers were
    compared, and a hand-made parser left '1.0rc1.dev2' and epochs unordered."""
    from packaging.version import InvalidVersion, Version  # (imported when a bundle is looked at)

    try:
        return Version(version)
    except InvalidVersion:
        return None


def is_newer(candidate: str, running: str) -> bool:
    a, b = version_key(candidate), version_key(running)
    if a is None or b is None:
        return candidate != running
    if version_key(a.public) == version_key(b.public):
        # the same release ('1.0' is '1.0.0'); built apart (another +local label), either may replace the other
        return a.local != b.local
    return a > b


def venv_dir(prefix: Path, version: str) -> Path:
    return prefix / f"venv-{version}"


def current_venv(prefix: Path) -> Path | None:
    link = prefix / "venv"
    return link.resolve() if link.is_symlink() or link.is_dir() else None


def venv_version(venv: Path) -> str:
    """The version a venv directory holds: `venv-<version>` by name."""
    return venv.name.removeprefix("venv-") if venv.name.startswith("venv-") else "unknown"


def read_status(data_root: Path) -> dict[str, Any] | None:
    """The last update's outcome (for the console); None when there was none or it cannot be read."""
    try:
        value = json.loads((data_root / UPDATES / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def mark_recorded(data_root: Path, status: dict[str, Any]) -> None:
    """The running box has put the outcome into its events (Admin.record_update_outcome)."""
    _replace_status(data_root / UPDATES / STATUS, {**status, "recorded": True})


def _replace_status(path: Path, status: dict[str, Any], prepare: Callable[[Path], None] | None = None) -> None:
    """status.json replaced durably: after a power cut it is the old one or this one, never empty (the box
    then read no outcome, or recorded it a second time). A name of its own for each write: the box and
    letterbox-update (root) may write it at once."""
    replace_file(path, json.dumps(status).encode("utf-8"), tmp=path.with_name(f".{STATUS}.{secrets.token_hex(4)}"),
                 prepare=prepare)


def copy_plain(src: Path, dst: Path) -> None:
    """shutil.copy2 for root in the box user's directories: `src` only when it is a plain file, never a
    link to one (the box's user made DATA/letterbox.db, or the database copy in DATA/updates, a link to
    /etc/shadow, and root copied that where the box's user reads it), and `dst` made new, never through a
    link. UpdateError otherwise."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UpdateError(f"{src} is a link, not a file of the box's: not copied") from None
        raise
    with os.fdopen(fd, "rb") as source:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UpdateError(f"{src} is not a plain file: not copied")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(out, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


def switch_link(prefix: Path, target: Path) -> None:
    """Point PREFIX/venv at `target` in one step: a new symlink renamed over the old one."""
    tmp = prefix / f".venv-{secrets.token_hex(4)}"
    os.symlink(target.name, tmp)
    os.replace(tmp, prefix / "venv")
    fsync_dir(prefix)


class Updater:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.updates = opts.data / UPDATES

    # --- small helpers -------------------------------------------------------------------------------

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.o.user and os.geteuid() == 0 and pwd.getpwnam(self.o.user).pw_uid != 0:
            return ["runuser", "-u", self.o.user, "--", *argv]
        return argv

    def _run(self, argv: Sequence[str], what: str, *, timeout: float | None = None) -> str:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout or self.o.timeout, check=False)  # noqa: S603  fixed argv of our own programs
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateError(f"{what}: {exc}") from None
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise UpdateError(f"{what}: {detail[0][:300]}")
        return done.stdout

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.o.systemctl, *args]
        try:
            # systemd gives up on a start after TimeoutStartSec and fails it; this is only a backstop.
            return subprocess.run(argv, capture_output=True, text=True, check=False,  # noqa: S603  the service manager
                                  timeout=self.o.timeout + 60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(argv, 1, "", str(exc))

    def _give(self, path: Path) -> None:
        """Files this program (root) writes into the data directory belong to the box's user. Never through
        a link: the box's user owns these directories and made DATA/updates a link to /etc, which root
        then gave it (a garbage incoming.tar was enough to have the failure written there)."""
        st = self.o.data.stat()
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)

    def _updates_dir(self) -> Path:
        """DATA/updates as a directory of the box's user: a link the box's user put in its place is
        removed rather than followed."""
        if self.updates.is_symlink():
            self.updates.unlink()
        self.updates.mkdir(exist_ok=True, mode=0o700)
        self._give(self.updates)
        return self.updates

    def _tell_the_box(self) -> None:
        """The outcome becomes one of the box's events (Admin.record_update_outcome). The box in force does
        it itself (appliance/update_outcome.py) and marks status.json recorded; a version without that
        follower gets `letterbox update status`, whose imports cost 4-7 s of an emulated guest's CPU. An
        older version without that command either: nothing to do."""
        deadline = time.monotonic() + RECORDED_WAIT
        while time.monotonic() < deadline:
            if (read_status(self.o.data) or {}).get("recorded"):
                return
            time.sleep(HEALTH_POLL / 2)
        letterbox = self.o.prefix / "venv" / "bin" / "letterbox"
        with contextlib.suppress(UpdateError):
            self._run(self._as_user([str(letterbox), "--data", str(self.o.data), "update", "status"]), "event", timeout=60)

    def _write_status(self, **values: Any) -> None:
        _replace_status(self._updates_dir() / STATUS, {"at": int(time.time()), **values}, self._give)

    # --- the steps -------------------------------------------------------------------------------------

    def install_venv(self, info: BundleInfo, wheels: Path, current: Path | None = None) -> Path:
        target = venv_dir(self.o.prefix, info.version)
        if target.exists():
            shutil.rmtree(target)  # a half-made venv of an earlier attempt (never the one in force)
        if current is not None and self._same_dependencies(info, current):
            try:
                return self._install_beside(info, wheels, current, target)
            except (UpdateError, OSError) as exc:  # e.g. the disk full: the whole install says so again
                self.o.say(f"the quick install did not work ({exc}); installing every wheel instead")
                shutil.rmtree(target, ignore_errors=True)
        self.o.say(f"installing Letterbox {info.version} into {target}")
        # Without ensurepip (8 s of CPU, a minute on a Pi): the pip of the version in force installs into
        # the new venv (`pip --python`), pip itself included when the bundle carries it (make bundle
        # does), so the next update finds a pip there too.
        self._run([self.o.python, "-m", "venv", "--without-pip", str(target)], "cannot make the venv")
        pip = [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "--quiet",
               "--disable-pip-version-check", "--no-warn-script-location", "--only-binary=:all:"]
        if info.machine:  # a bundle carries every wheel: no network at all
            pip += ["--no-index", "--find-links", str(wheels)]
        letterbox = next(n for n in info.wheels if n.startswith("letterbox-"))
        extra = ["pip"] if any(n.startswith("pip-") for n in info.wheels) or not info.machine else []
        self._pip_install(target, [*pip, str(wheels / letterbox), *extra], info.version)
        return target

    def _same_dependencies(self, info: BundleInfo, current: Path) -> bool:
        """Whether the venv in force holds exactly the bundle's dependencies (every wheel but Letterbox's
        and pip's, by name and version: the release's locked set) for the same Python. Only a bundle
        says what its set is; a bare wheel's dependencies come from the network."""
        if not info.machine or (current / "bin" / "python").resolve() != Path(self.o.python).resolve():
            return False
        installed = installed_distributions(current)
        wanted = wheel_distributions(info.wheels)
        return installed is not None and drop_tools(installed) == drop_tools(wanted)

    def _install_beside(self, info: BundleInfo, wheels: Path, current: Path, target: Path) -> Path:
        """The same dependencies as the venv in force: the new venv is a copy of it (the dependencies
        installed and byte-compiled as they are), paths made its own, and only Letterbox's wheel installed
        over the copy (appliance/wheel_install.py with PyPA's installer; pip with `--no-deps` when pip's own wheel changes too).
        The result is what a whole install of the bundle makes, without unpacking and compiling some 40
        wheels again (minutes under emulation or on a Pi). The venv in force is only read: it stays
        as it was for a rollback."""
        self.o.say(f"installing Letterbox {info.version} into {target} (the dependencies of {current.name} are"
                   " the bundle's: copied, only Letterbox installed)")
        self._copy_venv(current, target, links=True)
        letterbox = next(n for n in info.wheels if n.startswith("letterbox-"))
        names = [letterbox]
        pip_wheel = next((n for n in info.wheels if n.startswith("pip-")), None)
        if pip_wheel is not None and (installed_distributions(target) or {}).get("pip") != wheel_distributions([pip_wheel])["pip"]:
            names.append(pip_wheel)
        if names == [letterbox]:
            # Letterbox's wheel alone: unpacked here (appliance/wheel_install.py) rather than by pip,
            # whose own start took most of an update's minute of emulated CPU for one pure-Python wheel.
            from appliance import wheel_install

            try:
                wheel_install.install(wheels / letterbox, target)
            except (wheel_install.WheelError, OSError, ValueError) as exc:
                self.o.say(f"installing {letterbox} without pip did not work ({exc}); pip installs it")
            else:
                self._check_new_venv(target, info.version)
                return target
        # pip writes where it likes: it gets a copy of its own, with no file shared with the venv in force.
        shutil.rmtree(target)
        self._copy_venv(current, target, links=False)
        pip = [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "--quiet",
               "--disable-pip-version-check", "--no-warn-script-location", "--only-binary=:all:", "--no-index",
               "--no-deps", *(str(wheels / name) for name in names)]
        self._pip_install(target, pip, info.version)
        return target

    def _copy_venv(self, current: Path, target: Path, *, links: bool) -> None:
        """The venv in force copied to `target`, its paths made the copy's. links=True: hard links
        (`cp -al`), for appliance/wheel_install.py, which never writes into a file it did not make
        (the old version's files are removed first, and `installer` refuses to write over a file that
        exists; byte-code is written by rename, as own_paths does): the
        venv in force keeps every byte for a rollback. A copy of the 56 MB and 3,445 files took 121 s in
        the image's VM under TCG (load 7), links take seconds. Where links cannot be made (another file
        system), and for pip, a plain copy."""
        # cp, not shutil.copytree: some 4,000 files, each copied with its times and mode; Python's loop took
        # minutes of an emulated VM's CPU where cp takes seconds.
        if links:
            try:
                self._run(["cp", "-al", "--", str(current), str(target)], "cannot link the venv in force",
                          timeout=INSTALL_TIMEOUT)
            except UpdateError as exc:
                self.o.say(f"{exc}; copying it instead")
                shutil.rmtree(target, ignore_errors=True)
            else:
                own_paths(target, current)
                return
        self._run(["cp", "-a", "--", str(current), str(target)], "cannot copy the venv in force", timeout=INSTALL_TIMEOUT)
        own_paths(target, current)

    def _pip_install(self, target: Path, argv: list[str], version: str) -> None:
        """Run pip into `target` and check that the new version runs; the venv is removed if not."""
        try:
            self._run(argv, "cannot install the bundle", timeout=INSTALL_TIMEOUT)
        except UpdateError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        self._check_new_venv(target, version)

    def _check_new_venv(self, target: Path, version: str) -> None:
        """The new venv's `letterbox --version` says `version`; the venv is removed if not."""
        try:
            # The time a start has (900 s by default), not 2 minutes: `letterbox --version` imports the
            # command line's modules, and in a VM under TCG on a busy host the box's first start spent
            # almost 5 minutes importing (image test, load 14).
            out = self._run(self._as_user([str(target / "bin" / "letterbox"), "--version"]),
                            "the new version does not run")
        except UpdateError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        if out.split()[-1:] != [version]:
            shutil.rmtree(target, ignore_errors=True)
            raise UpdateError(f"the installed version says {out.strip()[:80]!r}, not {version}")

    def backup(self, current: Path) -> str:
        """A backup with the running version, when the box has a backup key."""
        if not has_backup_key(self.o.data / "letterbox.db"):
            self.o.say("no backup key on this box (console -> Backups): no backup made; the database is"
                       " copied aside before the update instead")
            return ""
        try:
            out = self._run(self._as_user([str(current / "bin" / "letterbox"), "--data", str(self.o.data),
                                           "backup", "create"]), "backup", timeout=BACKUP_TIMEOUT)
        except UpdateError as exc:
            if "no backup key" in str(exc):
                self.o.say("no backup key on this box (console -> Backups): no backup made; the database is"
                           " copied aside before the update instead")
                return ""
            raise UpdateError(f"the backup before the update failed, nothing was changed: {exc}") from None
        path = out.split("\t")[0].strip()
        self.o.say(f"backup made: {path}")
        return path

    def snapshot_db(self, version: str) -> Path:
        """The database (service stopped, so the files are consistent) copied to before-<version>/."""
        snap = self._updates_dir() / f"before-{version}"
        if snap.is_symlink():
            snap.unlink()
        shutil.rmtree(snap, ignore_errors=True)
        snap.mkdir(mode=0o700)
        self._give(snap)
        for name in DB_FILES:
            src = self.o.data / name
            if src.exists() or src.is_symlink():
                copy_plain(src, snap / name)
                self._give(snap / name)
        return snap

    def restore_db(self, snap: Path, failed_version: str) -> None:
        """The copy in `snap` becomes the database again; the migrated one is kept aside. Every step
        leaves a whole database in place: the migrated one, or it without its WAL, or the copy without
        its WAL, or the copy. The migrated files were moved aside first, so a kill between that and
        the copy's arrival left no database, and the box started as a new one, at the setup wizard
        (anyone on the network its first administrator). A WAL never meets another database's file."""
        kept = self._updates_dir() / f"failed-{failed_version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        kept.mkdir(mode=0o700)
        self._give(kept)
        data = self.o.data
        db, wal = (data / name for name in DB_FILES)
        copies: dict[str, Path] = {}
        for name in DB_FILES:  # the copy beside the live files first, whole and on disk
            if (snap / name).exists() or (snap / name).is_symlink():
                tmp = data / f".{name}.{secrets.token_hex(4)}"
                copy_plain(snap / name, tmp)
                self._give(tmp)
                fsync_file(tmp)
                copies[name] = tmp
        for name in (*DB_FILES, "letterbox.db-shm"):  # the migrated files kept, still in place
            live = data / name
            if live.exists():
                try:
                    os.link(live, kept / name)
                except OSError:
                    copy_plain(live, kept / name)
        fsync_dir(kept)
        for stale in (data / "letterbox.db-shm", wal):  # the migrated WAL must not meet the copy
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        fsync_dir(data)
        if DB_FILES[0] in copies:
            os.replace(copies[DB_FILES[0]], db)
            fsync_dir(data)
        if DB_FILES[1] in copies:
            os.replace(copies[DB_FILES[1]], wal)
            fsync_dir(data)
        self.o.say(f"database put back as it was before the update (the migrated one is kept in {kept})")

    def start_and_wait(self) -> str | None:
        """Start the service; None once it is active and its web port answers, else the reason."""
        started = self._systemctl("start", self.o.service)
        if started.returncode != 0:
            return f"the service did not start ({(started.stderr or started.stdout).strip()[:200] or started.returncode})"
        deadline = time.monotonic() + self.o.timeout
        reason = "no answer"
        while time.monotonic() < deadline:
            state = self._systemctl("is-active", self.o.service).stdout.strip()
            if state in ("failed", "inactive"):
                return f"the service is {state}"
            if state == "active":
                answer = http_answers(self.o.health_url)
                if answer is None:
                    return None
                reason = answer
            time.sleep(HEALTH_POLL)
        return f"the web port did not answer within {self.o.timeout:.0f} s ({reason})"

    # --- the whole update ------------------------------------------------------------------------------

    def run(self, bundle: Path) -> str:
        """Install `bundle` and switch to it; returns the version now running. UpdateError otherwise
        (with everything as it was, or rolled back)."""
        current = current_venv(self.o.prefix)
        if current is None:
            raise UpdateError(f"no Letterbox installed under {self.o.prefix} (run install.sh first)")
        running = venv_version(current)
        from appliance.bundle import BundleError, inspect

        with tempfile.TemporaryDirectory(prefix=".update-", dir=self.o.prefix) as work:
            wheels = Path(work)
            try:
                info = inspect(bundle, into=wheels)
            except BundleError as exc:
                raise UpdateError(str(exc)) from None
            except OSError as exc:  # the disk full (a first boot still growing the root, a full SD card)
                raise UpdateError(f"cannot unpack the bundle into {self.o.prefix}: {exc.strerror}{_no_space_hint(exc)}; nothing was changed"
                                  ) from None
            if info.machine and info.machine != os.uname().machine:
                raise UpdateError(f"this bundle is for {info.machine}; this box is {os.uname().machine}")
            if info.version == running:
                raise UpdateError(f"Letterbox {running} is already running")
            if not is_newer(info.version, running) and not self.o.allow_downgrade:
                raise UpdateError(f"{info.version} is older than the running {running} (--allow-downgrade to go back)")
            self._write_status(state="running", version=info.version, previous=running, message="installing")
            try:
                target = self.install_venv(info, wheels, current)
            except UpdateError as exc:
                self._write_status(state="failed", version=info.version, previous=running, message=str(exc))
                raise
        try:
            self.backup(current)
        except UpdateError as exc:
            self._write_status(state="failed", version=info.version, previous=running, message=str(exc))
            raise
        return self._switch(current, target, info.version, running)

    def _switch(self, current: Path, target: Path, version: str, running: str) -> str:
        self.o.say(f"stopping Letterbox {running}")
        self._systemctl("stop", self.o.service)
        snap = self.snapshot_db(version)
        schema_before = schema_version(snap / "letterbox.db")
        switch_link(self.o.prefix, target)
        self.o.say(f"starting Letterbox {version}")
        problem = self.start_and_wait()
        if problem is None:
            self._write_status(state="done", version=version, previous=running,
                               message=f"updated from {running} to {version}")
            self._tell_the_box()
            self.prune(keep={target, current})
            self.o.say(f"Letterbox {version} is running (the previous version stays in {current})")
            return version
        self.o.say(f"Letterbox {version} did not come up: {problem}; going back to {running}")
        self._systemctl("stop", self.o.service)
        switch_link(self.o.prefix, current)
        if schema_version(self.o.data / "letterbox.db") != schema_before:
            self.restore_db(snap, version)
        back = self.start_and_wait()
        message = f"{version} did not come up ({problem}); rolled back to {running}"
        if back is not None:
            message += f", which did not come up either: {back}"
        self._write_status(state="failed", version=version, previous=running, message=message)
        self._tell_the_box()
        raise UpdateError(message)

    def prune(self, keep: set[Path]) -> None:
        """Only the venv in force and the one before it stay; only the newest database copy stays."""
        for venv in self.o.prefix.glob("venv-*"):
            if venv.resolve() not in keep and venv.is_dir() and not venv.is_symlink():
                shutil.rmtree(venv, ignore_errors=True)
        snaps = sorted(self.updates.glob("before-*"), key=lambda p: p.stat().st_mtime)
        for old in snaps[:-1]:
            shutil.rmtree(old, ignore_errors=True)


def _project(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): 'Argon2_CFFI' -> 'argon2-cffi'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distributions(names: Iterable[str]) -> dict[str, str]:
    """Project -> version of wheel file names (PEP 427: name-version-...)."""
    return {_project(name.split("-")[0]): name.split("-")[1] for name in names if name.endswith(".whl")}


def installed_distributions(venv: Path) -> dict[str, str] | None:
    """Project -> version of what a venv holds (its `*.dist-info` folders, as pip writes them), None when
    it has no site-packages for the Python running this (another Python's venv is never reused)."""
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not site.is_dir():
        return None
    found: dict[str, str] = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").rpartition("-")
        found[_project(name)] = version
    return found


def drop_tools(distributions: dict[str, str]) -> dict[str, str]:
    """The release's own dependencies: without Letterbox itself and the installer (pip)."""
    return {name: version for name, version in distributions.items() if name not in ("letterbox", "pip")}


def own_paths(venv: Path, copied_from: Path) -> None:
    """A copied venv names its old place in its scripts' first lines (#!/opt/letterbox/venv-OLD/bin/python)
    and in its activate scripts and pyvenv.cfg: each names the copy instead."""
    old, new = os.fsencode(copied_from), os.fsencode(venv)
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            # A new file put in place, never a write into this one: it may be a hard link to the file
            # of the venv it was copied from (Updater._copy_venv).
            fresh = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            fresh.write_bytes(data.replace(old, new))
            shutil.copymode(path, fresh)
            os.replace(fresh, path)


def _read_row(db: Path, query: str) -> tuple[Any, ...] | None:
    """One row of `query` on a database file, read so that nothing is created next to it (root must not
    leave a -shm or -wal the box's user cannot open); None when the file, the table or the row is not
    there. Without a -wal no connection has the file open (SQLite removes it at the last close), so
    it is read as immutable; with the -wal and -shm of the running box it is opened read-only, which
    uses them and creates nothing. Only a -wal left without its -shm (a crash) is read from a copy,
    as it always was before: at 100k messages the full-text index makes that copy some 300 MB."""
    if not db.exists():
        return None
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if not wal.exists():
        return _query(f"{db.resolve().as_uri()}?immutable=1", query)
    if shm.exists():
        return _query(f"{db.resolve().as_uri()}?mode=ro", query)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "db"
        shutil.copy2(db, copy)
        shutil.copy2(wal, Path(tmp) / "db-wal")
        return _query(str(copy), query)


def _query(uri: str, query: str) -> tuple[Any, ...] | None:
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return None
    try:
        row: tuple[Any, ...] | None = conn.execute(query).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return row


def schema_version(db: Path) -> int:
    """The schema version of a database file."""
    row = _read_row(db, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(row[0]) if row else 0


def has_backup_key(db: Path) -> bool:
    """Whether the box has a backup key (the public half, a setting): without one `letterbox backup
    create` can only say so, after importing Letterbox (28 s of a VM's CPU under TCG)."""
    row = _read_row(db, f"SELECT value FROM settings WHERE key = '{BACKUP_KEY_SETTING}'")  # noqa: S608  a constant
    return bool(row and row[0])


def http_answers(url: str, timeout: float = 5.0) -> str | None:
    """None when an HTTP server answers at `url` (any status: the box's port 80 redirects), else why not."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException) as exc:
        return str(exc) or exc.__class__.__name__
    finally:
        conn.close()
    return None


@contextlib.contextmanager
def _one_at_a_time(prefix: Path) -> Iterator[None]:
    fd = os.open(prefix / ".update.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpdateError("another update is running") from None
        yield
    finally:
        os.close(fd)


def take_incoming(opts: Options, into: Path) -> Path | None:
    """Move an uploaded bundle out of the box's reach (the box's user owns DATA/updates) before checking
    it; None when there is none."""
    src = opts.data / UPDATES / INCOMING
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        os.unlink(src)
        raise UpdateError(f"the uploaded bundle cannot be read: {exc.strerror}") from None
    dest = into / INCOMING
    with os.fdopen(fd, "rb") as f, open(dest, "wb") as out:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UpdateError("the uploaded bundle is not a plain file")
        shutil.copyfileobj(f, out)
    os.unlink(src)
    return dest


def _no_space_hint(exc: OSError) -> str:
    """What to do, when the error is a full disk; '' for any other."""
    return NO_SPACE_HINT if exc.errno == errno.ENOSPC else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="letterbox-update", description="Install a newer Letterbox, keeping the data.")
    parser.add_argument("bundle", nargs="?", help="letterbox-bundle-VERSION-MACHINE.tar (or a letterbox wheel)")
    parser.add_argument("--incoming", action="store_true", help="install the bundle uploaded in the console, if any")
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--service", default="letterbox")
    parser.add_argument("--systemctl", default="systemctl", help="the service manager command (tests)")
    parser.add_argument("--user", default="letterbox", help="the box's user ('' = the caller, for tests)")
    parser.add_argument("--python", default="/usr/bin/python3", help="the Python the new venv is made from")
    parser.add_argument("--health-url", default="http://127.0.0.1:80/")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the new version has to answer")
    parser.add_argument("--allow-downgrade", action="store_true")
    args = parser.parse_args(argv)
    if not args.bundle and not args.incoming:
        parser.error("give a BUNDLE or --incoming")
    opts = Options(prefix=args.prefix, data=args.data, service=args.service, systemctl=args.systemctl.split(),
                   user=args.user, python=args.python, health_url=args.health_url, timeout=args.timeout,
                   allow_downgrade=args.allow_downgrade, say=lambda line: print(f"letterbox-update: {line}", flush=True))
    os.umask(0o022)  # the venvs are readable by the box's user, writable by root only
    try:
        with _one_at_a_time(opts.prefix), tempfile.TemporaryDirectory(prefix=".incoming-", dir=opts.prefix) as tmp:
            bundle = take_incoming(opts, Path(tmp)) if args.incoming else Path(args.bundle)
            if bundle is None:
                print("letterbox-update: no uploaded bundle waiting")
                return 0
            try:
                Updater(opts).run(bundle)
            except UpdateError as exc:
                if args.incoming:  # the console shows why
                    with contextlib.suppress(OSError):
                        if (read_status(opts.data) or {}).get("state") != "failed":
                            Updater(opts)._write_status(state="failed", version="", previous="", message=str(exc))
                raise
    except UpdateError as exc:
        print(f"letterbox-update: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # one line, never a traceback: e.g. the disk full while the upload is taken in
        print(f"letterbox-update: {exc.strerror} ({exc.filename or opts.prefix}){_no_space_hint(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
