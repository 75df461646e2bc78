"""Backup benchmark (issue 14): create and restore MB/s of `letterbox backup` beside the standard tools
(`tar | zstd | age` and `age -d | zstd -d | tar -x`) on the same files in the same run, and the peak
RSS of each Letterbox phase above its idle RSS. Targets: >= 0.8x of the standard tools; <= 64 MB
above idle.

Create: Letterbox's backup against `tar | zstd -3 | age` of the same files. Restore: Letterbox's
restore against `age -d | zstd -d | tar -x` of the same file (Letterbox's backup).

The box: one mailbox with N messages (default 20,000, about 25 KB each: text plus a random base64
attachment, so about 500 MB that compresses as real mail does), indexed by the store as a box would.
Usage: python -m bench.backup [--messages 20000] [--size 25000] [--runs 3] [--box DIR]
Disk: every restore is kept until the end of the run (see one_round), so 3 x runs x the box's size
(4.5 GB for the default 3 rounds) on top of the box.

Measured 2026-11-29 14:14-14:52 (2 cores, load 10-20 from other work; 3 rounds a run, medians of
paired ratios), after the restore became two processes sharing a ring of memory (the child decrypts
and decompresses; the restoring process parses and writes from the ring, and from 14:42 a thread of
it hashes): restore medians 0.57 (the tools restoring their own file), 1.69, 0.67 (autogroup nice
-10), 1.02 and 0.44, single rounds from 0.36 to 1.89; create 0.78-0.96. At that load the kernel's
file creation cost 2-4 times more CPU in some runs than in others, on either side and with or without
the early writeback (the same restore took 3.8 to 10.4 s of CPU, the tools' 3.2 to 9.0 s), so these
ratios say nothing about the target: only a quiet machine measures it. In alternation against the
design before (the child also parsed and hashed, in three threads): 0.2-0.5 s less CPU, the same wall
time within the noise; the hashing thread then took the restoring thread from 2.01-2.16 s of CPU to
1.54-1.72 s (0.16 s more in all). Peak PSS of the box and its child: 25 MB above idle (the RSS
figures this prints count the shared ring in both processes).

Measured 2026-11-29 16:30-18:05, after the files' SHA-256 moved to the unpack child (or to the
restoring process while it would wait for the child; RingReader). Per stage (CPU, per-thread from
/proc, load 4-12): decrypt 0.18-0.22 s (age -d: 0.3-0.6 s), zstd 0.77-0.85 s (zstd -d: 0.6-0.85 s user
+ 0.2-0.35 s of pipe writes), SHA-256 0.55 s (SHA-NI via OpenSSL, 2.2 s without it; the tools pay
none), the tar parse 0.1-0.2 s and the files' open/write/close 0.25 s of Python + 0.4 s of kernel on
tmpfs (tar: 0.06 s user + 0.55-0.7 s kernel there, more syscalls per file: 10 KiB writes, utimensat,
fchown), the child's interpreter start 0.1 s before the first block, reconcile 0.04 s, the last
syncfs 0.01-0.07 s. Against the hashing thread, in alternation on disk (autogroup nice -10, load
8-9): 1.91/4.63, 3.00/3.19, 2.53/2.71 s. This bench at autogroup nice -10, load 3.6-4.6: restore
rounds 0.95, 1.84, 0.45 (median 0.95; 148 against 173 MB/s; CPU 3.9 against 3.9 s), create 0.92,
0.97, 1.05; without nice at load 4-8 right after: restore 0.32, 0.11, 0.47, create 0.58-0.61, with
one restore at 10.2 s of CPU (3.6-5.3 in the others): the kernel's file creation cost still swings
2-3x between rounds here (ext4 without a journal skips inodes freed in the last 60-300 s,
fs/ext4/ialloc.c recently_deleted, and other work on this machine frees many), so the target is
still decided by a quiet run only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
phases = {}

def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    setattr(backup, name, wrapper)

for name in ("take_snapshot", "unpack", "reconcile", "_fsync_tree_dirs"):
    timed(name, getattr(backup, name))
import os
cpu0 = sum(os.times()[:4])  # the interpreter's start and imports, before the timed part
t = time.perf_counter()
if mode == "create":
    backup.create_backup(DataLayout(Path(data)), Path(out), recipient=key)
else:
    backup.restore_full(Path(out), backup.Secret(identity=key), Path(data))
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu = sum(os.times()[:4])  # user + system, of this process and of its codec child
child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": elapsed, "idle_kib": idle, "peak_kib": peak, "child_peak_kib": child_peak,
                  "cpu": cpu, "cpu_timed": cpu - cpu0, "phases": phases}))
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


def child(mode: str, data: Path, out: Path, key: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(data), str(out), key], check=True,
                            capture_output=True, text=True)
    return dict(json.loads(result.stdout))


def shell(command: str, cwd: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, cwd=cwd)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu": cpu}


def one_round(data: Path, work: Path, kit_file: Path, recipient: str, identity: str, *,
              ref_first: bool, n: int) -> dict[str, Any]:
    """Letterbox and the standard tools on the same files: create, then restore. Before each timed
    step the disk is synced, so no step pays for the write-back of the one before it; the order
    alternates from round to round.

    Each restore unpacks into a new directory, and none is deleted before the end of the run: on an
    ext4 without a journal (this VM's root) the inode allocator skips every inode freed in the last
    60 s (fs/ext4/ialloc.c recently_deleted), so deleting the last round's 40k files made each file
    created in the next minute cost hundreds of microseconds of kernel time, on both sides; that was
    half of the time measured before, and no real restore meets it."""
    ours = work / "ours.tar.zst.age"
    ref = work / "ref.tar.zst.age"
    restored = work / f"restored-{n}"
    unpacked = work / f"unpacked-{n}"
    synced = work / f"unpacked-synced-{n}"
    for p in (ours, ref):
        p.unlink(missing_ok=True)
    unpacked.mkdir()
    synced.mkdir()
    timed: dict[str, Any] = {}

    def ours_create() -> None:
        timed["create"] = child("create", data, ours, recipient)

    def ref_create() -> None:
        # The same files: the db snapshot's stand-in is the db itself (the box is idle). zstd's
        # default level (3), as a person typing the pipeline would.
        timed["ref_create"] = shell(
            f"tar -cf - letterbox.db mail dkim tls spool | zstd -q -3 | age -r {recipient} > {ref}", data)

    def ours_restore() -> None:
        timed["restore"] = child("restore", restored / "data", ours, identity)

    # Both sides restore the same file, Letterbox's backup (a standard .tar.zst.age): measured here,
    # `zstd -d` takes 15% less CPU on its zstd level 1 than on the tools' level 3 (0.81 against
    # 0.96 s), so restoring each side's own file flattered Letterbox.
    def ref_restore() -> None:
        timed["ref_restore"] = shell(f"age -d -i {kit_file} {ours} | zstd -q -d | tar -xf -", unpacked)

    def ref_restore_synced() -> None:
        # Not the target's reference, shown for honesty: the tools do not sync, Letterbox's restore
        # does (its data is on disk before the switch-over).
        timed["ref_restore_synced"] = shell(
            f"age -d -i {kit_file} {ours} | zstd -q -d | tar -xf - && sync -f .", synced)

    creates, restores = [ours_create, ref_create], [ours_restore, ref_restore]
    if ref_first:
        creates.reverse()
        restores.reverse()
    for step in (*creates, *restores, ref_restore_synced):
        os.sync()
        step()
    timed["size"], timed["ref_size"] = ours.stat().st_size, ref.stat().st_size
    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--box", type=Path, help="keep the generated box here and reuse it next time")
    args = parser.parse_args()
    if not shutil.which("age") or not shutil.which("zstd"):
        raise SystemExit("bench.backup needs the age and zstd programs (.ci/install-peers)")
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        work = Path(tmp)
        data = (args.box or work / "box") / "data"
        t = time.perf_counter()
        if args.box is not None and (args.box / "total").is_file():
            total = int((args.box / "total").read_text())
        else:
            shutil.rmtree(data.parent, ignore_errors=True)
            total = build_box(data, args.messages, args.size)
            (data.parent / "total").write_text(str(total))
        mb = total / 1e6
        print(f"box: {args.messages} messages, {mb:.0f} MB of mail (ready in {time.perf_counter() - t:.0f} s);"
              f" {os.cpu_count()} CPUs, {_load()}")
        kit = backup.new_kit("bench")
        kit_file = work / "kit.txt"
        kit_file.write_text(kit.text)
        identity = next(ln for ln in kit.text.splitlines() if ln.startswith("AGE-SECRET-KEY-"))
        rounds = []
        for n in range(args.runs):
            r = one_round(data, work, kit_file, kit.recipient, identity, ref_first=n % 2 == 1, n=n)
            rounds.append(r)
            print(f"round {n + 1} ({_load()}): create {mb / r['create']['seconds']:.1f} vs {mb / r['ref_create']['seconds']:.1f} MB/s"
                  f" (CPU {r['create']['cpu']:.1f} vs {r['ref_create']['cpu']:.1f} s), restore"
                  f" {mb / r['restore']['seconds']:.1f} vs {mb / r['ref_restore']['seconds']:.1f} MB/s"
                  f" (CPU {r['restore']['cpu']:.1f} vs {r['ref_restore']['cpu']:.1f} s; tools + sync -f"
                  f" {mb / r['ref_restore_synced']['seconds']:.1f} MB/s);"
                  f" phases {json.dumps({k: round(v, 2) for k, v in r['restore']['phases'].items()})};"
                  f" paired ratios create {_ratio(r, 'create')} restore {_ratio(r, 'restore')}",
                  flush=True)
        report(rounds, mb)


def _load() -> str:
    """The machine's load, printed with every figure: other work on the machine moves them a lot."""
    one, five, _fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def _ratio(r: dict[str, Any], what: str, ref: str = "") -> float:
    """Letterbox's speed over the standard tools' in one round (> 1: Letterbox is faster)."""
    return round(float(r[ref or f"ref_{what}"]["seconds"]) / float(r[what]["seconds"]), 2)


def report(rounds: list[dict[str, Any]], mb: float) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"archive: letterbox {med([r['size'] for r in rounds]) / 1e6:.0f} MB,"
          f" tar|zstd|age {med([r['ref_size'] for r in rounds]) / 1e6:.0f} MB; medians of {len(rounds)} rounds:")
    for what, ref in (("create", "ref_create"), ("restore", "ref_restore")):
        ours_s = med([r[what]["seconds"] for r in rounds])
        ref_s = med([r[ref]["seconds"] for r in rounds])
        ours_cpu = med([r[what]["cpu"] for r in rounds])
        ref_cpu = med([r[ref]["cpu"] for r in rounds])
        peak = max(r[what]["peak_kib"] for r in rounds) / 1024
        above = max(r[what]["peak_kib"] - r[what]["idle_kib"] for r in rounds) / 1024
        codec = max(r[what]["child_peak_kib"] for r in rounds) / 1024
        paired = med([_ratio(r, what) for r in rounds])
        print(f"{what:8} letterbox {mb / ours_s:6.1f} MB/s   tar|zstd|age {mb / ref_s:6.1f} MB/s"
              f"   ratio of medians {ref_s / ours_s:4.2f}, median of paired ratios {paired:4.2f}"
              f" (target >= 0.80)")
        timed_cpu = med([r[what]["cpu_timed"] for r in rounds])
        print(f"{'':8} CPU time letterbox {ours_cpu:.2f} s ({timed_cpu:.2f} s after its imports, in the timed part),"
              f" tar|zstd|age {ref_cpu:.2f} s (ratio {ref_cpu / ours_cpu:4.2f});"
              f" peak RSS {peak:.0f} MB ({above:.0f} MB above idle) + codec process {codec:.0f} MB")
    synced_s = med([r["ref_restore_synced"]["seconds"] for r in rounds])
    print(f"{'':8} for honesty, not the target: age -d | zstd -d | tar -x followed by sync -f (Letterbox's"
          f" restore syncs before its switch-over): {mb / synced_s:6.1f} MB/s, median of paired ratios"
          f" {med([_ratio(r, 'restore', 'ref_restore_synced') for r in rounds]):4.2f}")
    phases: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in r["restore"]["phases"].items():
            phases.setdefault(k, []).append(v)
    print(f"{_load()} at the end")
    print("restore phases (median s): " + ", ".join(f"{k} {med(v):.2f}" for k, v in phases.items())
          + "; the standard tools neither verify checksums, fix up the db, nor sync to disk")


if __name__ == "__main__":
    main()
