"""The one-time setup code: the first step of the wizard asks for it, so that only the person at the box
can claim a freshly installed box (an unconfigured box on a public address is otherwise anyone's).

Made at the first start while no administrator exists, printed in the `serve` output (the machine's
console on the image) and kept in the data directory as `setup-code` (0600), where an admin with a shell
can read it, as Pi-hole prints its generated password. It is checked in constant time, throttled like a
login, and deleted once the first administrator exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from appliance.auth import Throttle, peer_key

log = logging.getLogger("letterbox.setup")

SETUP_CODE_FILE = "setup-code"
# No 0/O/1/I/L: the code is read off a screen and typed by hand.
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
GROUPS, GROUP_LENGTH = 3, 4  # 12 characters of 31: about 59 bits, with throttled guessing
THROTTLE_ACCOUNT = "setup:code"  # the throttle's account key: every guess counts against one code
MAX_CODE_INPUT = 64


def code_path(data_root: Path) -> Path:
    return data_root / SETUP_CODE_FILE


def _new_code() -> str:
    groups = ("".join(secrets.choice(ALPHABET) for _ in range(GROUP_LENGTH)) for _ in range(GROUPS))
    return "-".join(groups)


def normalise(text: str) -> str:
    """What was typed, as stored: upper case, without spaces or dashes (people type 'abcd efgh ...')."""
    return "".join(ch for ch in text[:MAX_CODE_INPUT].upper() if ch not in " -\t")


def read_code(data_root: Path) -> str | None:
    try:
        text = code_path(data_root).read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text if len(normalise(text)) == GROUPS * GROUP_LENGTH else None


def ensure_code(data_root: Path) -> str:
    """The current code, made (0600, never readable by other local users) when there is none."""
    existing = read_code(data_root)
    if existing:
        return existing
    path = code_path(data_root)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # damaged: replace it
    code = _new_code()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start made one meanwhile: use that one
        return read_code(data_root) or code
    try:
        os.write(fd, code.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("setup code created in %s", path)
    return code


def remove_code(data_root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        code_path(data_root).unlink()


def matches(data_root: Path, given: str) -> bool | None:
    """Whether `given` is the code; None when there is no code (used up: the admin exists)."""
    stored = read_code(data_root)
    if stored is None:
        return None
    # Constant time: the time a wrong guess takes must not tell how much of it was right.
    return hmac.compare_digest(normalise(given).encode("ascii", "replace"), normalise(stored).encode("ascii"))


async def verify(throttle: Throttle, data_root: Path, given: str, peer: str) -> bool:
    """Check a typed code with the login throttle: failures from one address slow it down and lock
    it out as wrong passwords do."""
    client = peer_key(peer)
    async with throttle.serialised(client, THROTTLE_ACCOUNT):
        if not throttle.locked_for(client, THROTTLE_ACCOUNT):
            delay = throttle.delay(client, THROTTLE_ACCOUNT)
            if delay:
                await asyncio.sleep(delay)
        if throttle.locked_for(client, THROTTLE_ACCOUNT):
            return False
        found = await asyncio.to_thread(matches, data_root, given)  # a file read: off the loop
        if found is None:  # no code any more: the request lost a race with the first admin, not a guess
            return False
        ok = bool(given) and found
        if ok:
            throttle.succeeded(client, THROTTLE_ACCOUNT)
        else:
            throttle.failed(client, THROTTLE_ACCOUNT)
            log.warning("wrong setup code from %s", client)
        return ok
