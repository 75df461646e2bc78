"""Boot the Raspberry Pi image's own kernel, initrd and root file system under qemu-system-aarch64
`-M virt` (TCG) to the wizard: `python -m tests.image.pi_virt image/out/letterbox-arm64.img`.

What this checks: the arm64 user space (systemd, the venv's compiled wheels, letterbox.service, first
boot) and Debian's arm64 kernel+initrd from the FAT partition. What it cannot: the Pi firmware,
config.txt, cmdline.txt and the Pi's device tree (qemu has no Pi 4/5 machine).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.image.vm import DirectBoot, Vm

FIRMWARE_OFFSET = 4 * 1024 * 1024  # the FAT partition starts at 4 MiB (image/lib/disk.sh)


def extract_boot_files(image: Path, into: Path) -> tuple[Path, Path]:
    fat = f"{image}@@{FIRMWARE_OFFSET}"
    names = subprocess.run(["mdir", "-b", "-i", fat, "::/"], check=True, capture_output=True, text=True).stdout.split()
    found: dict[str, Path] = {}
    for prefix in ("vmlinuz-", "initrd.img-"):
        name = sorted(n.lstrip(":/") for n in names if n.lstrip(":/").startswith(prefix))[-1]
        found[prefix] = into / name
        subprocess.run(["mcopy", "-i", fat, f"::/{name}", str(found[prefix])], check=True)
    return found["vmlinuz-"], found["initrd.img-"]


def main(image: Path) -> int:
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
            status, _, _ = vm.https_get("/setup/1")
            print(f"arm64 image under qemu-system-aarch64 -M virt (TCG): wizard answered {status} "
                  f"{seconds:.0f} s after qemu started ({kernel.name})")
            print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
