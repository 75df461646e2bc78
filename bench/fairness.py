"""Fairness benchmark (issue 19): does one session's long SEARCH BODY slow everyone else down?

A real `letterbox serve` with one folder of N messages (bench.imap's, copied in as foreign files).
Interleaved rounds, each measured idle and then busy (while another session repeats
`SEARCH BODY zq`: a needle too short for the full-text index, so every file is read and decoded, in
the CPU pool's worker process): another session's NOOP latency (median of NOOPS) and SMTP intake
(bench.smtp's load with SPF/DKIM/DMARC on: M messages over C sessions, messages/s). Prints both
figures and the busy/idle ratios per round and as medians. Target: within 2x of idle.
Usage: python -m bench.fairness [--size 5000] [--rounds 3] [--messages 200] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.benchbox import cli, free_offset, serving, set_settings
from bench.imap import DOMAIN, IMAPS, PASSWORD, USER, Client, write_messages
from bench.search import INDEX_TIMEOUT, client_context, indexed_uid, session
from bench.smtp import MX_PORT, RCPT, SENDER_ZONE, load
from tests.support.dns_server import ZoneServer

NOOPS = 50


async def noop_median(client: Client) -> float:
    times = []
    for _ in range(NOOPS):
        started = time.perf_counter()
        await client.command("NOOP")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def search_forever(port: int, searches: list[float]) -> None:
    client = await session(port)
    try:
        while True:
            started = time.perf_counter()
            await client.command("SEARCH BODY zq")
            searches.append(time.perf_counter() - started)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def measure(imaps: int, mx: int, args: argparse.Namespace) -> dict[str, list[float]]:
    other = await session(imaps)
    out: dict[str, list[float]] = {k: [] for k in ("noop idle", "noop busy", "smtp idle", "smtp busy", "search")}
    for _ in range(args.rounds):
        out["noop idle"].append(await noop_median(other))
        elapsed, _ = await load(mx, args.messages, args.concurrency, 2048)
        out["smtp idle"].append(args.messages / elapsed)
        searches: list[float] = []
        searching = asyncio.create_task(search_forever(imaps, searches))
        await asyncio.sleep(1.0)  # the search is under way (and the worker process started)
        out["noop busy"].append(await noop_median(other))
        elapsed, _ = await load(mx, args.messages, args.concurrency, 2048)
        out["smtp busy"].append(args.messages / elapsed)
        searching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await searching
        out["search"] += searches
    await other.command("LOGOUT")
    await other.close()
    return out


async def _select(port: int) -> None:
    client = await session(port)
    await client.command("LOGOUT")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    client_context()  # fail early if TLS is unusable
    with tempfile.TemporaryDirectory(prefix="letterbox-bench-fairness-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN)
        for user in (USER, RCPT):
            cli(data, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
        write_messages(data / "mail" / DOMAIN / USER.split("@")[0], args.size)
        dns = ZoneServer(SENDER_ZONE, ttl=3600, negative_ttl=900)
        dns_port = dns.start()
        set_settings(data, {"dns_resolver": f"127.0.0.1:{dns_port}", "queue_hold": "1", "inbound_auth": "on"})
        try:
            with serving(data, Path(tmp) / "serve.log", offset := free_offset(), hostname="bench.test"):
                # "Idle" is idle: the copied-in folder is indexed first (its SELECT gives the UIDs).
                asyncio.run(_select(IMAPS + offset))
                deadline = time.monotonic() + INDEX_TIMEOUT
                while indexed_uid(data / "letterbox.db") < args.size and time.monotonic() < deadline:
                    time.sleep(0.5)
                out = asyncio.run(measure(IMAPS + offset, MX_PORT + offset, args))
        finally:
            dns.stop()
    load_avg = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"fairness: {args.size:,} messages, SEARCH BODY zq (every file scanned) in one session; "
          f"{args.rounds} rounds idle/busy ({load_avg})")
    searches = out["search"]
    if searches:
        print(f"  the search took {statistics.median(searches):.2f} s (median of {len(searches)})")
    for what, unit, scale in (("noop", "ms", 1000.0), ("smtp", "msg/s", 1.0)):
        idle, busy = out[f"{what} idle"], out[f"{what} busy"]
        paired = ", ".join(f"{b / a:.2f}" for a, b in zip(idle, busy, strict=True))
        print(f"  {what.upper():5} idle {statistics.median(idle) * scale:8.1f} {unit:6} busy "
              f"{statistics.median(busy) * scale:8.1f} {unit:6} busy/idle {statistics.median(busy) / statistics.median(idle):.2f}"
              f"   paired: {paired}")


if __name__ == "__main__":
    main()
