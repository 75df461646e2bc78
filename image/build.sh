#!/usr/bin/env bash
# Build the Letterbox appliance image: image/build.sh amd64|arm64 OUTDIR [--formats raw,qcow2,vmdk,xz]
#
# 1. the Debian bookworm base (mmdebstrap, no Docker), cached in $LETTERBOX_IMAGE_CACHE keyed by the
#    package list, so only a changed list pays the download and install again;
# 2. Letterbox from a wheel built from this checkout, with its dependencies' wheels, into the venv
#    /opt/letterbox/venv (no network at first boot);
# 3. image/overlay/ copied onto /, the services enabled, everything per-machine removed (first boot makes
#    the machine-id, SSH host keys, the certificate and the secrets);
# 4. the disk, without loop devices or mounts: ext4 made from the tree (mkfs.ext4 -d), FAT with mtools,
#    GRUB's images written in place (amd64: GPT with BIOS boot + EFI system partitions, boots with
#    BIOS and UEFI; arm64: MBR with the Raspberry Pi firmware's FAT boot partition).
# Prints the build time and sizes; writes OUTDIR/letterbox-ARCH.img (+ the other formats asked for).
set -euo pipefail
ARCH=${1:?usage: build.sh amd64|arm64 OUTDIR [--formats raw,qcow2,...]}
OUT=${2:?usage: build.sh amd64|arm64 OUTDIR}
FORMATS=raw
[[ ${3:-} == --formats ]] && FORMATS=${4:?}
IMAGE_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$IMAGE_DIR")
CACHE=${LETTERBOX_IMAGE_CACHE:-/var/cache/letterbox-image}
PYTHON=${PYTHON:-python3}  # a Python with pip, to build the wheels (the Makefile passes .venv/bin/python)
PREFIX=/opt/letterbox  # venv-<version>/, and venv -> the one in force (as letterbox-update keeps it)
DATA=/var/lib/letterbox/data
# shellcheck source=lib/base.sh
source "$IMAGE_DIR/lib/base.sh"
# shellcheck source=lib/disk.sh
source "$IMAGE_DIR/lib/disk.sh"

started=$SECONDS
step() { printf '[image %4ds] %s\n' $((SECONDS - started)) "$*"; }
mkdir -p "$CACHE" "$OUT"
WORK=$(mktemp -d /var/tmp/letterbox-image.XXXXXX)
ROOT=$WORK/root
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# --- 0. nothing changed since the last build into OUT: that image serves again ------------------------
# The inputs are the checkout's files (tracked, and new ones git does not ignore) but for the tests,
# benchmarks and docs, which go into neither the wheel nor the image; the base system's key and the
# formats. A test run after an unchanged checkout (make image-test twice) skips minutes of a build. The VM tests never change
# the image (they boot copy-on-write overlays of it).
name=letterbox-$ARCH
inputs=$( { echo "$FORMATS $(base_key "$ARCH")"
            git -C "$REPO" ls-files -z --cached --others --exclude-standard -- . ':!tests' ':!bench' ':!docs' ':!.ci' \
                | (cd "$REPO" && xargs -0 sha256sum 2>/dev/null || true); } | sha256sum | cut -c1-32)
if [[ -s $OUT/$name.img && $(cat "$OUT/$name.inputs" 2>/dev/null) == "$inputs" ]]; then
    echo "image of these inputs already built: $OUT/$name.img (inputs $inputs)"
    exit 0
fi
rm -f "$OUT/$name.inputs"

# --- 1. the base system ------------------------------------------------------------------------------
key=$(base_key "$ARCH")
BASE=$CACHE/base-$ARCH-$key.tar
(
    # One build at a time makes a missing base; the others wait and then use it.
    flock 9
    if [[ ! -s $BASE ]]; then
        step "base system $ARCH ($key) not cached: mmdebstrap $SUITE"
        make_base "$ARCH" "$BASE.partial"
        mv "$BASE.partial" "$BASE"
        find "$CACHE" -maxdepth 1 -name "base-$ARCH-*.tar" ! -name "$(basename "$BASE")" -delete
    fi
) 9>"$CACHE/base-$ARCH.lock"
step "base system $ARCH: $BASE"
mkdir "$ROOT"
tar --numeric-owner --xattrs --xattrs-include='*' -C "$ROOT" -xpf "$BASE"

# --- 2. Letterbox and its dependencies -------------------------------------------------------------
# Letterbox's own wheel is built each time; its dependencies' wheels are cached by pyproject.toml.
WHEELS=$WORK/wheels
# pip's wheel is among them, as in a bundle (make bundle): the image's venv is what a bundle of this
# checkout installs, so the first update finds the same dependencies and pip, and installs only Letterbox
# (appliance/update.py, Updater._install_beside).
DEPS=$CACHE/wheels-$ARCH-$( (cat "$REPO/pyproject.toml"; echo pip) | sha256sum | cut -c1-16)
pip_quiet() {  # pip, without the notes this machine's pip.conf makes about absent local indexes
    "$PYTHON" -m pip "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v 'is ignored: it is neither' || true; }
}
# From a copy of the checkout's files (tracked, and new ones git does not ignore): setuptools' build/
# directory in the checkout itself breaks after an interrupted build, and stays out of the clone.
SRC=$WORK/src
mkdir -p "$SRC"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | tar -C "$REPO" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$SRC" -xf -
step "wheel of $REPO"
pip_quiet wheel --no-deps --wheel-dir "$WHEELS" "$SRC"
if [[ ! -d $DEPS ]]; then
    step "dependency wheels ($ARCH) not cached: $DEPS"
    rm -rf "$DEPS.partial"
    pip_quiet wheel --wheel-dir "$DEPS.partial" "$SRC" pip
    rm -f "$DEPS.partial"/letterbox-*.whl
    if [[ $ARCH != amd64 ]]; then
        # Pure-Python wheels serve every architecture; the compiled ones are fetched again for aarch64.
        for whl in "$DEPS.partial"/*.whl; do
            [[ $whl == *-none-any.whl ]] && continue
            # (not $name: that is the image's name, and the image came out as zstandard==0.25.0.img)
            requirement=$(basename "$whl" | cut -d- -f1-2 | sed 's/-/==/')
            rm "$whl"
            pip_quiet download --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
                --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
                --platform manylinux2014_aarch64 --dest "$DEPS.partial" "$requirement"
        done
    fi
    mv "$DEPS.partial" "$DEPS"
    find "$CACHE" -maxdepth 1 -name "wheels-$ARCH-*" ! -name "$(basename "$DEPS")" -exec rm -rf {} +
fi
cp "$DEPS"/*.whl "$WHEELS/"
version=$(basename "$(ls "$WHEELS"/letterbox-*.whl)" | cut -d- -f2)
VENV=$PREFIX/venv-$version
step "Letterbox $version into $VENV"
mkdir -p "$ROOT/tmp/wheels"
cp "$WHEELS"/*.whl "$ROOT/tmp/wheels/"
# A clean environment: the host's PIP_* settings mean nothing inside.
chroot_clean() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$ROOT" "$@"; }
chroot_clean python3 -m venv "$VENV"
pip_wheel=$(cd "$WHEELS" && ls pip-*.whl)
chroot_clean "$VENV/bin/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/wheels letterbox "/tmp/wheels/$pip_wheel"
rm -rf "$ROOT/tmp/wheels"
# What the box never runs (about 25 MB of a 600 MB budget): setuptools (venv's default; nothing imports
# it, letterbox-update installs with pip, which stays), the dependencies' own test suites, and
# zstandard's second (CFFI) build of libzstd, used only when PYTHON_ZSTANDARD_IMPORT_POLICY asks for it.
chroot_clean "$VENV/bin/pip" uninstall --quiet --yes --disable-pip-version-check setuptools
find "$ROOT$VENV/lib" -depth -type d -path '*/site-packages/*/tests' -not -path '*/site-packages/appliance/*' \
    -exec rm -rf {} +
rm -f "$ROOT$VENV"/lib/python3*/site-packages/zstandard/_cffi.*.so
ln -sfn "venv-$version" "$ROOT$PREFIX/venv"
ln -sf "$PREFIX/venv/bin/letterbox" "$ROOT/usr/local/bin/letterbox"

# --- 3. the system ---------------------------------------------------------------------------------
step "system configuration"
cp -a --no-preserve=ownership "$IMAGE_DIR/overlay/." "$ROOT/"
# shellcheck source=lib/configure.sh
source "$IMAGE_DIR/lib/configure.sh"
configure_system "$ARCH" "$ROOT"
if [[ $ARCH == amd64 ]]; then
    step "rspamd's public-suffix list for CPUs without AVX2"
    warm_rspamd_tld "$ROOT" "$CACHE"
fi
check_nothing_unique "$ROOT"

# --- 4. the disk -----------------------------------------------------------------------------------
step "disk image ($ARCH)"
if [[ $ARCH == amd64 ]]; then
    make_disk_amd64 "$ROOT" "$WORK" "$OUT/$name.img"
else
    make_disk_arm64 "$ROOT" "$WORK" "$OUT/$name.img"
fi
IFS=, read -ra formats <<<"$FORMATS"
for format in "${formats[@]}"; do
    case $format in
        raw) ;;
        qcow2) qemu-img convert -O qcow2 "$OUT/$name.img" "$OUT/$name.qcow2" ;;
        vmdk) qemu-img convert -O vmdk "$OUT/$name.img" "$OUT/$name.vmdk" ;;  # monolithicSparse: VMware Workstation, VirtualBox
        xz) xz -T0 -6 -k -f "$OUT/$name.img" ;;
        *) echo "unknown format $format" >&2; exit 2 ;;
    esac
done
step "done: Letterbox $version, $ARCH"
for f in "$OUT/$name".*; do
    printf '  %-40s %5d MB\n' "$(basename "$f")" $(( $(stat -c %s "$f") / 1000000 ))
done
echo "build time: $((SECONDS - started)) s"
echo "$inputs" >"$OUT/$name.inputs"
