"""Boot the Raspberry Pi image's own kernel, initrd and root file system under qemu-system-aarch64
`-M virt` (TCG) to the wizard: `python -m tests.image.pi_virt image/out/letterbox-arm64.img`.

What this checks: the arm64 user space (systemd, the venv's compiled wheels, letterbox.service, first
boot), Debian's arm64 kernel+initrd from the FAT partition, booted with the arguments of the image's own
cmdline.txt (its root=LABEL=RASPIROOT, net.ifnames=0...; only its console= ones are replaced by qemu's
serial port), wizard step 1 completed from the host with an HTTP client, and the content filter
(issue 16): rspamd + Redis start after the console, `letterbox spam status` (the function behind the
status checklist's "Content filter" item) finds rspamd answering, and their RSS once it does. Then it
prints what the guest says of itself: failed units, the journal's errors, rspamd's own warnings, the
exposure score of letterbox.service. What it cannot: the Pi firmware, config.txt, the Pi's device tree
and its drivers (qemu has no Pi 4/5 machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.bundle import write_bundle
from tests.image.test_appliance import _wizard_step1, https_client
from tests.image.vm import DirectBoot, Vm
from tests.support.releases import ROOT, build_wheel

FIRMWARE_OFFSET = 4 * 1024 * 1024  # the FAT partition starts at 4 MiB (image/lib/disk.sh)
DATA = "/var/lib/letterbox/data"
CLI = f"runuser -u letterbox -- letterbox --data {DATA}"
# rspamd's first start compiles its public-suffix list before it answers (ExecStartPre, cut at 10 min).
RSPAMD_TIMEOUT = 1500.0
UPDATE_TIMEOUT = 1800.0


def extract_boot_files(image: Path, into: Path) -> tuple[Path, Path]:
    fat = f"{image}@@{FIRMWARE_OFFSET}"
    names = subprocess.run(["mdir", "-b", "-i", fat, "::/"], check=True, capture_output=True, text=True).stdout.split()
    found: dict[str, Path] = {}
    for prefix in ("vmlinuz-", "initrd.img-"):
        name = sorted(n.lstrip(":/") for n in names if n.lstrip(":/").startswith(prefix))[-1]
        found[prefix] = into / name
        subprocess.run(["mcopy", "-i", fat, f"::/{name}", str(found[prefix])], check=True)
    return found["vmlinuz-"], found["initrd.img-"]


def kernel_arguments(image: Path) -> str:
    """The image's cmdline.txt (what the Pi firmware hands the kernel) with qemu's serial port for its
    consoles: a Pi's are tty0 (HDMI) and its UART, -M virt has a PL011 at ttyAMA0."""
    text = subprocess.run(["mtype", "-i", f"{image}@@{FIRMWARE_OFFSET}", "::/cmdline.txt"], check=True,
                          capture_output=True, text=True).stdout
    return " ".join([*(arg for arg in text.split() if not arg.startswith("console=")), "console=ttyAMA0"])


def partition_sizes(image: Path) -> str:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    sizes = [f"{part['node'].rsplit('img', 1)[-1]}: {part['size'] * 512 / 1e6:.0f} MB" for part in table["partitions"]]
    return f"{image.stat().st_size / 1e6:.0f} MB raw; partitions " + ", ".join(sizes)


def content_filter(vm: Vm) -> tuple[str, str] | None:
    """`letterbox spam status` once rspamd answers, and the RSS of rspamd's and Redis's processes then;
    None when rspamd did not answer in time."""
    deadline = time.monotonic() + RSPAMD_TIMEOUT
    while vm.run(f"{CLI} spam status", check=False).exit_code != 0:
        if time.monotonic() > deadline:
            return None
        time.sleep(5)
    status = vm.run(f"{CLI} spam status").stdout.strip()
    rss = vm.run("ps -o rss=,comm= -C rspamd,redis-server | awk '{kb += $1; print $2, int($1/1024)} "
                 "END {print \"total\", int(kb/1024)}' | tr '\\n' ' '").stdout.strip()
    return status, rss


# What the guest says of itself once rspamd answers (root commands through the guest agent).
GUEST_REPORT = {
    "failed units": "systemctl --failed --no-legend --plain | cut -d' ' -f1 | tr '\\n' ' '",
    "journal errors (priority err and worse)": "journalctl -b -p err --no-pager -o short-monotonic",
    # rspamd logs to its own file (Debian's logging.inc), the journal has only its unit's lines. On arm64
    # it says "unknown worker type: hs_helper" once per start (no Hyperscan there) and goes on.
    "rspamd's log: errors and unknown sections": "grep -iE 'error|crit|unknown worker' /var/log/rspamd/rspamd.log "
                                                  "| cut -d' ' -f3- | cut -c1-200 | sort | uniq -c | sort -rn | head -20",
    "rspamd's transparent huge pages (THP_enabled: 0 = off)": "grep -h THP_enabled /proc/$(systemctl show "
                                                               "-p MainPID --value rspamd)/status",
    "interfaces": "ip -brief address",
    "exposure": "systemd-analyze security letterbox.service --no-pager | tail -1",
    "systemd-analyze": "systemd-analyze time | head -1",
}


def guest_report(vm: Vm) -> None:
    for what, command in GUEST_REPORT.items():
        result = vm.run(command, check=False)
        print(f"--- {what}:\n{(result.stdout + result.stderr).strip() or '(none)'}", flush=True)


def image_dependency_wheels() -> Path:
    """The aarch64 dependency wheels the image's venv was installed from, where image/build.sh caches
    them (keyed by pyproject.toml, as there)."""
    cache = Path(os.environ.get("LETTERBOX_IMAGE_CACHE", "/var/cache/letterbox-image"))
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + b"pip\n").hexdigest()[:16]
    return cache / f"wheels-arm64-{key}"


def quick_update(vm: Vm, tmp: Path) -> bool:
    """A bundle of this checkout, one version up, with the image's own dependency wheels, through
    `letterbox-update` as root: the path a release with the same locked dependencies takes on a Pi
    (appliance/update.py: the venv in force copied, only Letterbox's wheel installed over it)."""
    running = vm.run("letterbox --version").stdout.split()[-1]
    version = f"{running}.1"
    wheels = tmp / "update-wheels"
    shutil.copytree(image_dependency_wheels(), wheels)
    build_wheel(wheels, version)
    vm.write_file("/root/update.tar", write_bundle(wheels, tmp, machine="aarch64").read_bytes())
    # The first boot's letterbox-growroot (beside the console's start, before rspamd) makes the room for a
    # second venv: the image's root has little free before it (tests/image/test_update.py).
    deadline = time.monotonic() + UPDATE_TIMEOUT
    while vm.run("systemctl show -p ExecMainExitTimestampMonotonic --value letterbox-growroot").stdout.strip() in ("", "0"):
        if time.monotonic() > deadline:
            print("the root file system was not grown in time", file=sys.stderr)
            return False
        time.sleep(5)
    started = time.monotonic()
    result = vm.run("letterbox-update /root/update.tar", check=False, timeout=UPDATE_TIMEOUT)
    seconds = time.monotonic() - started
    print(f"--- letterbox-update {running} -> {version}: exit {result.exit_code} after {seconds:.0f} s\n"
          f"{(result.stdout + result.stderr).strip()}", flush=True)
    now = vm.run("letterbox --version", check=False).stdout.strip()
    active = vm.run("systemctl is-active letterbox", check=False).stdout.strip()
    print(f"after the update: {now}, letterbox.service {active}", flush=True)
    return result.exit_code == 0 and now == f"letterbox {version}" and active == "active"


def main(image: Path) -> int:
    print(f"{image.name}: {partition_sizes(image)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="letterbox-pi-virt-") as tmp:
        kernel, initrd = extract_boot_files(image, Path(tmp))
        append = kernel_arguments(image)
        print(f"kernel arguments (cmdline.txt's): {append}", flush=True)
        boot = DirectBoot(kernel, initrd, append)
        with Vm(image, Path(tmp), name="pi-virt", direct_boot=boot, memory_mb=1024) as vm:
            started = time.monotonic()
            vm.start()
            try:
                seconds = vm.wait_for_wizard()
            except AssertionError as exc:
                print(exc, file=sys.stderr)
                return 1
            print(f"arm64 image under qemu-system-aarch64 -M virt (TCG): wizard answered "
                  f"{seconds:.0f} s after qemu started ({kernel.name})", flush=True)
            # Right after the wizard the guest is busiest (growroot, SSH host keys, Redis and rspamd
            # starting): a page may take longer than the 30 s a readiness probe waits.
            status, _, _ = vm.https_get("/setup/1", timeout=300)
            print(f"wizard step 1: HTTP {status}", flush=True)
            code = vm.run(f"cat {DATA}/setup-code").stdout.strip()
            with https_client(vm) as client:
                response = _wizard_step1(client, code)
            location = response.headers.get("location", "")
            print(f"wizard step 1 completed {time.monotonic() - started:.0f} s after qemu started: "
                  f"HTTP {response.status_code} -> {location}", flush=True)
            if response.status_code != 303 or not location.endswith("/setup/2"):
                print(response.text[:800], file=sys.stderr)
                return 1
            checked = content_filter(vm)
            if checked is None:
                print(vm.failure_report(f"rspamd did not answer within {RSPAMD_TIMEOUT:.0f} s"), file=sys.stderr)
                return 1
            spam_status, rss = checked
            print(f"content filter {time.monotonic() - started:.0f} s after qemu started: {spam_status}", flush=True)
            print(f"RSS (MB) of rspamd + redis-server once rspamd answers: {rss}", flush=True)
            guest_report(vm)
            if not quick_update(vm, Path(tmp)):
                return 1
            print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
