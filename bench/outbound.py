"""Outbound queue benchmark: messages submitted on 587 (STARTTLS + AUTH, DKIM-signed) to 10
destination domains, until each is handed off to a local sink (Postfix's smtp-sink, or an aiosmtpd
sink when that is missing). A real `letterbox serve` subprocess; the 10 domains' MX records come from a
DNS server on loopback.

Prints submission rate, end-to-end rate (first submission -> last handoff) and p50/p99 of the time
from a message's 250 on 587 to its removal from the queue (= accepted by the sink).
Usage: python -m bench.outbound [--messages 1000] [--concurrency 4] [--size 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.benchbox import cli, free_offset, serving, set_settings
from tests.support.dns_server import ZoneServer

SINK_HOST = "127.0.0.2"
DOMAIN = "bench.test"
USER, PASSWORD = f"sender@{DOMAIN}", "bench password 1234"
DESTINATIONS = [f"d{n}.example" for n in range(10)]
POLL = 0.02  # seconds between looks at the queue


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class AiosmtpdSink:
    """Fallback sink: accepts and discards, on its own thread."""

    def __init__(self, host: str, port: int) -> None:
        from aiosmtpd.smtp import SMTP

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                return "250 2.0.0 discarded"

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> asyncio.AbstractServer:
            return await self.loop.create_server(lambda: SMTP(Handler(), hostname="sink", loop=self.loop),
                                                 host, port)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Submitter:
    """One submission session: STARTTLS, AUTH PLAIN, then MAIL/RCPT/DATA per message."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode().rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), lines[-1]

    async def cmd(self, line: bytes, expect: int) -> str:
        self.writer.write(line + b"\r\n")
        code, text = await self.reply()
        if code != expect:
            raise RuntimeError(f"{line[:40]!r}: {text}")
        return text

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        await self.reply()
        await self.cmd(b"EHLO bench.client", 250)
        await self.cmd(b"STARTTLS", 220)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the box's self-signed certificate
        await self.writer.start_tls(ctx)
        await self.cmd(b"EHLO bench.client", 250)
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        await self.cmd(f"AUTH PLAIN {token}".encode(), 235)

    async def send(self, rcpt: str, body: bytes) -> str:
        await self.cmd(f"MAIL FROM:<{USER}>".encode(), 250)
        await self.cmd(f"RCPT TO:<{rcpt}>".encode(), 250)
        await self.cmd(b"DATA", 354)
        text = await self.cmd(body + b".", 250)
        return text.split()[-1]  # '... queued as ID'

    async def close(self) -> None:
        self.writer.write(b"QUIT\r\n")
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def submit_all(port: int, messages: int, concurrency: int, size: int,
                     accepted: dict[str, float]) -> None:
    work: asyncio.Queue[int] = asyncio.Queue()
    for n in range(messages):
        work.put_nowait(n)
    filler = b"x" * 70 + b"\r\n"

    def body(n: int, rcpt: str) -> bytes:
        head = (f"From: Sender <{USER}>\r\nTo: <{rcpt}>\r\nSubject: bench {n}\r\n"
                f"Message-ID: <bench{n}@{DOMAIN}>\r\n\r\n").encode()
        return head + filler * max(1, (size - len(head)) // len(filler))

    async def session() -> None:
        s = Submitter(port)
        await s.open()
        while True:
            try:
                n = work.get_nowait()
            except asyncio.QueueEmpty:
                break
            rcpt = f"user{n}@{DESTINATIONS[n % len(DESTINATIONS)]}"
            queue_id = await s.send(rcpt, body(n, rcpt))
            accepted[queue_id] = time.monotonic()
        await s.close()

    await asyncio.gather(*(session() for _ in range(concurrency)))


def watch_handoffs(db_path: Path, accepted: dict[str, float], handed: dict[str, float], total: int,
                   deadline: float) -> None:
    """Poll the queue: a message handed off to the sink is removed from queue_messages."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        while len(handed) < total and time.monotonic() < deadline:
            present = {row[0] for row in conn.execute("SELECT id FROM queue_messages")}
            now = time.monotonic()
            for queue_id in list(accepted):
                if queue_id not in present and queue_id not in handed:
                    handed[queue_id] = now
            time.sleep(POLL)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4, help="submission sessions")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--profile", metavar="FILE", help="run the server under cProfile, stats to FILE")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="letterbox-bench-queue-"))
    data = workdir / "data"
    zone = ZoneServer(ttl=3600)
    zone.start()
    sink_port = free_port(SINK_HOST)
    for n, domain in enumerate(DESTINATIONS):
        zone.set(domain, "MX", [f"10 mx{n}.example."])
        zone.set(f"mx{n}.example", "A", [SINK_HOST])
    sink_program = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.access("/usr/sbin/smtp-sink", os.X_OK)
                                                  else None)
    sink_proc: subprocess.Popen[bytes] | None = None
    fallback: AiosmtpdSink | None = None
    if sink_program:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink_proc = subprocess.Popen([sink_program, *user, f"{SINK_HOST}:{sink_port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sink_name = "smtp-sink"
    else:
        fallback = AiosmtpdSink(SINK_HOST, sink_port)
        sink_name = "aiosmtpd sink"

    offset = free_offset()
    cli(data, "domain", "add", DOMAIN)
    cli(data, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
    cli(data, "dkim", "rotate", DOMAIN)
    set_settings(data, {"dns_resolver": zone.address, "outbound_port": str(sink_port)})
    profile = [sys.executable, "-m", "cProfile", "-o", args.profile] if args.profile else []
    try:
        with serving(data, workdir / "serve.log", offset, wrapper=profile):
            print(f"queue: {args.messages} messages of {args.size} bytes to {len(DESTINATIONS)} domains, "
                  f"{args.concurrency} submission sessions, DKIM-signed, sink: {sink_name}")
            port = 587 + offset

            # 1. Live: the queue delivers while mail is being submitted.
            accepted: dict[str, float] = {}
            handed: dict[str, float] = {}
            watcher = threading.Thread(target=watch_handoffs, args=(data / "letterbox.db", accepted, handed,
                                                                    args.messages, time.monotonic() + 600))
            start = time.monotonic()
            watcher.start()
            asyncio.run(submit_all(port, args.messages, args.concurrency, args.size, accepted))
            submitted = time.monotonic()
            watcher.join()
            if len(handed) < args.messages:
                raise SystemExit(f"only {len(handed)} of {args.messages} messages were handed off")
            finished = max(handed.values())
            latencies = [handed[q] - accepted[q] for q in accepted]
            print(f"  submission (587, STARTTLS+AUTH): {args.messages / (submitted - start):8.1f} messages/s")
            print(f"  submission -> handoff at sink:   {args.messages / (finished - start):8.1f} messages/s "
                  f"({finished - start:.2f} s)")
            print(f"  250 -> handoff latency:          p50 {statistics.median(latencies) * 1000:7.1f} ms   "
                  f"p99 {percentile(latencies, 0.99) * 1000:7.1f} ms")

            # 2. Backlog: the same number queued while delivery is held, then released (the queue alone).
            set_settings(data, {"queue_hold": "1"})
            time.sleep(6)  # the running queue reads its settings at least every 5 s
            backlog: dict[str, float] = {}
            asyncio.run(submit_all(port, args.messages, args.concurrency, args.size, backlog))
            drained: dict[str, float] = {}
            watcher = threading.Thread(target=watch_handoffs, args=(data / "letterbox.db", backlog, drained,
                                                                    args.messages, time.monotonic() + 600))
            set_settings(data, {"queue_hold": "0"})
            released = time.monotonic()
            watcher.start()
            watcher.join()
            if len(drained) < args.messages:
                raise SystemExit(f"only {len(drained)} of {args.messages} queued messages were handed off")
            first, last = min(drained.values()), max(drained.values())
            print(f"  queued backlog -> sink:          {args.messages / (last - first):8.1f} messages/s "
                  f"(first handoff {first - released:.2f} s after release, all in {last - released:.2f} s)")
    finally:
        if sink_proc is not None:
            sink_proc.terminate()
            sink_proc.wait(10)
        if fallback is not None:
            fallback.stop()
        zone.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
