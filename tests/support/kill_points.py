"""A kill at a chosen point of a running box: strace holds each of its threads right after the first of
the given system calls it makes from now on (delay_exit), so a test can see that call's effect on disk
and SIGKILL the box before the thread goes on (the commit, the fsync or the reply that follows)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.polling import wait_until

RENAMES = "rename,renameat,renameat2"
UNLINKS = "unlink,unlinkat"
LINKS = "link,linkat"


def traced(pid: int) -> bool:
    """Whether every thread of `pid` has a tracer."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("TracerPid:") and line.split()[1] == "0":
                    return False
    return bool(tasks)


@contextlib.contextmanager
def held_after(pid: int, syscalls: str, path: Path | None = None, *, before: bool = False) -> Iterator[None]:
    """Inside: every thread of `pid` stops for 20 s after its first call of `syscalls` (a set as
    strace's -e trace= takes it; with `path`, only calls on that file), with the call done (`before`:
    not yet made, so a write held there never reaches the file, not even the page cache). The
    caller SIGKILLs the process meanwhile; it is gone (and can be waited for) once the block ends
    and strace lets go of it."""
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "signal=none", *(["-P", str(path)] if path else []),
         "-e", f"trace={syscalls}",
         "-e", f"inject={syscalls}:{'delay_enter' if before else 'delay_exit'}=20000000:when=1", "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: traced(pid), seconds=20, interval=0.02, what="strace attached to every thread")
        yield
    finally:
        tracer.kill()
        tracer.wait()
