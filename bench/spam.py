"""Content filter benchmark (issue 16): the latency rspamd adds to a message at DATA, and the memory of
rspamd + Redis as the image configures them (image/overlay/etc/rspamd/local.d, Redis capped as in
image/overlay/etc/redis/redis.conf).

A private rspamd + Redis on loopback (tests/support/rspamd.py) starts from the image's local.d and its
public-suffix list (letterbox-tld.dat), every module as on a box, with its own ports and a loopback DNS
server that answers NXDOMAIN (no lookup leaves the machine: the modules that ask the internet fail at
once). As on a box, the list is compiled into rspamd's Hyperscan cache before rspamd starts
(letterbox-warm-tld.lua, unless --no-warm: rspamd's main process would keep the compiler's memory), and
rspamd's hs_helper is ended once it has compiled (letterbox-hs-helper-exit.sh, unless --keep-hs-helper).
Memory is read per process (/proc/PID/smaps_rollup: RSS, PSS and what they are made of) after the first
start (empty caches), after a reload (SIGHUP, as `systemctl reload rspamd`), after a restart, and after
the checks. A real `letterbox serve` receives N messages over one SMTP
connection, the content filter off and on in turns; each DATA is timed from the client's side: the
added latency is the difference of the percentiles. Last, rspamd's /checkv2 alone, with and without a
Deliver-To (the per-mailbox Bayes, statistic.conf), in turns: what one more check per recipient costs.

Usage: python -m bench.spam [--messages 200] [--tld image|full|small] [--no-warm] [--keep-hs-helper]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import smtplib
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from appliance.config import STANDARD_PORTS
from appliance.spam.rspamd import Endpoint, Envelope, RspamdClient
from bench.benchbox import cli, free_offset, serving, set_settings
from tests.support.rspamd import IMAGE_LOCAL_D, IMAGE_TLD, TLD_FILE, RspamdPeer

USER = "bench@bench.test"
# Links, with and without a scheme, as most mail has: rspamd looks every host up in its public-suffix
# list, which maps more of that list's Hyperscan database into the worker.
BODY = ("Hello Alice,\r\n\r\nthe plumber comes on Thursday morning; please leave the key with the "
        "neighbours. The invoice for the kitchen paint is at https://www.paints.example.co.uk/invoice?id=7 "
        "and the colours on shop.example.com.au or www.tiles.example.de.\r\n\r\nCheers,\r\nBob\r\n")


def message(n: int) -> bytes:
    return (f"From: Bob <bob@elsewhere.example>\r\nTo: {USER}\r\nSubject: note {n}\r\n"
            f"Message-ID: <bench-{n}@elsewhere.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
            + BODY).encode()


FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")


def memory_kib(pids: list[int]) -> dict[str, dict[str, int]]:
    """{process title: {smaps_rollup field: KiB}}. RSS counts the pages rspamd's processes share (forked
    from one main process, and the mapped Hyperscan databases) once per process; PSS splits them, so its
    sum is what the processes take together."""
    found: dict[str, dict[str, int]] = {}
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = {}
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                name, _, value = line.partition(":")
                if name in FIELDS:
                    fields[name] = int(value.split()[0])
        except OSError:
            continue
        name = title.split("(")[0].split(";")[0].strip().removeprefix("rspamd: ") or str(pid)
        if name.startswith("redis-server"):
            name = "redis"
        found[f"{name} [{pid}]"] = fields
    return found


def report_memory(when: str, peer: RspamdPeer) -> tuple[float, float]:
    """Print the memory of rspamd + Redis per process; (summed RSS, summed PSS) in MB."""
    usage = memory_kib(peer.pids())
    rss, pss = (sum(u.get(f, 0) for u in usage.values()) / 1024 for f in ("Rss", "Pss"))
    print(f"memory {when}: RSS {rss:.0f} MB summed, PSS {pss:.0f} MB summed (target: RSS <= 150 MB)")
    print(f"    {'process':<28} " + " ".join(f"{f:>13}" for f in FIELDS) + "   (MB)")
    for name, fields in sorted(usage.items()):
        print(f"    {name:<28} " + " ".join(f"{fields.get(f, 0) / 1024:13.1f}" for f in FIELDS))
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


def check_latencies(peer: RspamdPeer, count: int) -> tuple[list[float], list[float]]:
    """/checkv2 of one message, without and with Deliver-To, in turns: (box-wide only, with per-mailbox)."""
    client = RspamdClient(Endpoint.parse(peer.scanner, 11333), Endpoint.parse(peer.controller, 11334))

    async def run() -> tuple[list[float], list[float]]:
        plain: list[float] = []
        per_user: list[float] = []
        for n in range(count):
            for deliver_to, into in (("", plain), (USER, per_user)):
                envelope = Envelope(ip="192.0.2.7", helo="client.elsewhere.example", sender="bob@elsewhere.example",
                                    recipients=(USER,), deliver_to=deliver_to)
                started = time.perf_counter()
                await client.check(message(50_000 + n), envelope)
                into.append(time.perf_counter() - started)
        return plain, per_user

    return asyncio.run(run())


TLD_LISTS = {"image": IMAGE_TLD, "full": TLD_FILE}
# Hosts under suffixes of every kind: what the public-suffix list changes is the registered domain rspamd
# gives each (its URL rules and the "#u:" tokens of its Bayes use it), not which URLs it finds.
LINKS = ("shop.example.xyz", "www.paints.example.co.uk", "foo.bar.kawasaki.jp", "evil.blogspot.com",
         "a.b.github.io", "cheap.pharmacy.ru")


def report_urls(peer: RspamdPeer) -> None:
    body = (f"From: Bob <bob@elsewhere.example>\r\nTo: {USER}\r\nSubject: links\r\n"
            "Message-ID: <links@elsewhere.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nSee "
            + " and ".join(LINKS) + " today.\r\n").encode()
    request = urllib.request.Request(f"{peer.scanner}/checkv2", data=body,  # noqa: S310  our loopback rspamd
                                     headers={"IP": "192.0.2.7", "URL-Format": "extended"})
    with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310  our loopback rspamd
        urls = {u["host"]: u.get("tld", "") for u in json.loads(reply.read()).get("urls", [])}
    print(f"URLs found without a scheme: {len(urls)} of {len(LINKS)}; registered domains: "
          + ", ".join(f"{host} -> {urls.get(host, 'NOT FOUND')}" for host in LINKS))


def start_measured(peer: RspamdPeer, when: str, *, reload: bool = False) -> tuple[float, float]:
    """Start rspamd + Redis (or reload rspamd: SIGHUP, as `systemctl reload rspamd`), let it settle as
    on a box, and print its memory: (summed RSS, summed PSS) in MB."""
    started = time.monotonic()
    if reload:
        peer.reload()
    else:
        peer.start()  # the caller's try stops what a start that times out started
    print(f"rspamd + redis ready in {time.monotonic() - started:.1f} s")
    if peer.end_hs_helper and not peer.wait_hs_helper_gone(300):
        print("    hs_helper still running after 300 s")
    time.sleep(5)  # what a worker loads just after start (the hs_helper's notice, maps)
    return report_memory(when, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--tld", choices=("image", "full", "small"), default="image",
                        help="the public-suffix list: the image's (letterbox-tld.dat), Debian's full one, or a "
                             "tiny one (quick start)")
    parser.add_argument("--no-warm", action="store_true",
                        help="let rspamd compile the public-suffix list itself at its first start (without "
                             "the image's ExecStartPre, letterbox-warm-tld.lua)")
    parser.add_argument("--keep-hs-helper", action="store_true",
                        help="leave rspamd's hs_helper running (without the image's ExecStartPost, "
                             "letterbox-hs-helper-exit.sh)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spam-") as tmp:
        root = Path(tmp)
        peer = RspamdPeer(root / "rspamd", base_local=IMAGE_LOCAL_D, tld_file=TLD_LISTS.get(args.tld),
                          redis_maxmemory="48mb", ready_seconds=900, min_learns=None, warm_tld=not args.no_warm,
                          end_hs_helper=not args.keep_hs_helper, image_modules=True)
        print(f"public-suffix list: {args.tld} ({peer.tld}); hs_helper "
              f"{'kept' if args.keep_hs_helper else 'ended once it compiled, as on a box'}")
        figures: dict[str, tuple[float, float]] = {}
        try:
            first = "after the first start" + (" (rspamd compiled the list)" if args.no_warm else
                                               " (the list compiled before it, as the image's rspamd.service does)")
            figures["first start"] = start_measured(peer, first + ", empty caches")
            figures["reload"] = start_measured(peer, "after a reload (SIGHUP: the configuration read again, "
                                               "new workers)", reload=True)
            peer.stop()
            figures["restart"] = start_measured(peer, "after a restart (the compiled list read back from the cache)")
            report_urls(peer)
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
            plain, per_user = check_latencies(peer, args.messages // 2)
            (p50, p99), (u50, u99) = percentiles(plain), percentiles(per_user)
            ratios = sorted(u / p for u, p in zip(per_user, plain, strict=True))
            print(f"/checkv2 box-wide Bayes only:   p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(plain)} checks)")
            print(f"/checkv2 with Deliver-To:       p50 {u50:.1f} ms, p99 {u99:.1f} ms (paired ratio median "
                  f"{statistics.median(ratios):.2f})")
            figures[f"{len(on) + 2 * len(plain)} checks"] = report_memory(f"after {len(on) + 2 * len(plain)} checks", peer)
            print("memory summary (MB, rspamd + redis summed over their processes; target RSS <= 150): "
                  + "; ".join(f"{when}: RSS {rss:.0f}, PSS {pss:.0f}" for when, (rss, pss) in figures.items()))
        finally:
            peer.stop()


if __name__ == "__main__":
    main()
