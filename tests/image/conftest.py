"""The VM tests boot the built appliance image: minutes each, so `make test` never collects them; only
`make image-test` does (it builds the image and sets LETTERBOX_IMAGE).

Both machines of the run boot once, side by side, at the start (session fixture `boxes`): "bios" (SeaBIOS)
goes through the admin's story and the reboot (test_appliance.py); "uefi" (OVMF), booted from the same
image file, shows that every box makes its own identity, then takes the updates (test_update.py). Two
boots overlap instead of three in a row: most of a boot under TCG is waiting on one busy vCPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.image.vm import Vm, VmError, built_image, wait_for_wizards

collect_ignore_glob = [] if os.environ.get("LETTERBOX_IMAGE") else ["test_*.py"]

FIGURES: dict[str, str] = {}

# What the guest says of its own boot (tests/image/boot_profile.py has more): where the seconds went.
GUEST_FIGURES = {
    "systemd-analyze": "systemd-analyze time 2>&1 | head -1",
    # Microseconds since the kernel started: the process started, then it said READY=1 (every port bound).
    "letterbox.service start": "systemctl show letterbox.service -p ExecMainStartTimestampMonotonic "
                               "-p ActiveEnterTimestampMonotonic --value | tr '\\n' ' '",
    "exposure (systemd-analyze security)": "systemd-analyze security letterbox.service --no-pager | tail -1",
}


@pytest.fixture(scope="session")
def boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Vm]]:
    image = built_image()
    FIGURES["image size"] = f"{image.stat().st_size / 1e6:.0f} MB raw"
    workdir = tmp_path_factory.mktemp("vm")
    with Vm(image, workdir, name="bios") as bios, Vm(image, workdir, uefi=True, name="uefi") as uefi:
        bios.start()
        uefi.start()
        for vm, seconds in wait_for_wizards([bios, uefi]).items():
            FIGURES[f"boot to wizard ({vm.dir.name.upper()}, first boot, two VMs side by side)"] = (
                f"{seconds:.0f} s, qemu CPU {vm.wizard_cpu:.0f} s, host load {os.getloadavg()[0]:.1f}")
        for title, command in GUEST_FIGURES.items():
            # Figures, not checks: a guest too busy to answer one in time does not fail the run (a first
            # try that measured `python -X importtime` in the guest took over 300 s at load 22).
            try:
                FIGURES[f"{title} (bios)"] = bios.run(command, check=False, timeout=120).stdout.strip()
            except VmError as exc:
                FIGURES[f"{title} (bios)"] = f"not measured: {str(exc).splitlines()[0]}"
        yield {"bios": bios, "uefi": uefi}
        # Where each first boot's time went, kept beside the disks for a look afterwards (the BIOS
        # machine has rebooted since: its journal is of the second boot; the UEFI one's is its first).
        for vm in (bios, uefi):
            try:
                report = vm.run("systemd-analyze blame --no-pager | head -40;"
                                " journalctl -b -o short-monotonic --no-pager | head -2000", check=False, timeout=300)
            except VmError:
                continue
            (vm.dir / "boot-journal.txt").write_text(report.stdout + report.stderr)
            FIGURES[f"boot journal ({vm.dir.name})"] = str(vm.dir / "boot-journal.txt")


@pytest.fixture(scope="session", autouse=True)
def _print_figures() -> Iterator[None]:
    yield
    print("\n".join(["", "== appliance image figures =="] + [f"  {k}: {v}" for k, v in FIGURES.items()]))
