"""Content filter benchmark (issue 16): the latency rspamd adds to a message at DATA, and the memory of
rspamd + Redis as the image configures them (image/overlay/etc/rspamd/local.d, Redis capped as in
image/overlay/etc/redis/redis.conf).

A private rspamd + Redis on loopback (tests/support/rspamd.py) starts from the image's local.d, with its
own ports and a loopback DNS server that answers NXDOMAIN (no lookups leave the machine; the modules
that fetch lists from the internet are off). A real `letterbox serve` receives N messages over one SMTP
connection, first with the content filter off, then on; each DATA is timed from the client's side.

Usage: python -m bench.spam [--messages 200] [--small-tld]
"""

from __future__ import annotations

import argparse
import json
import smtplib
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from appliance.config import STANDARD_PORTS
from bench.benchbox import cli, free_offset, serving, set_settings
from tests.support.rspamd import RspamdPeer

REPO = Path(__file__).resolve().parent.parent
IMAGE_LOCAL_D = REPO / "image" / "overlay" / "etc" / "rspamd" / "local.d"
USER = "bench@bench.test"
BODY = ("Hello Alice,\r\n\r\nthe plumber comes on Thursday morning; please leave the key with the "
        "neighbours. The invoice for the kitchen paint is attached to my previous message.\r\n\r\n"
        "Cheers,\r\nBob\r\n")


def message(n: int) -> bytes:
    return (f"From: Bob <bob@elsewhere.example>\r\nTo: {USER}\r\nSubject: note {n}\r\n"
            f"Message-ID: <bench-{n}@elsewhere.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
            + BODY).encode()


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over the processes: RSS counts pages rspamd's workers share with their parent
    once per process; PSS splits them, so its sum is what the processes take together."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def timed_run(port: int, count: int, first: int) -> list[float]:
    latencies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.elsewhere.example")
        for n in range(first, first + count):
            client.mail("bob@elsewhere.example")
            client.rcpt(USER)
            started = time.perf_counter()
            code, text = client.data(message(n))
            latencies.append(time.perf_counter() - started)
            if code != 250:
                raise SystemExit(f"message {n} refused: {code} {text!r}")
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--small-tld", action="store_true",
                        help="a tiny public-suffix list (quick start; the image compiles the full one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spam-") as tmp:
        root = Path(tmp)
        peer = RspamdPeer(root / "rspamd", base_local=IMAGE_LOCAL_D, full_tld=not args.small_tld,
                          redis_maxmemory="48mb", ready_seconds=900)
        started = time.monotonic()
        try:
            peer.start()  # inside the try: a start that times out still stops what it started
            print(f"rspamd + redis ready in {time.monotonic() - started:.1f} s "
                  f"({len(peer.pids())} processes: {'full' if not args.small_tld else 'small'} public-suffix list)")
            rss, pss = memory_kib(peer.pids())
            print(f"memory after start: RSS {rss / 1024:.0f} MB summed, PSS {pss / 1024:.0f} MB (target <= 150 MB)")
            data = root / "data"
            cli(data, "domain", "add", "bench.test")
            cli(data, "user", "add", USER, "--password-stdin", stdin="a long bench password\n")
            set_settings(data, {"queue_hold": "1", "inbound_auth": "off", "spam_content_filter": "off",
                                "spam_rspamd_url": peer.scanner, "spam_rspamd_controller_url": peer.controller,
                                "spam_junk_score": "6", "spam_reject_score": "15"})
            offset = free_offset()
            port = STANDARD_PORTS["smtp"] + offset
            off: list[float] = []
            on: list[float] = []
            rounds = 4  # off and on alternate, so a busy machine's bad moment hits both alike
            with serving(data, root / "serve.log", offset):
                timed_run(port, 10, 0)  # warm-up
                for r in range(rounds):
                    set_settings(data, {"spam_content_filter": "off"})  # read live by the running box
                    off += timed_run(port, args.messages // rounds, 1000 * (2 * r + 1))
                    set_settings(data, {"spam_content_filter": "on"})
                    on += timed_run(port, args.messages // rounds, 1000 * (2 * r + 2))
            with urllib.request.urlopen(f"{peer.controller}/stat", timeout=10) as reply:  # noqa: S310  our loopback rspamd
                scanned = json.loads(reply.read()).get("scanned")
            print(f"rspamd checked {scanned} messages ({len(on)} were sent with the filter on)")
            (off50, off99), (on50, on99) = percentiles(off), percentiles(on)
            print(f"DATA without the filter: p50 {off50:.1f} ms, p99 {off99:.1f} ms ({len(off)} messages)")
            print(f"DATA with rspamd:        p50 {on50:.1f} ms, p99 {on99:.1f} ms ({len(on)} messages)")
            print(f"added by the content filter: p50 {on50 - off50:.1f} ms, p99 {on99 - off99:.1f} ms")
            rss, pss = memory_kib(peer.pids())
            print(f"memory after {len(on)} checks: RSS {rss / 1024:.0f} MB summed, PSS {pss / 1024:.0f} MB")
        finally:
            peer.stop()


if __name__ == "__main__":
    main()
