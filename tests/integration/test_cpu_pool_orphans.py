"""The CPU worker process does not outlive a server killed with SIGKILL (OOM killer, kill -9)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.polling import process_gone, wait_until

SCRIPT = """
import asyncio, os, signal
from appliance.cpu_pool import CpuPool

async def main() -> None:
    pool = CpuPool()
    print(await pool.run(os.getpid), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_worker_exits_when_the_server_is_killed() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    worker = int(done.stdout.split()[0])
    assert worker != os.getpid()
    wait_until(lambda: process_gone(worker), what="the worker process outlived its killed parent")
