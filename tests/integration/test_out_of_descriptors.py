"""`letterbox serve` out of file descriptors: each listener says so in one line a minute (asyncio's
accept loop said it with a traceback every second), and accepts again once descriptors come back."""

from __future__ import annotations

import os
import resource
import socket
import time

from tests.conftest import ServedBox
from tests.support.polling import wait_until


def test_a_listener_out_of_descriptors_says_so_once_and_accepts_again(served_box: ServedBox) -> None:
    assert served_box.proc is not None
    pid, port = served_box.proc.pid, served_box.port("imap")
    limit = len(os.listdir(f"/proc/{pid}/fd")) + 4  # four connections more, then accept() fails
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]  # (the backlog keeps the rest)
    try:
        def said() -> list[str]:
            return [line for line in served_box.log_path.read_text().splitlines()
                    if f"cannot accept connections on 127.0.0.1:{port}" in line]

        # A loaded machine may run the box's accept late: wait for the first line, then give asyncio's
        # retries (every second) time to say it again, which they must not.
        wait_until(said, seconds=30, what="the listener's line")
        time.sleep(3.5)
        log = served_box.log_path.read_text()
        lines = said()
        assert len(lines) == 1, log
        assert "Too many open files (EMFILE, open files limit" in lines[0]
        assert "out of system resource" not in log
    finally:
        for sock in held:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
        again.settimeout(10)
        assert again.recv(1024).startswith(b"* OK")
