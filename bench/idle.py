"""What a delivery costs per IDLE session (issue 19): a real `letterbox serve` on loopback, N sessions
IDLE on INBOX over TLS in a separate client process (reading what the box sends, or --silent: never
reading, so their output buffers fill), then M APPENDs to INBOX from another connection in this process.
Prints, per tier of N, the time of the M deliveries and the server's CPU (user + system from
/proc/PID/stat, its children included) per delivery, and per delivery per IDLE session above N = 0.

    python -m bench.idle [--sessions 0,10,50] [--messages 500] [--silent] [--code DIR]

Run it under `nice -n 5` on a shared machine; the CPU figures move less with other load than the times.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from bench.benchbox import cli, cpu_seconds, free_offset, serving
from bench.imap import DOMAIN, IMAPS, PASSWORD, USER, Client
from bench.search import client_context

MESSAGE = ("From: a@bench.test\r\nTo: reader@bench.test\r\nSubject: idle bench\r\n\r\n"
           + "a line of text in the body\r\n" * 40)


async def idle_sessions(port: int, count: int, silent: bool) -> None:
    """The client process: COUNT sessions IDLE on INBOX, reading (and dropping) what comes, or not
    reading at all (--silent); "ready" on stdout once all are idling; ends when stdin closes."""
    clients = []
    for _ in range(count):
        client = await Client.connect(port, client_context())
        await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
        await client.command("SELECT INBOX")
        client.writer.write(b"i IDLE\r\n")
        await client.reader.readline()  # + idling
        clients.append(client)
    readers = []
    for client in clients:
        if silent:
            cast(asyncio.Transport, client.writer.transport).pause_reading()
        else:
            readers.append(asyncio.create_task(_drain(client)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in readers:
        task.cancel()


async def _drain(client: Client) -> None:
    while await client.reader.read(65536):
        pass


async def deliver(port: int, count: int) -> float:
    # From another loopback address: 50 idlers are the box's limit of connections per client address.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                   local_addr=("127.0.0.2", 0))
    client = Client(reader, writer)
    await reader.readline()
    await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
    started = time.perf_counter()
    for _ in range(count):
        await client.command(f"APPEND INBOX {{{len(MESSAGE)}+}}\r\n{MESSAGE}")
    elapsed = time.perf_counter() - started
    await client.command("LOGOUT")
    await client.close()
    return elapsed


def tier(port: int, pid: int, count: int, messages: int, silent: bool) -> tuple[float, float]:
    """(seconds for the deliveries, server CPU seconds meanwhile) with COUNT sessions idling."""
    idlers = subprocess.Popen([sys.executable, "-m", "bench.idle", "--client", str(port), str(count)]
                              + (["--silent"] if silent else []),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert idlers.stdout is not None
        if idlers.stdout.readline().strip() != "ready":
            raise SystemExit("the IDLE client process did not start")
        time.sleep(1.0)  # the sessions' setup is over
        before = cpu_seconds(pid)
        elapsed = asyncio.run(deliver(port, messages))
        time.sleep(0.5)  # the last wake-ups are written
        return elapsed, cpu_seconds(pid) - before
    finally:
        assert idlers.stdin is not None
        idlers.stdin.close()
        idlers.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="0,10,50")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--silent", action="store_true", help="the IDLE sessions never read")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose appliance the box runs (A/B)")
    parser.add_argument("--client", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(idle_sessions(args.client[0], args.client[1], args.silent))
        return
    counts = sorted({int(n) for n in args.sessions.split(",") if n})
    with tempfile.TemporaryDirectory(prefix="letterbox-bench-idle-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN, code=args.code)
        cli(data, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n", code=args.code)
        with serving(data, Path(tmp) / "serve.log", offset := free_offset(), code=args.code) as box:
            port = IMAPS + offset
            load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
            print(f"# {args.messages} APPENDs per tier, IDLE sessions {'never reading' if args.silent else 'reading'}, "
                  f"code {args.code or 'this checkout'} ({load})")
            print("| IDLE sessions | deliveries s | server CPU per delivery ms | per delivery per session µs |")
            print("|---|---|---|---|")
            base = None
            for count in counts:
                elapsed, cpu = tier(port, box.pid, count, args.messages, args.silent)
                per = cpu / args.messages
                if count == 0:
                    base = per
                extra = f"{(per - base) / count * 1e6:.0f}" if base is not None and count else ""
                print(f"| {count} | {elapsed:.2f} | {per * 1000:.2f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
