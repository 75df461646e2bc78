"""The C library through ctypes, loaded once for the whole process (glibc on the box).

One place, because each lookup costs: ctypes.util.find_library runs `ldconfig -p` in a new process
at every call (a restore made eight of them, one per early sync). errno is kept for
ctypes.get_errno (renameat2, inotify, adjtimex report through it); the functions that do not set it
(malloc_trim, mallopt) are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library; OSError where it cannot be loaded."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
