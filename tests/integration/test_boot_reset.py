"""A forgotten administrator password reset from the boot partition: the image's own script
(image/overlay/usr/local/sbin/letterbox-reset) run on a running box, with a directory standing for the
SD card's FAT and the checkout's `letterbox` for the image's (tests/image/test_appliance.py does it on the
image at its reboot)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from appliance.auth import Throttle
from tests.conftest import LETTERBOX, BoxHandle
from tests.integration.test_live_settings import ADMIN, ADMIN_PASSWORD, admin_console
from tests.integration.test_lockout import LOCKOUT, WRONG, web_login

SCRIPT = Path(__file__).parents[2] / "image/overlay/usr/local/sbin/letterbox-reset"
NEW = "the new password from the card é"


def run_reset(box: BoxHandle, card: Path, cmdline: str = "BOOT_IMAGE=/vmlinuz ro quiet",
              cli_stdin_size: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`cli_stdin_size`: the CLI writes there the size of the file it was handed first."""
    (card.parent / "cmdline").write_text(cmdline + "\n")
    cli = LETTERBOX
    if cli_stdin_size is not None:
        cli = str(card.parent / "letterbox-measured")
        Path(cli).write_text(f'#!/bin/sh\nstat -L -c %s /proc/self/fd/0 > "{cli_stdin_size}"\nexec {LETTERBOX} "$@"\n')
        os.chmod(cli, 0o700)
    env = {**os.environ, "LETTERBOX_RESET_DIRS": f"{card} {card.parent / 'no-such-partition'}",
           "LETTERBOX_RESET_DATA": str(box.data.root), "LETTERBOX_RESET_CLI": cli,
           "LETTERBOX_RESET_AS": "",  # the image runs it as the box's user; the test's box is this user's
           "LETTERBOX_RESET_CMDLINE": str(card.parent / "cmdline"),
           "LETTERBOX_RESET_ISSUE": str(card.parent / "issue.d/40-letterbox-reset.issue"),
           "LETTERBOX_RESET_RELOAD": "true"}  # not this machine's gettys
    # SIGPIPE ignored, as systemd starts every service (IgnoreSIGPIPE=yes).
    result = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False,
                            preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN))
    assert result.returncode == 0, result.stderr  # a failed reset never stops the boot
    return result


def events(web: httpx.Client) -> str:
    return web.get("/console/events").text


def card_with(tmp_path: Path, name: str, data: bytes) -> Path:
    card = tmp_path / "card"
    card.mkdir(exist_ok=True)
    (card / name).write_bytes(data)
    return card


def test_notepads_file_sets_the_password_ends_sessions_and_lockouts_and_goes(box: BoxHandle, tmp_path: Path) -> None:
    with admin_console(box) as web:
        box.services.auth.throttle = Throttle(LOCKOUT)
        for _ in range(3):
            assert web_login(box, ADMIN, WRONG).status_code == 401
        assert web_login(box, ADMIN, WRONG).status_code == 429  # locked out guessing
        # Windows' Explorer hides the .txt it adds: the name typed was "letterbox-reset.txt".
        card = card_with(tmp_path, "letterbox-reset.txt.txt", b"\xef\xbb\xbf" + NEW.encode() + b"\r\n")
        run_reset(box, card)

        assert sorted(p.name for p in card.iterdir()) == ["letterbox-reset-result.txt"]
        said = (card / "letterbox-reset-result.txt").read_bytes()
        assert b"Done: the password of administrator admin was reset." in said, said
        assert NEW.encode() not in said
        assert b"\r\n" in said  # Notepad shows its lines
        assert web.get("/console/domains").status_code in (302, 303)  # the session before it ended
    assert web_login(box, ADMIN, ADMIN_PASSWORD).status_code == 401
    assert web_login(box, ADMIN, NEW).status_code == 303  # and the lockout with it
    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as web:
        token = web.get("/login").text.split('name="csrf" value="')[1].split('"')[0]
        web.post("/login", data={"csrf": token, "name": ADMIN, "password": NEW})
        assert "administrator password of admin reset from the boot partition (letterbox-reset.txt)" in events(web)


def test_an_empty_or_unreadable_file_changes_nothing_and_says_why(box: BoxHandle, tmp_path: Path) -> None:
    with admin_console(box) as web:
        card = card_with(tmp_path, "letterbox-reset.txt", b"\r\n")
        run_reset(box, card)
        assert not (card / "letterbox-reset.txt").exists()
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "Not done, nothing was changed: the file is empty: write the new password in it" in said, said
        assert ("administrator password not reset from the boot partition (letterbox-reset.txt): the file is empty" in events(web))

        # A file whose reading fails (a bad card): here a directory of that name, which opens but reads EISDIR.
        (card / "letterbox-reset.txt").mkdir()
        run_reset(box, card)
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "Not done, nothing was changed: the file could not be read (Is a directory)" in said, said
        assert "administrator password not reset from the boot partition (letterbox-reset.txt): the file could not be read" in events(web)
    assert web_login(box, ADMIN, ADMIN_PASSWORD).status_code == 303


def test_a_name_that_is_no_administrator_is_not_repeated(box: BoxHandle, tmp_path: Path) -> None:
    """The password put first and something else second: the result names the administrators, and never
    the file's lines (it stays on the card, and in the events)."""
    with admin_console(box) as web:
        card = card_with(tmp_path, "letterbox-reset.txt", f"{NEW}\n{NEW} again\n".encode())
        run_reset(box, card)
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "the first of the two lines names no administrator of this box (they are: admin)" in said, said
        assert NEW not in said
        assert NEW not in events(web)
    assert web_login(box, ADMIN, ADMIN_PASSWORD).status_code == 303


def test_the_boot_menus_entry_shows_a_new_password_on_the_console_until_the_next_boot(
        box: BoxHandle, tmp_path: Path) -> None:
    """A VM's owner, at the hypervisor's console, chose the boot menu's entry (image/lib/disk.sh)."""
    with admin_console(box) as web:
        card = tmp_path / "card"
        card.mkdir()
        result = run_reset(box, card, "BOOT_IMAGE=/vmlinuz root=UUID=x ro quiet letterbox.reset-password")
        issue = tmp_path / "issue.d/40-letterbox-reset.issue"
        shown = issue.read_text()
        assert stat.S_IMODE(issue.stat().st_mode) == 0o600  # agetty reads it as root
        match = re.search(r"Log in to the web console as admin with\n +([a-z2-9]{4}(?:-[a-z2-9]{4}){3})\n", shown)
        assert match, shown
        assert match.group(1) not in result.stdout + result.stderr  # the journal never sees it
        assert result.stderr == "", result.stderr
        assert web.get("/console/domains").status_code in (302, 303)  # the session before it ended
    assert web_login(box, ADMIN, match.group(1)).status_code == 303
    assert web_login(box, ADMIN, ADMIN_PASSWORD).status_code == 401

    run_reset(box, card)  # the next boot, a plain one
    assert not issue.exists()
    assert web_login(box, ADMIN, match.group(1)).status_code == 303


def test_a_second_reset_file_beside_the_first_goes_with_it(box: BoxHandle, tmp_path: Path) -> None:
    """Two tries on one card (Notepad's hidden .txt.txt, then the name typed again; or TextEdit's .rtf
    and a plain copy): the first found is applied, and no other file with a password stays on the card
    to be applied at the next boot."""
    with admin_console(box):
        other = "an older password from the card"
        card = card_with(tmp_path, "letterbox-reset.txt", NEW.encode() + b"\r\n")
        (card / "letterbox-reset.txt.txt").write_bytes(other.encode() + b"\r\n")
        (card / "letterbox-reset.rtf").write_bytes(b"{\\rtf1\\ansi " + other.encode() + b"}")
        run_reset(box, card)
        assert sorted(p.name for p in card.iterdir()) == ["letterbox-reset-result.txt"]
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "Done: the password of administrator admin was reset." in said, said
        assert "letterbox-reset.txt.txt, letterbox-reset.rtf: deleted unread" in said, said
        run_reset(box, card)  # the next boot
        assert web_login(box, ADMIN, NEW).status_code == 303
        assert web_login(box, ADMIN, other).status_code == 401


def test_a_file_the_card_keeps_is_not_applied(box: BoxHandle, tmp_path: Path) -> None:
    """A reset file that cannot be deleted (a FAT the kernel made read-only after an error; here an
    immutable file) was applied at every boot, over any password set since, and stayed on the card."""
    if subprocess.run(["chattr", "--help"], capture_output=True, check=False).returncode not in (0, 1):
        pytest.skip("no chattr")
    with admin_console(box) as web:
        card = card_with(tmp_path, "letterbox-reset.txt", NEW.encode() + b"\n")
        if subprocess.run(["chattr", "+i", str(card / "letterbox-reset.txt")], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip("this file system keeps no immutable flag")
        try:
            result = run_reset(box, card)
        finally:
            subprocess.run(["chattr", "-i", str(card / "letterbox-reset.txt")], check=True)
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "Not done, nothing was changed: letterbox-reset.txt could not be deleted from the boot partition" in said, said
        assert "could not be deleted" in result.stderr
        assert "reset from the boot partition" not in events(web)
    assert web_login(box, ADMIN, ADMIN_PASSWORD).status_code == 303
    assert web_login(box, ADMIN, NEW).status_code == 401


def test_a_big_file_is_not_copied_whole_into_memory(box: BoxHandle, tmp_path: Path) -> None:
    """The copy goes to /run, a tmpfs in RAM: the whole file went there, as big as the partition
    allowed, though the CLI reads 4097 bytes of it at most."""
    with admin_console(box):
        card = card_with(tmp_path, "letterbox-reset.txt", b"x" * 20_000_000)
        run_reset(box, card, cli_stdin_size=tmp_path / "stdin-size")
        assert int((tmp_path / "stdin-size").read_text()) <= 4097
        said = (card / "letterbox-reset-result.txt").read_text()
        assert "the file is larger than 4096 bytes" in said, said
