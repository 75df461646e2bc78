"""Where the wall time of the side-by-side bench's far IMAP rows goes (issue 19): for each row, Letterbox
only, the same client, corpus and order as bench/side_by_side.py (cold SELECT, Thunderbird's first
header fetch, then in a second session FETCH 1:* (ENVELOPE BODYSTRUCTURE) and SEARCH SUBJECT; with
--body then 2000 LMTP deliveries, 200 APPENDs, a wait until the box is idle and SEARCH BODY):

- wall: the client's time for the command;
- server: the `letterbox serve` process's CPU (user/system, from /proc) and its threads' context
  switches (GIL hand-offs show there);
- worker: CPU of its children (the CPU pool's worker and multiprocessing's resource tracker);
- client: this process's CPU (the bench client's parsing);
- runnable: time the threads of each were ready to run but waited for a core (/proc schedstat): the
  machine's load, not the box;
- wall - CPU: the wall time less the three CPU figures; negative when they ran in parallel;
- then each row's CPU by thread (process, thread id, name; py-spy's --threads names the ids), so
  the server's GIL-bound threads show apart from the worker's.

--corpus DIR keeps the written folder between runs; --code DIR runs that checkout's appliance (A/B).

With --spy DIR, py-spy records each row (`--threads`, raw collapsed stacks, the worker included) into
DIR/ROW-ROUND.txt; the figures of a row recorded so are slowed by the sampling.

Usage: python -m bench.wall [--size 10000] [--rounds 1] [--spy DIR] [--corpus DIR] [--code DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench import corpus
from bench.side_by_side import (
    READER,
    THUNDERBIRD,
    Box,
    Session,
    Setup,
    close_session,
    lmtp_load,
    open_session,
    settle_cpu,
    uptime,
)

TICK = os.sysconf("SC_CLK_TCK")
SPY = Path(sys.executable).parent / "py-spy"


def _stat_fields(pid: int) -> list[str]:
    # Fields after the command name (which may hold spaces): utime is [11], stime [12].
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _tasks(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in _tasks(pid):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Usage:
    """One process's counters at one moment (seconds, switches)."""

    user: float = 0.0
    system: float = 0.0
    switches: int = 0
    runnable: float = 0.0  # waiting on a run queue, all threads

    @classmethod
    def of(cls, pid: int) -> Usage:
        try:
            fields = _stat_fields(pid)
        except FileNotFoundError:
            return cls()
        switches, runnable = 0, 0
        for task in _tasks(pid):
            try:
                runnable += int((task / "schedstat").read_text().split()[1])
                for line in (task / "status").read_text().splitlines():
                    if "ctxt_switches" in line:
                        switches += int(line.split()[1])
            except FileNotFoundError:
                continue
        return cls(int(fields[11]) / TICK, int(fields[12]) / TICK, switches, runnable / 1e9)

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.user + other.user, self.system + other.system, self.switches + other.switches,
                     self.runnable + other.runnable)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user - other.user, self.system - other.system, self.switches - other.switches,
                     self.runnable - other.runnable)

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass(frozen=True)
class Moment:
    wall: float
    server: Usage
    worker: Usage  # the server's children, live and reaped (cutime/cstime)
    client: Usage

    @classmethod
    def now(cls, pid: int) -> Moment:
        kids = sum((Usage.of(child) for child in children(pid)), Usage())
        fields = _stat_fields(pid)
        reaped = Usage(int(fields[13]) / TICK, int(fields[14]) / TICK)
        times = os.times()
        client = Usage.of(os.getpid())
        return cls(time.perf_counter(), Usage.of(pid), kids + reaped,
                   Usage(times.user, times.system, client.switches, client.runnable))


def line(name: str, before: Moment, after: Moment) -> str:
    wall = after.wall - before.wall
    server, worker, client = after.server - before.server, after.worker - before.worker, after.client - before.client
    rest = wall - server.cpu - worker.cpu - client.cpu

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.0f}"

    return (f"| {name} | {ms(wall)} | {ms(server.cpu)} ({ms(server.user)}/{ms(server.system)}) | {server.switches:,} "
            f"| {ms(worker.cpu)} | {ms(client.cpu)} | {ms(server.runnable)} / {ms(worker.runnable)} / "
            f"{ms(client.runnable)} | {ms(rest)} |")


HEADER = ("| row | wall ms | server CPU ms (user/sys) | server context switches | worker CPU ms | client CPU ms "
          "| runnable, waiting for a core ms (server / worker / client) | wall - CPU ms |\n|---|---|---|---|---|---|---|---|")


class Recorder:
    """Measures one row at a time; with `spy`, py-spy records the box meanwhile."""

    def __init__(self, pid: int, spy: Path | None, round_number: int) -> None:
        self.pid, self.spy, self.round = pid, spy, round_number
        self.lines: list[str] = []
        self.by_thread: list[str] = []  # CPU ms of each thread in each row (Recorder.threads)
        self.spans: list[str] = []  # each row's start and end, epoch seconds (to match the server's log)

    def threads(self) -> dict[str, float]:
        """CPU seconds of each thread of the server and of its children, by process and thread name."""
        found: dict[str, float] = {}
        for pid in (self.pid, *children(self.pid)):
            for task in _tasks(pid):
                try:
                    fields = (task / "stat").read_text().rpartition(")")[2].split()
                    name = (task / "comm").read_text().strip()
                except FileNotFoundError:
                    continue
                key = f"{'server' if pid == self.pid else f'child {pid}'} {task.name} {name}"
                found[key] = found.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
        return found

    async def row(self, name: str, command: Callable[[], Awaitable[object]]) -> None:
        recording = None
        if self.spy is not None:
            out = self.spy / f"{re.sub('[^a-z]+', '-', name.lower()).strip('-')[:40]}-{self.round}.txt"
            recording = await asyncio.create_subprocess_exec(
                str(SPY), "record", "--threads", "--subprocesses", "-r", "250", "-f", "raw", "-o", str(out),
                "-p", str(self.pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)  # py-spy attached
        threads = self.threads()
        before = Moment.now(self.pid)
        began = time.time()
        await command()
        after = Moment.now(self.pid)
        self.spans.append(f"{name}: {began:.3f} .. {time.time():.3f}")
        spent = {k: v - threads.get(k, 0.0) for k, v in self.threads().items()}
        self.by_thread.append(f"{name}: " + ", ".join(
            f"{k} {v * 1000:,.0f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.01))
        if recording is not None:
            recording.send_signal(signal.SIGINT)
            await asyncio.wait_for(recording.wait(), 60)
        self.lines.append(line(name, before, after))


async def rows(recorder: Recorder, port: int, size: int, body: Box | None = None) -> None:
    first = await open_session(port, READER, 120)
    await recorder.row("cold SELECT", lambda: first.timed("SELECT INBOX"))
    await recorder.row("Thunderbird's first header fetch", lambda: first.timed(THUNDERBIRD))
    await close_session(first)
    second: Session = await open_session(port, READER, 120)
    await second.command("SELECT INBOX")
    await recorder.row("FETCH 1:* (ENVELOPE BODYSTRUCTURE), second session",
                       lambda: second.timed("FETCH 1:* (ENVELOPE BODYSTRUCTURE)"))
    await recorder.row("SEARCH SUBJECT", lambda: second.search(f"SEARCH SUBJECT {corpus.SUBJECT_WORD}"))
    await close_session(second)
    if body is not None:
        await body_row(recorder, body, size)


async def body_row(recorder: Recorder, box: Box, size: int, deliveries: int = 2000, appends: int = 200) -> None:
    """side_by_side's SEARCH BODY row and what comes before it there: LMTP deliveries and APPENDs
    into the folder, then until the box is idle (its full-text index caught up)."""
    await lmtp_load(box.port("lmtp"), READER, size, deliveries)
    appender = await open_session(box.port("imaps"), READER, 120)
    for n in range(appends):
        await appender.append("INBOX", corpus.message(size + deliveries + n, READER))
    await close_session(appender)
    waited = await settle_cpu(box.pid, 600)
    recorder.lines.append(f"(idle after {waited:.1f} s before SEARCH BODY)")
    third = await open_session(box.port("imaps"), READER, 120)
    await third.command("SELECT INBOX")
    await recorder.row("SEARCH BODY", lambda: third.search(f"SEARCH BODY {corpus.BODY_WORD}"))
    await close_session(third)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose appliance the box runs (A/B)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a directory keeping the corpus folder between runs (written when missing)")
    parser.add_argument("--spy", type=Path, default=None, help="a directory for py-spy's records of each row")
    parser.add_argument("--body", action="store_true",
                        help="then side_by_side's SEARCH BODY row (after its LMTP and APPEND rows and an idle wait)")
    args = parser.parse_args(argv)
    if args.spy is not None:
        args.spy.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="letterbox-wall-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        setup = Setup.make(work, args)
        folder = work / "corpus" if args.corpus is None else args.corpus / f"{args.size}"
        written = None if args.corpus is None else args.corpus / f"{args.size}.written"
        if written is None or not written.exists():
            corpus.write_folder(folder, args.size, READER)
            if written is not None:
                written.touch()
        for n in range(args.rounds):
            with setup.letterbox({READER: folder}, code=args.code) as box:
                load = uptime()
                recorder = Recorder(box.pid, args.spy, n + 1)
                asyncio.run(rows(recorder, box.port("imaps"), args.size, box if args.body else None))
            print(f"Letterbox, {args.size:,} messages, round {n + 1}/{args.rounds}; before: {load}; after: {uptime()}")
            print(HEADER)
            print("\n".join(recorder.lines))
            print("CPU ms by thread:\n" + "\n".join(recorder.by_thread))
            print("When (epoch seconds):\n" + "\n".join(recorder.spans), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
