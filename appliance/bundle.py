"""Update bundles: one file that carries a Letterbox release and every wheel it needs, for a box offline.

A bundle is an uncompressed tar (wheels are zip files already) named
`letterbox-bundle-<version>-<machine>.tar`, e.g. `letterbox-bundle-0.2.0-x86_64.tar`, holding:

- `bundle.json`: {"format": 1, "version": "0.2.0", "python": "3.11", "machine": "x86_64",
  "wheels": {"letterbox-0.2.0-py3-none-any.whl": "<sha256>", ...}}
- `wheels/<name>.whl`: the Letterbox wheel, one wheel for each dependency and one of pip (binary wheels
  only, so installing runs none of the bundle's code as root: pip only unpacks wheels).

`make bundle` (python -m appliance.bundle build --out dist) builds it from this checkout with
`pip wheel`; the image build installs the same wheels, and `letterbox-update BUNDLE` (appliance/update.py)
or the console's Updates page takes it. A bare `letterbox-<version>-*.whl` is accepted too, but then pip
fetches any dependency the box lacks from the network.

Reading a bundle is bounded (size, member count, names) and every wheel must match its listed SHA-256:
a bundle comes from an upload, so nothing in it is trusted before it has been checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

FORMAT = 1
MANIFEST = "bundle.json"
WHEELS = "wheels"
MAX_BYTES = 256 * 1024 * 1024  # a release with its wheels is ~15 MB; an upload beyond this is refused
MAX_MEMBERS = 400
MAX_MANIFEST = 64 * 1024
# Wheel file names (PEP 427): name-version(-build)?-python-abi-platform.whl, no path parts.
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.]+-[A-Za-z0-9_.!+]+(-[A-Za-z0-9_.]+){3,4}\.whl$")
_LETTERBOX_WHEEL = re.compile(r"^letterbox-([0-9][A-Za-z0-9_.!+]*)-")


class BundleError(Exception):
    """The file is not a usable bundle; the message is one line for a person."""


@dataclass(frozen=True)
class BundleInfo:
    version: str
    machine: str  # "" for a bare wheel (pure Python, any machine)
    python: str
    wheels: dict[str, str]  # file name -> sha256 ("" for a bare wheel: nothing to check it against)


def bundle_name(version: str, machine: str) -> str:
    return f"letterbox-bundle-{version}-{machine}.tar"


def wheel_version(name: str) -> str:
    """'letterbox-0.2.0-py3-none-any.whl' -> '0.2.0'; BundleError for any other wheel."""
    m = _LETTERBOX_WHEEL.match(name)
    if not m or not _WHEEL_NAME.match(name):
        raise BundleError(f"{name[:100]} is not a Letterbox wheel (letterbox-VERSION-py3-none-any.whl)")
    return m.group(1)


def _sha256(f: IO[bytes], copy_to: IO[bytes] | None = None) -> str:
    """The SHA-256 of what `f` holds, copying it to `copy_to` on the way when given."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return h.hexdigest()


def _read_manifest(tar: tarfile.TarFile) -> BundleInfo:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise BundleError(f"not a Letterbox bundle: no {MANIFEST}") from None
    if not member.isfile() or member.size > MAX_MANIFEST:
        raise BundleError(f"not a Letterbox bundle: {MANIFEST} is not a small file")
    f = tar.extractfile(member)
    assert f is not None
    try:
        data = json.loads(f.read())
        info = BundleInfo(version=str(data["version"]), machine=str(data["machine"]), python=str(data["python"]),
                          wheels={str(k): str(v) for k, v in dict(data["wheels"]).items()})
        fmt = int(data["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"not a Letterbox bundle: {MANIFEST} is malformed ({exc.__class__.__name__})") from None
    if fmt != FORMAT:
        raise BundleError(f"bundle format {fmt} is not known to this Letterbox (knows {FORMAT}): update in two steps")
    for name in info.wheels:
        if not _WHEEL_NAME.match(name):
            raise BundleError(f"the bundle lists a file that is not a wheel: {name[:100]}")
    if wheel_version(next((n for n in info.wheels if n.startswith("letterbox-")), "none")) != info.version:
        raise BundleError("the bundle's Letterbox wheel does not match its version")
    return info


def inspect(path: Path, *, into: Path | None = None) -> BundleInfo:
    """Check a bundle (or a bare Letterbox wheel) and, with `into`, put its wheels into that folder.

    Checks: size bound, member count, only `bundle.json` and `wheels/<wheel>` plain files, every listed
    wheel present exactly once with its SHA-256, nothing unlisted. BundleError otherwise."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_BYTES:
        raise BundleError(f"the file is {size // (1 << 20)} MiB; a bundle is at most {MAX_BYTES >> 20} MiB")
    if path.name.endswith(".whl"):
        info = BundleInfo(version=wheel_version(path.name), machine="", python="", wheels={path.name: ""})
        if into is not None:
            shutil.copyfile(path, into / path.name)
        return info
    try:
        with tarfile.open(path, "r:") as tar:
            members = _members(tar)
            info = _read_manifest(tar)
            seen: set[str] = set()
            for member in members:
                if member.name in (MANIFEST, WHEELS, WHEELS + "/") and (member.isfile() or member.isdir()):
                    continue
                name = member.name.removeprefix(WHEELS + "/")
                if member.name != f"{WHEELS}/{name}" or not member.isfile() or name not in info.wheels or name in seen:
                    raise BundleError(f"unexpected entry in the bundle: {member.name[:100]}")
                seen.add(name)
                _check_wheel(tar, member, name, info.wheels[name], into)
            missing = set(info.wheels) - seen
            if missing:
                raise BundleError(f"the bundle lacks {sorted(missing)[0]}: it is truncated or damaged")
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"not a Letterbox bundle (a tar file): {exc}") from None
    return info


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for member in tar:
        members.append(member)
        if len(members) > MAX_MEMBERS:
            raise BundleError(f"the bundle has more than {MAX_MEMBERS} files")
    return members


def _check_wheel(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, digest: str, into: Path | None) -> None:
    f = tar.extractfile(member)
    assert f is not None
    if into is None:
        got = _sha256(f)
    else:
        with open(into / name, "wb") as out:
            got = _sha256(f, out)
    if got != digest:
        raise BundleError(f"{name} does not match its checksum: the bundle is damaged")


def write_bundle(wheel_dir: Path, out_dir: Path, *, machine: str | None = None) -> Path:
    """Pack every wheel of `wheel_dir` (one of them Letterbox's) into a bundle in `out_dir`."""
    wheels = sorted(p for p in wheel_dir.iterdir() if p.name.endswith(".whl"))
    ours = [p for p in wheels if p.name.startswith("letterbox-")]
    if len(ours) != 1:
        raise BundleError(f"{wheel_dir} must hold exactly one Letterbox wheel (found {len(ours)})")
    version = wheel_version(ours[0].name)
    sums = {}
    for p in wheels:
        with open(p, "rb") as f:
            sums[p.name] = _sha256(f)
    machine = machine or platform.machine()
    manifest = {"format": FORMAT, "version": version, "machine": machine,
                "python": f"{sys.version_info.major}.{sys.version_info.minor}", "wheels": sums}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / bundle_name(version, machine)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        info.mode = 0o644
        with tempfile.TemporaryFile() as tmp:
            tmp.write(data)
            tmp.seek(0)
            tar.addfile(info, tmp)
        for p in wheels:
            tar.add(p, arcname=f"{WHEELS}/{p.name}", recursive=False)
    partial.replace(out)
    return out


def build(source: Path, out_dir: Path, *, pip: list[str] | None = None) -> Path:
    """`pip wheel` this checkout and its dependencies (binary wheels, built where only an sdist exists),
    then pack them. The result is for the machine and Python it was built on."""
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="letterbox-wheels-") as tmp:
        # pip too: letterbox-update installs the next version with the pip of the venv in force.
        subprocess.run([*pip, "wheel", "--quiet", "--wheel-dir", tmp, str(source), "pip"], check=True)  # noqa: S603  our own pip on our own checkout
        return write_bundle(Path(tmp), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bundle", description="Letterbox update bundles")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a bundle from a checkout")
    b.add_argument("--source", default=".", help="the checkout (default: .)")
    b.add_argument("--out", default="dist", help="folder for the bundle (default: dist)")
    c = sub.add_parser("check", help="check a bundle and print its version")
    c.add_argument("bundle")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(Path(args.source), Path(args.out)))
        else:
            info = inspect(Path(args.bundle))
            print(f"Letterbox {info.version} for {info.machine or 'any machine'}: {len(info.wheels)} wheels")
    except BundleError as exc:
        print(f"letterbox bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
