# Sourced by image/build.sh: the cached Debian base system (mmdebstrap), keyed by what goes into it.
# shellcheck shell=bash

MIRROR="${LETTERBOX_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${LETTERBOX_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm
# The Raspberry Pi image's kernel comes from here (and only the kernel: lib/kernel-arm64/letterbox-kernel.pref):
# bookworm's 6.1 has no Raspberry Pi 5 support (image/README.md, "Which Pi").
KERNEL_SUITE_ARM64=trixie-backports

# Files no appliance needs: documentation, manuals, translations, and (amd64) kernel modules for
# hardware a VM never has. Kept in the image's dpkg config too, so upgrades stay as lean.
dpkg_excludes() {
    local arch=$1
    printf '%s\n' \
        'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
        'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*' \
        'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias' \
        'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/bash-completion/*'
    if [[ $arch == amd64 ]]; then
        # udev's hardware database (22 MB) names vendors and models of USB/PCI devices for desktops.
        # This path matches nothing (bookworm's udev installs under /lib/udev): lib/configure.sh's trim
        # has the one that does. (Left as is: this list is the cached base's key.)
        # (rspamd's web UI stays: its postinst copies JavaScript into it, and fails without it.)
        echo 'path-exclude=/usr/lib/udev/hwdb.d/*'
        local dir
        for dir in sound drivers/gpu drivers/media drivers/net/wireless net/wireless net/mac80211 \
                   drivers/bluetooth net/bluetooth drivers/infiniband drivers/isdn drivers/staging \
                   drivers/iio drivers/input/touchscreen drivers/net/can net/can drivers/mtd \
                   drivers/hwmon drivers/w1 drivers/nfc net/nfc drivers/thunderbolt drivers/fpga; do
            printf 'path-exclude=/lib/modules/*/kernel/%s/*\n' "$dir"
        done
    else
        arm64_excludes
    fi
}

# The Raspberry Pi image's share of dpkg_excludes (about 110 MB of the root file system and 17 MB of the
# firmware partition; the image's limit is 600 MB with rspamd and its Perl and ICU in it).
arm64_excludes() {
    # udev's hardware database, as on amd64. This path matches nothing (bookworm's udev installs under
    # /lib/udev): lib/configure.sh's trim has the one that does. (Left as is: this list is the
    # cached base's key, whose rebuild takes 45 minutes.)
    echo 'path-exclude=/usr/lib/udev/hwdb.d/*'
    # Device trees: the kernel ships them for every arm64 board (trixie's kernels under
    # /usr/lib/modules/VER/dtb, with /usr/lib/linux-image-VER a link to it); raspi-firmware copies
    # /usr/lib/linux-image-VER/broadcom/bcm*.dtb (the Pi 3, 4 and 5 ones) to /boot/firmware, and qemu
    # -M virt makes its own.
    echo 'path-exclude=/usr/lib/modules/*/dtb/*'
    echo 'path-include=/usr/lib/modules/*/dtb/broadcom/*'
    # linux-base's kernel hooks, which bookworm's run-parts cannot run beside /etc/kernel's: copies of
    # them are in /etc/kernel (lib/kernel-arm64/setup).
    echo 'path-exclude=/usr/share/kernel/*'
    # The VideoCore firmware's camera (x), debug (db) and cut-down (cd) variants, 17 MB and as much again
    # on the FAT partition (raspi-firmware copies /usr/lib/raspi-firmware/*): config.txt asks for none
    # of them (no start_x, gpu_mem), so the Pi boots start.elf (Pi 3) or start4.elf (Pi 4).
    printf 'path-exclude=/usr/lib/raspi-firmware/%s\n' 'start_*' 'start4[cdx]*' 'fixup_*' 'fixup4[cdx]*'
    # glibc's iconv converters (20 MB): only glib's g_convert would load them here (rspamd converts
    # charsets with ICU, Python with its own codecs); the Unicode and Western ones stay.
    echo 'path-exclude=/usr/lib/*-linux-gnu/gconv/*.so'
    printf 'path-include=/usr/lib/*-linux-gnu/gconv/%s\n' 'UTF-*.so' 'UNICODE.so' 'ISO8859-*.so' 'CP125*.so'
    # Perl is there for rspamd's rspamd_stats script: not its C headers (8 MB), its East Asian encodings
    # (9 MB) and the Unicode collation tables (5 MB).
    echo 'path-exclude=/usr/lib/*-linux-gnu/perl/5.*/CORE/*.h'
    printf 'path-exclude=/usr/lib/*-linux-gnu/perl/5.*/auto/Encode/%s/*\n' JP KR CN TW
    echo 'path-exclude=/usr/share/perl/5.*/Unicode/Collate/*'
    # Kernel modules for what a Pi never has or a mail box never uses, as on amd64 but for the
    # graphics and sound cores: vc4 (the HDMI console that shows the address) needs drm, the sound
    # core and CEC (in drivers/media, whose cameras and TV tuners go).
    local dir
    for dir in drivers/media sound/pci sound/usb sound/isa drivers/net/wireless net/wireless net/mac80211 \
               drivers/bluetooth net/bluetooth drivers/infiniband drivers/isdn drivers/staging \
               drivers/iio drivers/input/touchscreen drivers/net/can net/can drivers/mtd \
               drivers/w1 drivers/nfc net/nfc drivers/thunderbolt drivers/fpga \
               drivers/gpu/drm/amd drivers/gpu/drm/nouveau drivers/gpu/drm/radeon drivers/gpu/drm/msm; do
        printf 'path-exclude=/usr/lib/modules/*/kernel/%s/*\n' "$dir"
    done
    printf 'path-include=/usr/lib/modules/*/kernel/drivers/media/%s\n' 'cec/*' 'rc/rc-core.ko*'
    # (/usr/lib/modules: trixie's kernel packages ship their modules there, bookworm's under /lib.)
}

package_list() {
    grep -v '^\s*#' "$IMAGE_DIR/packages-$1.txt" | grep -v '^\s*$' | sort -u | paste -sd, -
}

components() { [[ $1 == arm64 ]] && echo "main non-free-firmware" || echo "main"; }

# The mmdebstrap hooks of each architecture's base. amd64: the initramfs settings before the kernel
# makes its initrd. arm64 installs under qemu-user emulation: lib/emulation-defer puts off what costs
# minutes there (initrds, Python byte-compilation, SSH host keys, dpkg's fsyncs) and lib/emulation-finish
# does it once at the end, natively where it can (lib/compile-python).
essential_hook() { [[ $1 == amd64 ]] && echo "$IMAGE_DIR/lib/initramfs-setup" || echo "$IMAGE_DIR/lib/emulation-defer"; }
finish_hook() { [[ $1 == amd64 ]] || echo "$IMAGE_DIR/lib/emulation-finish"; }
hook_files() {  # every file the hooks of ARCH run, for the cache key
    echo "$IMAGE_DIR/lib/compress-modules"
    if [[ $1 == amd64 ]]; then
        ls "$IMAGE_DIR/lib/initramfs-setup" "$IMAGE_DIR/lib/initramfs"/*
    else
        ls "$IMAGE_DIR/lib/emulation-defer" "$IMAGE_DIR/lib/emulation-finish" "$IMAGE_DIR/lib/compile-python" \
           "$IMAGE_DIR/lib/initramfs/letterbox.conf" "$IMAGE_DIR/lib/initramfs-arm64"/* "$IMAGE_DIR/lib/kernel-arm64"/*
    fi
}

# The cache key: everything that changes the base tarball.
base_key() {
    local arch=$1
    { echo "v1 $SUITE $MIRROR $SECURITY_MIRROR $(components "$arch") $([[ $arch == arm64 ]] && echo "$KERNEL_SUITE_ARM64")"; package_list "$arch"; dpkg_excludes "$arch"
      sed -n '/^make_base()/,/^}/p' "$IMAGE_DIR/lib/base.sh"; hook_files "$arch" | xargs cat; } | sha256sum | cut -c1-16
}

# make_base ARCH TARBALL: mmdebstrap into a tarball (no Docker, no loop devices).
make_base() {
    local arch=$1 out=$2 comps opts=() finish=() kernel_source=()
    [[ $arch == amd64 ]] || finish=("--customize-hook=$(finish_hook "$arch")")
    if [[ $arch == arm64 ]]; then  # the kernel from trixie-backports, pinned before anything is installed
        opts+=("--setup-hook=$IMAGE_DIR/lib/kernel-arm64/setup")
        kernel_source=("deb $MIRROR $KERNEL_SUITE_ARM64 main")
    fi
    comps=$(components "$arch")
    opts+=("--essential-hook=$(essential_hook "$arch")")
    while read -r line; do opts+=("--dpkgopt=$line"); done < <(dpkg_excludes "$arch")
    # LETTERBOX_IMAGE_VERBOSE=1: every apt and dpkg line (which maintainer script failed, and when).
    mmdebstrap "$([[ -n ${LETTERBOX_IMAGE_VERBOSE:-} ]] && echo --verbose || echo --quiet)" --variant=minbase --arch="$arch" --format=tar \
        --aptopt='APT::Install-Recommends "false"' "${opts[@]}" \
        --include="$(package_list "$arch")" \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        "${finish[@]}" \
        --customize-hook="$IMAGE_DIR/lib/compress-modules" \
        "$SUITE" "$out" \
        "deb $MIRROR $SUITE $comps" "deb $MIRROR $SUITE-updates $comps" "deb $SECURITY_MIRROR $SUITE-security $comps" \
        "${kernel_source[@]}"
}
