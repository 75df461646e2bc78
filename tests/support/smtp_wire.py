"""A raw SMTP/LMTP client for tests that need exact bytes on the wire (smuggling, LMTP per-recipient
replies, limits) and a reader for what landed in a Maildir."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any


class Wire:
    """One connection; `reply()` reads one complete (possibly multi-line) reply."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None, source: str | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        self._buf = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        """(code, text of all lines joined by newlines)."""
        lines = []
        while True:
            line = self.line().decode("utf-8", "replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, command: str | bytes) -> tuple[int, str]:
        self.send((command if isinstance(command, bytes) else command.encode()) + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (reads EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False


def lmtp_data(port: int, recipients: list[str] | tuple[str, ...], timeout: float = 30.0) -> Wire:
    """An LMTP session at its DATA's 354, for `recipients`."""
    wire = Wire(port, timeout=timeout)
    wire.reply()
    assert wire.cmd("LHLO mta.test")[0] == 250
    assert wire.cmd("MAIL FROM:<sender@external.test>")[0] == 250
    for rcpt in recipients:
        assert wire.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    return wire


def maildir_messages(mail_root: Path, address: str, folder: str = "") -> list[bytes]:
    """Every message file of a mailbox's INBOX (or `.Folder`), new/ and cur/, in the order written."""
    local, domain = address.split("@")
    base = mail_root / domain / local / folder
    files = [p for sub in ("new", "cur") if (base / sub).is_dir() for p in (base / sub).iterdir()]
    return [p.read_bytes() for p in sorted(files, key=lambda p: _written(p.name))]


_UNIQUE = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?")


def _written(name: str) -> tuple[int, int, str]:
    """A Maildir name's time (seconds, then microseconds) for sorting: the microseconds are not
    zero-padded (Dovecot's form), so by name a later M100000 came before M95000 of the same second."""
    match = _UNIQUE.match(name)
    if match is None:
        return (0, 0, name)
    return (int(match[1]), int(match[2] or 0), name)


def parse(raw: bytes) -> Message:
    return message_from_bytes(raw)


# The outbound queue (issue 7) runs inside the box and would try to deliver what these tests spool to
# made-up domains: hold it, and point its resolver at a loopback port where nothing answers, so no
# test traffic ever leaves the machine.
OUTBOUND_HOLD_SETTINGS = {"queue_hold": "1", "dns_resolver": "127.0.0.1:9"}


def hold_outbound(box: Any) -> None:
    """For the in-process `box` fixture (a tests.conftest.BoxHandle)."""

    async def hold() -> None:
        for key, value in OUTBOUND_HOLD_SETTINGS.items():
            await box.services.db.set_setting(key, value)

    box.run(hold())


def hold_outbound_sql(db_path: Path) -> None:
    """For a `letterbox serve` subprocess: write the settings straight into its (WAL) database."""
    import sqlite3

    with sqlite3.connect(db_path, timeout=30) as conn:
        conn.executemany(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            list(OUTBOUND_HOLD_SETTINGS.items()),
        )
    conn.close()
