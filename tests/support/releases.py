"""Letterbox releases for update tests: wheels of this checkout under any version, with extra migrations
or a deliberately broken start, and the dependency wheels a bundle carries.

The Letterbox wheel is written here directly (a zip in the wheel format: the packages, the migrations
as data files, METADATA with the dependencies of pyproject.toml, the `letterbox` entry point, RECORD)
rather than by setuptools in an isolated build, which takes 20+ s per version on this machine; pip
installs it exactly as it installs the one `make bundle` builds. The dependency wheels come from
`pip wheel` once, kept under the test venv keyed by the requirement list.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# A release whose start fails: it migrates the database (Database.open) and answers with the console,
# then fails as the mail services start; the box closes what it opened and `letterbox serve` exits 1, as
# a release with a bug in its start would. For build_wheel's `patches` (file -> (old, new)).
BROKEN_START = {"appliance/app.py": ("        await self.services.store.recover()\n",
                                     "        await self.services.store.recover()\n"
                                     "        raise RuntimeError('this release cannot start (update test)')\n")}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [str(r) for r in project["dependencies"]]


def build_wheel(out_dir: Path, version: str, *, migrations: dict[str, str] | None = None,
                patches: dict[str, tuple[str, str]] | None = None) -> Path:
    """letterbox-<version>-py3-none-any.whl from this checkout. `migrations`: extra migration files
    (name -> SQL); `patches`: file -> (old text, new text) replaced once in that source file."""
    patches = dict(patches or {})
    patches.setdefault("appliance/__init__.py", ('__version__ = "', f'__version__ = "{version}"  # was "'))
    files: dict[str, bytes] = {}
    for package in ("appliance", "web"):
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                rel = path.relative_to(ROOT).as_posix()
                data = path.read_bytes()
                if rel in patches:
                    old, new = patches.pop(rel)
                    assert old.encode() in data, f"{old!r} not in {rel}"
                    data = data.replace(old.encode(), new.encode(), 1)
                files[rel] = data
    assert not patches, f"patched files not found: {sorted(patches)}"
    data_dir = f"letterbox-{version}.data/data/share/letterbox/migrations"
    for path in sorted((ROOT / "migrations").glob("*.sql")):
        files[f"{data_dir}/{path.name}"] = path.read_bytes()
    for name, sql in (migrations or {}).items():
        files[f"{data_dir}/{name}"] = sql.encode()
    info = f"letterbox-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", "Name: letterbox", f"Version: {version}", "Requires-Python: >=3.11"]
    metadata += [f"Requires-Dist: {r}" for r in requirements()]
    files[f"{info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\nletterbox = appliance.cli:main\n"
    return _write_wheel(out_dir, info, files)


def extra_wheel(out_dir: Path, name: str, version: str) -> Path:
    """A wheel of one empty module: a dependency set that differs from an installed one (update tests)."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": b"", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()}
    return _write_wheel(out_dir, info, files)


def _write_wheel(out_dir: Path, info: str, files: dict[str, bytes]) -> Path:
    """NAME-VERSION-py3-none-any.whl of `files`, with the dist-info folder `info`'s WHEEL and RECORD added."""
    files = {**files, f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: letterbox-tests\nRoot-Is-Purelib: true\n"
                                      b"Tag: py3-none-any\n"}
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{info.removesuffix('.dist-info')}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def dependency_wheels() -> Path:
    """Every dependency of Letterbox (and pip, as make bundle adds it) as wheels, made once per requirement list (kept in the test venv)."""
    key = hashlib.sha256("\n".join([*requirements(), "pip"]).encode()).hexdigest()[:16]
    folder = Path(sys.prefix) / "letterbox-test-wheels" / key
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                        "--wheel-dir", str(folder), *requirements(), "pip"], check=True, capture_output=True)
        (folder / ".complete").touch()
    return folder
