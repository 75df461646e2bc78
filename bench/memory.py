"""Where the box's memory is after bench/side_by_side.py's IMAP rows (issue 19: RSS after the 100k run
<= 120 MB, all processes): Letterbox only, the same client, corpus, rows and order as side_by_side's
IMAP round, then per process (the server, the CPU pool's worker, multiprocessing's resource tracker)
RSS, PSS, anonymous and file-backed memory at a few moments after the sessions closed, and the server's
anonymous memory by kind of mapping (/proc/PID/smaps): the main heap (brk), glibc's thread arenas
(64 MiB reservations), thread stacks, and other anonymous mappings (pymalloc's 1 MiB arenas, glibc's
mmap'd large blocks, SQLite's page cache when it mmaps).

    python -m bench.memory [--size 100000] [--rows ...] [--at 5,15,30] [--corpus DIR]

--corpus keeps the generated Maildir in DIR between runs (writing 100k messages takes minutes).
Run it under `nice -n 5` on a shared machine; the figures are sizes, not times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench import corpus
from bench.peers import _children
from bench.side_by_side import IMAP_ROWS, READER, ImapRound, Results, Setup, _rows, uptime

MIB = 1024.0


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup's kB fields of one process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    return fields


def process_name(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = " ".join(part.decode(errors="replace") for part in cmdline if part)
    if "resource_tracker" in text:
        return "resource tracker"
    if "multiprocessing" in text or "spawn_main" in text:
        return "cpu pool worker"
    if "appliance.cli" in text or "letterbox" in text:
        return "server"
    return text[:40]


def tree(pid: int) -> list[int]:
    children = _children()
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")
ARENA = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: each thread arena reserves this, aligned


def anon_kinds(pid: int) -> dict[str, float]:
    """The server's anonymous RSS (MiB) by kind of mapping."""
    kinds = {"heap (brk)": 0.0, "thread arenas": 0.0, "stacks": 0.0, "other anon": 0.0}
    start = end = 0
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = HEADER.match(line)
        if match:
            start, end, path = int(match[1], 16), int(match[2], 16), match[3]
            continue
        if not line.startswith("Anonymous:"):
            continue
        kb = int(line.split()[1])
        if not kb:
            continue
        if path == "[heap]":
            kinds["heap (brk)"] += kb / MIB
        elif path.startswith("[stack"):
            kinds["stacks"] += kb / MIB
        elif path == "" and start % ARENA == 0 and end - start <= ARENA:
            kinds["thread arenas"] += kb / MIB
        elif path == "" and end - start in (8 * 1024 * 1024, 8 * 1024 * 1024 + 4096) and kb <= 1024:
            kinds["stacks"] += kb / MIB  # a thread's 8 MiB stack, mostly untouched
        else:
            kinds["other anon"] += kb / MIB
    return kinds


def hwm(pid: int) -> float:
    """The process's peak RSS (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / MIB
    return 0.0


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


CENSUS = """
def _pinning_detail(objects, regions):
  # What the objects in sparse regions are: a sample of each type's values, and who refers to them.
  import gc, sys, collections
  samples = collections.defaultdict(collections.Counter)
  budget = [400]
  for o in objects:
      if (id(o) >> 20) not in regions or sys.getsizeof(o) > 512:
          continue
      name = type(o).__name__
      try:
          if name == "ReferenceType":
              r = o()
              what = "-> " + (type(r).__name__ if r is not None else "dead") + " " + (getattr(r, "__qualname__", "") if r is not None else "")
          elif name == "code":
              what = f"{o.co_filename.rsplit('/', 2)[-1]}:{o.co_qualname}"
          elif name in ("str", "bytes"):
              what = repr(o[:50])
          elif name in ("TimerHandle", "Handle"):
              what = repr(o)[:120]
          elif budget[0] > 0:
              budget[0] -= 1
              refs = [type(r).__name__ for r in gc.get_referrers(o)[:4] if r is not objects]
              what = "held by " + ",".join(refs)[:80] + " " + repr(o)[:60]
          else:
              what = repr(o)[:60]
      except Exception as exc:
          what = f"? {exc!r}"[:60]
      samples[name][what] += 1
  for name, c in sorted(samples.items(), key=lambda kv: -sum(kv[1].values()))[:14]:
      print(f"census: pin {name} {sum(c.values())}: " + " | ".join(f"{k} x{v}" for k, v in c.most_common(10)), file=sys.stderr)

def _census():
  import gc, sys, collections
  seen, spread, count = set(), collections.defaultdict(set), collections.Counter()
  seen_objects = []
  by_region = collections.defaultdict(collections.Counter)
  todo = gc.get_objects()
  while todo:
      o = todo.pop()
      if id(o) in seen:
          continue
      seen.add(id(o))
      seen_objects.append(o)
      if sys.getsizeof(o) <= 512:  # pymalloc's blocks; larger ones come from malloc
          name = type(o).__name__
          spread[name].add(id(o) >> 20)
          count[name] += 1
          by_region[id(o) >> 20][name] += 1
      todo.extend(r for r in gc.get_referents(o) if id(r) not in seen)
  buckets = set().union(*spread.values())
  print(f"census: {len(seen)} objects, small ones in {len(buckets)} MiB regions", file=sys.stderr)
  for name, regions in sorted(spread.items(), key=lambda kv: -len(kv[1]))[:8]:
      print(f"census: {name} {count[name]} objects in {len(regions)} MiB regions", file=sys.stderr)
  for name, n in count.most_common(12):
      print(f"census: most: {name} {n}", file=sys.stderr)
  # Regions (1 MiB of addresses, about an arena) holding few live objects: what keeps them.
  sparse = [r for r in by_region.values() if sum(r.values()) < 300]
  pinning = sum(sparse, collections.Counter())
  print(f"census: {len(sparse)} of {len(by_region)} regions hold under 300 small objects each, "
        f"{sum(pinning.values())} in all: " + ", ".join(f"{k} {v}" for k, v in pinning.most_common(15)),
        file=sys.stderr)
  sparse_keys = {k for k, r in by_region.items() if sum(r.values()) < 300}
  _pinning_detail(seen_objects, sparse_keys)
  if sparse:
      sample = min(sparse, key=lambda r: sum(r.values()))
      print("census: the sparsest: " + ", ".join(f"{k} {v}" for k, v in sample.most_common(8)), file=sys.stderr)
  import asyncio
  for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
      for task in asyncio.all_tasks(loop):
          frames = task.get_stack()
          where = " -> ".join(f"{f.f_code.co_qualname}:{f.f_lineno}" for f in frames[:2] + frames[-2:])
          print(f"census: task {task.get_name()} {where}", file=sys.stderr)
  for thread_id, frame in sys._current_frames().items():
      print(f"census: thread {thread_id} {frame.f_code.co_qualname}:{frame.f_lineno}", file=sys.stderr)
_census()
del _census
"""

CLEAR = """
def _clear():
  import gc, sys
  cleared = 0
  for name, module in list(sys.modules.items()):
      if not name.startswith(("appliance", "web")):
          continue
      for value in list(vars(module).values()):
          if hasattr(value, "cache_clear") and hasattr(value, "cache_info"):
              cleared += value.cache_info().currsize
              value.cache_clear()
  import time
  started = time.process_time()
  found = gc.collect()
  took = time.process_time() - started
  from appliance.heap import release_memory
  release_memory()
  print(f"probe: {cleared} cache entries cleared; gc.collect() found {found} in {took * 1000:.0f} ms CPU", file=sys.stderr)
_clear()
del _clear
"""


def in_server(pid: int, code: str, log: Path) -> str:
    """Python code run in the server (gdb, holding the GIL); what it wrote to its log meanwhile."""
    script = log.parent / "probe.py"
    script.write_text(code)
    before = log.stat().st_size
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int)PyGILState_Ensure()",
                    "-ex", f"call (int)PyRun_SimpleString(\"exec(open('{script}').read())\")",
                    "-ex", "call (void)PyGILState_Release($1)"], capture_output=True, timeout=300, check=False)
    time.sleep(0.5)
    with log.open("rb") as f:
        f.seek(before)
        return f.read().decode(errors="replace")


def malloc_stats(pid: int, log: Path) -> None:
    """pymalloc's arenas and pools of the running server (sys._debugmallocstats, through gdb), from its
    log: what the 'other anon' mappings hold."""
    before = log.stat().st_size
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (void)_PyObject_DebugMallocStats(stderr)"],
                   capture_output=True, timeout=120, check=False)
    time.sleep(0.5)
    with log.open("rb") as f:
        f.seek(before)
        text = f.read().decode(errors="replace")
    keep = ("# arenas", "Total", "# bytes in allocated blocks", "# bytes in available blocks",
            "unused pools", "# bytes lost", "# times object malloc called")
    for line in text.splitlines():
        if any(line.startswith(k) or k in line for k in keep):
            print("  " + line.strip())


def snapshot(pid: int, label: str) -> None:
    print(f"## {label}   {uptime()}")
    print("| process | pid | RSS MiB | PSS MiB | anon MiB | file MiB | peak RSS MiB | threads | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    total_rss = total_pss = 0.0
    for member in tree(pid):
        try:
            fields = rollup(member)
            name = process_name(member)
            count = threads(member)
            peak = hwm(member)
            seconds = cpu(member)
        except OSError:
            continue
        rss, pss, anon = fields.get("Rss", 0) / MIB, fields.get("Pss", 0) / MIB, fields.get("Anonymous", 0) / MIB
        total_rss += rss
        total_pss += pss
        print(f"| {name} | {member} | {rss:.1f} | {pss:.1f} | {anon:.1f} | {rss - anon:.1f} | {peak:.1f} | {count} | {seconds:.1f} |")
    print(f"| all | | {total_rss:.1f} | {total_pss:.1f} | | | | | |")
    with_kinds = anon_kinds(pid)
    print("server's anonymous memory: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in with_kinds.items()), flush=True)


def tree_rss(pid: int) -> float:
    """RSS of the server and its children (MiB), 0 for those that ended meanwhile."""
    total = 0.0
    for member in tree(pid):
        try:
            total += rollup(member).get("Rss", 0) / MIB
        except OSError:
            continue
    return total


class PeakRound(ImapRound):
    """side_by_side's IMAP round, printing after each row the highest RSS of all the box's processes
    during it (sampled every 0.2 s) and the RSS at its end: which row makes the peak that pymalloc's
    arenas keep."""

    def __init__(self, results: Results, server: str, imaps: int, size: int, pid: int) -> None:
        super().__init__(results, server, imaps, size, pid)
        self.highest = 0.0
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        assert self.pid is not None
        while not self.done.wait(0.2):
            self.highest = max(self.highest, tree_rss(self.pid))

    def add(self, work: str, seconds: float | None, count: int = -1, found: int = -1) -> None:
        super().add(work, seconds, count, found)
        assert self.pid is not None
        now = tree_rss(self.pid)
        print(f"# row {work}: peak {max(self.highest, now):.1f} MiB, at its end {now:.1f} MiB (all processes)", flush=True)
        self.highest = now


def corpus_folder(folder: Path, size: int) -> Path:
    """The corpus Maildir of `size` messages for the reader, written into `folder` unless it is there."""
    if not (folder / "cur").is_dir() or len(list((folder / "cur").iterdir())) != size:
        print(f"# writing {size:,} messages into {folder}", flush=True)
        corpus.write_folder(folder, size, READER)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--rows", default=None, type=_rows, help="IMAP rows (all by default): " + ",".join(IMAP_ROWS))
    parser.add_argument("--at", default="5,15,30", help="seconds after the sessions closed to read memory")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per IMAP command")
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--corpus", type=Path, help="where the generated Maildir is kept between runs")
    parser.add_argument("--malloc-stats", action="store_true", help="pymalloc's statistics of the server at the end (gdb)")
    parser.add_argument("--probe", action="store_true",
                        help="at the end, which objects are spread over pymalloc's arenas, then clear the lru caches (gdb)")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose appliance the box runs (A/B)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="in the server's environment only (PYTHONMALLOC=malloc, MALLOC_ARENA_MAX=1...)")
    args = parser.parse_args()
    args.settle = 0.0
    # The server is started after this (bench.benchbox.code_env copies os.environ); this interpreter,
    # the client, already runs with its own allocator.
    os.environ.update(item.split("=", 1) for item in args.env)
    results = Results(args)
    with tempfile.TemporaryDirectory(prefix="letterbox-memory-") as tmp:
        work = Path(tmp)
        folder = corpus_folder(args.corpus or work / "corpus", args.size)
        setup = Setup.make(work, args)
        with setup.letterbox({READER: folder}, code=args.code) as box:
            snapshot(box.pid, "ready")
            started = time.monotonic()
            rows = PeakRound(results, "letterbox", box.port("imaps"), args.size, box.pid)
            asyncio.run(rows.run(box.port("lmtp")))
            rows.done.set()
            closed = time.monotonic()
            print(f"# rows done in {closed - started:.0f} s", flush=True)
            snapshot(box.pid, "sessions closed")
            for at in (float(s) for s in args.at.split(",") if s):
                time.sleep(max(0.0, closed + at - time.monotonic()))
                snapshot(box.pid, f"{at:g} s after")
            log = box.data.parent / "serve.log"
            if args.malloc_stats:
                malloc_stats(box.pid, log)
            if args.probe:
                print("\n".join(line for line in in_server(box.pid, CLEAR, log).splitlines() if "probe" in line))
                snapshot(box.pid, "after clearing the caches")
                malloc_stats(box.pid, log)
                print("\n".join(line for line in in_server(box.pid, CENSUS, log).splitlines() if "census" in line))
    results.print_table(print)


if __name__ == "__main__":
    main()
