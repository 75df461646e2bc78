"""The socket half of the raw test clients (IMAP, POP3): exact bytes in and out, one line at a time."""

from __future__ import annotations

import socket
import ssl


class RawLineClient:
    def __init__(self, port: int, context: ssl.SSLContext | None = None, timeout: float = 15,
                 source: str | None = None) -> None:
        """source: the loopback address to connect from (127.0.0.0/8), as another client would."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        self.sock: socket.socket = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        return self.read_line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_line(self, seen: bytes = b"") -> bytes:
        """The next line without its CRLF; EOFError (with what came) if the server closes first."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(seen + self.buffer)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line
