"""Boot the Raspberry Pi image's own kernel, initrd and root file system under qemu-system-aarch64
`-M virt` (TCG) to the wizard: `python -m tests.image.pi_virt image/out/letterbox-arm64.img`.

What this checks: the arm64 user space (systemd, the venv's compiled wheels, letterbox.service, first
boot), Debian's arm64 kernel+initrd from the FAT partition, and the content filter (issue 16): rspamd +
Redis start after the console, `letterbox spam status` (the function behind the status checklist's
"Content filter" item) finds rspamd answering, and their RSS once it does. What it cannot: the Pi
firmware, config.txt, cmdline.txt and the Pi's device tree (qemu has no Pi 4/5 machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.image.vm import DirectBoot, Vm

FIRMWARE_OFFSET = 4 * 1024 * 1024  # the FAT partition starts at 4 MiB (image/lib/disk.sh)
CLI = "runuser -u letterbox -- letterbox --data /var/lib/letterbox/data"
# rspamd's first start compiles its public-suffix list before it answers (ExecStartPre, cut at 10 min).
RSPAMD_TIMEOUT = 1500.0


def extract_boot_files(image: Path, into: Path) -> tuple[Path, Path]:
    fat = f"{image}@@{FIRMWARE_OFFSET}"
    names = subprocess.run(["mdir", "-b", "-i", fat, "::/"], check=True, capture_output=True, text=True).stdout.split()
    found: dict[str, Path] = {}
    for prefix in ("vmlinuz-", "initrd.img-"):
        name = sorted(n.lstrip(":/") for n in names if n.lstrip(":/").startswith(prefix))[-1]
        found[prefix] = into / name
        subprocess.run(["mcopy", "-i", fat, f"::/{name}", str(found[prefix])], check=True)
    return found["vmlinuz-"], found["initrd.img-"]


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


def main(image: Path) -> int:
    print(f"{image.name}: {partition_sizes(image)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="letterbox-pi-virt-") as tmp:
        kernel, initrd = extract_boot_files(image, Path(tmp))
        boot = DirectBoot(kernel, initrd, "root=LABEL=RASPIROOT ro console=ttyAMA0")
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
            checked = content_filter(vm)
            if checked is None:
                print(vm.failure_report(f"rspamd did not answer within {RSPAMD_TIMEOUT:.0f} s"), file=sys.stderr)
                return 1
            spam_status, rss = checked
            print(f"content filter {time.monotonic() - started:.0f} s after qemu started: {spam_status}", flush=True)
            print(f"RSS (MB) of rspamd + redis-server once rspamd answers: {rss}")
            print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
