"""A private Postfix (Debian's postfix 3.7) for interop tests and benchmarks: its own main.cf, master.cf,
queue and virtual(8) Maildirs under a temp dir, listening on loopback only, started and stopped with
`postfix -c DIR` (PEERS.md has the traps)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from contextlib import suppress
from functools import partial
from pathlib import Path

from tests.support.polling import process_gone, wait_until

NOBODY = pwd.getpwnam("nobody").pw_uid  # Postfix's virtual delivery refuses root (PEERS.md)

# Every service but the smtpd listeners, which each user of this module writes first.
MASTER_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000? 1 tlsmgr
"""

# What every private instance shares: its own directories and log, loopback only, no DNS, no local(8)
# aliases, virtual(8) Maildirs under root/mail owned by nobody. Later lines of main.cf win.
MAIN_CF_BASE = """\
compatibility_level = 3.7
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
alias_maps =
alias_database =
virtual_mailbox_base = {root}/mail
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
virtual_mailbox_limit = 0
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
biff = no
"""


class PostfixInstance:
    """`main_cf` is added to MAIN_CF_BASE and `listeners` (the smtpd lines) put before MASTER_SERVICES, both
    formatted with {root} and {uid}; `files` are written into root/etc (a *key.pem mode 0600)."""

    def __init__(self, main_cf: str, listeners: str, files: dict[str, bytes]) -> None:
        # Postfix's processes run as postfix/nobody: pytest's tmp dir (0700 root) is out of their reach.
        self.root = Path(tempfile.mkdtemp(prefix="letterbox-postfix-"))
        self.root.chmod(0o755)
        etc = self.root / "etc"
        for sub in ("etc", "queue", "data", "mail"):
            (self.root / sub).mkdir()
        values = {"root": self.root, "uid": NOBODY}
        (etc / "main.cf").write_text((MAIN_CF_BASE + main_cf).format(**values))
        (etc / "master.cf").write_text(listeners.format(**values) + MASTER_SERVICES)
        for name, content in files.items():
            (etc / name).write_bytes(content)
            if name.endswith("key.pem"):
                (etc / name).chmod(0o600)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(self.root / "mail", NOBODY, NOBODY)
        self.log = self.root / "postfix.log"

    def _control(self, action: str) -> subprocess.CompletedProcess[str]:
        # postfix prints its errors only to a terminal (PEERS.md): give it one with script(1).
        return subprocess.run(["script", "-qec", f"postfix -c {self.root / 'etc'} {action}", "/dev/null"],
                              capture_output=True, text=True, timeout=60, check=False)

    def start(self) -> None:
        result = self._control("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix did not start: {result.stdout} {result.stderr}")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        self._control("stop")
        if pid is not None:
            try:
                wait_until(partial(process_gone, pid), seconds=10, interval=0.1, what="the postfix master gone")
            except AssertionError:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # our own instance's master, by its pid
        shutil.rmtree(self.root, ignore_errors=True)
