#!/bin/sh
# Install Letterbox on an existing Debian 12 (bookworm) or Raspberry Pi OS (bookworm) machine: the same
# user, venv, data directory and systemd units as the appliance image. Run as root from a checkout:
#
#   sudo ./install.sh                          # builds a bundle from this checkout (needs PyPI), installs it
#   sudo ./install.sh --bundle letterbox-bundle-0.2.0-aarch64.tar     # offline, from a bundle (make bundle)
#   ./install.sh --root /mnt/rootfs --bundle B # into another root file system (an image being built), via chroot
#
# What it makes (and leaves alone when it is already there, so running it again is harmless):
#   user and group `letterbox` (system account, no login, home /var/lib/letterbox)
#   /opt/letterbox/venv-<version>/ and the symlink /opt/letterbox/venv (see appliance/update.py)
#   /var/lib/letterbox/data/ (0700, the box's data; never touched when it exists)
#   /etc/systemd/system/letterbox.service, letterbox-update.path|service, /usr/local/sbin/letterbox-update
#   (copied from image/overlay/, the files the image has), enabled; started unless --root or --no-start.
#   /usr/local/bin/letterbox, a link to the venv's command, as in the image.
# Installing a newer version over an older one with this script works, but letterbox-update (backup,
# health check, rollback) is the way to update a box that holds mail.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
overlay="$here/image/overlay"
root=""
bundle=""
start=yes
python=/usr/bin/python3

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle="$2"; shift 2 ;;
        --root) root="$(cd "$2" && pwd)"; start=no; shift 2 ;;
        --no-start) start=no; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run it as root (sudo $0)"
[ -d "$overlay" ] || die "run it from a Letterbox checkout (no $overlay)"
[ "$root" = "/" ] && root=""

# Runs a command inside the target root (chroot) or here.
in_root() { if [ -n "$root" ]; then chroot "$root" "$@"; else "$@"; fi; }

if [ -z "$root" ] && [ -r /etc/os-release ]; then
    . /etc/os-release
    [ "${VERSION_CODENAME:-}" = bookworm ] || say "warning: made for Debian/Raspberry Pi OS bookworm; this is ${PRETTY_NAME:-unknown}"
fi

# --- Python with venv ---------------------------------------------------------------------------------
if ! in_root "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    [ -z "$root" ] || die "$root has no $python with venv (install python3-venv in it first)"
    say "installing python3 and python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv >/dev/null
fi

work="$(mktemp -d "${root:-}/tmp/letterbox-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM

# --- the bundle: given, or built from this checkout -----------------------------------------------------
if [ -z "$bundle" ]; then
    say "building a bundle from $here (pip fetches the dependencies)"
    "$python" -m venv "$work/build"
    PYTHONPATH="$here" "$work/build/bin/python" -m appliance.bundle build --source "$here" --out "$work" >/dev/null
    bundle="$(ls "$work"/letterbox-bundle-*.tar)"
fi
[ -f "$bundle" ] || die "no bundle $bundle"
mkdir -p "$work/wheels"
version="$(PYTHONPATH="$here" "$python" -c '
import sys
from pathlib import Path
from appliance.bundle import BundleError, inspect
try:
    print(inspect(Path(sys.argv[1]), into=Path(sys.argv[2])).version)
except BundleError as exc:
    sys.exit(f"install.sh: {exc}")
' "$bundle" "$work/wheels")"
wheels_in_root="${work#"$root"}/wheels"

# --- user and directories -------------------------------------------------------------------------------
if ! grep -q '^letterbox:' "${root:-}/etc/passwd"; then
    say "creating the user letterbox"
    useradd ${root:+--root "$root"} --system --user-group --home-dir /var/lib/letterbox --no-create-home \
        --shell /usr/sbin/nologin --comment "Letterbox mail server" letterbox
fi
install -d -m 0755 "${root:-}/opt/letterbox"
for dir in /var/lib/letterbox /var/lib/letterbox/data; do
    if [ ! -d "${root:-}$dir" ]; then
        install -d -m 0700 "${root:-}$dir"
        in_root chown letterbox:letterbox "$dir"
    fi
done

# --- the venv -----------------------------------------------------------------------------------------------
venv="/opt/letterbox/venv-$version"
if in_root "$venv/bin/letterbox" --version 2>/dev/null | grep -qx "letterbox $version"; then
    say "Letterbox $version is already installed in $venv"
else
    say "installing Letterbox $version into $venv"
    rm -rf "${root:-}$venv"
    (umask 022 && in_root "$python" -m venv "$venv")
    (umask 022 && in_root "$venv/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location \
        --no-index --find-links "$wheels_in_root" --only-binary=:all: "letterbox==$version" \
        $(ls "$work/wheels" | grep -q '^pip-' && echo pip))
fi
ln -sfn "venv-$version" "${root:-}/opt/letterbox/.venv-install"
mv -T "${root:-}/opt/letterbox/.venv-install" "${root:-}/opt/letterbox/venv"

# --- units and the update program ---------------------------------------------------------------------------
install -d "${root:-}/etc/systemd/system" "${root:-}/usr/local/sbin" "${root:-}/usr/local/bin"
# `letterbox` on the PATH, as in the image (run it as the box's user: sudo -u letterbox letterbox ...)
ln -sfn /opt/letterbox/venv/bin/letterbox "${root:-}/usr/local/bin/letterbox"
for unit in letterbox.service letterbox-update.path letterbox-update.service; do
    install -m 0644 "$overlay/etc/systemd/system/$unit" "${root:-}/etc/systemd/system/$unit"
done
install -m 0755 "$overlay/usr/local/sbin/letterbox-update" "${root:-}/usr/local/sbin/letterbox-update"
if [ -n "$root" ]; then
    systemctl --root="$root" enable letterbox.service letterbox-update.path >/dev/null 2>&1
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable letterbox.service letterbox-update.path >/dev/null 2>&1
    if [ "$start" = yes ]; then
        for port in 25 80 443 587 465 143 993 110 995; do
            if ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && ! systemctl -q is-active letterbox; then
                say "warning: port $port is already in use (another mail or web server?): Letterbox will not start until it is free"
            fi
        done
        systemctl restart letterbox.service letterbox-update.path || die "letterbox did not start: journalctl -u letterbox"
    fi
else
    say "no systemd running here: the units are installed and enabled for the next boot"
fi

say "Letterbox $version installed"
if [ -z "$root" ]; then
    address="$(hostname -I 2>/dev/null | cut -d' ' -f1)"
    say "open https://${address:-this-machine}/ (or https://$(hostname).local/ where mDNS works) and follow the wizard"
    say "the wizard's setup code: sudo journalctl -u letterbox | grep 'setup code'  (or sudo cat /var/lib/letterbox/data/setup-code)"
fi
