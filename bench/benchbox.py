"""What the benchmarks share: a real `letterbox serve` subprocess on a free loopback port range, the
CLI to prepare its data directory, settings written straight into its database, and its peak RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from appliance.config import STANDARD_PORTS

LETTERBOX = str(Path(sys.executable).parent / "letterbox")
READY_TIMEOUT = 60.0


def free_offset(start: int = 31000) -> int:
    """A port offset at which every standard port is free on 127.0.0.1."""
    for offset in range(start, 60000, 1009):
        try:
            for port in STANDARD_PORTS.values():
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return offset
    raise SystemExit("no free port range")


def cli(data: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run([LETTERBOX, "--data", str(data), *args], input=stdin, text=True, check=True,
                          capture_output=True).stdout


def set_settings(data: Path, settings: dict[str, str]) -> None:
    """Settings for a box that is not running yet (the CLI has made and migrated its database)."""
    conn = sqlite3.connect(data / "letterbox.db")
    try:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", list(settings.items()))
    finally:
        conn.close()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def serving(data: Path, log: Path, offset: int, *, hostname: str = "localhost",
            wrapper: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT) -> Iterator[subprocess.Popen[bytes]]:
    """`letterbox serve` on 127.0.0.1 with the given port offset, from "ready" until SIGTERM."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*wrapper, LETTERBOX, "--data", str(data), "serve", "--listen", "127.0.0.1",
             "--port-offset", str(offset), "--hostname", hostname],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while b"\nready\n" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"letterbox serve did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
