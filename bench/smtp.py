"""SMTP intake benchmark: N messages over C concurrent sessions into the MX port of a real
`letterbox serve`, each delivered (fsynced and indexed) into one Maildir before its 250.

Prints messages/s, p50/p99 latency per message (MAIL FROM sent -> 250 after DATA), the server's CPU
seconds per message (user + system of the box and its CPU worker during the load) and its peak RSS.
The client is this script's (a Python asyncio client) or, with --client smtp-source, Postfix's
smtp-source as bench.side_by_side runs it (1 KiB messages; throughput until all are in the Maildir). The MX's inbound checks (SPF, DKIM, DMARC) run as in production (or not, with
--inbound-auth off), against a DNS server on loopback serving the sender's SPF and DMARC records with
real TTLs and an SOA on negative answers (so nothing leaves the machine, and a resolver cache behaves
as it would with a real sender's zone); the outbound queue is held.
Usage: python -m bench.smtp [--messages 2000] [--concurrency 10] [--size 2048] [--inbound-auth on|off]
       [--client python|smtp-source] [--delivery-log on|off|compare [--rounds 12]]
       [--against DIR [--rounds 12]]
--against DIR compares this tree's box with another checkout of the code (e.g. `git worktree add
/tmp/base main` or `git archive main | tar -x -C /tmp/base`): rounds alternate the two, each pair's
ratio cancels the machine's load of its moment, and the medians of the pairs' ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.benchbox import (
    cli,
    cpu_seconds,
    free_offset,
    maildir_count,
    peak_rss_kib,
    serving,
    set_settings,
    thread_cpu,
    thread_cpu_used,
)
from tests.support.dns_server import ZoneServer  # the repo's loopback DNS server

MX_PORT = 25
START_TRIES = 5
DOMAIN = "bench.test"
RCPT = f"rcpt@{DOMAIN}"
SENDER_DOMAIN = "elsewhere.test"
# What a sender's zone typically publishes (RFC 7208 SPF, RFC 7489 DMARC), with common TTLs.
SENDER_ZONE = {
    (SENDER_DOMAIN, "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    (f"_dmarc.{SENDER_DOMAIN}", "TXT"): ['"v=DMARC1; p=none"'],
    ("bench.client", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
}


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def cmd(self, line: bytes, expect: int) -> None:
        self.writer.write(line + b"\r\n")
        code = await self.reply()
        if code != expect:
            raise RuntimeError(f"{line[:40]!r}: {code}")


async def run_session(port: int, queue: asyncio.Queue[int], body: bytes, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    s = Session(reader, writer)
    if await s.reply() != 220:
        raise RuntimeError("no greeting")
    await s.cmd(b"EHLO bench.client", 250)
    while True:
        try:
            n = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        started = time.perf_counter()
        await s.cmd(f"MAIL FROM:<sender@{SENDER_DOMAIN}>".encode(), 250)
        await s.cmd(f"RCPT TO:<{RCPT}>".encode(), 250)
        await s.cmd(b"DATA", 354)
        head = f"From: <sender@{SENDER_DOMAIN}>\r\nTo: <{RCPT}>\r\nSubject: bench {n}\r\n\r\n"
        await s.cmd(head.encode() + body + b".", 250)
        latencies.append(time.perf_counter() - started)
    await s.cmd(b"QUIT", 221)
    writer.close()
    await writer.wait_closed()


async def load(port: int, messages: int, concurrency: int, size: int) -> tuple[float, list[float]]:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(messages):
        queue.put_nowait(n)
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(run_session(port, queue, body, latencies) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


@contextlib.contextmanager
def serving_somewhere(data: Path, log: Path, code: Path | None = None
                      ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The box on a free port block; another block when someone else's process took a port of this one
    between the look and the bind (other benchmarks and tests run on this machine at the same time)."""
    start = 31000
    for _ in range(START_TRIES):
        offset = free_offset(start)
        try:
            with serving(data, log, offset, hostname="bench.test", code=code) as proc:
                yield proc, offset
                return
        except SystemExit as exc:
            if "address already in use" not in str(exc).lower():
                raise
            start = offset + 1009
    raise SystemExit(f"no free port block after {START_TRIES} tries")


def smtp_source(port: int, messages: int, concurrency: int, maildir: Path) -> tuple[float, list[float]]:
    """Postfix's smtp-source as bench.side_by_side runs it (1 KiB messages): seconds until every
    message is in the Maildir (its 250s come after that here anyway); it reports no latencies."""
    started = time.perf_counter()
    subprocess.run(["smtp-source", "-s", str(concurrency), "-m", str(messages), "-l", "1024",
                    "-M", "bench.client", "-f", f"sender@{SENDER_DOMAIN}", "-t", RCPT, f"127.0.0.1:{port}"],
                   capture_output=True, check=True, timeout=600)
    deadline = started + 600
    while maildir_count(maildir) < messages and time.perf_counter() < deadline:
        time.sleep(0.01)
    return time.perf_counter() - started, []


@contextlib.contextmanager
def profiling(pid: int, output: Path | None, options: str) -> Iterator[None]:
    """py-spy recording the box (`--format raw`, collapsed stacks) while the load runs, when asked
    for; `options` are more of py-spy's (e.g. "--idle", "--gil", "--threads")."""
    if output is None:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    proc = subprocess.Popen([str(spy), "record", "--format", "raw", "--nonblocking", "--rate", "200",
                             "--output", str(output), "--pid", str(pid), *options.split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attaches before the first message
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@dataclass(frozen=True)
class Round:
    elapsed: float
    latencies: list[float]
    stored: int
    rss_idle_kib: int
    rss_peak_kib: int
    dns_queries: int
    cpu: float  # the server's CPU seconds during the load
    threads: dict[str, tuple[float, float]]  # the box's CPU seconds (user, system) by thread during the load

    def rate(self) -> float:
        return self.stored / self.elapsed

    def loop_cpu(self) -> float:
        """CPU seconds of the event loop's thread (what caps the MX's throughput, issue 19)."""
        return sum(self.threads.get("loop", (0.0, 0.0)))


def run_box(args: argparse.Namespace, delivery_log: str, code: Path | None = None) -> Round:
    """One box (this tree's code, or the checkout at `code`), one load."""
    with tempfile.TemporaryDirectory(prefix="letterbox-bench-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN, code=code)
        cli(data, "user", "add", RCPT, "--password-stdin", stdin="bench password 1234567\n", code=code)
        dns = ZoneServer(SENDER_ZONE, ttl=3600, negative_ttl=900)
        dns_port = dns.start()
        set_settings(data, {"dns_resolver": f"127.0.0.1:{dns_port}", "queue_hold": "1",
                            "inbound_auth": args.inbound_auth, "delivery_log": delivery_log})
        maildir = data / "mail" / DOMAIN / "rcpt"
        try:
            with serving_somewhere(data, Path(tmp) / "serve.log", code) as (proc, offset):
                rss_idle = peak_rss_kib(proc.pid)
                cpu_before, threads_before = cpu_seconds(proc.pid), thread_cpu(proc.pid)
                with profiling(proc.pid, args.profile, args.profile_options):
                    if args.client == "smtp-source":
                        elapsed, latencies = smtp_source(MX_PORT + offset, args.messages, args.concurrency,
                                                         maildir)
                    else:
                        elapsed, latencies = asyncio.run(load(MX_PORT + offset, args.messages,
                                                              args.concurrency, args.size))
                cpu = cpu_seconds(proc.pid) - cpu_before
                threads = thread_cpu_used(threads_before, thread_cpu(proc.pid))
                rss_peak = peak_rss_kib(proc.pid)
        finally:
            dns.stop()
        stored = maildir_count(maildir)
    if stored != args.messages:
        raise SystemExit(f"expected {args.messages} files in the Maildir, found {stored}")
    return Round(elapsed, latencies, stored, rss_idle, rss_peak, dns.queries, cpu, threads)


def paired_cost(off: list[float], on: list[float]) -> tuple[float, list[float]]:
    """The log's cost in % from rounds run in pairs (off then on, back to back): each pair's ratio
    cancels the load of its moment, which moves whole rounds by 2-3x on a shared machine; the median
    of the pairs' costs, and the costs themselves."""
    costs = [100 * (1 - b / a) for a, b in zip(off, on, strict=True)]
    return statistics.median(costs), costs


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cpus"


def compare_log(args: argparse.Namespace) -> None:
    """The delivery log's cost (issue 18: at most 5 %): off/on pairs back to back, the order within a
    pair alternating (so a trend in the machine's load does not favour one side), the median of the
    pairs' costs next to the medians of the rates."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    loads: list[str] = []
    for n in range(args.rounds):
        loads.append(load_average())
        for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
            rates[mode].append(run_box(args, mode).rate())
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cost, costs = paired_cost(rates["off"], rates["on"])
    print(f"smtp intake with the delivery log off and on: {args.messages} messages x {args.size} B over "
          f"{args.concurrency} sessions, {args.rounds} pairs (off/on back to back); {loads[0]} at the start, "
          f"{load_average()} at the end")
    print(f"  log off  {off:8.1f} messages/s median  (rounds: {', '.join(f'{r:.1f}' for r in rates['off'])})")
    print(f"  log on   {on:8.1f} messages/s median  (rounds: {', '.join(f'{r:.1f}' for r in rates['on'])})")
    print(f"  cost     {cost:8.1f} %  median of the pairs' costs (target: at most 5 %); "
          f"of the medians {100 * (off - on) / off:.1f} %")
    print(f"  pairs    {', '.join(f'{c:+.1f}' for c in costs)} %")


def compare_code(args: argparse.Namespace) -> None:
    """This tree's box against the checkout at --against: rounds alternate the two (the order within
    a pair alternating too), and each pair's ratios of msg/s and of server CPU per message cancel
    the load of their moment; their medians are what to quote."""
    base: Path = args.against
    runs: dict[str, list[Round]] = {"this": [], "base": []}
    loads: list[str] = []
    for n in range(args.rounds):
        loads.append(load_average())
        for which in ("base", "this") if n % 2 == 0 else ("this", "base"):
            runs[which].append(run_box(args, args.delivery_log, base if which == "base" else None))
        this, old = runs["this"][-1], runs["base"][-1]
        print(f"  pair {n + 1}: base {old.rate():6.1f} msg/s {1000 * old.cpu / old.stored:5.2f} ms CPU/msg "
              f"({1000 * old.loop_cpu() / old.stored:4.2f} on the loop), "
              f"this {this.rate():6.1f} msg/s {1000 * this.cpu / this.stored:5.2f} ms CPU/msg "
              f"({1000 * this.loop_cpu() / this.stored:4.2f} on the loop)   ({loads[-1]})", flush=True)
    speed = [t.rate() / b.rate() for t, b in zip(runs["this"], runs["base"], strict=True)]
    cpu = [(t.cpu / t.stored) / (b.cpu / b.stored) for t, b in zip(runs["this"], runs["base"], strict=True)]
    loop = [(t.loop_cpu() / t.stored) / (b.loop_cpu() / b.stored)
            for t, b in zip(runs["this"], runs["base"], strict=True)]
    print(f"smtp intake, this tree vs {base}: {args.messages} messages over {args.concurrency} sessions "
          f"({args.client} client, inbound checks {args.inbound_auth}, delivery log {args.delivery_log}), "
          f"{args.rounds} pairs; {loads[0]} at the start, {load_average()} at the end")
    for which in ("base", "this"):
        rounds = runs[which]
        print(f"  {which:5} {statistics.median(r.rate() for r in rounds):7.1f} msg/s median, "
              f"{statistics.median(1000 * r.cpu / r.stored for r in rounds):6.2f} ms server CPU per message median, "
              f"peak RSS {statistics.median(r.rss_peak_kib for r in rounds) / 1024:.1f} MiB")
    print(f"  msg/s ratio this/base, median of pairs {statistics.median(speed):.2f}  "
          f"({', '.join(f'{r:.2f}' for r in speed)})")
    print(f"  CPU per message this/base, median of pairs {statistics.median(cpu):.2f}  "
          f"({', '.join(f'{r:.2f}' for r in cpu)})")
    print(f"  loop thread's CPU per message this/base, median of pairs {statistics.median(loop):.2f}  "
          f"({', '.join(f'{r:.2f}' for r in loop)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=None, help="default 2000 (300 a round with compare)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message (python client)")
    parser.add_argument("--client", choices=("python", "smtp-source"), default="python")
    parser.add_argument("--inbound-auth", choices=("on", "off"), default="on", help="SPF/DKIM/DMARC checks")
    parser.add_argument("--delivery-log", choices=("on", "off", "compare"), default="on",
                        help="the delivery log; 'compare' runs both, interleaved, and prints its cost")
    parser.add_argument("--against", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=12, help="pairs, with --delivery-log compare or --against")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy's collapsed stacks of the box during the load into this file")
    parser.add_argument("--profile-options", default="", help="more py-spy options, e.g. '--idle --gil'")
    args = parser.parse_args()
    if args.messages is None:
        # With compare, short rounds and many of them: the pairs' median stands up to the machine's
        # noise better than a few long rounds do (each round is a fresh box; only the load is timed).
        args.messages = 300 if args.delivery_log == "compare" else 2000
    if args.delivery_log == "compare":
        compare_log(args)
        return
    if args.against is not None:
        compare_code(args)
        return
    result = run_box(args, args.delivery_log)
    print(f"smtp intake: {args.messages} messages over {args.concurrency} sessions ({args.client} client), "
          f"delivered to one Maildir with fsync; {load_average()}")
    print(f"  throughput   {result.rate():8.1f} messages/s  ({result.elapsed:.2f} s)")
    if result.latencies:
        latencies = sorted(result.latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"  latency p50  {statistics.median(latencies) * 1000:8.1f} ms")
        print(f"  latency p99  {p99 * 1000:8.1f} ms")
    print(f"  server CPU   {1000 * result.cpu / result.stored:8.2f} ms per message  ({result.cpu:.2f} s)")
    for name, (user, system) in sorted(result.threads.items(), key=lambda item: -sum(item[1])):
        print(f"    {name:22} {1000 * (user + system) / result.stored:6.2f} ms per message "
              f"(user {1000 * user / result.stored:.2f}, system {1000 * system / result.stored:.2f}), "
              f"{100 * (user + system) / result.elapsed:4.0f} % of a core")
    print(f"  server RSS   {result.rss_peak_kib / 1024:8.1f} MiB peak  ({result.rss_idle_kib / 1024:.1f} MiB after start)")
    print(f"  stored       {result.stored} files")
    print(f"  DNS queries  {result.dns_queries}  (inbound checks {args.inbound_auth}, delivery log {args.delivery_log})")


if __name__ == "__main__":
    main()
