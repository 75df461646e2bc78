"""The amd64 appliance image, booted under qemu (TCG) with user networking, driven from the host through
the forwarded ports as a family admin and their mail clients would meet it (issue 15).

One VM (BIOS) goes through the whole story: console banner, HTTP -> HTTPS, wizard step 1, the domain
and the mailbox made on the console's pages, a message in on port 25 and out over IMAPS, a reboot (with a
forgotten administrator password reset from the boot partition), the same mail and settings. A second VM (UEFI) booted from the
same image file, side by side with it (conftest.py: it takes the updates of test_update.py meanwhile),
shows that every box makes its own identity at first boot.
"""

from __future__ import annotations

import email.message
import imaplib
import os
import re
import shlex
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
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
# Seconds a client of the box waits for one answer: a guest starved by a loaded host is slow, not
# broken (at load 17-21, with a quarter of a core per machine, the wizard's step 1 was never completed
# and the test failed; 60 s had been enough at load 9-12).
CLIENT_TIMEOUT = 300


@pytest.fixture(scope="module")
def box(bios: Vm) -> Vm:
    return bios


_SET_SETTING = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('INSERT INTO settings (key, value) VALUES (?, ?)"
    " ON CONFLICT(key) DO UPDATE SET value = excluded.value', (sys.argv[2], sys.argv[3])); c.commit()")


def set_setting(vm: Vm, key: str, value: str) -> None:
    """One row of the box's settings table written in the guest, as the console's forms save them; the
    running box reads it live (a new connection is screened with the settings as last read)."""
    args = " ".join(shlex.quote(a) for a in (_SET_SETTING, f"{DATA}/letterbox.db", key, value))
    vm.run(f"runuser -u letterbox -- python3 -c {args}")


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


def https_client(vm: Vm) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{vm.port(443)}", verify=unverified_tls(), timeout=CLIENT_TIMEOUT)


def _token(page: httpx.Response) -> str:
    """The form's CSRF token, as a browser sends it back."""
    assert page.status_code == 200, page.text[:500]
    match = _CSRF.search(page.text)
    assert match, page.text[:500]
    return match.group(1)


def post_form(client: httpx.Client, form_page: str, action: str, data: dict[str, str]) -> httpx.Response:
    return client.post(action, data={"csrf": _token(client.get(form_page)), **data})


def _wizard_step1(client: httpx.Client, code: str) -> httpx.Response:
    return post_form(client, "/setup/1", "/setup/1", {
        "code": code, "name": ADMIN, "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD, "hostname": HOSTNAME,
    })


def log_in(client: httpx.Client, password: str = ADMIN_PASSWORD) -> None:
    response = post_form(client, "/login", "/login", {"name": ADMIN, "password": password})
    assert response.status_code == 303, response.text[:500]


_GREYLISTED = re.compile(r"try again in (\d+) seconds")


def _send(vm: Vm, subject: str) -> None:
    """As a sending MTA does: a first attempt the box greylists (451) is retried after the delay it
    names (the host's address, 10.0.2.2 behind qemu's forward, is not in the box's skip networks)."""
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "tester@example.invalid", ALICE, subject
    msg.set_content("Sent from the host to the forwarded port 25.\n")
    for _attempt in range(3):
        try:
            with smtplib.SMTP("127.0.0.1", vm.port(25), timeout=CLIENT_TIMEOUT) as smtp:
                smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as refused:
            code, text = refused.recipients[ALICE]
            match = _GREYLISTED.search(text.decode(errors="replace"))
            assert code == 451, (code, text)
            assert match, text
            time.sleep(int(match.group(1)) + 2)
        else:
            return
    raise AssertionError(f"{subject!r} still refused after the greylisting delays")


def _subjects(vm: Vm) -> list[str]:
    with imaplib.IMAP4_SSL("127.0.0.1", vm.port(993), ssl_context=unverified_tls(), timeout=CLIENT_TIMEOUT) as imap:
        imap.login(ALICE, ALICE_PASSWORD)
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        subjects = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            header = parts[0][1] if isinstance(parts[0], tuple) else b""
            subjects.append(header.decode().partition(":")[2].strip())
        return subjects


def set_up_on_the_console(vm: Vm) -> None:
    """The wizard's step 1 with the code the console shows, then the domain and Alice's mailbox made on
    the console's pages by the admin step 1 logged in, as from a browser on the LAN (a `letterbox` CLI
    command in the guest imports Letterbox: 10-20 s of emulated CPU each)."""
    code = vm.run(f"cat {DATA}/setup-code").stdout.strip()
    with https_client(vm) as client:
        response = _wizard_step1(client, code)
        assert response.status_code == 303, response.text[:800]
        assert response.headers["location"].endswith("/setup/2")
        added = post_form(client, "/console/domains", "/console/domains", {"domain": DOMAIN})
        assert added.status_code == 303, added.text[:800]
        created = post_form(client, "/console/mailboxes", "/console/mailboxes", {
            "local": ALICE.partition("@")[0], "domain": DOMAIN, "name": "Alice",
            "password": ALICE_PASSWORD, "password2": ALICE_PASSWORD,
        })
        assert created.status_code == 303, created.text[:800]
        assert created.headers["location"].endswith("/console/mailboxes"), created.headers
    assert vm.run(f"test -e {DATA}/setup-code", check=False).exit_code != 0, "code used up"


def test_wizard_and_mail(box: Vm) -> None:
    set_up_on_the_console(box)

    # Greylisting stays on (the first attempt is deferred, the retry taken), with a delay of 2 seconds
    # instead of the default 5 minutes, which were most of this test's time.
    set_setting(box, "spam_greylist_delay", "2")
    _send(box, "before the reboot")
    wait_for(lambda: "before the reboot" in _subjects(box), 120, "the message in the IMAP INBOX", box)


def _content_filter_item(vm: Vm) -> str:
    """The console's status checklist, checked now ("Check now" as the admin), and its "Content filter"
    item's class: "ok" is the green badge (web/templates/console/status.html)."""
    with https_client(vm) as client:
        log_in(client)
        checked = post_form(client, "/console", "/console/status/check", {})
        assert checked.status_code == 303, checked.text[:500]
        match = re.search(r'<li class="check (\w+)" id="check-content_filter">', client.get("/console").text)
        assert match, "no Content filter item on the status page"
        return match.group(1)


def test_content_filter_answers(box: Vm) -> None:
    """The image ships rspamd and Redis, configured for a small box (issue 16): the console's status
    checklist shows the "Content filter" item green once rspamd answers. rspamd and Redis start after
    the console (their first start compiles the public-suffix list, minutes under TCG): until then the
    item is a "problem" (rspamd silent, mail delivered unchecked), never a refused message. Their memory
    is sampled all along (every 0.5 s, in the guest): the maximum after the boot, a reload and a restart
    stays within the issue's 150 MB of RSS summed, with a margin."""
    _start_rss_sampler(box)
    try:
        _content_filter_and_its_memory(box)
    finally:
        box.run("systemctl stop letterbox-rss-sampler", check=False)


def _content_filter_and_its_memory(box: Vm) -> None:
    since = _uptime(box)
    for unit in ("rspamd", "redis-server"):
        assert box.run(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled", unit
    FIGURES["Content filter item at the first check"] = _content_filter_item(box)
    wait_for(lambda: _rspamd_answers(box), 1800, "rspamd to answer", box)
    FIGURES["rspamd answering, seconds after letterbox.service was active (first start)"] = _rspamd_start_seconds(box)
    _assert_root_grown_before_rspamd(box)
    wait_for(lambda: _content_filter_item(box) == "ok", 300, "the Content filter item to be green", box)
    FIGURES["rspamd + redis RSS as soon as rspamd answers after the boot (MB)"] = _rss(box)
    # rspamd forks an hs_helper at every start; it has nothing to compile on the image (its regular
    # expressions run on PCRE2) and ExecStartPost's watcher ends it as soon as it can end.
    _wait_hs_helper_gone(box, "the boot")
    FIGURES["rspamd + redis RSS after the boot, hs_helper ended (MB)"] = _rss(box)
    top = FIGURES["rspamd + redis RSS max, from the test's start after the boot until settled"] = _rss_max(box, since)
    tops = [top]
    # The language detector reads the ten languages linked in /etc/rspamd/letterbox-languages (the
    # overlay's links to Debian's files survived the build): rspamd.conf.local, most of the memory cut.
    languages = box.run("grep -o 'loaded [0-9]* languages' /var/log/rspamd/rspamd.log | tail -n 1").stdout
    assert languages.strip() == "loaded 10 languages", languages
    # A reload restarts rspamd (rspamd.service.d ExecReload; rspamd's own SIGHUP reload would run two
    # controllers and a new hs_helper at once): a new main process, hs_helper not back for good, and the
    # box's checklist green again. A plain restart proved nothing more (the same stop and start, without
    # the image's drop-in) and cost a second start of rspamd under TCG.
    since = _uptime(box)
    main = box.run("systemctl show -p MainPID --value rspamd").stdout.strip()
    box.run("systemctl reload rspamd")
    wait_for(lambda: box.run("systemctl show -p MainPID --value rspamd").stdout.strip() not in ("0", main),
             600, "a new rspamd main process after a reload", box)
    wait_for(lambda: _rspamd_answers(box), 600, "rspamd after a reload", box)
    _wait_hs_helper_gone(box, "a reload")
    FIGURES["rspamd + redis RSS after a reload (MB)"] = _rss(box)
    top = FIGURES["rspamd + redis RSS max, from a reload until settled"] = _rss_max(box, since)
    tops.append(top)
    assert _content_filter_item(box) == "ok", "the Content filter item after rspamd's reload"
    # The target is 150 MB; 135 keeps a margin (measured at load 10-12: 112, 107 and 106 MB,
    # each with hs_helper alive for a moment, since rspamd runs without transparent huge pages).
    for top in tops:
        assert int(top.split()[0]) <= 135, FIGURES


# rspamd's normal worker answers /ping with "pong" (what `letterbox spam status` asks first). Polled with
# the guest's bash rather than with that command: each `letterbox` command imports Letterbox, 10-20 s of
# emulated CPU, and polling it back to back took that CPU from rspamd's first start, which it waited for.
_RSPAMD_PING = ("bash -c 'exec 3<>/dev/tcp/127.0.0.1/11333 && printf \"GET /ping HTTP/1.0\\r\\n\\r\\n\" >&3"
                " && timeout 30 grep -q pong <&3'")


def _rspamd_answers(vm: Vm) -> bool:
    return vm.run(_RSPAMD_PING, check=False, timeout=120).exit_code == 0


def _rspamd_start_seconds(vm: Vm) -> str:
    """From letterbox.service active (rspamd starts after it) to rspamd's ExecStartPre (the public-suffix
    warm-up) done and rspamd running, in the guest's own clock."""
    active = _monotonic(vm, "letterbox.service", "ActiveEnterTimestampMonotonic")
    began = _monotonic(vm, "rspamd.service", "InactiveExitTimestampMonotonic")
    main_start = _monotonic(vm, "rspamd.service", "ExecMainStartTimestampMonotonic")
    return f"rspamd.service began {began - active:.0f} s after, its main process started {main_start - active:.0f} s after"


def _monotonic(vm: Vm, unit: str, prop: str) -> float:
    return int(vm.run(f"systemctl show -p {prop} --value {unit}").stdout.strip() or 0) / 1e6


def _assert_root_grown_before_rspamd(vm: Vm) -> None:
    """The image leaves ~15 MB free on its root: rspamd's and Redis's first start (tens of MB) must find
    the disk grown. Behind everything at the lowest priority, the growth once waited minutes on a loaded
    CI machine while rspamd filled the disk, and the first mail was refused with 451."""
    grown = _monotonic(vm, "letterbox-growroot.service", "ExecMainExitTimestampMonotonic")
    began = _monotonic(vm, "rspamd.service", "InactiveExitTimestampMonotonic")
    assert 0 < grown <= began, f"root grown at {grown:.1f} s, rspamd began at {began:.1f} s (guest uptime)"
    free_mb = int(vm.run("df -Pm / | awk 'NR == 2 {print $4}'").stdout)
    assert free_mb > 1024, f"{free_mb} MB free on / after the growth"


def _wait_hs_helper_gone(vm: Vm, what: str) -> None:
    # Anchored: the guest agent's `sh -c` running pgrep has the pattern in its own command line.
    wait_for(lambda: vm.run("pgrep -f '^rspamd: hs_helper'", check=False).exit_code != 0, 600,
             f"hs_helper to be ended after {what}", vm)
    time.sleep(5)  # what the workers load just after (maps), before the next figure


# rspamd's and Redis's memory summed, every 0.5 s, one line each: "UPTIME RSS_KB PSS_KB ANONHUGE_KB
# PROCESSES HS_HELPER" (a forked hs_helper bears its main process's title until it set its own: PROCESSES
# counts it all the same). The guest's python3, as a transient unit the test stops.
_RSS_SAMPLER = r"""
import os, sys, time
out = open(sys.argv[1], "a", buffering=1)
while True:
    rss = pss = huge = count = helper = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in ("rspamd", "redis-server"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read()
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in list(f)[1:])  # after the "[rollup]" line
        except (OSError, ValueError):
            continue
        rss += int(fields.get("Rss", "0 kB").split()[0])
        pss += int(fields.get("Pss", "0 kB").split()[0])
        huge += int(fields.get("AnonHugePages", "0 kB").split()[0])
        count += 1
        helper |= title.startswith(b"rspamd: hs_helper")
    with open("/proc/uptime") as f:
        now = f.read().split()[0]
    out.write(f"{now} {rss} {pss} {huge} {count} {helper}\n")
    time.sleep(0.5)
"""


def _start_rss_sampler(vm: Vm) -> None:
    vm.write_file("/run/letterbox-rss-sampler.py", _RSS_SAMPLER.encode())
    vm.run("systemd-run --unit=letterbox-rss-sampler --quiet python3 /run/letterbox-rss-sampler.py "
           "/run/letterbox-rss.log")


def _uptime(vm: Vm) -> float:
    return float(vm.run("cut -d' ' -f1 /proc/uptime").stdout)


def _rss_max(vm: Vm, since: float) -> str:
    """The largest RSS summed over rspamd's and Redis's processes the sampler saw since `since` (the
    guest's uptime), in MB, with what made it."""
    samples = [line.split() for line in vm.run("cat /run/letterbox-rss.log").stdout.splitlines()]
    window = [s for s in samples if len(s) == 6 and float(s[0]) >= since]
    if not window:
        return "0 (no sample)"
    at, rss, pss, huge, count, helper = max(window, key=lambda s: int(s[1]))
    return (f"{int(rss) // 1024} MB at +{float(at) - since:.0f} s (PSS {int(pss) // 1024}, AnonHugePages "
            f"{int(huge) // 1024}, {count} processes, hs_helper {'alive' if helper == '1' else 'not alive'}); "
            f"{len(window)} samples over {float(window[-1][0]) - since:.0f} s")


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


# After the content filter's test, not before: rspamd's first start (the public-suffix list compiled,
# minutes of emulated CPU) is under way from just after the wizard, and a reboot in the middle of it threw
# that work away and began it again after the reboot (the boot then shared the CPU with it). Once rspamd
# has answered, its compiled list is in /var/lib/rspamd and the second boot only reads it back.
#
# The reboot also carries the reset of a forgotten administrator password from the boot partition, as
# the README tells the owner to do: letterbox-reset.txt written as Notepad saves it (a byte-order mark,
# CRLF) onto the EFI partition (/boot/efi, mounted on first use), read once the box has started.
RESET_PASSWORD = "a password from the boot partition"


def test_reboot_keeps_mail_and_settings(box: Vm) -> None:
    box.run(f"printf '\\357\\273\\277%s\\r\\n' {shlex.quote(RESET_PASSWORD)} >/boot/efi/letterbox-reset.txt")
    box.reboot()
    seconds = box.wait_for_wizard()
    FIGURES["boot to wizard (BIOS, reboot)"] = (f"{seconds:.0f} s, qemu CPU {box.wizard_cpu:.0f} s, "
                                               f"host load {os.getloadavg()[0]:.1f}")
    FIGURES["boot to letterbox.service active (BIOS, reboot)"] = f"{box.wait_until_ready():.0f} s"
    assert "before the reboot" in _subjects(box)
    with https_client(box) as client:
        # The admin exists: the wizard's first step no longer asks for a code, it wants a login.
        page = client.get("/setup/1")
        assert page.status_code in (302, 303), page.status_code
        # The reset runs once letterbox.service has started (its unit says why): its end is waited for.
        wait_for(lambda: box.run("systemctl show -P ExecMainExitTimestampMonotonic letterbox-reset.service"
                                 ).stdout.strip() not in ("", "0"), 600, "letterbox-reset.service", box)
        began = _monotonic(box, "letterbox-reset.service", "ExecMainStartTimestampMonotonic")
        ended = _monotonic(box, "letterbox-reset.service", "ExecMainExitTimestampMonotonic")
        active = _monotonic(box, "letterbox.service", "ActiveEnterTimestampMonotonic")
        FIGURES["letterbox-reset.service with the file (BIOS, reboot)"] = (
            f"{ended - began:.1f} s, from {began - active:.1f} s after letterbox.service was active")
        log_in(client, RESET_PASSWORD)
        domains = client.get("/console/domains")
        assert domains.status_code == 200, domains.text[:800]
        assert DOMAIN in domains.text, domains.text[:800]
        assert "administrator password of admin reset from the boot partition" in client.get("/console/events").text
    card = box.run("ls /boot/efi; cat /boot/efi/letterbox-reset-result.txt").stdout
    assert "letterbox-reset.txt" not in card.replace("letterbox-reset-result.txt", ""), card
    assert "Done: the password of administrator admin was reset." in card, card
    assert RESET_PASSWORD not in card, card
    _send(box, "after the reboot")
    wait_for(lambda: "after the reboot" in _subjects(box), 120, "mail after the reboot", box)




# Last in the module: it waits for the other worker's machine, which publishes its identity once its
# own tests are done (conftest.py).
def test_two_boxes_from_one_image_differ(box: Vm, other_identity: dict[str, str]) -> None:
    """The same image file written twice (two SD cards, two VM imports): every secret is made at first
    boot. The first box booted with BIOS, the second one with UEFI (OVMF): both firmwares work."""
    first, second = identity(box), other_identity
    assert (first["firmware"], second["firmware"]) == ("BIOS", "UEFI")
    same = [name for name in first if first[name] == second[name]]
    assert not same, f"identical on two boxes: {same}"
    assert all(first.values()), first
    assert all(second.values()), second
