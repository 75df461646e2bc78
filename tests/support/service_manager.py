"""A tiny stand-in for systemctl, for tests of letterbox-update where no systemd runs (this container has
no systemd as PID 1).

`python service_manager.py --state DIR start|stop|restart|is-active SERVICE` runs the command line in
DIR/unit.json as systemd runs a Type=notify unit: it starts the process in its own session with
NOTIFY_SOCKET pointing at a datagram socket, `start` returns 0 once the process sent READY=1 and 1 if it
exited first (or took too long); `is-active` prints active / failed / inactive. So the box really is
started, stopped and restarted, and its sd_notify really is what tells success from failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


def write_unit(state: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "unit.json").write_text(json.dumps({"argv": argv, "env": env or {}}), encoding="utf-8")


def command(state: Path) -> list[str]:
    """The argv that runs this manager on `state` (give it to letterbox-update as --systemctl)."""
    return [sys.executable, str(Path(__file__).resolve()), "--state", str(state)]


def _pid(state: Path) -> int | None:
    try:
        return int((state / "pid").read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Running, and not a zombie waiting for a reaper."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(state: Path) -> int:
    if alive(_pid(state)):
        return 0
    unit = json.loads((state / "unit.json").read_text(encoding="utf-8"))
    notify = state / "notify"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(0.5)
        with open(state / "serve.log", "ab") as log:
            proc = subprocess.Popen(unit["argv"], env={**os.environ, **unit["env"], "NOTIFY_SOCKET": str(notify)},
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        (state / "pid").write_text(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in sock.recv(4096):
                    (state / "state").write_text("active")
                    return 0
            except TimeoutError:
                pass
            if proc.poll() is not None:
                (state / "state").write_text("failed")
                return 1
        proc.kill()
        proc.wait()
        (state / "state").write_text("failed")
        return 1


def stop(state: Path) -> int:
    pid = _pid(state)
    if alive(pid):
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    (state / "state").write_text("inactive")
    return 0


def is_active(state: Path) -> int:
    try:
        recorded = (state / "state").read_text()
    except OSError:
        recorded = "inactive"
    if recorded == "active" and not alive(_pid(state)):
        recorded = "failed"
    print(recorded)
    return 0 if recorded == "active" else 3


def main(argv: list[str]) -> int:
    assert argv[0] == "--state"
    state, verb = Path(argv[1]), argv[2]
    if verb == "start":
        return start(state)
    if verb == "stop":
        return stop(state)
    if verb == "restart":
        stop(state)
        return start(state)
    if verb == "is-active":
        return is_active(state)
    print(f"service_manager: unknown command {verb}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
