# Sourced by image/build.sh: the system settings of the image, and the check that nothing in it is
# per-machine (every box makes its own identity at first boot).
# shellcheck shell=bash

configure_system() {
    local arch=$1 root=$2
    echo letterbox >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tletterbox.local letterbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$root/etc/hosts"
    ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
    echo Etc/UTC >"$root/etc/timezone"
    # A plain file naming systemd-resolved's stub, not the usual link to /run/systemd/resolve/: resolved
    # starts after the console (below), and until then the link pointed nowhere; letterbox read no
    # resolv.conf at its start and asked 127.0.0.1, where nothing answers. Lookups made before resolved
    # is up fail and are retried as in any DNS outage.
    rm -f "$root/etc/resolv.conf"
    printf 'nameserver 127.0.0.53\noptions edns0 trust-ad\n' >"$root/etc/resolv.conf"
    if [[ $arch == arm64 ]]; then
        # The root file system by its label, as /etc/fstab has it: raspi-firmware writes root=/dev/mmcblk0p2
        # into cmdline.txt, but the SD card's number differs between Pi models and kernels, and a USB disk is
        # neither. ROOTPART keeps it so when a kernel upgrade writes cmdline.txt again.
        sed -i 's|^#ROOTPART=.*|ROOTPART="LABEL=RASPIROOT"|' "$root/etc/default/raspi-firmware"
        sed -i 's|root=[^ ]*|root=LABEL=RASPIROOT|' "$root/boot/firmware/cmdline.txt"
        pi5_boot_files "$root"
        kernel_updates_arm64 "$root"
    fi

    # The service user; the data directory is made empty: the box makes its secrets and certificate
    # at its first start.
    chroot "$root" useradd --system --user-group --home-dir /var/lib/letterbox --no-create-home \
        --shell /usr/sbin/nologin letterbox
    chroot "$root" install -d -m 0700 -o letterbox -g letterbox /var/lib/letterbox
    if [[ ! -f $root/etc/systemd/system/letterbox.service ]]; then
        # Until image/overlay/etc/systemd/system/letterbox.service exists (hardened, with updates and
        # rollback), a plain unit, so that the image can be built and tested meanwhile.
        echo "WARNING: no image/overlay/etc/systemd/system/letterbox.service: using a plain unit" >&2
        cat >"$root/etc/systemd/system/letterbox.service" <<UNIT
[Unit]
Description=Letterbox mail server
After=network.target
[Service]
User=letterbox
ExecStart=$PREFIX/venv/bin/letterbox --data $DATA serve
AmbientCapabilities=CAP_NET_BIND_SERVICE
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
    fi

    # DHCP by systemd-networkd (the .network file is in the overlay), names by systemd-resolved
    # (its own mDNS off: avahi answers for letterbox.local).
    systemctl --root="$root" enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
        avahi-daemon.service >/dev/null 2>&1
    # systemd-resolved and systemd-timesyncd come with Before=sysinit.target (and resolved with
    # Before=network.target): everything of the boot, letterbox.service included, waited for their first
    # start (resolved had used 25 s of CPU when the wizard answered, emulated, load 7). The box needs neither before the
    # console: copies in /etc (which take precedence over /usr/lib, and which a drop-in could not do:
    # drop-ins add dependencies, they cannot remove one) that start in multi-user.target, after the
    # console (the After= is in their overlay drop-ins). networkd hands resolved its DNS servers through
    # /run/systemd/netif whenever resolved starts. A systemd upgrade changes /usr/lib's units, not these.
    local early
    for early in systemd-resolved systemd-timesyncd; do
        systemctl --root="$root" disable "$early.service" >/dev/null 2>&1
        sed -e '/^Before=/s/sysinit\.target \?//; /^Before=/s/network\.target \?//' \
            -e 's/^WantedBy=sysinit\.target/WantedBy=multi-user.target/' \
            "$root/usr/lib/systemd/system/$early.service" >"$root/etc/systemd/system/$early.service"
        grep -q 'sysinit.target' "$root/etc/systemd/system/$early.service" && { echo "$early: still before sysinit" >&2; return 1; }
        systemctl --root="$root" enable "$early.service" >/dev/null 2>&1
    done
    # Every unit of the overlay that says where it belongs (letterbox.service, the first-boot units,
    # letterbox-update.path...).
    local unit
    for unit in "$IMAGE_DIR"/overlay/etc/systemd/system/*.{service,path,timer,socket} "$root/etc/systemd/system/letterbox.service"; do
        if [[ -f $unit ]] && grep -q '^\[Install\]' "$unit"; then
            systemctl --root="$root" enable "$(basename "$unit")" >/dev/null 2>&1
        fi
    done
    # What a mail appliance never uses, off: each of these cost seconds to a minute of an emulated boot
    # (systemd-analyze blame in the VM, tests/image/boot_profile.py). e2scrub needs LVM snapshots (the
    # image has no LVM); the rest load modules or mount file systems for debugging, FUSE, binfmt,
    # huge pages and EFI crash logs.
    systemctl --root="$root" mask e2scrub_reap.service e2scrub_all.timer e2scrub_all.service \
        sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
        dev-hugepages.mount proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
        systemd-binfmt.service systemd-pstore.service modprobe@drm.service modprobe@fuse.service \
        modprobe@configfs.service modprobe@efi_pstore.service >/dev/null 2>&1
    # SSH stays off until the admin turns it on (its host keys are made at first boot all the same).
    systemctl --root="$root" disable ssh.service >/dev/null 2>&1 || true

    # Unattended Debian security upgrades (the origins are Debian's defaults: the security archive).
    printf 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n' \
        >"$root/etc/apt/apt.conf.d/20auto-upgrades"
    mkdir -p "$root/var/log/journal"  # persistent journal, capped in journald.conf.d

    # mmdebstrap's merged-/usr setup leaves usrmerge and the Perl modules it alone uses: /usr is merged
    # already. Perl itself stays where rspamd (its helper scripts) depends on it: purging it would
    # take rspamd along.
    local purge=(usrmerge libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl)
    chroot "$root" dpkg-query -W -f '${Status}' rspamd 2>/dev/null | grep -q 'ok installed' || purge+=(perl)
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -y -q purge "${purge[@]}" >/dev/null
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -y -q autoremove --purge >/dev/null

    trim "$arch" "$root"

    # Per-machine state out: first boot makes it (systemd: an empty machine-id means first boot).
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed" \
        "$root/var/lib/systemd/credential.secret" "$root"/etc/ssh/ssh_host_*
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
        "$root"/var/log/*.log "$root/var/log/apt"/* "$root"/tmp/* "$root"/root/.cache
    usr_updated_now "$root"
}

# The Raspberry Pi 5's share of the firmware partition (raspi-firmware's hooks already copy the kernel's
# bcm2712 device trees there with the Pi 4's, and its config.txt's kernel= and initramfs lines serve
# both: the Pi 5's boot loader, in its EEPROM, reads config.txt, the kernel, the initrd and the tree by
# name from the FAT's root as the Pi 4's start4.elf does): the D0 stepping's tree under the name its
# firmware asks for, now and after every kernel or initrd update (lib/pi-firmware/letterbox-pi5-dtb).
pi5_boot_files() {
    local root=$1 dir
    for dir in kernel/postinst.d initramfs/post-update.d; do
        install -D -m 0755 "$IMAGE_DIR/lib/pi-firmware/letterbox-pi5-dtb" "$root/etc/$dir/z51-letterbox-pi5-dtb"
    done
    # And room on the FAT for the next kernel however many updates come between two reboots.
    install -m 0755 "$IMAGE_DIR/lib/pi-firmware/letterbox-firmware-room" "$root/etc/kernel/postinst.d/z49-letterbox-firmware-room"
    [[ -f $root/boot/firmware/bcm2712-d-rpi-5-b.dtb ]] || { echo "no Raspberry Pi 5 device tree in /boot/firmware" >&2; return 1; }
    cp "$root/boot/firmware/bcm2712-d-rpi-5-b.dtb" "$root/boot/firmware/bcm2712d0-rpi-5-b.dtb"
}

# The kernel (from trixie-backports, pinned by lib/kernel-arm64/letterbox-kernel.pref) gets its updates as
# the rest of the system gets Debian's security updates: unattended-upgrades' allowed origins include
# trixie-backports. Only the kernel's packages can come from there: the pin puts every other package of
# it at -1, and unattended-upgrades takes a version only if its pin priority is not below the installed
# one's (find_better_version), and installs no candidate apt would not.
kernel_updates_arm64() {
    local root=$1
    cat >"$root/etc/apt/apt.conf.d/51letterbox-kernel-updates" <<'CONF'
// Letterbox (image/lib/configure.sh): the kernel's updates from trixie-backports, installed
// unattended like the security archive's (/etc/apt/preferences.d/letterbox-kernel.pref lets only the
// kernel's packages come from there).
Unattended-Upgrade::Origins-Pattern {
        "origin=Debian Backports,codename=trixie-backports,label=Debian Backports";
};
CONF
    grep -q "trixie-backports" "$root/etc/apt/sources.list" || { echo "no trixie-backports in the image's apt sources" >&2; return 1; }
}

# systemd runs its "after an update of /usr" jobs at a boot that finds /usr newer than /etc/.updated and
# /var/.updated (ConditionNeedsUpdate): systemd-sysusers, ldconfig, the journal's message catalog,
# systemd-update-done. An image has no stamps, so every first boot ran them before sysinit.target, in
# front of the console (system users about 4 s of an emulated first boot): done here once instead, and
# stamped with /usr's time in whole seconds (systemd then compares seconds only). The last step of the
# tree: anything changed under /usr later makes them run again at first boot, which is only slower.
usr_updated_now() {
    local root=$1
    chroot "$root" systemd-sysusers >/dev/null
    chroot "$root" ldconfig
    chroot "$root" journalctl --update-catalog
    touch -d "@$(stat -c %Y "$root/usr")" "$root/usr"
    touch -r "$root/usr" "$root/etc/.updated" "$root/var/.updated"
}

# The image's second cut, after lib/base.sh's dpkg excludes (here rather than in the base's list: the
# base is cached, and these cost nothing to change): rules in dpkg's path-exclude/path-include form,
# written to the image's dpkg config so that upgrades stay as lean, and applied to the tree now; the
# venv's compiled extensions stripped. Both images: udev's hardware database (22 MB: vendor and model
# names for desktops' USB and PCI devices; bookworm's udev installs under /lib, so lib/base.sh's
# /usr/lib/udev/hwdb.d exclude matches nothing). The Raspberry Pi image cuts more (trim_arm64), to fit
# rspamd, ICU and Perl in 600 MB.
trim() {
    local arch=$1 root=$2 rules
    rules=$(printf '%s\n' '# Letterbox (image/lib/configure.sh): what the image leaves out' 'path-exclude=/lib/udev/hwdb.d/*'
            if [[ $arch == arm64 ]]; then arm64_trim_rules; fi)
    printf '%s\n' "$rules" >"$root/etc/dpkg/dpkg.cfg.d/letterbox-trim"
    local line pattern excludes=() includes=()
    while read -r line; do
        pattern=${line#path-*=}
        pattern=$root${pattern/#\/lib\//\/usr\/lib\/}  # merged /usr: /lib is a link to usr/lib
        case $line in
            path-exclude=*) excludes+=(-path "$pattern" -o) ;;
            path-include=*) includes+=(! -path "$pattern") ;;
        esac
    done <<<"$rules"
    find "$root/usr" \( "${excludes[@]}" -false \) "${includes[@]}" \( -type f -o -type l \) -delete
    # udev's compiled database goes with its sources: with neither, udev looks nothing up, and
    # systemd-hwdb-update has nothing to compile at first boot.
    rm -f "$root/usr/lib/udev/hwdb.bin"
    [[ $arch == arm64 ]] && trim_arm64 "$root"
    strip_venv "$arch" "$root"
}

# The venv's compiled extensions without their symbol tables and debug information: zstandard's
# aarch64 wheel ships 10.6 MB with debug_info (0.8 MB stripped), cryptography's 13.7 MB (10.4); on
# amd64 about 10 MB of the venv's .so files go the same way. Only what the dynamic linker needs stays
# (--strip-unneeded); the host's strip (binutils) for amd64, its aarch64 one for the Pi.
strip_venv() {
    local arch=$1 root=$2 strip
    if [[ $arch == arm64 ]]; then
        strip=$(command -v aarch64-linux-gnu-strip || command -v llvm-strip || true)
    else
        strip=$(command -v strip || command -v llvm-strip || true)
    fi
    if [[ -n $strip ]]; then
        find "$root/opt/letterbox" -name '*.so' -type f -exec "$strip" --strip-unneeded {} +
    else
        echo "WARNING: no strip for $arch (binutils): the venv is not stripped" >&2
    fi
}

# The Raspberry Pi image's own rules (trim above writes and applies them with the common ones).
arm64_trim_rules() {
    printf '%s\n' \
        'path-exclude=/usr/lib/modules/*/kernel/drivers/net/ethernet/*' \
        'path-include=/usr/lib/modules/*/kernel/drivers/net/ethernet/broadcom/*' \
        'path-include=/usr/lib/modules/*/kernel/drivers/net/ethernet/cadence/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/ocfs2/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/gfs2/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/nilfs2/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/jfs/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/reiserfs/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/orangefs/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/ceph/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/coda/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/dlm/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/ubifs/*' \
        'path-exclude=/usr/lib/modules/*/kernel/fs/jffs2/*' 'path-exclude=/usr/lib/modules/*/kernel/fs/afs/*' \
        'path-exclude=/usr/lib/modules/*/kernel/drivers/scsi/*/*' 'path-exclude=/usr/lib/modules/*/kernel/drivers/target/*' \
        'path-exclude=/usr/lib/modules/*/kernel/sound/firewire/*' \
        'path-exclude=/usr/lib/modules/*/kernel/drivers/gpu/drm/*/*' \
        'path-include=/usr/lib/modules/*/kernel/drivers/gpu/drm/vc4/*' \
        'path-include=/usr/lib/modules/*/kernel/drivers/gpu/drm/display/*' \
        'path-include=/usr/lib/modules/*/kernel/drivers/gpu/drm/clients/*' \
        'path-exclude=/usr/lib/modules/*/kernel/sound/soc/*/*' 'path-include=/usr/lib/modules/*/kernel/sound/soc/bcm/*' \
        'path-include=/usr/lib/modules/*/kernel/sound/soc/codecs/snd-soc-hdmi-codec.ko*' \
        'path-exclude=/usr/lib/modules/*/kernel/drivers/clk/*/*' 'path-exclude=/usr/lib/modules/*/kernel/drivers/usb/gadget/*' \
        'path-exclude=/usr/share/zoneinfo/right/*' 'path-exclude=/usr/share/zsh/*' \
        'path-exclude=/usr/lib/python3.*/pydoc_data/*' 'path-exclude=/usr/lib/python3.*/lib2to3/*' \
        'path-exclude=/usr/share/perl/5.*/pod/*'
    # (The Pi's own Ethernet is broadcom's genet (Pi 4) or the RP1's Cadence GEM, macb (Pi 5); Pi 3's and
    # USB adapters are in drivers/net/usb.
    # drivers/scsi keeps its top level, the SCSI disk layer of USB disks; its subdirectories are PCIe
    # RAID and Fibre Channel cards. Trixie's kernel has more boards' drivers than bookworm's, 9 MB of
    # them here: drm's subdirectories are other SoCs' and PC graphics but vc4 (the Pi's HDMI console)
    # and the helpers it loads (display, clients), sound/soc's other SoCs' audio but the Pi's I2S and
    # the HDMI codec vc4 asks for, drivers/clk's subdirectories other SoCs' clocks (the RP1's is at the
    # top, the Pi's built in), USB gadgets the box never is. pydoc_data is help()'s topics, lib2to3 the 2to3 tool.)
}

# What only the Pi image does after the rules are applied: tidy the emptied directories, index the
# kernel modules left, drop pip's byte-code.
trim_arm64() {
    local root=$1
    find "$root/usr/lib/modules" "$root/usr/share/zoneinfo" "$root/usr/lib"/python3.*/{pydoc_data,lib2to3} \
        -mindepth 1 -type d -empty -delete
    local dir
    for dir in "$root"/usr/lib/modules/*; do
        chroot "$root" depmod -a "$(basename "$dir")"
    done
    # pip's byte-code (8 MB): pip runs only for an update (letterbox-update, as root), whose Python
    # compiles what it imports again; and its Windows launchers.
    find "$root/opt/letterbox" -path '*/site-packages/pip/*' -name __pycache__ -prune -exec rm -rf {} +
    find "$root/opt/letterbox" -path '*/site-packages/pip/*' -name '*.exe' -delete
}

# Fail the build if anything that must differ between two boxes is in the image.
check_nothing_unique() {
    local root=$1 bad=()
    [[ -s $root/etc/machine-id ]] && bad+=("/etc/machine-id is not empty")
    compgen -G "$root/etc/ssh/ssh_host_*" >/dev/null && bad+=("SSH host keys in /etc/ssh")
    [[ -n $(ls -A "$root/var/lib/letterbox") ]] && bad+=("/var/lib/letterbox is not empty")
    [[ -e $root/var/lib/systemd/random-seed ]] && bad+=("a random seed")
    if ((${#bad[@]})); then
        printf 'image would not be unique per machine: %s\n' "${bad[@]}" >&2
        return 1
    fi
}

# rspamd's public-suffix list compiled into its Hyperscan cache at build time (amd64), so that a box's
# first rspamd start reads it instead of compiling it. rspamd names the cache file by a hash of the
# patterns and of the CPU Hyperscan sees (hs_populate_platform: AVX2/AVX-512 and the Intel core it tunes
# for): a database compiled on the build host (AVX-512 here) has a name no other CPU looks for, which is
# why rspamd.service's warm-up (ExecStartPre) ran at the first boot, in the guest: 35 s of CPU at native
# speed under qemu-user, several minutes of a VM without KVM (the image test waited 474 s for rspamd at
# load 5). Compiled here under qemu-user for a CPU without AVX2 (Westmere: SSE4.2, POPCNT, AES-NI), the
# file carries the name every such CPU computes: Proxmox's default (x86-64-v2-AES), VirtualBox and most
# hypervisors' default models, and the image test's machines. On a CPU with AVX2 rspamd does not find it
# and compiles its own at the first start (4 s on this build host), as before; the 10 MB stay unused.
# The result is cached beside the base system, by the list, the script and the rspamd and Hyperscan
# packages; the compiling is measured at 35 s of CPU (qemu-user, load 7).
warm_rspamd_tld() {
    local root=$1 cache=$2 key dir
    chroot "$root" dpkg-query -W -f '${Status}' rspamd 2>/dev/null | grep -q 'ok installed' || return 0
    key=$( { cat "$root/etc/rspamd/letterbox-tld.dat" "$root/etc/rspamd/letterbox-warm-tld.lua"
             chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' rspamd 'libhyperscan5' 2>/dev/null; } \
           | sha256sum | cut -c1-16)
    dir=$cache/rspamd-tld-amd64-$key
    if [[ ! -d $dir ]]; then
        rm -rf "$dir.partial" && mkdir -p "$dir.partial" "$root/tmp/letterbox-tld"
        cp /usr/bin/qemu-x86_64-static "$root/tmp/letterbox-tld/qemu"
        chroot "$root" /tmp/letterbox-tld/qemu -cpu Westmere /usr/bin/rspamadm lua -b \
            -s /etc/rspamd/letterbox-warm-tld.lua -a /etc/rspamd/letterbox-tld.dat -a /tmp/letterbox-tld/ \
            </dev/null >/dev/null
        cp "$root"/tmp/letterbox-tld/*.hsmp "$dir.partial/"
        # rspamadm also writes the .unser copies it maps (rspamd makes them at its first load anyway).
        rm -rf "$root/tmp/letterbox-tld" "$root"/var/lib/rspamd/*.hsmp*
        mv "$dir.partial" "$dir"
        find "$cache" -maxdepth 1 -name 'rspamd-tld-amd64-*' ! -name "$(basename "$dir")" -exec rm -rf {} +
    fi
    install -m 0644 "$dir"/*.hsmp "$root/var/lib/rspamd/"
    chroot "$root" sh -c 'chown _rspamd:_rspamd /var/lib/rspamd/*.hsmp' 
}
