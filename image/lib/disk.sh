# Sourced by image/build.sh: the disk image from the root tree, with no loop device and no mount.
# shellcheck shell=bash

MIB=1048576
ESP_MIB=16
# quiet: every kernel and systemd status line on the serial console is slow to emulate (and a VM's
# serial port is rarely read); the journal keeps them all, and the login screen still shows the address.
# net.ifnames=0: the network interface keeps the kernel's name (eth0; 20-wired.network matches it). With
# udev's rename to enp0s1, which came 30 s into an emulated first boot, systemd-networkd (252) configured
# the link twice and failed it ("Failed to configure DHCPv4 client: Device or resource busy", the race of
# systemd PR 19290): a box with no IPv4 address, whose wizard nobody reaches (seen in a boot profile here).
KERNEL_ARGS_AMD64="ro quiet systemd.show_status=0 net.ifnames=0 console=tty0 console=ttyS0,115200n8"

# make_rootfs ROOT FILE LABEL UUID [ROOM_MIB]: an ext4 of the tree, as small as it goes plus room for
# the first boot (it grows to fill the disk right after).
make_rootfs() {
    local root=$1 file=$2 label=$3 uuid=$4 room=${5:-40} used size
    used=$(du -s --block-size=$MIB "$root" | cut -f1)
    # ext4's own metadata (journal, inode tables), and room for the first start (database, journal,
    # certificate: a few MB) until letterbox-growroot fills the disk; 64 MB put the raw image over 600 MB.
    size=$((used * 105 / 100 + room))
    until mkfs.ext4 -q -F -L "$label" -U "$uuid" -m 1 -d "$root" "$file" "${size}M" 2>"$file.log"; do
        grep -q 'Could not allocate\|No space left' "$file.log" || { cat "$file.log" >&2; return 1; }
        size=$((size * 5 / 4))
        rm -f "$file"
    done
    rm -f "$file.log"
}

# make_rootfs_fitted ROOT FILE LABEL UUID ROOM_MIB: the Raspberry Pi's root, made from the tree, shrunk
# to what it holds (resize2fs -M) and given ROOM for the first boot (letterbox-growroot fills the card
# right after). make_rootfs's estimate from du (the host's 4 KiB blocks) left 66 MB free in a 487 MiB
# root. An inode per 16 KiB, Debian's usual ratio: below 512 MiB mkfs.ext4 takes its "small" type, an
# inode per 4 KiB, 31 MB of inode tables for 16,500 files, and resize2fs keeps the ratio, so a card
# grown to 32 GB would have had 2 GB of them. 1 KiB blocks, as "small" had: the tree's 16,500 files
# take 25 MB less than in 4 KiB ones (and mail is many small files).
make_rootfs_fitted() {
    local root=$1 file=$2 label=$3 uuid=$4 room=$5 used
    used=$(du -s --block-size=$MIB "$root" | cut -f1)
    rm -f "$file"
    mkfs.ext4 -q -F -L "$label" -U "$uuid" -m 1 -b 1024 -i 16384 -J size=16 -d "$root" "$file" "$((used * 3 / 2 + 64))M"
    e2fsck -f -p "$file" >/dev/null || (($? == 1))  # 1: it corrected something (resize2fs wants it checked)
    resize2fs -M "$file" >/dev/null 2>&1
    # resize2fs -M keeps a margin of its own (120 MB of 590 at 1 KiB blocks): then down (-f, below that
    # estimate) to what is used plus ROOM, and checked.
    local count free blocks
    read -r count free < <(dumpe2fs -h "$file" 2>/dev/null | awk -F: '/^Block count/ {n = $2} /^Free blocks/ {f = $2}
                                                                 END {print n + 0, f + 0}')
    blocks=$((count - free + room * 1024))
    ((blocks <= count)) || truncate -s $((blocks * 1024)) "$file"
    resize2fs -f "$file" "${blocks}K" >/dev/null 2>&1
    e2fsck -f -n "$file" >/dev/null 2>&1
    [[ $(stat -c %s "$file") == $((blocks * 1024)) ]] || truncate -s $((blocks * 1024)) "$file"
}

grub_early_config() {
    printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\n' "$1"
}

grub_config() {
    local uuid=$1
    cat <<CFG
# Static on purpose: /vmlinuz and /initrd.img are the symlinks Debian keeps on the newest kernel, so a
# kernel upgrade needs no update-grub (the image has no GRUB package: GRUB's images sit on the disk).
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
# No menu unless asked for (Esc during the second GRUB waits shows it, with the previous kernel): drawing
# it and counting down on the serial console and the screen took seconds of an emulated boot.
set timeout_style=hidden
set timeout=1
set default=0
# The echo lines time GRUB's loading of the kernel and initrd from the serial console
# (tests/image/boot_profile.py).
menuentry "Letterbox" {
    echo "GRUB: loading /vmlinuz"
    linux /vmlinuz root=UUID=$uuid $KERNEL_ARGS_AMD64
    echo "GRUB: loading /initrd.img"
    initrd /initrd.img
    echo "GRUB: starting the kernel"
}
menuentry "Letterbox (previous kernel)" {
    linux /vmlinuz.old root=UUID=$uuid $KERNEL_ARGS_AMD64
    initrd /initrd.img.old
}
# A forgotten administrator password on a VM, from its console (letterbox-reset): a new one is shown on
# the login screen. Choosing it needs the console, where the kernel line can be edited anyway.
menuentry "Letterbox: a new administrator password on this screen" {
    linux /vmlinuz root=UUID=$uuid $KERNEL_ARGS_AMD64 letterbox.reset-password
    initrd /initrd.img
}
CFG
}

# amd64: GPT with a BIOS boot partition (GRUB's core.img), an EFI system partition (BOOTX64.EFI at the
# removable-media path, so no NVRAM entry is needed) and the root file system.
make_disk_amd64() {
    local root=$1 work=$2 out=$3 uuid modules
    uuid=$(cat /proc/sys/kernel/random/uuid)
    mkdir -p "$root/boot/grub"
    for platform in i386-pc x86_64-efi; do
        mkdir -p "$root/boot/grub/$platform"
        cp /usr/lib/grub/$platform/*.mod /usr/lib/grub/$platform/*.lst "$root/boot/grub/$platform/"
    done
    grub_config "$uuid" >"$root/boot/grub/grub.cfg"
    # The EFI partition at /boot/efi, mounted on first use (root's alone): letterbox-reset looks there
    # for the owner's letterbox-reset.txt at each boot. Never checked by fsck, never a reason to stop.
    printf 'UUID=%s\t/\text4\terrors=remount-ro,noatime\t0\t1\nLABEL=LBXEFI\t/boot/efi\tvfat\tnoatime,umask=0077,nofail,x-systemd.automount\t0\t0\n' \
        "$uuid" >"$root/etc/fstab"
    mkdir -p "$root/boot/efi"
    grub_early_config "$uuid" >"$work/early.cfg"
    modules="part_gpt part_msdos ext2 search search_fs_uuid normal configfile linux echo test serial terminal"
    # shellcheck disable=SC2086
    grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/early.cfg" -p /boot/grub biosdisk $modules
    # shellcheck disable=SC2086
    grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -c "$work/early.cfg" -p /boot/grub fat efi_gop $modules

    make_rootfs "$root" "$work/root.ext4" letterbox-root "$uuid"
    rm -f "$work/esp.img"
    # 16 MiB of FAT16 hold GRUB's 1 MB BOOTX64.EFI: UEFI firmware (EDK2 in OVMF, Proxmox, VirtualBox,
    # VMware's) reads FAT12/16/32 alike, and 48 MB more of a 600 MB image are left for the system.
    mkfs.vfat -C -F 16 -n LBXEFI "$work/esp.img" $((ESP_MIB * 1024)) >/dev/null
    mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
    mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

    local root_sectors=$(( $(stat -c %s "$work/root.ext4") / 512 ))
    local root_start=$(( (2 + ESP_MIB + 1) * 2048 ))  # 1 MiB gap, 1 MiB BIOS boot, the ESP, 1 MiB gap
    rm -f "$out"
    truncate -s $(( (root_start + root_sectors + 2048) * 512 )) "$out"
    sfdisk --quiet "$out" <<TABLE
label: gpt
start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="bios"
start=4096, size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
TABLE
    dd if="$work/esp.img" of="$out" bs=$MIB seek=2 conv=notrunc,sparse status=none
    dd if="$work/root.ext4" of="$out" bs=$MIB seek=$((root_start / 2048)) conv=notrunc,sparse status=none
    python3 "$IMAGE_DIR/lib/bios_boot.py" "$out" /usr/lib/grub/i386-pc/boot.img "$work/core.img" 2048
}

# arm64 (Raspberry Pi 4/5): MBR, the firmware's FAT partition (/boot/firmware: firmware, kernel, initrd,
# device trees, config.txt and cmdline.txt as Debian's raspi-firmware writes them) and the root.
make_disk_arm64() {
    local root=$1 work=$2 out=$3 uuid
    uuid=$(cat /proc/sys/kernel/random/uuid)
    # /boot/firmware is only needed when a kernel or firmware upgrade writes there: mounted on first use,
    # and never a reason to stop the boot (qemu -M virt: udev had not named it within the 90 s default
    # and the box stopped in emergency mode, which on a headless Pi is a brick).
    printf 'LABEL=RASPIROOT\t/\text4\terrors=remount-ro,noatime\t0\t1\nLABEL=RASPIFIRM\t/boot/firmware\tvfat\tdefaults,noatime,nofail,x-systemd.automount\t0\t2\n' \
        >"$root/etc/fstab"
    # The FAT partition holds what raspi-firmware put there (firmware, the newest kernel and initrd,
    # device trees: 44 MiB) and room for one kernel update: its hook copies the new kernel and initrd
    # in before it deletes the old ones, so the kernel + initrd (38 MiB) fit a second time, with a
    # tenth more for a kernel that grew and 4 MiB for FAT's own tables (about 1.5 MiB at this size).
    local used kernel_mib boot_mib
    used=$(du -s --block-size=$MIB "$root/boot/firmware" | cut -f1)
    kernel_mib=$(( ( $(find "$root/boot/firmware" -maxdepth 1 \( -name 'vmlinuz-*' -o -name 'initrd.img-*' \) -printf '%s+' ; echo 0) ) / MIB + 1 ))
    boot_mib=$(( (used + kernel_mib * 11 / 10 + 4 + 3) / 4 * 4 ))
    echo "firmware partition: ${boot_mib} MiB (${used} MiB used, ${kernel_mib} MiB kernel + initrd)"
    rm -f "$work/boot.img"
    mkfs.vfat -C -F 32 -n RASPIFIRM "$work/boot.img" $((boot_mib * 1024)) >/dev/null
    mcopy -s -i "$work/boot.img" "$root"/boot/firmware/* ::/
    rm -rf "${root:?}"/boot/firmware/*
    make_rootfs_fitted "$root" "$work/root.ext4" RASPIROOT "$uuid" 16
    local root_sectors=$(( $(stat -c %s "$work/root.ext4") / 512 ))
    local root_start=$(( (4 + boot_mib) * 2048 ))
    rm -f "$out"
    truncate -s $(( (root_start + root_sectors) * 512 )) "$out"
    sfdisk --quiet "$out" <<TABLE
label: dos
start=8192, size=$((boot_mib * 2048)), type=c, bootable
start=$root_start, size=$root_sectors, type=83
TABLE
    dd if="$work/boot.img" of="$out" bs=$MIB seek=4 conv=notrunc,sparse status=none
    dd if="$work/root.ext4" of="$out" bs=$MIB seek=$((root_start / 2048)) conv=notrunc,sparse status=none
}
