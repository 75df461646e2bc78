"""The CPU worker process does not outlive a server killed with SIGKILL (OOM killer, kill -9)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

SCRIPT = """
import asyncio, os, signal
from appliance.cpu_pool import CpuPool

async def main() -> None:
    pool = CpuPool()
    print(await pool.run(os.getpid), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_exits_when_the_server_is_killed() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    worker = int(done.stdout.split()[0])
    assert worker != os.getpid()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the worker process outlived its killed parent"
