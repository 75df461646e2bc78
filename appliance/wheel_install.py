"""Install one wheel into a venv without pip: letterbox-update's quick path (appliance/update.py).

An update whose dependencies are those of the venv in force copies that venv and installs only
Letterbox's own wheel over the copy. pip did that job in about 1.5 s of CPU on a PC, 60-100 s of a VM
under emulation (most of it importing pip, its resolver and its UI) and minutes on a Pi; what it did
for a pure-Python wheel with `--no-deps --no-index` is a short list (PEP 427 / the binary
distribution format spec): remove the files of the installed version (its RECORD), unpack the wheel
(its `NAME.data/` directories into their schemes), write the console scripts of entry_points.txt,
byte-compile the new modules, and write INSTALLER and RECORD so that pip still knows the result.

Anything this does not handle (a `headers` scheme, a path outside the venv, a wheel for another
Python) raises WheelError, and the caller falls back to pip.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import importlib.util
import io
import os
import py_compile
import re
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {attr}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""


class WheelError(Exception):
    """This wheel is not one the quick install handles; pip should install it."""


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _inside(base: Path, relative: str) -> Path:
    """base/relative, refusing an absolute path or one that climbs out of base (a crafted wheel)."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise WheelError(f"a path outside the venv in the wheel: {relative!r}")
    return base.joinpath(*pure.parts)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def uninstall(venv: Path, project: str) -> None:
    """Remove an installed distribution's files (those its RECORD lists, inside the venv) and its
    dist-info folder, as `pip uninstall` does."""
    site = site_packages(venv)
    for info in site.glob("*.dist-info"):
        if _normalized(info.name.removesuffix(".dist-info").rpartition("-")[0]) != _normalized(project):
            continue
        record = info / "RECORD"
        rows = list(csv.reader(io.StringIO(record.read_text()))) if record.exists() else []
        folders: set[Path] = set()
        for row in rows:
            if not row or not row[0]:
                continue
            path = Path(os.path.normpath(site / row[0]))
            if not path.is_relative_to(venv):
                continue
            path.unlink(missing_ok=True)
            if path.suffix == ".py":  # its byte-code, which RECORD does not always list
                Path(importlib.util.cache_from_source(str(path))).unlink(missing_ok=True)
            folders.add(path.parent)
        shutil.rmtree(info, ignore_errors=True)
        # Folders left empty (deepest first), __pycache__ ones included.
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            for candidate in (folder / "__pycache__", folder):
                if candidate.is_dir() and candidate != site and candidate.is_relative_to(site) and not any(candidate.iterdir()):
                    candidate.rmdir()


def install(wheel: Path, venv: Path, *, installer: str = "letterbox-update") -> str:
    """Install `wheel` (pure Python) into `venv` over the same project's installed version, without its
    dependencies; returns the version installed. The venv's Python must be the one running this."""
    site = site_packages(venv)
    if not site.is_dir():
        raise WheelError(f"{venv} has no site-packages for Python {sys.version_info.major}.{sys.version_info.minor}")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next((n.split("/")[0] for n in names if re.fullmatch(r"[^/]+\.dist-info/WHEEL", n)), None)
        if dist_info is None:
            raise WheelError(f"{wheel.name} has no dist-info/WHEEL")
        project, _, version = dist_info.removesuffix(".dist-info").rpartition("-")
        uninstall(venv, project)
        written = [_unpack(archive, name, venv, f"{project}-{version}.data/") for name in names if not name.endswith("/")]
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode() if f"{dist_info}/entry_points.txt" in names else ""
    written += _console_scripts(entry_points, venv)
    written += _compile(written, site)
    info = site / dist_info
    _write_new(info / "INSTALLER", f"{installer}\n".encode())
    written.append(info / "INSTALLER")
    rows = [[os.path.relpath(p, site), _record_hash(p.read_bytes()), str(p.stat().st_size)] for p in written]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([*rows, [os.path.relpath(info / "RECORD", site), "", ""]])
    _write_new(info / "RECORD", out.getvalue().encode())
    return version


def _unpack(archive: zipfile.ZipFile, name: str, venv: Path, data_dir: str) -> Path:
    """One member of the wheel where it belongs: NAME.data/SCHEME/... into that scheme's folder, the
    rest into site-packages."""
    site = site_packages(venv)
    script = name.startswith(data_dir + "scripts/")
    if name.startswith(data_dir):
        scheme, _, rest = name[len(data_dir):].partition("/")
        base = {"purelib": site, "platlib": site, "data": venv, "scripts": venv / "bin"}.get(scheme)
        if base is None:
            raise WheelError(f"the {scheme!r} scheme is not handled here")
        target = _inside(base, rest)
    else:
        target = _inside(site, name)
    data = archive.read(name)
    if script and data.startswith(b"#!python"):
        data = b"#!" + os.fsencode(venv / "bin" / "python") + data[len(b"#!python"):]
    _write_new(target, data)
    if script:
        target.chmod(0o755)
    return target


def _write_new(target: Path, data: bytes) -> None:
    """A new file at `target`, never a write into the file there: the venv may be a copy made of hard
    links to the venv in force (appliance/update.py), which must keep every byte for a rollback."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.write_bytes(data)


def _console_scripts(entry_points: str, venv: Path) -> list[Path]:
    """bin/NAME for each [console_scripts] entry, as pip writes them."""
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # script names keep their case
    parser.read_string(entry_points)
    written = []
    for script, spec in (parser["console_scripts"].items() if parser.has_section("console_scripts") else []):
        module, _, attr = spec.strip().partition(":")
        target = venv / "bin" / script
        _write_new(target, SCRIPT.format(python=venv / "bin" / "python", module=module,
                                         attr=attr.split(".")[0], call=attr).encode())
        target.chmod(0o755)
        written.append(target)
    return written


def _compile(written: list[Path], site: Path) -> list[Path]:
    """The byte-code of the new modules, as pip makes it: the box imports it and never writes any
    (PYTHONDONTWRITEBYTECODE in letterbox.service)."""
    compiled = []
    for path in written:
        if path.suffix == ".py" and path.is_relative_to(site):
            try:
                cfile = py_compile.compile(str(path), doraise=True)
            except py_compile.PyCompileError as exc:
                raise WheelError(f"{path.name} does not compile: {exc.msg}") from None
            if cfile is not None:
                compiled.append(Path(cfile))
    return compiled
