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

# The cache key: everything that changes the base tarball.
base_key() {
    local arch=$1
    { echo "v1 $SUITE $MIRROR $SECURITY_MIRROR $(components "$arch")"; package_list "$arch"; dpkg_excludes "$arch"
      sed -n '/^make_base()/,/^}/p' "$IMAGE_DIR/lib/base.sh"; cat "$IMAGE_DIR/lib/compress-modules" "$IMAGE_DIR/lib/initramfs"/* "$IMAGE_DIR"/lib/initramfs-*; } | sha256sum | cut -c1-16
}

# make_base ARCH TARBALL: mmdebstrap into a tarball (no Docker, no loop devices).
make_base() {
    local arch=$1 out=$2 comps opts=() finish=()
    [[ $arch == amd64 ]] || finish=("--customize-hook=$IMAGE_DIR/lib/initramfs-finish")
    comps=$(components "$arch")
    if [[ $arch == amd64 ]]; then
        opts+=("--essential-hook=$IMAGE_DIR/lib/initramfs-setup")
    else
        opts+=("--essential-hook=$IMAGE_DIR/lib/initramfs-defer")
    fi
    while read -r line; do opts+=("--dpkgopt=$line"); done < <(dpkg_excludes "$arch")
    mmdebstrap --quiet --variant=minbase --arch="$arch" --format=tar \
        --aptopt='APT::Install-Recommends "false"' "${opts[@]}" \
        --include="$(package_list "$arch")" \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        "${finish[@]}" \
        --customize-hook="$IMAGE_DIR/lib/compress-modules" \
        "$SUITE" "$out" \
        "deb $MIRROR $SUITE $comps" "deb $MIRROR $SUITE-updates $comps" "deb $SECURITY_MIRROR $SUITE-security $comps"
}
