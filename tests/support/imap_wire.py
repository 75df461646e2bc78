"""A raw IMAP client for tests: exact bytes in and out, for what imaplib and imapclient cannot send."""

from __future__ import annotations

import contextlib
import re
import ssl

from tests.support.polling import wait_until
from tests.support.raw_wire import RawLineClient

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class RawImap(RawLineClient):
    def line(self) -> bytes:
        """One response line with any literals it announces appended (CRLF kept)."""
        out = b""
        while True:
            out += self.read_line(out) + b"\r\n"
            m = _LITERAL.search(out)
            if not m:
                return out
            size = int(m.group(1))
            while len(self.buffer) < size:
                if not self._fill():
                    raise EOFError(out + self.buffer)
            out += self.buffer[:size]
            self.buffer = self.buffer[size:]

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def login(self, user: str, password: str) -> None:
        reply = self.command(b"L", f'LOGIN "{user}" "{password}"'.encode())
        assert reply[-1].startswith(b"L OK"), reply

    def closed(self, wait: float = 5) -> bool:
        """True when the server has closed the connection (reads until EOF, discarding)."""
        self.sock.settimeout(wait)
        try:
            wait_until(lambda: not self.sock.recv(65536), seconds=wait, interval=0, what="EOF from the server")
        except (ConnectionError, ssl.SSLError):
            return True
        except (TimeoutError, AssertionError):  # silent for `wait` seconds, or still talking after them
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
