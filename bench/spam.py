"""Content filter benchmark (issue 16): the latency rspamd adds to a message at DATA, and the memory of
rspamd + Redis as the image configures them (image/overlay/etc/rspamd/local.d, Redis capped as in
image/overlay/etc/redis/redis.conf).

A private rspamd + Redis on loopback (tests/support/rspamd.py) starts from the image's local.d and its
public-suffix list (letterbox-tld.dat), every module as on a box, with its own ports and a loopback DNS
server that answers NXDOMAIN (no lookup leaves the machine: the modules that ask the internet fail at
once). As on a box, the list is compiled into rspamd's Hyperscan cache before rspamd starts
(letterbox-warm-tld.lua, unless --no-warm: rspamd's main process would keep the compiler's memory),
rspamd's regular expressions run on PCRE2 (unless --hyperscan) and its hs_helper is ended as soon as it
can end cleanly (letterbox-hs-helper-exit.sh, unless --keep-hs-helper or --hyperscan).
Memory is sampled every 0.1 s from the moment each of these begins until it has settled, and the
window's maximum printed with a timeline (RSS summed over rspamd's and Redis's processes, "h" where
hs_helper lived): the first start (empty caches), `systemctl reload rspamd` as a box does it (rspamd
stopped and started again), rspamd's own reload (SIGHUP), a restart of both; then it is read per process
(/proc/PID/smaps_rollup: RSS, PSS and what they are made of), and again after the checks.
A real `letterbox serve` receives N messages over one SMTP
connection, the content filter off and on in turns; each DATA is timed from the client's side: the
added latency is the difference of the percentiles. Last, rspamd's /checkv2 alone, with and without a
Deliver-To (the per-mailbox Bayes, statistic.conf), in turns: what one more check per recipient costs.

Usage: python -m bench.spam [--messages 200] [--tld image|full|small] [--no-warm] [--keep-hs-helper]
                            [--hyperscan]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import smtplib
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Sample:
    seconds: float  # since the start, reload or restart began
    rss: float  # MB, summed over rspamd's and Redis's processes
    pss: float
    hs_helper: bool  # rspamd's hs_helper was alive
    processes: int  # rspamd's and Redis's (a forked hs_helper bears the main process's title at first)


class WindowSampler(threading.Thread):
    """Samples rspamd + Redis's memory every `interval` seconds while it starts, reloads or restarts
    and settles: a single figure taken afterwards misses what hs_helper and a reload's second set of
    workers add while they live."""

    def __init__(self, peer: RspamdPeer, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.peer, self.interval = peer, interval
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            usage = memory_kib(self.peer.pids())
            if usage:
                rss, pss = (sum(u.get(f, 0) for u in usage.values()) / 1024 for f in ("Rss", "Pss"))
                self.samples.append(Sample(time.monotonic() - self.started, rss, pss,
                                           hs_helper=any(name.startswith("hs_helper") for name in usage),
                                           processes=len(usage)))
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)

    def report(self, when: str) -> float:
        """Print the window's maximum and a timeline; the maximum summed RSS in MB."""
        if not self.samples:
            print(f"window {when}: no sample")
            return 0.0
        top = max(self.samples, key=lambda s: s.rss)
        helper = [s.seconds for s in self.samples if s.hs_helper]
        lived = f"hs_helper seen from +{helper[0]:.1f} s to +{helper[-1]:.1f} s" if helper else "no hs_helper seen"
        print(f"window {when}: max RSS {top.rss:.0f} MB summed at +{top.seconds:.1f} s (PSS {top.pss:.0f}, "
              f"hs_helper {'alive' if top.hs_helper else 'not alive'}, {top.processes} processes), last {self.samples[-1].rss:.0f} MB; "
              f"{lived}; {len(self.samples)} samples every {self.interval} s (target: RSS <= 150 MB at every one)")
        # One point a second (the second's maximum), "h" where hs_helper was alive.
        seconds: dict[int, Sample] = {}
        for sample in self.samples:
            second = int(sample.seconds)
            if second not in seconds or sample.rss > seconds[second].rss:
                seconds[second] = sample
        print("    timeline (s: MB): " + " ".join(
            f"{second}:{sample.rss:.0f}{'h' if sample.hs_helper else ''}" for second, sample in sorted(seconds.items())))
        return top.rss


def start_measured(peer: RspamdPeer, when: str, start: Callable[[], None]) -> tuple[float, float, float]:
    """Start rspamd + Redis, or restart or reload rspamd (`start`), let it settle as on a box, sampling
    its memory all along, and print it: (maximum summed RSS over the window, summed RSS and PSS once
    settled) in MB."""
    sampler = WindowSampler(peer)
    sampler.start()
    try:
        start()  # the caller's try stops what a start that times out started
        print(f"rspamd + redis ready in {time.monotonic() - sampler.started:.1f} s")
        if peer.end_hs_helper and not peer.wait_hs_helper_gone(300):
            print("    hs_helper still running after 300 s")
        time.sleep(5)  # what a worker loads just after start (the hs_helper's notice, maps)
    finally:
        sampler.stop()
    top = sampler.report(when)
    rss, pss = report_memory(when, peer)
    return top, rss, pss


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
    parser.add_argument("--hyperscan", action="store_true",
                        help="rspamd's regular expressions on Hyperscan, compiled by hs_helper, which is kept "
                             "(the image before: without disable_hyperscan and hs_helper's cache_dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spam-") as tmp:
        root = Path(tmp)
        peer = RspamdPeer(root / "rspamd", base_local=IMAGE_LOCAL_D, tld_file=TLD_LISTS.get(args.tld),
                          redis_maxmemory="48mb", ready_seconds=900, min_learns=None, warm_tld=not args.no_warm,
                          end_hs_helper=not (args.keep_hs_helper or args.hyperscan), image_modules=True,
                          hyperscan=args.hyperscan)
        print(f"public-suffix list: {args.tld} ({peer.tld}); regular expressions on "
              f"{'Hyperscan' if args.hyperscan else 'PCRE2, as on a box'}; hs_helper "
              f"{'ended as soon as it can end, as on a box' if peer.end_hs_helper else 'kept'}")
        figures: dict[str, tuple[float, float]] = {}
        window: dict[str, float] = {}
        try:
            first = "after the first start" + (" (rspamd compiled the list)" if args.no_warm else
                                               " (the list compiled before it, as the image's rspamd.service does)")
            phases = (
                ("first start", first + ", empty caches", peer.start),
                ("reload", "after `systemctl reload rspamd` on a box (rspamd.service's ExecReload: rspamd ends "
                 "and starts again, Redis goes on)", peer.restart_rspamd),
                ("SIGHUP reload", "after rspamd's own reload (SIGHUP: new workers and a new hs_helper before "
                 "the old workers end; the box's reload does not use it)", peer.reload),
                ("restart", "after a restart of both (the compiled list read back from the cache)", peer.start))
            for name, when, start in phases:
                if name == "restart":
                    peer.stop()
                window[name], rss, pss = start_measured(peer, when, start)
                figures[name] = (rss, pss)
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
            print("memory window maxima (MB, RSS summed, sampled every 0.1 s from the start until settled): "
                  + "; ".join(f"{when}: {rss:.0f}" for when, rss in window.items()))
        finally:
            peer.stop()


if __name__ == "__main__":
    main()
