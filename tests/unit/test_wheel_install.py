"""appliance/wheel_install.py: letterbox-update's pip-free install of one pure-Python wheel."""

from __future__ import annotations

import csv
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

from appliance import wheel_install


def _wheel(folder: Path, version: str, modules: dict[str, str], extra: dict[str, str] | None = None) -> Path:
    path = folder / f"demo_pkg-{version}-py3-none-any.whl"
    info = f"demo_pkg-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**modules, **(extra or {})}.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/entry_points.txt", "[console_scripts]\ndemo = demo.cli:main\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def env(tmp_path: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    return tmp_path / "venv"


def test_installs_over_the_older_version(env: Path, tmp_path: Path) -> None:
    site = wheel_install.site_packages(env)
    old = {"demo/__init__.py": "", "demo/cli.py": "def main() -> int:\n    print('old')\n    return 0\n",
           "demo/gone.py": "X = 1\n"}
    wheel_install.install(_wheel(tmp_path, "1.0", old), env)
    assert (site / "demo" / "gone.py").exists()
    new = {"demo/__init__.py": "", "demo/cli.py": "def main() -> int:\n    print('new')\n    return 0\n"}
    data = {"demo_pkg-2.0.data/data/share/demo/0001.sql": "CREATE TABLE t (x);\n"}
    assert wheel_install.install(_wheel(tmp_path, "2.0", new, data), env) == "2.0"
    # The old version's files and dist-info are gone, byte-code included; the new one's are there.
    assert not (site / "demo" / "gone.py").exists()
    assert not list((site / "demo" / "__pycache__").glob("gone.*"))
    assert [p.name for p in site.glob("demo_pkg-*.dist-info")] == ["demo_pkg-2.0.dist-info"]
    assert (env / "share" / "demo" / "0001.sql").read_text() == "CREATE TABLE t (x);\n"
    assert list((site / "demo" / "__pycache__").glob("cli.*.pyc"))
    # The console script runs the new code with the venv's Python.
    script = env / "bin" / "demo"
    assert script.read_text().startswith(f"#!{env}/bin/python\n")
    assert subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout == "new\n"
    # RECORD lists what was written, so that pip can uninstall it later.
    info = site / "demo_pkg-2.0.dist-info"
    recorded = {row[0] for row in csv.reader((info / "RECORD").read_text().splitlines())}
    assert {"demo/cli.py", "../../../share/demo/0001.sql", "../../../bin/demo", "demo_pkg-2.0.dist-info/RECORD"} <= recorded
    assert (info / "INSTALLER").read_text() == "letterbox-update\n"


@pytest.mark.parametrize("member", ["../evil.py", "/etc/evil.py", "demo_pkg-1.0.data/headers/x.h"])
def test_refuses_what_it_does_not_handle(env: Path, tmp_path: Path, member: str) -> None:
    with pytest.raises(wheel_install.WheelError):
        wheel_install.install(_wheel(tmp_path, "1.0", {"demo/__init__.py": "", member: "x"}), env)
    assert not (tmp_path / "evil.py").exists()


def test_a_copy_of_hard_links_leaves_the_original_untouched(env: Path, tmp_path: Path) -> None:
    """letterbox-update installs over a `cp -al` copy of the venv in force: the original keeps every
    byte (a rollback runs it), however the new version's files are written."""
    old = {"demo/__init__.py": "", "demo/cli.py": "def main() -> int:\n    print('old')\n    return 0\n"}
    wheel_install.install(_wheel(tmp_path, "1.0", old), env)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-al", str(env), str(copy)], check=True)
    new = {"demo/__init__.py": "", "demo/cli.py": "def main() -> int:\n    print('new')\n    return 0\n"}
    wheel_install.install(_wheel(tmp_path, "2.0", new), copy)
    assert subprocess.run([str(env / "bin" / "demo")], capture_output=True, text=True, check=True).stdout == "old\n"
    assert (wheel_install.site_packages(env) / "demo_pkg-1.0.dist-info").is_dir()
    assert "new" in (wheel_install.site_packages(copy) / "demo" / "cli.py").read_text()


def test_a_file_in_the_way_is_left_to_pip(env: Path, tmp_path: Path) -> None:
    """A file the installed version's RECORD does not name stands where the new version writes: the
    quick install refuses (pip then installs on a plain copy) instead of writing into it."""
    stray = wheel_install.site_packages(env) / "demo" / "cli.py"
    stray.parent.mkdir(parents=True)
    stray.write_text("# someone else's\n")
    with pytest.raises(wheel_install.WheelError):
        wheel_install.install(_wheel(tmp_path, "1.0", {"demo/__init__.py": "", "demo/cli.py": "X = 1\n"}), env)
    assert stray.read_text() == "# someone else's\n"
