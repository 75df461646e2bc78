"""What the Raspberry Pi image holds for the Pi 4 family and the Pi 5, read from the built image file: the
firmware's FAT partition (firmware, device trees, config.txt, cmdline.txt), the initrd in it, and the ext4
root (kernel modules, apt's pins and sources, dpkg's status), without mounting anything (mtools,
debugfs). `make image-pi` runs it after the build, before tests/image/pi_virt.py boots the image under
qemu -M virt, which can check none of this: qemu has no Pi machine, and neither the Pi firmware nor a
Pi's device tree run there.

Collected only when LETTERBOX_PI_IMAGE names the image (tests/image/conftest.py; not part of `make test`):
`LETTERBOX_PI_IMAGE=image/out/letterbox-arm64.img .venv/bin/pytest tests/image/test_pi_image.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import zstandard

# The Pi 4 B, Pi 400 and CM4 (bcm2711), the Pi 5 with the BCM2712's C1 and D0 steppings: Linux's name for
# D0's tree and the one the Pi 5's firmware asks for (image/lib/pi-firmware/letterbox-pi5-dtb).
PI4_FILES = (
    "start4.elf",
    "fixup4.dat",
    "bcm2711-rpi-4-b.dtb",
    "bcm2711-rpi-400.dtb",
    "bcm2711-rpi-cm4-io.dtb",
)
PI5_FILES = ("bcm2712-rpi-5-b.dtb", "bcm2712-d-rpi-5-b.dtb", "bcm2712d0-rpi-5-b.dtb")
# Before the root file system: its SD card on each Pi (Pi 5: the BCM2712's SD host, its pins, the GPIOs of
# card detect and of its regulators; Pi 4: emmc2; Pi 3: sdhost), the virtio disk of pi_virt, ext4.
INITRD_MODULES = (
    "sdhci-brcmstb",
    "pinctrl-brcmstb-bcm2712",
    "gpio-brcmstb",
    "gpio-regulator",
    "fixed",
    "sdhci-iproc",
    "bcm2835",
    "virtio_blk",
    "ext4",
)
# From the root file system, loaded by udev on a Pi 5: the RP1 chip and, behind it, Ethernet and USB.
ROOT_MODULES = (
    "drivers/misc/rp1/rp1_pci",
    "drivers/clk/clk-rp1",
    "drivers/pinctrl/pinctrl-rp1",
    "drivers/net/ethernet/cadence/macb",
    "drivers/usb/dwc3/dwc3",
    "drivers/net/ethernet/broadcom/genet/genet",
)
# What the pin may take from trixie-backports (image/lib/kernel-arm64/letterbox-kernel.pref).
KERNEL_PACKAGES = re.compile(r"linux-(image|base|binary|modules)(-.*)?")


def image() -> Path:
    path = Path(os.environ.get("LETTERBOX_PI_IMAGE", "image/out/letterbox-arm64.img"))
    if not path.is_file():
        pytest.skip(f"no Raspberry Pi image built at {path} (make image-pi)")
    return path


@cache
def partition_offsets(path: Path) -> tuple[int, int]:
    """Byte offsets of the FAT and of the root file system (image/lib/disk.sh: MBR, FAT first)."""
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]
    fat, root = table["partitions"]
    return fat["start"] * 512, root["start"] * 512


def fat(path: Path) -> str:
    return f"{path}@@{partition_offsets(path)[0]}"


@cache
def fat_names(path: Path) -> frozenset[str]:
    listing = subprocess.run(
        ["mdir", "-b", "-i", fat(path), "::/"], check=True, capture_output=True, text=True
    ).stdout
    return frozenset(name.removeprefix("::/") for name in listing.split())


def fat_bytes(path: Path, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", fat(path), f"::/{name}"], check=True, capture_output=True).stdout


def root_fs(path: Path) -> str:
    return f"{path}?offset={partition_offsets(path)[1]}"


def debugfs(path: Path, request: str) -> bytes:
    return subprocess.run(["debugfs", "-R", request, root_fs(path)], check=True, capture_output=True).stdout


def root_names(path: Path, folder: str) -> set[str]:
    """The entries of a folder of the root file system (debugfs's `ls -p`: /inode/mode/uid/gid/name/size/)."""
    lines = debugfs(path, f"ls -p {folder}").decode().splitlines()
    return {line.split("/")[5] for line in lines if line.count("/") >= 6} - {".", ".."}


def root_text(path: Path, file: str) -> str:
    return debugfs(path, f"cat {file}").decode()


def config_lines(path: Path) -> list[str]:
    return [
        line.strip()
        for line in fat_bytes(path, "config.txt").decode().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def kernel_version(path: Path) -> str:
    (kernel,) = [name for name in fat_names(path) if name.startswith("vmlinuz-")]
    return kernel.removeprefix("vmlinuz-")


def cpio_names(data: bytes) -> list[str]:
    """The file names of an initramfs: newc cpio archives, each maybe zstd-compressed, one after the other
    (initramfs-tools: an uncompressed early one first when there is early firmware or microcode)."""
    names: list[str] = []
    while data:
        if data.startswith(b"\x28\xb5\x2f\xfd"):
            data = zstandard.ZstdDecompressor().stream_reader(data).read()
            continue
        if not data.startswith(b"070701"):
            data = data.lstrip(b"\0")  # padding between archives
            if data and not data.startswith((b"070701", b"\x28\xb5\x2f\xfd")):
                raise AssertionError(f"not a newc cpio or zstd stream: {data[:8]!r}")
            continue
        position = 0
        while True:
            header = data[position : position + 110]
            assert header.startswith(b"070701"), f"broken cpio header at {position}"
            file_size, name_size = int(header[54:62], 16), int(header[94:102], 16)
            name = data[position + 110 : position + 110 + name_size - 1].decode()
            position = (position + 110 + name_size + 3) & ~3
            position = (position + file_size + 3) & ~3
            if name == "TRAILER!!!":
                break
            names.append(name)
        data = data[position:]
    return names


def test_firmware_partition_has_the_pi4_and_pi5_boot_files() -> None:
    path = image()
    missing = [
        name for name in (*PI4_FILES, *PI5_FILES, "config.txt", "cmdline.txt") if name not in fat_names(path)
    ]
    assert not missing, f"not on the firmware partition: {missing}"
    # The D0 board's tree under the firmware's name is the kernel's own tree, byte for byte.
    assert fat_bytes(path, "bcm2712d0-rpi-5-b.dtb") == fat_bytes(path, "bcm2712-d-rpi-5-b.dtb")


def test_config_txt_boots_the_kernel_and_initrd_on_every_pi() -> None:
    path = image()
    lines = config_lines(path)
    # Conditional sections ([pi4], [pi5], ...) would hide what follows from the other models: the kernel
    # and initramfs lines must come before any section but [all].
    section = "all"
    seen: dict[str, str] = {}
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]").lower()
        elif line.startswith(("kernel=", "initramfs ")):
            seen[line.split("=" if "=" in line else " ")[0]] = section
    assert seen == {"kernel": "all", "initramfs": "all"}, f"config.txt: {lines}"
    settings = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("["))
    assert settings["kernel"] in fat_names(path), (
        f"config.txt's kernel={settings['kernel']} is not on the FAT"
    )
    (initramfs,) = [line.split()[1] for line in lines if line.startswith("initramfs ")]
    assert initramfs in fat_names(path), f"config.txt's initramfs {initramfs} is not on the FAT"
    assert settings["arm_64bit"] == "1"
    cmdline = fat_bytes(path, "cmdline.txt").decode().split()
    assert "root=LABEL=RASPIROOT" in cmdline, cmdline
    assert "net.ifnames=0" in cmdline, cmdline


def test_kernel_on_the_fat_is_the_root_file_systems() -> None:
    """The kernel the firmware loads is the installed trixie-backports one, whose modules are in the root."""
    path = image()
    version = kernel_version(path)
    assert "+deb13" in version or "bpo" in version, f"not trixie's kernel: {version}"
    assert version in root_names(path, "/usr/lib/modules")
    fat_kernel = hashlib.sha256(fat_bytes(path, f"vmlinuz-{version}")).hexdigest()
    root_kernel = hashlib.sha256(debugfs(path, f"cat /usr/lib/modules/{version}/vmlinuz")).hexdigest()
    assert fat_kernel == root_kernel


def test_initrd_finds_the_root_on_each_pi() -> None:
    path = image()
    version = kernel_version(path)
    names = cpio_names(fat_bytes(path, f"initrd.img-{version}"))
    modules = {Path(name).name.split(".ko")[0] for name in names if ".ko" in name}
    missing = [module for module in INITRD_MODULES if module not in modules]
    assert not missing, f"not in the initrd: {missing} (it has {sorted(modules)})"


def test_root_has_the_pi5_network_and_usb_drivers() -> None:
    path = image()
    version = kernel_version(path)
    kernel = f"/usr/lib/modules/{version}/kernel"
    missing = [
        module
        for module in ROOT_MODULES
        if not any(
            name.startswith(Path(module).name + ".ko")
            for name in root_names(path, f"{kernel}/{Path(module).parent}")
        )
    ]
    assert not missing, f"not in the root file system: {missing}"
    # depmod ran after the trim: udev finds them by the device tree's compatible strings.
    aliases = root_text(path, f"/usr/lib/modules/{version}/modules.alias")
    for compatible in ("raspberrypi,rp1-gem", "brcm,bcm2712-sdhci"):
        assert compatible in aliases, f"no module alias for {compatible}"


def test_only_the_kernel_comes_from_trixie_backports() -> None:
    path = image()
    sources = root_text(path, "/etc/apt/sources.list")
    assert re.search(r"^deb \S+ trixie-backports main$", sources, re.M), sources
    pins = root_text(path, "/etc/apt/preferences.d/letterbox-kernel.pref")
    assert re.search(r"Package: \*\nPin: release n=trixie-backports\nPin-Priority: -1", pins), pins
    updates = root_text(path, "/etc/apt/apt.conf.d/51letterbox-kernel-updates")
    assert '"origin=Debian Backports,codename=trixie-backports,label=Debian Backports";' in updates
    # dpkg's status: what came from trixie-backports (~bpo13 versions) is the kernel's packages only.
    status = root_text(path, "/var/lib/dpkg/status")
    backported = {
        package
        for package, version in re.findall(r"^Package: (\S+)\n(?:.+\n)*?Version: (\S+)", status, re.M)
        if "bpo13" in version
    }
    assert backported, "no package from trixie-backports installed"
    strays = sorted(package for package in backported if not KERNEL_PACKAGES.fullmatch(package))
    assert not strays, f"from trixie-backports but not the kernel: {strays}"
    assert "linux-image-arm64" in backported


def test_kernel_updates_have_their_hooks() -> None:
    """What a kernel update runs besides the packages' own hooks (image/lib/kernel-arm64, pi-firmware):
    /boot/vmlinuz-VER for raspi-firmware, room on the FAT first, the D0 tree's name after."""
    path = image()
    hooks = {
        "/etc/kernel/postinst.d": {
            "00-legacy-boot",
            "z49-letterbox-firmware-room",
            "z50-raspi-firmware",
            "z51-letterbox-pi5-dtb",
        },
        "/etc/kernel/prerm.d": {"zz-legacy-boot"},
        "/etc/initramfs/post-update.d": {"z50-raspi-firmware", "z51-letterbox-pi5-dtb"},
    }
    for folder, names in hooks.items():
        missing = names - root_names(path, folder)
        assert not missing, f"not in {folder}: {sorted(missing)}"
