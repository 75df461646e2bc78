"""A TCP forwarder on loopback: connections to its port are joined to a target port, and counted.
Stands for a peer that comes back at an address where nothing listened (the real peer runs on its
own port), and shows whether anyone tried to connect meanwhile."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class Forwarder:
    def __init__(self, port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.target_port = host, port, target_port
        self.connections = 0
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Forwarder:
        listener = socket.create_server((self.host, self.port))
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            self._listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _spawn(self, target: Callable[..., None], *args: socket.socket) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection((self.host, self.target_port), timeout=30)
            self._sockets += [client, upstream]
            self._spawn(_pump, client, upstream)
            self._spawn(_pump, upstream, client)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Bytes one way until the source ends; then the sink hears the end too."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
