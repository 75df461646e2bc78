"""What the benchmarks share: a real `letterbox serve` subprocess on a free loopback port range, the
CLI to prepare its data directory, settings written straight into its database, and its peak RSS."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from appliance.config import STANDARD_PORTS

LETTERBOX = str(Path(sys.executable).parent / "letterbox")
READY_TIMEOUT = 60.0


PORT_BLOCK = 1000  # ports are claimed in blocks of this many (every standard port, 24..995, fits in one)
PORT_LOCKS = Path(tempfile.gettempdir()) / "letterbox-test-ports"
_held_blocks: dict[int, int] = {}  # block -> the open lock file's descriptor, held while this process lives


def _lock(block: int) -> bool:
    if block in _held_blocks:
        return True
    PORT_LOCKS.mkdir(exist_ok=True)
    fd = os.open(PORT_LOCKS / f"{block}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held_blocks[block] = fd
    return True


def claim_offset(offset: int) -> bool:
    """Claim the port blocks a box at this offset uses for this process, with advisory locks the kernel
    drops when the process dies: boxes started by tests in several xdist workers or worktrees, and by the
    benches they run, never race for the same ports (checking that the ports are free is not enough:
    two processes can both see them free and both start a box). True when this process holds them all."""
    blocks = sorted({(offset + port) // PORT_BLOCK for port in STANDARD_PORTS.values()})
    new: list[int] = []
    for block in blocks:
        if block not in _held_blocks:
            if not _lock(block):
                for taken in new:
                    os.close(_held_blocks.pop(taken))
                return False
            new.append(block)
    return True


def holds_offset(offset: int) -> bool:
    return all((offset + port) // PORT_BLOCK in _held_blocks for port in STANDARD_PORTS.values())


def ports_free(offset: int) -> bool:
    """Whether every standard port at this offset can be bound on 127.0.0.1 now."""
    for port in STANDARD_PORTS.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port + offset))
            except OSError:
                return False
    return True


def free_offset(start: int = 31000) -> int:
    """A port offset at which every standard port is free on 127.0.0.1, claimed for this process."""
    for offset in range(start, 60000, 1009):
        if claim_offset(offset) and ports_free(offset):
            return offset
    raise SystemExit("no free port range")


def code_env(code: Path | None) -> dict[str, str]:
    """The environment of a `letterbox` child: with `code`, a checkout of the project whose
    `appliance` runs instead of this one (put first on PYTHONPATH)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(code), env.get("PYTHONPATH"))))
    return env


def cli(data: Path, *args: str, stdin: str | None = None, code: Path | None = None) -> str:
    return subprocess.run([LETTERBOX, "--data", str(data), *args], input=stdin, text=True, check=True,
                          capture_output=True, env=code_env(code)).stdout


def set_settings(data: Path, settings: dict[str, str]) -> None:
    """Settings for a box that is not running yet (the CLI has made and migrated its database)."""
    conn = sqlite3.connect(data / "letterbox.db")
    try:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", list(settings.items()))
    finally:
        conn.close()


def maildir_count(maildir: Path) -> int:
    """Messages in a Maildir's new/ and cur/ (0 before it exists)."""
    total = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError), os.scandir(maildir / sub) as entries:
            total += sum(1 for _ in entries)
    return total


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def serving(data: Path, log: Path, offset: int, *, hostname: str = "localhost",
            wrapper: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT,
            code: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`letterbox serve` on 127.0.0.1 with the given port offset, from "ready" until SIGTERM; `code`: a
    checkout of the project whose `appliance` runs instead of this one (code_env)."""
    env = code_env(code)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*wrapper, LETTERBOX, "--data", str(data), "serve", "--listen", "127.0.0.1",
             "--port-offset", str(offset), "--hostname", hostname],
            stdout=out, stderr=subprocess.STDOUT, env=env,
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


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """User and system CPU seconds of each live thread of the box, by thread (the event loop's is
    "loop"; the others by their name, numbered ones such as asyncio_3 summed as asyncio_*)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        name = "loop" if task.name == str(pid) else stat[stat.index("(") + 1:stat.rindex(")")]
        key = f"{name}:{task.name}"
        fields = stat.rpartition(")")[2].split()
        found[key] = (int(fields[11]) / ticks, int(fields[12]) / ticks)
    return found


def thread_cpu_used(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
                    ) -> dict[str, tuple[float, float]]:
    """CPU seconds per kind of thread between two thread_cpu readings (a thread that ended between
    them is not counted: the box's threads live as long as it does under this load)."""
    used: dict[str, tuple[float, float]] = {}
    for key, (user, system) in after.items():
        user0, system0 = before.get(key, (0.0, 0.0))
        name = re.sub(r"_\d+$", "_*", key.partition(":")[0])
        total = used.get(name, (0.0, 0.0))
        used[name] = (total[0] + user - user0, total[1] + system - system0)
    return used


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and of its descendants, live ones (the box's CPU worker,
    Postfix's smtpd processes) and the ones already reaped by a process of the tree: what a benchmark
    charges to a server, less moved by other load than wall time."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            # Fields after the command name (which may hold spaces): utime, stime, cutime, cstime.
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += sum(int(value) for value in fields[11:15]) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total
