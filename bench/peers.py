"""The component standard the side-by-side benchmark measures Letterbox against, as private instances on
loopback under a temp dir (PEERS.md has the traps):

- BenchDovecot: Dovecot 2.3 with IMAPS, POP3S, LMTP and an auth socket for Postfix's SASL, Maildir, users
  given as passwd-file secrets ("{PLAIN}..." or "{ARGON2ID}$argon2id$..." with Letterbox's own cost).
- BenchPostfix: Postfix 3.7 with one smtpd for intake (lmtp.test -> Dovecot LMTP, virtual.test ->
  virtual(8) Maildir) and one for submission (STARTTLS required, SASL through Dovecot's auth socket).
- tree_memory: RSS and PSS of a process and all its descendants (Dovecot is a dozen processes).
"""

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

from tests.support.dovecot import PrivateDovecot, free_port
from tests.support.polling import process_gone, wait_until

NOBODY = pwd.getpwnam("nobody").pw_uid


class BenchDovecot(PrivateDovecot):
    def __init__(self, secrets: dict[str, str], tls: tuple[Path, Path]) -> None:
        super().__init__(dict.fromkeys(secrets, ""), tls)
        self.secrets = secrets
        self.pop3s_port = free_port()
        self.lmtp_port = free_port()

    @property
    def auth_socket(self) -> Path:
        return self.root / "run" / "auth-postfix"

    def write_config(self) -> None:
        super().write_config()  # the directories, then our own files over its ones
        passwd = self.root / "passwd"
        passwd.write_text("".join(f"{user}:{secret}:{self.uid}:{self.gid}::{self.mail / user}\n"
                                  for user, secret in self.secrets.items()))
        cert, key = self.tls or (Path(), Path())
        self.conf.write_text(f"""
base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
log_path = {self.root / "dovecot.log"}
instance_name = letterbox-bench-{self.port}
listen = 127.0.0.1
protocols = imap pop3 lmtp
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
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
protocol lmtp {{
  postmaster_address = postmaster@bench.test
}}
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    port = {self.tls_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")

    def master(self) -> int:
        if self._pid is None:
            raise RuntimeError("dovecot is not running")
        return self._pid


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
127.0.0.1:{submission} inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path={auth_socket}
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
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

# Postfix's defaults otherwise (in_flow_delay, process limits, connection caching): the peer as shipped.
MAIN_CF = """\
compatibility_level = 3.7
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bench.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
alias_maps =
alias_database =
relay_domains = lmtp.test
transport_maps = texthash:{root}/etc/transport
virtual_mailbox_domains = virtual.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
virtual_mailbox_limit = 0
message_size_limit = 60000000
smtpd_tls_cert_file = {root}/etc/cert.pem
smtpd_tls_key_file = {root}/etc/key.pem
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
biff = no
"""


class BenchPostfix:
    """Mail for anyone@lmtp.test goes to Dovecot's LMTP at `lmtp_port` as that address; mail for the
    addresses in `virtual` goes to virtual(8) Maildirs under root/mail/virtual.test/LOCAL/."""

    def __init__(self, lmtp_port: int, auth_socket: Path, virtual: list[str], cert: bytes, key: bytes) -> None:
        # Postfix's processes run as postfix/nobody: a 0700 temp dir would be out of their reach.
        self.root = Path(tempfile.mkdtemp(prefix="letterbox-bench-postfix-"))
        self.root.chmod(0o755)
        self.port, self.submission_port = free_port(), free_port()
        etc = self.root / "etc"
        for sub in ("etc", "queue", "data", "mail"):
            (self.root / sub).mkdir()
        (etc / "main.cf").write_text(MAIN_CF.format(root=self.root, uid=NOBODY))
        (etc / "master.cf").write_text(MASTER_CF.format(port=self.port, submission=self.submission_port,
                                                        auth_socket=auth_socket))
        (etc / "transport").write_text(f"lmtp.test lmtp:inet:127.0.0.1:{lmtp_port}\n")
        (etc / "vmailbox").write_text("".join(f"{a} virtual.test/{a.split('@')[0]}/\n" for a in virtual))
        (etc / "cert.pem").write_bytes(cert)
        (etc / "key.pem").write_bytes(key)
        (etc / "key.pem").chmod(0o600)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(self.root / "mail", NOBODY, NOBODY)
        self.log = self.root / "postfix.log"

    def maildir(self, address: str) -> Path:
        return self.root / "mail" / "virtual.test" / address.split("@")[0]

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


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, processes) summed over `pid` and all its descendants, now."""
    children = _children()
    todo, rss, pss, count = [pid], 0, 0, 0
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss, count
