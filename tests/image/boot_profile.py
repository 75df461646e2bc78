"""Where an appliance image's boot goes: `python -m tests.image.boot_profile IMAGE [--uefi]`.

Boots IMAGE under qemu (TCG, as tests/image/ do), waits for the wizard and prints what the guest says of
its boot through the guest agent: systemd-analyze (kernel, initrd, user space), the critical chain of
letterbox.service, the slowest units, and letterbox's own start from its journal lines. The numbers
the issue's target (boot to wizard) is made of.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.image.vm import Vm

REPORTS = {
    # systemd-analyze answers only once the boot has finished (rspamd and the others after the console).
    "boot finished": "timeout 600 systemctl is-system-running --wait",
    "systemd-analyze": "systemd-analyze time",
    "critical chain": "systemd-analyze critical-chain letterbox.service --no-pager",
    "blame": "systemd-analyze blame --no-pager | head -25",
    "letterbox journal": "journalctl -b -o short-monotonic --no-pager -u letterbox.service | head -40",
    # What ran before and beside letterbox's start (the kernel's own lines left out: hundreds).
    "boot journal": "journalctl -b -o short-monotonic --no-pager | grep -v ' kernel: ' | head -150",
    "exposure": "systemd-analyze security letterbox.service --no-pager | tail -1",
}


class ConsoleTimes:
    """Each new line of the serial console with the seconds since qemu started, as the host saw it
    arrive: GRUB's own lines ("loading the kernel"...) time the firmware and the boot loader, which
    the guest's clock (it starts with the kernel) cannot."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.lines: list[tuple[float, str]] = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ConsoleTimes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        partial = ""
        while not self._stop.wait(0.05):
            text = self.vm.console_log()
            partial += text[self._seen:]
            self._seen = len(text)
            *done, partial = partial.split("\n")
            now = time.monotonic() - self.vm.started_at
            self.lines += [(now, line.strip()) for line in done if line.strip()]


# CPU seconds each unit (cgroup v2 cpu.stat usage_usec: all its processes, alive or gone) has used since
# the boot, one "UNIT SECONDS" line each: what a box that should be idle spends its CPU on.
_UNIT_CPU = ("cd /sys/fs/cgroup && for f in system.slice/*/cpu.stat init.scope/cpu.stat; do "
             "echo \"${f%/cpu.stat} $(awk '/^usage_usec/ {print $2 / 1e6}' $f)\"; done")


def unit_cpu(vm: Vm) -> dict[str, float]:
    lines = vm.run(_UNIT_CPU, check=False, timeout=120).stdout.splitlines()
    return {unit.removeprefix("system.slice/"): float(seconds)
            for unit, seconds in (line.split() for line in lines if len(line.split()) == 2)}


def watch_cpu(vm: Vm, seconds: float, every: float = 20.0) -> None:
    """The guest CPU of each unit over `seconds` after the wizard answered, printed every `every`
    seconds for the units that used any since the last sample; with qemu's own CPU."""
    print(f"--- CPU by unit (guest cgroup usage, s) every {every:.0f} s for {seconds:.0f} s after the wizard")
    end = time.monotonic() + seconds
    last = unit_cpu(vm)
    print("at wizard: " + ", ".join(f"{u} {s:.1f}" for u, s in sorted(last.items(), key=lambda i: -i[1]) if s >= 0.5))
    while time.monotonic() < end:
        time.sleep(every)
        now = unit_cpu(vm)
        used = {u: s - last.get(u, 0.0) for u, s in now.items()}
        busy = ", ".join(f"{u} +{s:.1f}" for u, s in sorted(used.items(), key=lambda i: -i[1]) if s >= 0.2)
        print(f"{time.monotonic() - vm.started_at:6.0f} s, qemu CPU {vm.cpu_seconds():6.0f} s, "
              f"load {os.getloadavg()[0]:.1f}: {busy or 'idle'}", flush=True)
        last = now


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("image", type=Path)
    parser.add_argument("--uefi", action="store_true")
    parser.add_argument("--reboot", action="store_true", help="also time a reboot")
    parser.add_argument("--run", action="append", default=[], help="another guest command to print")
    parser.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                        help="after the wizard, the CPU each unit uses, sampled for SECONDS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="letterbox-boot-") as tmp, \
            Vm(args.image, Path(tmp), uefi=args.uefi, name="profile") as vm:
        vm.start()
        with ConsoleTimes(vm) as console:
            wizard = vm.wait_for_wizard()
        # The guest's clock starts with its kernel: what the host waited beyond it is firmware and GRUB
        # (before) and the first answer of the console (after READY=1, in the journal).
        uptime = float(vm.run("cut -d' ' -f1 /proc/uptime").stdout)
        print(f"boot to wizard ({'UEFI' if args.uefi else 'BIOS'}, first boot): {wizard:.0f} s, "
              f"qemu CPU {vm.wizard_cpu:.0f} s, host load {os.getloadavg()[0]:.1f}; "
              f"guest uptime then {uptime:.0f} s", flush=True)
        print(f"--- serial console, seconds since qemu started (kernel started at about {wizard - uptime:.1f} s)")
        for seconds, line in console.lines[:40]:
            print(f"{seconds:7.1f} {line[:150]}")
        if args.watch:
            watch_cpu(vm, args.watch)
        time.sleep(2)
        for title, command in {**REPORTS, **{c: c for c in args.run}}.items():
            result = vm.run(command, check=False)
            print(f"--- {title}: {command}\n{result.stdout}{result.stderr}", flush=True)
        if args.reboot:
            vm.reboot()
            seconds = vm.wait_for_wizard()
            print(f"boot to wizard (reboot): {seconds:.0f} s, qemu CPU {vm.wizard_cpu:.0f} s", flush=True)
            for title in ("systemd-analyze", "critical chain", "blame"):
                result = vm.run(REPORTS[title], check=False)
                print(f"--- {title} (reboot)\n{result.stdout}{result.stderr}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
