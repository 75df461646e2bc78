"""Start-up cost and idle memory (issues 15 and 19): modules and CPU seconds to import the CLI, the admin
layer and the composition root, CPU per `letterbox` call, and `letterbox serve` from a fresh data
directory to "ready": its CPU, its modules, and its RSS/PSS a few seconds later; then the same box started
again ("serve again"), as every start after the first one is (the first makes the certificate).

    python -m bench.startup [--rounds 5] [--settle 3] [--compare OTHER_CHECKOUT]

With --compare, every figure is measured for this checkout and for OTHER_CHECKOUT (e.g. `git archive
main | tar -x -C /tmp/base`) in alternation (A, B, A, B...) with the same interpreter and venv, the other
tree first on PYTHONPATH, and printed with the ratio: load from other work moves absolute figures a lot,
paired ratios much less. CPU is user+system seconds of the child (not wall time). Memory is summed
over the serve process and its descendants, as bench/side_by_side.py does (the CPU pool's worker
process is started on first use, so an idle box has none). Both trees need their bytecode written
(`python -m compileall -q appliance web`), or each run pays for compiling every module.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.peers import tree_memory
from tests.conftest import pick_port_offset

HERE = Path(__file__).resolve().parent.parent
IMPORTS = ("appliance.cli", "appliance.admin", "appliance.app")
READY_TIMEOUT = 300.0
# Children run from here, not from a checkout: `python -c` puts its working directory first on sys.path.
NEUTRAL_DIR = tempfile.gettempdir()


def child_cpu(run: Callable[[], None]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def env_for(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(tree)}


def import_figures(tree: Path, module: str) -> tuple[float, float]:
    """(modules loaded, CPU seconds) of `import module` in a fresh interpreter."""
    code = f"import sys\nimport {module}\nprint(len(sys.modules))"
    out: list[str] = []

    def run() -> None:
        done = subprocess.run([sys.executable, "-c", code], env=env_for(tree), cwd=NEUTRAL_DIR, capture_output=True,
                              text=True, check=True)
        out.append(done.stdout)

    cpu = child_cpu(run)
    return float(out[0].split()[-1]), cpu


def cli_cpu(tree: Path, args: list[str]) -> float:
    def run() -> None:
        subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env_for(tree), cwd=NEUTRAL_DIR,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

    return child_cpu(run)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def serve_figures(tree: Path, settle: float) -> dict[str, float]:
    """A fresh box (its first start makes the certificate, the setup code...), then the same box started
    again, as it starts every later time (a reboot, an update): each one's figures, after settle."""
    root = Path(tempfile.mkdtemp(prefix="letterbox-startup-"))
    try:
        first = serve_once(tree, root, settle)
        again = serve_once(tree, root, settle)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {f"serve: {k}": v for k, v in first.items()} | {f"serve again: {k}": v for k, v in again.items()}


def serve_once(tree: Path, root: Path, settle: float) -> dict[str, float]:
    """One start of the box in root/data: seconds and CPU to "ready", modules imported by then, RSS/PSS
    (MiB) after settle."""
    env = {**env_for(tree), "PYTHONPROFILEIMPORTTIME": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "appliance.cli", "--data", str(root / "data"), "serve", "--listen", "127.0.0.1",
           "--port-offset", str(pick_port_offset()), "--hostname", "bench.test"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        modules = 0
        assert proc.stdout is not None
        for line in proc.stdout:  # importtime lines (stderr) and the serve lines, in the order written
            if line.startswith("import time:") and "|" in line and "self [us]" not in line:
                modules += 1
            elif line.strip() == "ready":
                break
            if time.monotonic() - started > READY_TIMEOUT:
                raise RuntimeError("letterbox serve did not get ready")
        else:
            raise RuntimeError(f"letterbox serve exited with {proc.wait()}")
        seconds, cpu = time.monotonic() - started, proc_cpu(proc.pid)
        # Keep reading what it writes (a full pipe would block the box) while it settles.
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
        time.sleep(settle)
        rss, pss, processes = tree_memory(proc.pid)
        return {"seconds to ready": seconds, "CPU s to ready": cpu, "modules at ready": modules,
                "idle RSS MiB": rss / 1024, "idle PSS MiB": pss / 1024, "processes": processes}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if "drain" in locals():
            drain.wait()


def measure(tree: Path, data: Path, settle: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    for module in IMPORTS:
        count, cpu = import_figures(tree, module)
        figures[f"import {module}: modules"] = count
        figures[f"import {module}: CPU s"] = cpu
    for args in (["--version"], ["--help"], ["--data", str(data), "user", "list"]):
        figures[f"letterbox {' '.join(a for a in args if a != str(data))}: CPU s"] = cli_cpu(tree, args)
    figures.update(serve_figures(tree, settle))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready before reading memory")
    parser.add_argument("--compare", type=Path, help="another checkout, measured in alternation with this one")
    args = parser.parse_args()
    trees = {"this": HERE} | ({"other": args.compare.resolve()} if args.compare else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="letterbox-startup-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "appliance.cli", "--data", str(data), "domain", "add", "example.org"],
                       env=env_for(HERE), check=True, stdout=subprocess.DEVNULL)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(measure(tree, data, args.settle))
    print(f"medians of {args.rounds} rounds; load {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}")
    header = f"{'':44s} {'this':>9s}" + (f" {'other':>9s} {'other/this':>10s}" if args.compare else "")
    print(header)
    for key in runs["this"][0]:
        this = statistics.median(r[key] for r in runs["this"])
        line = f"{key:44s} {this:9.3f}"
        if args.compare:
            other = statistics.median(r[key] for r in runs["other"])
            line += f" {other:9.3f} {other / this if this else float('nan'):10.2f}"
        print(line)


if __name__ == "__main__":
    main()
