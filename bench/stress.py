"""imaptest's stress mode against Letterbox alone, A/B between checkouts (issue 19): the same run as
bench/side_by_side.py's stress row (5 clients, logout=0, over TLS, the stress user's INBOX empty at start,
imaptest appending from the same mbox), one fresh box per run, the checkouts interleaved (A, B, A, B ...).

Per run: fetches/s and logins/s as the side-by-side row computes them, imaptest's per-command totals,
the server's CPU seconds (process and children, /proc), the load (`uptime`) before the run. With
--strace, the server's fsync/fdatasync/rename/unlink, socket and mmap/munmap/mremap calls are counted (strace -c -f, attached for the
run: it slows the box, so those runs' rates are not comparable; --strace-all counts every call: under
this mode the futex calls of the GIL's hand-overs between the event loop and the threads are the most,
~35 per command, and SQLite's fcntl locks, pwrite64 and getpid, which asyncio.get_running_loop() calls,
~3-4 each); with --spy DIR, py-spy records the server (--idle, raw collapsed stacks) into
DIR/LABEL-ROUND.txt: py-spy from $PY_SPY, else PATH, else the venv. With --waits, the box's full
collections are listed at their second from imaptest's start.

Usage: python -m bench.stress [--code DIR ...] [--rounds 2] [--secs 10] [--strace [--strace-all]] [--spy DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import corpus
from bench.benchbox import cpu_seconds, thread_cpu, thread_cpu_used
from bench.side_by_side import IMAPTEST, PASSWORD, STRESS, Box, Setup, parse_imaptest_totals, uptime

# py-spy: $PY_SPY, else the one on PATH, else the venv's
SPY = Path(os.environ.get("PY_SPY") or shutil.which("py-spy") or Path(sys.executable).parent / "py-spy")


@contextlib.contextmanager
def attached(argv: list[str]) -> Iterator[None]:
    """A tracer attached to the box for the block; ended by SIGINT (both write their summary then)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the clients come
    try:
        yield
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=60)
        if argv[0] == "strace":
            print(err.decode(errors="replace"))


def one_run(setup: Setup, stress_folder: Path, mbox: Path, code: Path | None, secs: int, label: str, rnd: int,
            args: argparse.Namespace) -> dict[str, float]:
    waits_file = Path(args.waits) / f"{label}-{rnd}.json" if args.waits else None
    if waits_file is not None:
        os.environ["LETTERBOX_WAITS"] = str(waits_file)  # the box's probe (appliance/waits.py)
    with setup.letterbox({STRESS: stress_folder}, code=code) as box:
        tracers: list[contextlib.AbstractContextManager[None]] = []
        if args.strace:
            tracers.append(attached(["strace", "-c", "-f", "-p", str(box.pid), *(() if args.strace_all else ("-e",
                                     "trace=fsync,fdatasync,rename,renameat,unlink,unlinkat,sendto,write,mmap,munmap,mremap,recvfrom,read"))]))
        if args.spy:
            out = Path(args.spy) / f"{label}-{rnd}.txt"
            tracers.append(attached([str(SPY), "record", *(["--idle"] if args.idle else ["--gil"] if args.gil else ["--subprocesses"]), "-r", "200", "-f", "raw", "-o", str(out),
                                     "-p", str(box.pid), "--threads", "--nonblocking"]))
        with contextlib.ExitStack() as stack:
            for tracer in tracers:
                stack.enter_context(tracer)
            started = time.time()
            figures = _imaptest(box, mbox, secs)
            if waits_file is not None:
                time.sleep(1.5)  # the probe's last summary (written every second)
                os.environ.pop("LETTERBOX_WAITS", None)
                summary = json.loads(waits_file.read_text())
                print(waits_table(summary), flush=True)
                print(full_collections(summary, started), flush=True)
            return figures


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def waits_table(summary: dict[str, Any]) -> str:
    """The probe's summary: per command kind, the mean wall time and its parts, in ms per command."""
    lines = []
    for kind, row in sorted(summary["commands"].items(), key=lambda kv: -kv[1]["wall"]):
        count = row["count"]
        parts = sorted(((k, v) for k, v in row.items() if k not in ("count", "wall")), key=lambda kv: -kv[1])
        lines.append(f"  {kind:<12} n={count:<5} wall {_ms(row['wall'] / count)} ms: "
                     + ", ".join(f"{k} {_ms(v / count)}" for k, v in parts if v / count >= 20_000))
    glob = summary["global"]
    lines.append("  global: " + ", ".join(f"{k} {v / 1e6:.0f} ms" if "count" not in k and "iterations" not in k
                                          and "slices" not in k and "tid" not in k and "sleeps" not in k else f"{k} {v}"
                                          for k, v in sorted(glob.items())))
    return "\n".join(lines)


def full_collections(summary: dict[str, Any], started: float) -> str:
    """The box's full collections (the probe's list), each at its second from imaptest's start: one
    inside the run is CPU the run's commands are charged for."""
    rows = [f"{at - started:+.1f} s {ms:.0f} ms ({kind}, {freed} freed)"
            for at, ms, kind, _thread, freed, _frozen in summary.get("full collections", [])]
    return "  full collections: " + ("; ".join(rows) or "none")


def _imaptest(box: Box, mbox: Path, secs: int) -> dict[str, float]:
    load = uptime().rpartition("load average:")[2].strip()
    before, threads_before = cpu_seconds(box.pid), thread_cpu(box.pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([str(IMAPTEST), "host=127.0.0.1", f"port={box.port('imaps')}", "ssl=any-cert",
                             f"user={STRESS}", f"pass={PASSWORD}", f"mbox={mbox}", "clients=5", "logout=0",
                             f"secs={secs}"], capture_output=True, text=True, errors="replace",
                            timeout=secs + 120, check=False)
    cpu = cpu_seconds(box.pid) - before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # imaptest's own: the box, still running, is not counted yet
    client = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    threads = {name: user + system for name, (user, system) in
               thread_cpu_used(threads_before, thread_cpu(box.pid)).items()}
    loop_cpu = threads.get("loop", 0.0)
    threads["child processes, ended threads"] = cpu - sum(threads.values())  # cpu_seconds counts them
    print("  threads: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.01))
    totals = parse_imaptest_totals(result.stdout)
    if not totals:
        raise SystemExit(f"imaptest gave no totals: {result.stdout[-2000:]} {result.stderr[-2000:]}")
    errors = sum(1 for line in result.stdout.splitlines() if "Error:" in line)
    figures: dict[str, float] = {f"cmd {k}": float(v) for k, v in totals.items()}
    figures.update({"fetches/s": (totals.get("Fetc", 0) + totals.get("Fet2", 0)) / secs,
                    "logins/s": totals.get("Logi", 0) / secs, "server cpu s": cpu, "loop cpu s": loop_cpu,
                    "errors": errors, "client cpu s": client})
    print(f"  load {load}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", type=Path, default=[],
                        help="a checkout whose appliance runs (repeat for A/B); default: this one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--secs", type=int, default=10)
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--strace-all", action="store_true", help="with --strace: every system call, not only the usual few")
    parser.add_argument("--spy", default=None)
    parser.add_argument("--idle", action="store_true", help="py-spy --idle (wall samples), else CPU samples")
    parser.add_argument("--waits", default=None,
                        help="a directory: the box's wall-time probe (LETTERBOX_WAITS) per run, printed as a table")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil (samples of the thread holding the GIL)")
    args = parser.parse_args()
    codes: list[Path | None] = list(args.code) or [None]
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="letterbox-stress-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        setup = Setup.make(work, argparse.Namespace())
        stress_folder = work / "corpus-stress"
        corpus.make_maildir(stress_folder)
        mbox = work / "stress.mbox"
        corpus.write_mbox(mbox, 200, STRESS)
        for rnd in range(args.rounds):
            for code in codes:
                label = str(code) if code else "this"
                figures = one_run(setup, stress_folder, mbox, code, args.secs, label.replace("/", "_"), rnd, args)
                runs.setdefault(label, []).append(figures)
                print(f"{label} round {rnd}: fetches/s {figures['fetches/s']:.1f}, logins/s {figures['logins/s']:.1f},"
                      f" server CPU {figures['server cpu s']:.2f} s (loop {figures['loop cpu s']:.2f}), client CPU {figures['client cpu s']:.2f} s, errors {figures['errors']:.0f}; "
                      + " ".join(f"{k[4:]}={v:.0f}" for k, v in figures.items() if k.startswith("cmd ")), flush=True)
    print("\n".join(summary(runs)))


def cpu_per_command(figures: dict[str, float]) -> float:
    """The server's CPU ms per imaptest command of one run."""
    return figures["server cpu s"] / max(1.0, sum(v for k, v in figures.items() if k.startswith("cmd "))) * 1000


def summary(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Per checkout, the medians (each round's figure in brackets); for each checkout after the first,
    its rounds against the first's of the same round, run next to each other: on a machine other
    work loads, a round's CPU per command moves by a tenth or more, most of it shared by the two
    runs of a round (imaptest's stress mode at load 7-12: the medians of two checkouts 5 % apart in
    one A/B run and the other way round in the next), so how many rounds went which way says more
    than medians apart."""
    lines = []
    first = next(iter(runs.values()), [])
    for label, figures_list in runs.items():
        rates = [f["fetches/s"] for f in figures_list]
        cpus = [f["server cpu s"] / max(1.0, f.get("cmd Fetc", 0) + f.get("cmd Fet2", 0)) * 1000 for f in figures_list]
        per_command = [cpu_per_command(f) for f in figures_list]
        lines.append(f"{label}: fetches/s median {statistics.median(rates):.1f} ({', '.join(f'{r:.0f}' for r in rates)});"
                     f" server CPU ms per fetch {statistics.median(cpus):.2f}, per command {statistics.median(per_command):.2f}"
                     f" ({', '.join(f'{c:.3f}' for c in per_command)})")
        if figures_list is not first:
            ratios = [cpu_per_command(f) / cpu_per_command(a) for a, f in zip(first, figures_list, strict=False)]
            if ratios:
                lower = sum(r < 1 for r in ratios)
                lines.append(f"  against the first, round by round: CPU per command x{statistics.median(ratios):.3f}"
                             f" (median of {len(ratios)}; lower in {lower}, higher in {len(ratios) - lower})")
    return lines


if __name__ == "__main__":
    main()
