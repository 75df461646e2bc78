"""A file uploaded to the console, kept on the box: the restore's backup, an update's bundle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO


def save_private(src: BinaryIO, target: Path) -> None:
    """Copy the upload (starlette's spool file) from its start to `target`, which must not exist, as
    a file of the box's user alone whatever the umask (`make run` has the shell's, often 022): a
    backup holds the password hashes and the DKIM keys. Blocking: a worker thread."""
    src.seek(0)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
