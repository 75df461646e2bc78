"""inotify's real limits for tests: an event queue that overflows, and a child Python in a user
namespace of its own, where /proc/sys/user/max_inotify_watches is the namespace's (Linux 4.9 and
later) and may be lowered without touching the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def overflow(directory: Path) -> None:
    """More events in `directory` than an inotify queue holds (a name made and removed again and
    again: events that differ from the one before are not merged), so each instance watching it
    overflows until it reads its events."""
    size = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    path = directory / ".flood"
    for _ in range(size // 2 + 64):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY))
        os.unlink(path)


def run_with_watch_limit(limit: int, code: str) -> str:
    """Run `code` in a child Python allowed `limit` inotify watches; its standard output (an
    AssertionError if it fails). Skips where unprivileged user namespaces are not to be had."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "-r", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here")
    script = f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$0" -c "$1"'
    done = subprocess.run([unshare, "-U", "-r", "sh", "-c", script, sys.executable, code],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
