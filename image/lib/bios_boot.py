"""Write GRUB's BIOS boot code into a GPT disk image, as grub-bios-setup does, without a loop device:
boot.img in the MBR (keeping the protective partition table) pointing at core.img, which goes into the
BIOS boot partition, its first sector (diskboot) pointing at the rest.

Usage: bios_boot.py DISK BOOT_IMG CORE_IMG CORE_SECTOR
Offsets from GRUB's include/grub/i386/pc/boot.h.
"""

from __future__ import annotations

import sys

SECTOR = 512
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C  # 8 bytes: LBA of core.img's first sector
DRIVE_CHECK = 0x66  # 2 bytes: NOPs on hard disks, as grub-bios-setup sets them
NT_MAGIC = 0x1B8  # disk signature, partition table, 55AA: kept from the disk
BLOCKLIST_START = SECTOR - 12  # in diskboot: 8 bytes start LBA, 2 bytes length, 2 bytes segment


def main(disk: str, boot_img: str, core_img: str, core_sector: int) -> None:
    with open(boot_img, "rb") as f:
        boot = bytearray(f.read())
    with open(core_img, "rb") as f:
        core = bytearray(f.read())
    if len(boot) != SECTOR:
        raise SystemExit(f"{boot_img}: not one sector")
    if len(core) > 2048 * SECTOR:
        raise SystemExit(f"{core_img}: {len(core)} bytes do not fit the 1 MiB BIOS boot partition")
    with open(disk, "r+b") as f:
        mbr = f.read(SECTOR)
        boot[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        boot[NT_MAGIC:] = mbr[NT_MAGIC:]
        boot[KERNEL_SECTOR:KERNEL_SECTOR + 8] = core_sector.to_bytes(8, "little")
        boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        core[BLOCKLIST_START:BLOCKLIST_START + 8] = (core_sector + 1).to_bytes(8, "little")
        f.seek(0)
        f.write(boot)
        f.seek(core_sector * SECTOR)
        f.write(core)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
