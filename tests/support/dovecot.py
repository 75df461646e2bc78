"""A private Dovecot (Debian's dovecot-imapd) for interop tests: own config, state and ports under a temp
dir, listening on 127.0.0.1 only, stopped by the PID it wrote (PEERS.md has the traps)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from tests.conftest import require_program
from tests.support.polling import process_gone, wait_until
from tests.support.ports import PORT_ATTEMPTS, PortTaken, free_ports, port_taken

START_TIMEOUT = 15.0


@contextmanager
def private_dovecot(users: dict[str, str], tls: tuple[Path, Path] | None = None) -> Iterator[PrivateDovecot]:
    """A PrivateDovecot for the `with` block, its processes and files cleaned up afterwards."""
    server = PrivateDovecot(users, tls)
    try:
        yield server
    finally:
        server.cleanup()


class PrivateDovecot:
    """Users get the uid/gid of `nobody` (Dovecot refuses uid 0 for mail). With `tls` (certificate and
    key PEM files) it also serves IMAPS on `tls_port`."""

    def __init__(self, users: dict[str, str], tls: tuple[Path, Path] | None = None) -> None:
        self.binary = require_program("dovecot")
        self.doveadm = require_program("doveadm")
        # Not under pytest's tmp_path: that is 0700 root, and Dovecot's auth and mail processes run
        # as other users that must reach the passwd file and the Maildir.
        self.root = Path(tempfile.mkdtemp(prefix="letterbox-dovecot-"))
        self.root.chmod(0o755)
        self.port, tls_port = free_ports(2)
        self.tls = tls
        self.tls_port = tls_port if tls else 0
        self.users = users
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        self.mail = self.root / "mail"
        self.conf = self.root / "dovecot.conf"
        self._pid: int | None = None
        self._started = False

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def write_config(self) -> None:
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        passwd = self.root / "passwd"
        passwd.write_text("".join(
            f"{user}:{self.secret(password)}:{self.uid}:{self.gid}::{self.mail / user}\n"
            for user, password in self.users.items()
        ))
        self.conf.write_text(f"""
base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
log_path = {self.root / "dovecot.log"}
instance_name = letterbox-test-{self.port}
listen = 127.0.0.1
protocols = {" ".join(self.protocols)}
{self._ssl_settings()}
disable_plaintext_auth = no
mail_location = maildir:{self.mail}/%u/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    port = {self.tls_port}
    ssl = {"yes" if self.tls else "no"}
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{self.extra_config()}""")

    protocols: tuple[str, ...] = ("imap",)

    @staticmethod
    def secret(password: str) -> str:
        """The passwd-file field for a user's password: a scheme and the password or its hash."""
        return "{PLAIN}" + password

    def extra_config(self) -> str:
        """More of dovecot.conf, for a subclass that serves more than IMAP."""
        return ""

    def _ssl_settings(self) -> str:
        if self.tls is None:
            return "ssl = no"
        # Dovecot reads "<path" settings as the file's content; its login processes read them as root.
        cert, key = self.tls
        return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"

    def give_mail_to_dovecot(self) -> None:
        for path in [self.mail, *self.mail.rglob("*")]:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def start(self) -> None:
        """The first start takes fresh ports when another process took one between picking and binding
        (free_ports' ports are in the ephemeral range); a restart keeps its ports."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_on_ports()
                self._started = True
                return
            except PortTaken:
                if self._started or attempt == PORT_ATTEMPTS:
                    raise
                self.port, tls_port = free_ports(2)
                self.tls_port = tls_port if self.tls else 0

    def _start_on_ports(self) -> None:
        self.write_config()
        self.give_mail_to_dovecot()
        # The master daemonizes; its output goes to a file (a pipe would be held open by the daemon).
        with (self.root / "start.log").open("wb") as out:
            started = subprocess.run([self.binary, "-c", str(self.conf)], stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, timeout=30, check=False)
        if started.returncode != 0:
            output = (self.root / "start.log").read_text(errors="replace") + " " + self.log()
            raise (PortTaken if port_taken(output) else RuntimeError)(f"dovecot exited {started.returncode}: {output}")
        pidfile = self.root / "run" / "master.pid"

        def answering() -> int | None:
            pid = self._master_pid(pidfile)
            if pid is None:
                return None
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return pid
            except OSError:
                return None

        with contextlib.suppress(AssertionError):
            self._pid = wait_until(answering, seconds=START_TIMEOUT, interval=0.05, what="dovecot answering")
            return
        self._pid = self._master_pid(pidfile)  # started but not answering: stop it before giving up
        if self._pid is not None:
            self.stop()
        raise RuntimeError(f"dovecot did not start: {self.log()}")

    @staticmethod
    def _master_pid(pidfile: Path) -> int | None:
        """The master's PID, once it has written it (the file exists, empty, for a moment before)."""
        try:
            words = pidfile.read_text().split()
        except FileNotFoundError:
            return None
        return int(words[0]) if words else None

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def doveadm_run(self, *args: str, input: bytes | None = None) -> bytes:
        result = subprocess.run([self.doveadm, "-c", str(self.conf), *args], input=input, capture_output=True,
                                timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"doveadm {' '.join(args)}: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def stop(self) -> None:
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(AssertionError):  # still there after 10 s: left to the test's cleanup
            wait_until(partial(process_gone, pid), seconds=10, interval=0.05, what="dovecot stopped")

    def copy_maildir_out(self, user: str, dest: Path) -> None:
        """Copy a user's Maildir (files only, Dovecot's index caches left behind) and own it as root."""
        shutil.copytree(self.maildir(user), dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("dovecot.index*", "dovecot.list.index*"))
        for path in [dest, *dest.rglob("*")]:
            os.chown(path, os.getuid(), os.getgid(), follow_symlinks=False)

    def copy_maildir_in(self, user: str, source: Path) -> None:
        dest = self.maildir(user)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, dest, dirs_exist_ok=True)
        self.give_mail_to_dovecot()
