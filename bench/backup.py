"""Backup benchmark (issue 14): create and restore MB/s of `letterbox backup` beside the standard tools
(`tar | zstd | age` and `age -d | zstd -d | tar -x`) on the same files in the same run, and the peak
RSS of each Letterbox phase above its idle RSS. Targets: >= 0.8x of the standard tools; <= 64 MB
above idle.

The box: one mailbox with N messages (default 20,000, about 25 KB each: text plus a random base64
attachment, so about 500 MB that compresses as real mail does), indexed by the store as a box would.
Usage: python -m bench.backup [--messages 20000] [--size 25000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance import backup
from appliance.accounts import Accounts
from appliance.config import DataLayout
from appliance.db import Database
from appliance.store.mailstore import MailStore

USER = "reader@bench.test"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from appliance import backup
from appliance.config import DataLayout
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mode, data, out, key = sys.argv[1:5]
t = time.perf_counter()
if mode == "create":
    backup.create_backup(DataLayout(Path(data)), Path(out), recipient=key)
else:
    backup.restore_full(Path(out), backup.Secret(identity=key), Path(data))
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "idle_kib": idle, "peak_kib": peak}))
"""


def build_box(root: Path, count: int, size: int) -> int:
    layout = DataLayout(root)
    layout.create()
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n" * 100).encode()
    cur = layout.mail / "bench.test" / "reader" / "cur"

    async def setup() -> None:
        db = await Database.open(layout.db)
        try:
            accounts = Accounts(db, data=layout)
            await accounts.add_domain("bench.test")
            await accounts.add_user(USER, "bench password 1234567")
        finally:
            await db.close()

    asyncio.run(setup())
    cur.mkdir(parents=True, exist_ok=True)
    for sub in ("new", "tmp"):
        (cur.parent / sub).mkdir(exist_ok=True)
    total = 0
    for n in range(count):
        attach = base64.encodebytes(os.urandom(max(0, size - len(text) - 300) * 3 // 4))
        data = (f"From: s{n % 50}@example.org\r\nTo: {USER}\r\nSubject: message {n}\r\n"
                f"Message-ID: <m{n}@example.org>\r\n\r\n").encode() + text[: size // 3] + attach.replace(b"\n", b"\r\n")
        name = f"{1_700_000_000 + n}.M{n}P1.bench,S={len(data)},W={len(data)}:2,S"
        (cur / name).write_bytes(data)
        total += len(data)

    async def index() -> None:
        db = await Database.open(layout.db)
        try:
            snap = await MailStore(layout.mail, db, Accounts(db)).snapshot(USER, "INBOX")
            assert len(snap.messages) == count, len(snap.messages)
        finally:
            await db.close()

    asyncio.run(index())
    return total


def child(mode: str, data: Path, out: Path, key: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(data), str(out), key], check=True,
                            capture_output=True, text=True)
    return dict(json.loads(result.stdout))


def shell(command: str, cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, cwd=cwd)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=25_000)
    args = parser.parse_args()
    if not shutil.which("age") or not shutil.which("zstd"):
        raise SystemExit("bench.backup needs the age and zstd programs (.ci/install-peers)")
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        work = Path(tmp)
        data = work / "box" / "data"
        t = time.perf_counter()
        total = build_box(data, args.messages, args.size)
        mb = total / 1e6
        print(f"box: {args.messages} messages, {mb:.0f} MB of mail (built in {time.perf_counter() - t:.0f} s)")
        kit = backup.new_kit("bench")
        kit_file = work / "kit.txt"
        kit_file.write_text(kit.text)
        identity = next(ln for ln in kit.text.splitlines() if ln.startswith("AGE-SECRET-KEY-"))

        ours = work / "ours.tar.zst.age"
        created = child("create", data, ours, kit.recipient)
        ref = work / "ref.tar.zst.age"
        # The same files: the db snapshot's stand-in is the db itself (the box is idle).
        ref_create = shell(f"tar -cf - letterbox.db mail dkim tls spool | zstd -q -3 | age -r {kit.recipient}"
                           f" > {ref}", data)
        restored = work / "restored" / "data"
        back = child("restore", restored, ours, identity)
        unpack = work / "unpacked"
        unpack.mkdir()
        ref_restore = shell(f"age -d -i {kit_file} {ref} | zstd -q -d | tar -xf -", unpack)

        def line(what: str, ours_s: float, ref_s: float, rss: dict[str, float] | None) -> None:
            mem = f"   peak RSS {rss['peak_kib'] / 1024:.0f} MB ({(rss['peak_kib'] - rss['idle_kib']) / 1024:.0f} MB" \
                  f" above idle)" if rss else ""
            print(f"{what:8} letterbox {mb / ours_s:6.1f} MB/s   tar|zstd|age {mb / ref_s:6.1f} MB/s"
                  f"   ratio {ref_s / ours_s:4.2f} (target >= 0.80){mem}")

        print(f"archive: letterbox {ours.stat().st_size / 1e6:.0f} MB, tar|zstd|age {ref.stat().st_size / 1e6:.0f} MB")
        line("create", created["seconds"], ref_create, created)
        line("restore", back["seconds"], ref_restore, back)


if __name__ == "__main__":
    main()
