# Sourced by image/build.sh: the cached Debian base system (mmdebstrap), keyed by what goes into it.
# shellcheck shell=bash

MIRROR="${LETTERBOX_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${LETTERBOX_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm

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
        # (rspamd's web UI stays: its postinst copies JavaScript into it, and fails without it.)
        echo 'path-exclude=/usr/lib/udev/hwdb.d/*'
        local dir
        for dir in sound drivers/gpu drivers/media drivers/net/wireless net/wireless net/mac80211 \
                   drivers/bluetooth net/bluetooth drivers/infiniband drivers/isdn drivers/staging \
                   drivers/iio drivers/input/touchscreen drivers/net/can net/can drivers/mtd \
                   drivers/hwmon drivers/w1 drivers/nfc net/nfc drivers/thunderbolt drivers/fpga; do
            printf 'path-exclude=/lib/modules/*/kernel/%s/*\n' "$dir"
        done
    fi
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
           "$IMAGE_DIR/lib/initramfs/letterbox.conf" "$IMAGE_DIR/lib/initramfs-arm64"/*
    fi
}

# The cache key: everything that changes the base tarball.
base_key() {
    local arch=$1
    { echo "v1 $SUITE $MIRROR $SECURITY_MIRROR $(components "$arch")"; package_list "$arch"; dpkg_excludes "$arch"
      sed -n '/^make_base()/,/^}/p' "$IMAGE_DIR/lib/base.sh"; hook_files "$arch" | xargs cat; } | sha256sum | cut -c1-16
}

# make_base ARCH TARBALL: mmdebstrap into a tarball (no Docker, no loop devices).
make_base() {
    local arch=$1 out=$2 comps opts=() finish=()
    [[ $arch == amd64 ]] || finish=("--customize-hook=$(finish_hook "$arch")")
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
        "deb $MIRROR $SUITE $comps" "deb $MIRROR $SUITE-updates $comps" "deb $SECURITY_MIRROR $SUITE-security $comps"
}
