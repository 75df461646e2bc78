"""The VM tests boot the built appliance image: minutes each, so `make test` never collects them; only
`make image-test` does (it builds the image and sets LETTERBOX_IMAGE).

Two machines boot from the same image file, side by side: `make image-test` runs pytest-xdist with two
workers and `--dist loadfile`, so each module has its own worker and its own machine, and the two
modules run at the same time (most of a TCG boot or update is one busy vCPU: two machines use the
host's two cores). "bios" (SeaBIOS, session fixture `bios`) goes through the admin's story, the content
filter and the reboot (test_appliance.py); "uefi" (OVMF, `uefi`) takes the updates, then the check of the
system services (test_update.py), the shorter story of the two. Each machine
publishes its identity (machine-id, SSH host keys, certificate, SRS secret) once its own tests are done;
test_appliance.py's last test compares the two (`other_identity`). In one process (no -n) the same tests run one
module after the other, and the comparison boots the other machine itself.

The figures (boot times, image size, the guest's own) are written beside the image by each worker and
printed at the end of the run by the controller.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.vm import BOOT_TIMEOUT, Vm, VmError, built_image

# The VM tests boot the amd64 image (LETTERBOX_IMAGE); test_pi_image.py reads the Raspberry Pi image
# (LETTERBOX_PI_IMAGE, set by `make image-pi`). Neither is collected without its image's variable.
collect_ignore_glob = [*([] if os.environ.get("LETTERBOX_IMAGE") else ["test_[!p]*.py"]),
                       *([] if os.environ.get("LETTERBOX_PI_IMAGE") else ["test_pi_*.py"])]

FIGURES: dict[str, str] = {}

# What the guest says of its own boot (tests/image/boot_profile.py has more): where the seconds went.
GUEST_FIGURES = {
    "systemd-analyze": "systemd-analyze time 2>&1 | head -1",
    # Microseconds since the kernel started: the process started, then it said READY=1 (every port bound).
    "letterbox.service start": "systemctl show letterbox.service -p ExecMainStartTimestampMonotonic "
                               "-p ActiveEnterTimestampMonotonic --value | tr '\\n' ' '",
    "exposure (systemd-analyze security)": "systemd-analyze security letterbox.service --no-pager | tail -1",
}

DATA = "/var/lib/letterbox/data"


def run_dir() -> Path:
    """Beside the image: where the workers leave their machines' identities and figures for each other
    and for the controller (all of them see LETTERBOX_IMAGE)."""
    folder = built_image().parent / "run"
    folder.mkdir(exist_ok=True)
    return folder


def identity(vm: Vm) -> dict[str, str]:
    """What must differ between two boxes made from one image (every secret is made at first boot). The
    SSH host keys are made after the console answers (letterbox-firstboot, at a low priority): waited for."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while vm.run("test -s /etc/ssh/ssh_host_ed25519_key.pub", check=False).exit_code != 0:
        if time.monotonic() > deadline:
            raise VmError(vm.failure_report("no SSH host keys made at first boot"))
        time.sleep(2)
    return {
        "firmware": "UEFI" if vm.run("test -d /sys/firmware/efi", check=False).exit_code == 0 else "BIOS",
        "machine-id": vm.run("cat /etc/machine-id").stdout.strip(),
        "ssh host keys": vm.run("cat /etc/ssh/ssh_host_*_key.pub | sort").stdout,
        "certificate": vm.certificate(443).hex(),
        "srs secret": vm.run(f"sha256sum {DATA}/srs.secret").stdout,
    }


def _booted(tmp_path_factory: pytest.TempPathFactory, name: str, *, uefi: bool) -> Iterator[Vm]:
    """The machine, and its identity published once its tests are done; if it fails before that (qemu
    did not start, no wizard, no identity), the reason is published instead, so the other worker's
    comparison stops waiting for it (`other_identity`)."""
    try:
        yield from _boot_and_publish(tmp_path_factory, name, uefi=uefi)
    except BaseException as exc:
        if not (run_dir() / f"identity-{name}.json").exists():
            (run_dir() / f"identity-{name}.failed").write_text(f"{type(exc).__name__}: {exc}"[:4000])
        raise


def _boot_and_publish(tmp_path_factory: pytest.TempPathFactory, name: str, *, uefi: bool) -> Iterator[Vm]:
    image = built_image()
    FIGURES["image size"] = f"{image.stat().st_size / 1e6:.0f} MB raw"
    with Vm(image, tmp_path_factory.mktemp("vm"), uefi=uefi, name=name) as vm:
        vm.start()
        seconds = vm.wait_for_wizard()
        FIGURES[f"boot to wizard ({name.upper()}, first boot)"] = (
            f"{seconds:.0f} s, qemu CPU {vm.wizard_cpu:.0f} s, host load {os.getloadavg()[0]:.1f}")
        # The console answers first; the tests that follow want the mail ports too.
        FIGURES[f"boot to letterbox.service active ({name.upper()}, first boot)"] = f"{vm.wait_until_ready():.0f} s"
        yield vm
        # After the machine's tests, not before: the SSH host keys are made at the lowest priority once
        # the console answers (minutes after it on a busy first boot), and the figures cost the guest's
        # CPU; the tests should not wait for either. The other worker's comparison waits for this file.
        (run_dir() / f"identity-{name}.json").write_text(json.dumps(identity(vm)))
        for title, command in GUEST_FIGURES.items():
            # Figures, not checks: a guest too busy to answer one in time does not fail the run (a first
            # try that measured `python -X importtime` in the guest took over 300 s at load 22).
            try:
                FIGURES[f"{title} ({name})"] = vm.run(command, check=False, timeout=120).stdout.strip()
            except VmError as exc:
                FIGURES[f"{title} ({name})"] = f"not measured: {str(exc).splitlines()[0]}"
        # Where the boot's time went, kept beside the disk for a look afterwards (the BIOS machine has
        # rebooted since: its journal is of the second boot). The journal's own times, not `systemd-analyze
        # blame`: that asked every unit over D-Bus, 12 s of emulated CPU at the end of each machine's run.
        try:
            report = vm.run("journalctl -b -o short-monotonic --no-pager | head -2000", check=False, timeout=300)
        except VmError:
            return
        (vm.dir / "boot-journal.txt").write_text(report.stdout + report.stderr)
        FIGURES[f"boot journal ({name})"] = str(vm.dir / "boot-journal.txt")


@pytest.fixture(scope="session")
def bios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    yield from _booted(tmp_path_factory, "bios", uefi=False)


@pytest.fixture(scope="session")
def uefi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    yield from _booted(tmp_path_factory, "uefi", uefi=True)


@pytest.fixture
def other_identity(request: pytest.FixtureRequest) -> dict[str, str]:
    """The UEFI machine's identity: published by its own worker (pytest-xdist, `make image-test`), or,
    when the run is one process, of that machine booted here."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        vm: Vm = request.getfixturevalue("uefi")
        return identity(vm)
    published = run_dir() / "identity-uefi.json"
    failed = published.with_suffix(".failed")
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not published.exists():
        if failed.exists():
            raise VmError(f"the UEFI machine failed before it published its identity: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise VmError(f"the UEFI machine published no identity in {BOOT_TIMEOUT:.0f} s ({published})")
        time.sleep(2)
    value: dict[str, str] = json.loads(published.read_text())
    return value


@pytest.fixture(scope="session", autouse=True)
def _figures() -> Iterator[None]:
    yield
    if not os.environ.get("LETTERBOX_IMAGE"):
        return  # test_pi_image.py alone: no machine, no figures
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (run_dir() / f"figures-{name}.json").write_text(json.dumps(FIGURES))


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("LETTERBOX_IMAGE") and not os.environ.get("PYTEST_XDIST_WORKER"):
        for stale in [*run_dir().glob("*.json"), *run_dir().glob("*.failed")]:  # of an earlier run: the controller starts afresh
            stale.unlink()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not os.environ.get("LETTERBOX_IMAGE") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    figures: dict[str, str] = {}
    for path in sorted(run_dir().glob("figures-*.json")):
        figures.update(json.loads(path.read_text()))
    terminalreporter.write_line("== appliance image figures ==")
    for key, value in figures.items():
        terminalreporter.write_line(f"  {key}: {value}")
