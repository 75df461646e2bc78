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
from pathlib import Path

from tests.support.dovecot import PrivateDovecot
from tests.support.ports import free_ports
from tests.support.postfix import PostfixInstance


class BenchDovecot(PrivateDovecot):
    """PrivateDovecot with POP3S and LMTP too, and the auth socket Postfix's SASL asks. A password given as
    "{SCHEME}..." is used as it is (a hash), others as {PLAIN}."""

    protocols = ("imap", "pop3", "lmtp")

    def __init__(self, users: dict[str, str], tls: tuple[Path, Path]) -> None:
        super().__init__(users, tls)
        self.pop3s_port, self.lmtp_port = free_ports(2)

    @staticmethod
    def secret(password: str) -> str:
        return password if password.startswith("{") else "{PLAIN}" + password

    @property
    def auth_socket(self) -> Path:
        return self.root / "run" / "auth-postfix"

    def extra_config(self) -> str:
        return f"""
auth_mechanisms = plain login
protocol lmtp {{
  postmaster_address = postmaster@bench.test
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
  unix_listener {self.auth_socket.name} {{
    mode = 0666
  }}
}}
"""

    def master(self) -> int:
        if self._pid is None:
            raise RuntimeError("dovecot is not running")
        return self._pid


LISTENERS = """\
127.0.0.1:{port} inet n - n - - smtpd
127.0.0.1:{submission} inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path={auth_socket}
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
"""

# Postfix's defaults otherwise (in_flow_delay, process limits, connection caching): the peer as shipped.
MAIN_CF = """\
myhostname = mx.bench.test
relay_domains = lmtp.test
transport_maps = texthash:{root}/etc/transport
virtual_mailbox_domains = virtual.test
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
message_size_limit = 60000000
smtpd_tls_cert_file = {root}/etc/cert.pem
smtpd_tls_key_file = {root}/etc/key.pem
"""


class BenchPostfix(PostfixInstance):
    """Mail for anyone@lmtp.test goes to Dovecot's LMTP at `lmtp_port` as that address; mail for the
    addresses in `virtual` goes to virtual(8) Maildirs under root/mail/virtual.test/LOCAL/."""

    def __init__(self, lmtp_port: int, auth_socket: Path, virtual: list[str], cert: bytes, key: bytes) -> None:
        self.port, self.submission_port = free_ports(2)
        listeners = LISTENERS.format(port=self.port, submission=self.submission_port, auth_socket=auth_socket)
        super().__init__(MAIN_CF, listeners.replace("{", "{{").replace("}", "}}"), {
            "transport": f"lmtp.test lmtp:inet:127.0.0.1:{lmtp_port}\n".encode(),
            "vmailbox": "".join(f"{a} virtual.test/{a.split('@')[0]}/\n" for a in virtual).encode(),
            "cert.pem": cert,
            "key.pem": key,
        })

    def maildir(self, address: str) -> Path:
        return self.root / "mail" / "virtual.test" / address.split("@")[0]


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
