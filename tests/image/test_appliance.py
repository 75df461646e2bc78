"""The amd64 appliance image, booted under qemu (TCG) with user networking, driven from the host through
the forwarded ports as a family admin and their mail clients would meet it (issue 15).

One VM (BIOS) goes through the whole story: console banner, HTTP -> HTTPS, wizard step 1, a message in
on port 25 and out over IMAPS, a reboot, the same mail and settings. A second VM (UEFI) booted from the
same image file, side by side with it (conftest.py: it takes the updates of test_update.py meanwhile),
shows that every box makes its own identity at first boot.
"""

from __future__ import annotations

import email.message
import imaplib
import os
import re
import smtplib
import time

import httpx2 as httpx
import pytest

from tests.image.conftest import DATA, FIGURES, identity
from tests.image.vm import Vm, VmError, unverified_tls

pytestmark = pytest.mark.timeout(3600)

ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery"
HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
ALICE, ALICE_PASSWORD = f"alice@{DOMAIN}", "alice's long password"
CLI = f"runuser -u letterbox -- letterbox --data {DATA}"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def box(bios: Vm) -> Vm:
    return bios


def wait_for(check: object, timeout: float, what: str, vm: Vm) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(1.0)
    raise VmError(vm.failure_report(f"timed out waiting for {what}"))


def test_console_shows_the_address_and_the_setup_code(box: Vm) -> None:
    code = box.run(f"cat {DATA}/setup-code").stdout.strip()
    assert re.fullmatch(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", code), code
    # The serial getty prints /etc/issue (+ issue.d) with agetty's escapes filled in.
    wait_for(lambda: code in box.console_log(), 900, "the setup code on the console", box)
    log = box.console_log()
    assert "http://letterbox.local/" in log
    assert re.search(r"http://10\.0\.2\.15/", log), "the DHCP address on the login screen"


def test_http_redirects_to_https(box: Vm) -> None:
    status, headers, _ = box.http_get("/")
    assert status in (301, 308), status
    # Behind qemu's forwards the redirect names the guest's own port 443; the host uses the forward.
    assert headers["location"].startswith("https://"), headers


def _wizard_step1(vm: Vm, code: str) -> httpx.Response:
    with httpx.Client(base_url=f"https://127.0.0.1:{vm.port(443)}", verify=unverified_tls(), timeout=60) as client:
        page = client.get("/setup/1")
        assert page.status_code == 200, page.text[:500]
        match = _CSRF.search(page.text)
        assert match, page.text[:500]
        return client.post("/setup/1", data={
            "csrf": match.group(1), "code": code, "name": ADMIN, "password": ADMIN_PASSWORD,
            "password2": ADMIN_PASSWORD, "hostname": HOSTNAME,
        })


_GREYLISTED = re.compile(r"try again in (\d+) seconds")


def _send(vm: Vm, subject: str) -> None:
    """As a sending MTA does: a first attempt the box greylists (451) is retried after the delay it
    names (the host's address, 10.0.2.2 behind qemu's forward, is not in the box's skip networks)."""
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "tester@example.invalid", ALICE, subject
    msg.set_content("Sent from the host to the forwarded port 25.\n")
    for _attempt in range(3):
        try:
            with smtplib.SMTP("127.0.0.1", vm.port(25), timeout=120) as smtp:
                smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as refused:
            code, text = refused.recipients[ALICE]
            match = _GREYLISTED.search(text.decode(errors="replace"))
            assert code == 451, (code, text)
            assert match, text
            time.sleep(int(match.group(1)) + 5)
        else:
            return
    raise AssertionError(f"{subject!r} still refused after the greylisting delays")


def _subjects(vm: Vm) -> list[str]:
    with imaplib.IMAP4_SSL("127.0.0.1", vm.port(993), ssl_context=unverified_tls(), timeout=60) as imap:
        imap.login(ALICE, ALICE_PASSWORD)
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        subjects = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            header = parts[0][1] if isinstance(parts[0], tuple) else b""
            subjects.append(header.decode().partition(":")[2].strip())
        return subjects


def test_wizard_mail_and_reboot(box: Vm) -> None:
    code = box.run(f"cat {DATA}/setup-code").stdout.strip()
    response = _wizard_step1(box, code)
    assert response.status_code == 303, response.text[:800]
    assert response.headers["location"].endswith("/setup/2")
    assert box.run(f"test -e {DATA}/setup-code", check=False).exit_code != 0, "code used up"

    box.run(f"{CLI} domain add {DOMAIN}")
    box.run(f"{CLI} user add {ALICE} --password-stdin", stdin=f"{ALICE_PASSWORD}\n".encode())
    _send(box, "before the reboot")
    wait_for(lambda: "before the reboot" in _subjects(box), 120, "the message in the IMAP INBOX", box)

    box.reboot()
    seconds = box.wait_for_wizard()
    FIGURES["boot to wizard (BIOS, reboot)"] = (f"{seconds:.0f} s, qemu CPU {box.wizard_cpu:.0f} s, "
                                               f"host load {os.getloadavg()[0]:.1f}")
    FIGURES["boot to letterbox.service active (BIOS, reboot)"] = f"{box.wait_until_ready():.0f} s"
    assert "before the reboot" in _subjects(box)
    with httpx.Client(base_url=f"https://127.0.0.1:{box.port(443)}", verify=unverified_tls(), timeout=60) as client:
        # The admin exists: the wizard's first step no longer asks for a code, it wants a login.
        page = client.get("/setup/1")
        assert page.status_code in (302, 303), page.status_code
    assert box.run(f"{CLI} domain list").stdout.split() == [DOMAIN]
    _send(box, "after the reboot")
    wait_for(lambda: "after the reboot" in _subjects(box), 120, "mail after the reboot", box)


def test_system_services(box: Vm) -> None:
    checks = {
        "ssh is off": "! systemctl is-enabled --quiet ssh.service && ! systemctl is-active --quiet ssh.service",
        "letterbox runs as its own user": "test \"$(ps -o user= -C letterbox | sort -u)\" = letterbox",
        "timesyncd": "systemctl is-enabled --quiet systemd-timesyncd.service",
        "unattended upgrades": "apt-config dump | grep -q 'APT::Periodic::Unattended-Upgrade \"1\"'",
        "avahi announces letterbox.local": "systemctl is-active --quiet avahi-daemon.service"
                                           " && avahi-resolve -n letterbox.local 2>/dev/null | grep -q . "
                                           "|| journalctl -u avahi-daemon | grep -q 'letterbox.local'",
        "journal capped": "systemd-analyze cat-config systemd/journald.conf | grep -q '^SystemMaxUse='",
        "root file system grew": "test $(df -Pm / | awk 'NR==2 {print $2}') -gt 3000",
        "swap file": "swapon --show=NAME --noheadings | grep -qx /var/swapfile",
    }
    # The root file system grows, and the swap file is made, after the box serves (first boot puts the
    # wizard first): they may still be under way.
    later = ("root file system grew", "swap file")
    for name in later:
        wait_for(lambda name=name: box.run(checks[name], check=False).exit_code == 0, 600, name, box)
    failed = [name for name, command in checks.items() if box.run(command, check=False).exit_code != 0]
    assert not failed, failed


def test_two_boxes_from_one_image_differ(box: Vm, other_identity: dict[str, str]) -> None:
    """The same image file written twice (two SD cards, two VM imports): every secret is made at first
    boot. The first box booted with BIOS, the second one with UEFI (OVMF): both firmwares work."""
    first, second = identity(box), other_identity
    assert (first["firmware"], second["firmware"]) == ("BIOS", "UEFI")
    same = [name for name in first if first[name] == second[name]]
    assert not same, f"identical on two boxes: {same}"
    assert all(first.values()), first
    assert all(second.values()), second


def _content_filter_item(vm: Vm) -> str:
    """The console's status checklist, checked now ("Check now" as the admin), and its "Content filter"
    item's class: "ok" is the green badge (web/templates/console/status.html)."""
    with httpx.Client(base_url=f"https://127.0.0.1:{vm.port(443)}", verify=unverified_tls(), timeout=300) as client:
        page = client.get("/login")
        token = _CSRF.search(page.text)
        assert token, page.text[:500]
        client.post("/login", data={"csrf": token.group(1), "name": ADMIN, "password": ADMIN_PASSWORD})
        page = client.get("/console")
        token = _CSRF.search(page.text)
        assert page.status_code == 200, page.text[:500]
        assert token, page.text[:500]
        checked = client.post("/console/status/check", data={"csrf": token.group(1)})
        assert checked.status_code == 303, checked.text[:500]
        match = re.search(r'<li class="check (\w+)" id="check-content_filter">', client.get("/console").text)
        assert match, "no Content filter item on the status page"
        return match.group(1)


def test_content_filter_answers(box: Vm) -> None:
    """The image ships rspamd and Redis, configured for a small box (issue 16): the console's status
    checklist shows the "Content filter" item green once rspamd answers. rspamd and Redis start after
    the console (their first start compiles the public-suffix list, minutes under TCG): until then the
    item is a "problem" (rspamd silent, mail delivered unchecked), never a refused message."""
    for unit in ("rspamd", "redis-server"):
        assert box.run(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled", unit
    FIGURES["Content filter item at the first check"] = _content_filter_item(box)
    wait_for(lambda: box.run(f"{CLI} spam status", check=False).exit_code == 0, 1800, "rspamd to answer", box)
    status = box.run(f"{CLI} spam status").stdout
    assert "content filtering is on (rspamd)" in status, status
    wait_for(lambda: _content_filter_item(box) == "ok", 300, "the Content filter item to be green", box)
    # As soon as rspamd answers its hs_helper may still be checking or compiling the regular expressions
    # (minutes under TCG); ExecStartPost's watcher ends it once a worker has loaded them.
    FIGURES["rspamd + redis RSS as soon as rspamd answers after the boot (MB)"] = _rss(box)
    wait_for(lambda: box.run("pgrep -f '^rspamd: hs_helper'", check=False).exit_code != 0, 900,
             "hs_helper to be ended after the boot", box)
    FIGURES["rspamd + redis RSS after the boot, hs_helper ended (MB)"] = _rss(box)
    # The language detector reads the ten languages linked in /etc/rspamd/letterbox-languages (the
    # overlay's links to Debian's files survived the build): rspamd.conf.local, most of the memory cut.
    languages = box.run("grep -o 'loaded [0-9]* languages' /var/log/rspamd/rspamd.log | tail -n 1").stdout
    assert languages.strip() == "loaded 10 languages", languages
    # hs_helper (rspamd's regular-expression compiler) is ended once it has compiled (ExecStartPost);
    # a reload (SIGHUP: a new configuration) must not bring it back for good.
    box.run("systemctl reload rspamd")
    wait_for(lambda: box.run(f"{CLI} spam status", check=False).exit_code == 0, 600, "rspamd after a reload", box)
    # Anchored: the guest agent's `sh -c` running pgrep has the pattern in its own command line.
    wait_for(lambda: box.run("pgrep -f '^rspamd: hs_helper'", check=False).exit_code != 0, 600,
             "hs_helper to be ended after the reload", box)
    FIGURES["rspamd + redis RSS after a reload (MB)"] = _rss(box)
    box.run("systemctl restart rspamd")
    wait_for(lambda: box.run(f"{CLI} spam status", check=False).exit_code == 0, 600, "rspamd after a restart", box)
    wait_for(lambda: box.run("pgrep -f '^rspamd: hs_helper'", check=False).exit_code != 0, 600,
             "hs_helper to be ended after the restart", box)
    FIGURES["rspamd + redis RSS after a restart (MB)"] = _rss(box)


def _rss(vm: Vm) -> str:
    """RSS and PSS (MB) of each rspamd and Redis process, and both summed (issue 16's target: RSS summed
    <= 150 MB). RSS counts the pages rspamd's processes share (forked from one main process) once per
    process; PSS splits them."""
    # rspamd's processes are told apart by their title ("rspamd: controller process ...").
    return vm.run("ps -o pid=,comm=,args= -C rspamd,redis-server | while read -r pid comm _ title _; do "
                  "[ \"$comm\" = rspamd ] || title=$comm; "
                  "awk -v c=\"$title\" '/^Rss:/ {r = $2} /^Pss:/ {p = $2} END {print c, r, p}' "
                  "/proc/$pid/smaps_rollup; done | awk '{r += $2; p += $3; printf \"%s %d (PSS %d), \", $1, "
                  "$2 / 1024, $3 / 1024} END {printf \"total RSS %d, PSS %d\", r / 1024, p / 1024}'").stdout
