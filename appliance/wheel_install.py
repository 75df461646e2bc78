"""Install one wheel into a venv without pip: letterbox-update's quick path (appliance/update.py).

An update whose dependencies are those of the venv in force copies that venv and installs only
Letterbox's own wheel over the copy. pip did that job in about 1.5 s of CPU on a PC, 60-100 s of a VM
under emulation (most of it importing pip, its resolver and its UI) and minutes on a Pi. The install
itself is PyPA's `installer` (the reference implementation of the binary distribution format: the
schemes, console scripts, byte-code, RECORD and INSTALLER; a few small modules to import). What it
leaves to its caller is done here: the installed version's files are removed first, as `pip
uninstall` does from its RECORD, so every file of the new version is a new file (the copy is made of
hard links to the venv in force, which must keep every byte for a rollback; `installer` refuses to
write over a file that exists).

Anything this does not handle (a path outside the venv, a damaged wheel, a file left in the way) raises
WheelError, and the caller falls back to pip.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path


class WheelError(Exception):
    """This wheel is not one the quick install handles; pip should install it."""


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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


def install(wheel: Path, venv: Path, *, installed_by: str = "letterbox-update") -> str:
    """Install `wheel` into `venv` over the same project's installed version, without its
    dependencies; returns the version installed. The venv's Python must be the one running this."""
    try:  # a venv made before Letterbox depended on it has none: pip then
        from installer import install as install_wheel
        from installer.destinations import SchemeDictionaryDestination
        from installer.exceptions import InstallerError
        from installer.sources import WheelFile
    except ImportError as exc:
        raise WheelError(f"no installer module ({exc})") from None

    site = site_packages(venv)
    if not site.is_dir():
        raise WheelError(f"{venv} has no site-packages for Python {sys.version_info.major}.{sys.version_info.minor}")
    # The running interpreter's install scheme with the venv as its base: what pip uses for a venv.
    scheme = sysconfig.get_paths(scheme="venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix",
                                 vars={"base": str(venv), "platbase": str(venv), "installed_base": str(venv),
                                       "installed_platbase": str(venv)})
    destination = SchemeDictionaryDestination(
        # No "headers": a wheel with C headers is left to pip (KeyError below).
        {key: scheme[key] for key in ("purelib", "platlib", "scripts", "data")},
        interpreter=str(venv / "bin" / "python"), script_kind="posix", bytecode_optimization_levels=(0,))
    try:
        with WheelFile.open(wheel) as source:
            project, _, version = source.dist_info_dir.removesuffix(".dist-info").rpartition("-")
            uninstall(venv, project)
            install_wheel(source, destination, {"INSTALLER": f"{installed_by}\n".encode()})
    except (InstallerError, FileExistsError, ValueError, KeyError) as exc:
        raise WheelError(f"{wheel.name}: {exc}") from None
    return version
