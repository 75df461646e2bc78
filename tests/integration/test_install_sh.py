"""install.sh into a throwaway root file system, through chroot as it installs into an image being built.

The root is a temporary directory with the host's /usr bind-mounted read-only (and /dev), in a private
mount namespace (`unshare -m`) so that nothing of it is seen outside the test, and copies of the host's
/etc/passwd and friends, so the user it makes lands only there. Checked: the `letterbox` system user,
the data directory and its owner and mode, the venv and its symlink (Letterbox runs from it, inside
the root), the units enabled, `systemd-analyze verify` of the installed unit; and that a second run
changes nothing and keeps the data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.bundle import write_bundle
from tests.support.releases import ROOT, build_wheel, dependency_wheels

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ETC_FILES = ("passwd", "group", "shadow", "gshadow", "login.defs", "nsswitch.conf")


def _throwaway_root(path: Path) -> Path:
    for sub in ("usr", "dev", "etc", "tmp", "var/lib", "run", ".usr-local"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "tmp").chmod(0o1777)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/", link).is_symlink():
            os.symlink(os.readlink(Path("/", link)), path / link)
    for name in ETC_FILES:
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), path / "etc" / name)
    return path


def _in_namespace(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in a private mount namespace where ROOT has the host's /usr (read-only, but for its
    own /usr/local, which is ROOT/.usr-local) and /dev."""
    setup = (f"mount --bind /usr {root}/usr && mount -o remount,bind,ro {root}/usr && "
             f"mount --bind {root}/.usr-local {root}/usr/local && mount --rbind /dev {root}/dev && ")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", setup + script],
                          capture_output=True, text=True, timeout=500, check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("install-bundle")
    wheels = folder / "wheels"
    shutil.copytree(dependency_wheels(), wheels, ignore=shutil.ignore_patterns(".complete"))
    build_wheel(wheels, "1.0.0")
    return write_bundle(wheels, folder)


def test_install_sh_into_a_root_twice(tmp_path: Path, bundle: Path) -> None:
    root = _throwaway_root(tmp_path / "root")
    install = f"{ROOT / 'install.sh'} --root {root} --bundle {bundle}"
    first = _in_namespace(root, f"{install}; chroot {root} /opt/letterbox/venv/bin/letterbox --version;"
                                f" systemd-analyze verify --root={root} /etc/systemd/system/letterbox.service")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing Letterbox 1.0.0 into /opt/letterbox/venv-1.0.0" in first.stdout
    assert "letterbox 1.0.0" in first.stdout.splitlines()

    user = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("letterbox:")]
    assert len(user) == 1
    _, _, uid, gid, _, home, shell = user[0]
    assert int(uid) < 1000
    assert home == "/var/lib/letterbox"
    assert shell == "/usr/sbin/nologin"
    assert "letterbox:" in (root / "etc" / "group").read_text()
    assert "letterbox:" not in Path("/etc/passwd").read_text()  # the host's users are untouched
    for data in (root / "var/lib/letterbox", root / "var/lib/letterbox/data"):
        st = data.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (int(uid), int(gid), 0o700)
    assert os.readlink(root / "opt/letterbox/venv") == "venv-1.0.0"
    assert (root / "opt/letterbox/venv-1.0.0/bin/letterbox").read_text().startswith("#!/opt/letterbox/venv-1.0.0/bin/python")
    units = root / "etc/systemd/system"
    overlay = ROOT / "image/overlay"
    for unit in ("letterbox.service", "letterbox-update.path", "letterbox-update.service"):
        assert (units / unit).read_bytes() == (overlay / "etc/systemd/system" / unit).read_bytes()
    assert (units / "multi-user.target.wants/letterbox.service").is_symlink()
    assert (units / "multi-user.target.wants/letterbox-update.path").is_symlink()
    assert os.access(root / ".usr-local/sbin/letterbox-update", os.X_OK)
    # The README's `letterbox ...` commands: on the PATH, as in the image.
    assert os.readlink(root / ".usr-local/bin/letterbox") == "/opt/letterbox/venv/bin/letterbox"

    (root / "var/lib/letterbox/data/letterbox.db").write_text("the box's data")
    second = _in_namespace(root, install)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already installed" in second.stdout
    assert (root / "var/lib/letterbox/data/letterbox.db").read_text() == "the box's data"
    assert sum(line.startswith("letterbox:") for line in (root / "etc/passwd").read_text().splitlines()) == 1
    assert os.readlink(root / "opt/letterbox/venv") == "venv-1.0.0"
