"""Delivery benchmark: MailStore.deliver into one Maildir, each copy fsynced (file and directory) and
indexed in SQLite (synchronous=FULL) before it counts, first one after another, then with C
deliveries in flight at once. Also times a snapshot of the resulting folder.

Usage: python -m bench.deliver [--messages 2000] [--size 4096] [--concurrency 10] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from appliance.accounts import Accounts
from appliance.db import Database
from appliance.store.mailstore import MailStore

MAILBOX = "bench@bench.test"


def message(n: int, size: int) -> bytes:
    head = b"From: a@example.test\r\nTo: bench@bench.test\r\nSubject: message %d\r\n\r\n" % n
    line = b"x" * 70 + b"\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def report(label: str, latencies: list[float], elapsed: float, size: int) -> None:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"{label}: {len(latencies)} deliveries of {size} bytes in {elapsed:.2f} s = "
          f"{len(latencies) / elapsed:.0f}/s (p50 {statistics.median(ordered) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms)", flush=True)


async def deliver_one(store: MailStore, n: int, size: int, latencies: list[float]) -> None:
    started = time.perf_counter()
    result = (await store.deliver([MAILBOX], message(n, size)))[MAILBOX]
    if not isinstance(result, int):
        raise SystemExit(f"delivery failed: {result!r}")
    latencies.append(time.perf_counter() - started)


async def bench(root: Path, messages: int, size: int, concurrency: int) -> None:
    db = await Database.open(root / "letterbox.db")
    try:
        await db.execute("INSERT INTO domains (name, created_at) VALUES ('bench.test', 0)")
        await db.execute("INSERT INTO mailboxes (domain_id, local_part, password_hash, created_at)"
                         " SELECT id, 'bench', 'x', 0 FROM domains")
        store = MailStore(root / "mail", db, Accounts(db))
        await store.recover()
        await deliver_one(store, 0, size, [])  # the Maildir, folders and rows exist from here

        latencies: list[float] = []
        started = time.perf_counter()
        for n in range(messages):
            await deliver_one(store, n, size, latencies)
        report("sequential", latencies, time.perf_counter() - started, size)

        latencies = []
        todo = iter(range(messages))

        async def worker() -> None:
            for n in todo:
                await deliver_one(store, n, size, latencies)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        report(f"concurrent ({concurrency} in flight)", latencies, time.perf_counter() - started, size)

        total = 2 * messages + 1
        fresh = MailStore(root / "mail", db, Accounts(db))  # a restart: the index comes from the db
        started = time.perf_counter()
        snap = await fresh.snapshot(MAILBOX, "INBOX")
        first = time.perf_counter() - started
        assert len(snap.messages) == total, len(snap.messages)
        for sub in ("new", "cur"):  # past the "changed just now" window, as after a quiet second
            os.utime(root / "mail" / "bench.test" / "bench" / sub, (time.time() - 60,) * 2)
        await fresh.snapshot(MAILBOX, "INBOX")
        started = time.perf_counter()
        await fresh.snapshot(MAILBOX, "INBOX")
        unchanged = time.perf_counter() - started
        print(f"snapshot of {total} messages: after a restart {first * 1000:.0f} ms, "
              f"unchanged {unchanged * 1000:.1f} ms", flush=True)
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--dir", type=Path, help="where to make the data directory (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="letterbox-bench-", dir=args.dir))
    try:
        asyncio.run(bench(root, args.messages, args.size, args.concurrency))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
