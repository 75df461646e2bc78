"""The box's memory with many IMAP sessions holding one big folder selected (issue 19: an open folder's
memory per session independent of the folder's size): `letterbox serve` on a copy of the corpus folder,
then sessions opened in tiers (1, 10, 50 by default). Each session logs in, SELECTs INBOX and fetches
`1:* (FLAGS)` (what a mail program does when it opens a folder); then a message is APPENDed and another
session sets a flag, and every session NOOPs, taking in both changes. RSS of the server (and its
children) is read after each tier, and the growth per session and per message is printed, with the
time of `UID FETCH 1:* (FLAGS)` and of a session's catch-up after another's STORE (NOOP) at that tier.

    python -m bench.sessions [--size 100000] [--sessions 1,10,50] [--corpus DIR] [--code DIR]

--corpus keeps the generated Maildir between runs; --code runs another checkout (A/B).
Run it under `nice -n 5` on a shared machine; the figures are sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import corpus
from bench.memory import corpus_folder, rollup, tree, tree_rss
from bench.side_by_side import READER, Results, Session, Setup, close_session, open_session, uptime

MIB = 1024.0


def server_rss(pid: int) -> float:
    return rollup(pid).get("Rss", 0) / MIB


async def tiers(port: int, pid: int, size: int, counts: list[int], deadline: float) -> None:
    sessions: list[Session] = []
    start = server_rss(pid)
    print(f"| sessions | server RSS MiB | all processes MiB | growth per session MiB | per session and message B "
          f"| UID FETCH 1:* FLAGS ms | catch-up per session ms |  ({uptime()})")
    print("|---|---|---|---|---|---|---|")
    print(f"| 0 | {start:.1f} | {tree_rss(pid):.1f} | | |", flush=True)
    for appended, count in enumerate(counts, start=1):
        while len(sessions) < count:
            session = await open_session(port, READER, deadline)
            await session.command("SELECT INBOX")
            await session.command("FETCH 1:* (FLAGS)")
            sessions.append(session)
        # A change every session takes in: a new message and a flag set by the first session.
        message = corpus.message(size + appended, READER).decode()
        first = sessions[0]
        await first.command(f"APPEND INBOX {{{len(message)}+}}\r\n{message}")
        await first.command(f"STORE {appended} +FLAGS (\\Flagged)")
        for session in sessions:
            await session.command("NOOP")
        await asyncio.sleep(2.0)
        rss = server_rss(pid)
        per = (rss - start) / count
        # What the commands whose work is per message of the view cost meanwhile (ms, medians of 3):
        # UID FETCH 1:* (FLAGS) in one session, and a catch-up: a flag set in one session, then a
        # NOOP in each (per session).
        flags, catch_up = [], []
        for n in range(3):
            began = time.perf_counter()
            await first.command("UID FETCH 1:* (FLAGS)")
            flags.append((time.perf_counter() - began) * 1000)
            await first.command(f"STORE {appended + 100 + n} +FLAGS (\\Answered)")
            began = time.perf_counter()
            for session in sessions:
                await session.command("NOOP")
            catch_up.append((time.perf_counter() - began) * 1000 / count)
        print(f"| {count} | {rss:.1f} | {tree_rss(pid):.1f} | {per:.2f} | {per * 1024 * 1024 / size:.0f} "
              f"| {statistics.median(flags):.0f} | {statistics.median(catch_up):.1f} |", flush=True)
    for session in sessions:
        await close_session(session)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--corpus", type=Path, help="where the generated Maildir is kept between runs")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose appliance the box runs (A/B)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per IMAP command")
    args = parser.parse_args()
    args.settle = 0.0
    Results(args)  # (Setup reads nothing of it but the arguments)
    counts = sorted({int(n) for n in args.sessions.split(",") if n})
    with tempfile.TemporaryDirectory(prefix="letterbox-sessions-") as tmp:
        work = Path(tmp)
        folder = corpus_folder(args.corpus or work / "corpus", args.size)
        setup = Setup.make(work, args)
        with setup.letterbox({READER: folder}, code=args.code) as box:
            print(f"# {args.size:,} messages, code {args.code or 'this checkout'}, server pid {box.pid} "
                  f"({len(tree(box.pid))} processes)", flush=True)
            asyncio.run(tiers(box.port("imaps"), box.pid, args.size, counts, args.timeout))


if __name__ == "__main__":
    main()
