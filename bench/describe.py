"""The CPU a message costs to get its message cache row (issue 19): describe the side-by-side corpus
(bench/corpus.py) in one process, as the server's FETCH and the CPU pool's worker do, and print the
thread CPU per message, the median and best of the rounds.

Each round describes the same `--count` messages in order, its per-process caches (rendered
addresses, shared part headers, leaf texts: appliance/caches.py) emptied first, as after a folder
left memory. `--files` describes them from files in a Maildir (fetch_cache.described_files: os.open,
one fstat, one read, 16 files read ahead), the server's path for a folder copied in; without it, from memory
(fetch_cache.describe_bytes, as at delivery). `--profile` prints cProfile's top functions of one more
round.

For instruction counts (the figure to compare on a loaded machine):
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out python -m bench.describe --rounds 1 --count 2000

Usage: python -m bench.describe [--count 10000] [--rounds 5] [--files] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from appliance import caches
from appliance.imap import fetch_cache
from bench import corpus


def _clear_caches() -> None:
    for cache in caches._registered:  # (caches.empty also collects: not part of describing)
        cache.cache_clear()


def _from_memory(messages: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        for data in messages:
            fetch_cache.describe_bytes(data, (len(data), 0, 0))
        return len(messages)
    return run


def _from_files(paths: list[str]) -> Callable[[], int]:
    def run() -> int:
        for _ in fetch_cache.described_files([(path, path, None) for path in paths]):
            pass
        return len(paths)
    return run


def _round(run: Callable[[], int]) -> float:
    """Thread CPU per message of one round, in microseconds."""
    _clear_caches()
    start = time.thread_time()
    count = run()
    return (time.thread_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000, help="messages of the corpus (default 10000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", action="store_true", help="describe from Maildir files, not from memory")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round, top 30 by own time")
    args = parser.parse_args()
    messages = [corpus.message(n, "user@bench.test") for n in range(args.count)]
    with tempfile.TemporaryDirectory(prefix="describe-") as tmp:
        if args.files:
            corpus.write_folder(Path(tmp), args.count, "user@bench.test")
            cur = Path(tmp) / "cur"
            run = _from_files(sorted((str(cur / name) for name in os.listdir(cur)), key=lambda p: int(p.rsplit("/", 1)[1].split(".")[0])))
        else:
            run = _from_memory(messages)
        figures = [_round(run) for _ in range(args.rounds)]
        load = os.getloadavg()[0]
        print(f"describe {'files' if args.files else 'memory'}: {args.count} messages, {args.rounds} rounds, "
              f"thread CPU us/message median {statistics.median(figures):.1f}, best {min(figures):.1f} "
              f"[{', '.join(f'{f:.1f}' for f in figures)}] (load {load:.2f})")
        if args.profile:
            _clear_caches()
            profile = cProfile.Profile()
            profile.runcall(run)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
