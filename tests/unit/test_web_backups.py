"""The console's Backups page (issue 14): the emergency kit as a download, a backup made in the
background with its progress kept across reloads, the list with downloads, one mailbox put back."""

from __future__ import annotations

import datetime as dt
import re
import resource
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from appliance import backup
from tests.conftest import require_program
from tests.support.polling import wait_until
from tests.support.umask import umask
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, WebClient, web_client


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.login(ADMIN, ADMIN_PASSWORD)
        yield client


def wait_for(web: WebClient, text: str) -> str:
    def shown() -> str:
        page = web.get("/console/backups").text
        return page if text in page else ""

    return wait_until(shown, seconds=30, what=f"{text!r} shown on /console/backups")


def test_key_backup_download_and_one_mailbox_back(web: WebClient) -> None:
    web.add_user()
    for n in range(3):
        web.run(web.services.store.deliver, [ALICE], f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    page = web.get("/console/backups")
    assert page.status_code == 200
    assert "Make the key and download the emergency kit" in page.text
    kit = web.post("/console/backups/key", token_from="/console/backups")
    assert kit.status_code == 200
    assert kit.headers["content-disposition"] == 'attachment; filename="letterbox-emergency-kit.txt"'
    assert "AGE-SECRET-KEY-" in kit.text
    recipient = web.run(web.services.db.get_setting, backup.RECIPIENT_SETTING)
    assert recipient
    assert recipient in kit.text
    # A second key only when asked for explicitly.
    again = web.post("/console/backups/key", token_from="/console/backups")
    assert again.status_code == 303
    assert web.run(web.services.db.get_setting, backup.RECIPIENT_SETTING) == recipient

    made = web.post("/console/backups/create", {"keep": "3"}, token_from="/console/backups")
    assert made.status_code == 303
    shown = wait_for(web, "Backup made")
    [item] = backup.list_backups(web.services.config.data.backups)
    assert item.path.name in shown
    assert web.run(web.services.db.get_setting, backup.KEEP_SETTING) == "3"
    download = web.get(f"/console/backups/download/{item.path.name}")
    assert download.status_code == 200
    assert download.content == item.path.read_bytes()
    assert web.get("/console/backups/download/..%2Fletterbox.db").status_code == 404
    assert web.get("/console/backups/download/nothing.tar.zst.age").status_code == 404

    web.run(web.services.accounts.remove_user, ALICE)
    back = web.post("/console/backups/restore-mailbox",
                    {"file": item.path.name, "address": ALICE, "secret": kit.text}, token_from="/console/backups")
    assert back.status_code == 303
    wait_for(web, f"Restored 3 messages into {ALICE} (the mailbox was made again")
    assert len(web.run(web.services.store.snapshot, ALICE, "INBOX").messages) == 3


@pytest.mark.parametrize(("name", "disposition"), [
    ('letterbox-x"y.tar.zst.age', "attachment; filename=\"letterbox-x_y.tar.zst.age\"; filename*=UTF-8''letterbox-x%22y.tar.zst.age"),
    ("letterbox-a\r\nX-Set: 1.tar.zst.age",
     "attachment; filename=\"letterbox-a__X-Set__1.tar.zst.age\"; filename*=UTF-8''letterbox-a%0D%0AX-Set%3A%201.tar.zst.age"),
    ("letterbox-\u00e9t\u00e9.tar.zst.age",
     "attachment; filename=\"letterbox-_t_.tar.zst.age\"; filename*=UTF-8''letterbox-%C3%A9t%C3%A9.tar.zst.age"),
    ("letterbox-box.one.test-20261201T030327Z.tar.zst.age",
     'attachment; filename="letterbox-box.one.test-20261201T030327Z.tar.zst.age"'),
])
def test_a_download_names_its_file_in_a_well_formed_header(web: WebClient, name: str, disposition: str) -> None:
    """A backup file is named by `letterbox backup create --to FILE` too: a quote in its name was sent
    inside the quoted filename (a malformed header), a line break split the header, and a letter
    outside Latin-1 could not be encoded at all."""
    folder = web.services.config.data.backups
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"the backup's bytes")
    download = web.get("/console/backups/download/" + quote(name, safe=""))
    assert download.status_code == 200
    assert download.headers["content-disposition"] == disposition
    assert download.content == b"the backup's bytes"


def test_backup_pages_are_for_admins_only(tmp_path: Path) -> None:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        assert client.get("/console/backups").status_code in (303, 307)
        assert client.post("/console/backups/create", token_from="/login").status_code in (303, 307)


def test_wizard_first_screen_offers_the_restore_and_asks_the_setup_code(tmp_path: Path) -> None:
    with web_client(tmp_path / "data") as client:
        first = client.get("/setup/1")
        assert 'href="/setup/restore"' in first.text
        page = client.get("/setup/restore")
        assert page.status_code == 200
        assert 'enctype="multipart/form-data"' in page.text
        token = client.csrf("/setup/restore")
        wrong = client.client.post("/setup/restore", data={"csrf": token, "code": "AAAA-BBBB-CCCC", "secret": "x"},
                                   files={"backup": ("b.tar.zst.age", b"not a backup")}, follow_redirects=True)
        assert "not this box&#39;s setup code" in wrong.text or "not this box's setup code" in wrong.text
        assert client.services.backups.current is None
        assert not [p for p in (tmp_path).iterdir() if ".upload-" in p.name]


def test_the_wizards_restore_page_shows_only_the_current_error(tmp_path: Path) -> None:
    """A restore that failed, then a new try with a wrong setup code: the page says the code is wrong,
    not that and the earlier restore's error beside it."""
    with web_client(tmp_path / "data") as client:
        code = client.setup_code()
        token = client.csrf("/setup/restore")
        client.client.post("/setup/restore", data={"csrf": token, "code": code, "secret": "a passphrase"},
                           files={"backup": ("b.tar.zst.age", b"not a backup")})
        failed = wait_until(lambda: (job := client.services.backups.current) and not job.running and job.error,
                            seconds=30, what="the restore failed")
        page = client.get("/setup/restore").text
        assert 'id="restore-error"' in page  # (the failure is shown until a newer try)
        wrong = client.client.post("/setup/restore", data={"csrf": token, "code": "AAAA-BBBB-CCCC", "secret": "x"},
                                   files={"backup": ("b.tar.zst.age", b"not a backup")}, follow_redirects=True)
        assert "not this box&#39;s setup code" in wrong.text
        assert 'id="restore-error"' not in wrong.text
        assert str(failed) not in wrong.text
        assert wrong.text.count('class="flash') == 1


def test_the_wizards_restore_pages_never_show_a_console_job(web: WebClient) -> None:
    """The wizard's restore page and its progress answer anyone, for a restore that claims the box; once
    the administrator had made a backup (or put a mailbox back), they showed that job to anyone: the
    backup's file name, a mailbox's address and message count, errors."""
    web.add_user()
    web.post("/console/backups/key", token_from="/console/backups")
    web.post("/console/backups/create", token_from="/console/backups")
    wait_for(web, "Backup made")
    assert web.get("/console/backups/progress").json()["job"]["result"].startswith("Backup made")
    web.client.cookies.clear()  # a stranger
    assert web.get("/setup/restore/progress").status_code == 404
    page = web.get("/setup/restore")
    assert (page.status_code, page.headers["location"]) == (303, "/login")


def test_daily_schedule_runs_and_shows_on_the_status_page(web: WebClient, tmp_path: Path) -> None:
    web.run(backup.make_key, web.services.db, web.services.events, "x")
    usb = tmp_path / "usb"
    usb.mkdir()
    saved = web.post("/console/backups/schedule", {"enabled": "yes", "hour": "4", "target": str(usb)},
                     token_from="/console/backups")
    assert saved.status_code == 303
    bad = web.post("/console/backups/schedule", {"enabled": "yes", "hour": "4", "target": "relative/dir"},
                   token_from="/console/backups")
    assert bad.status_code == 303
    # A digit that is not ASCII passed isdigit() and failed int(): 500 (and the same for "keep").
    superscript = web.post("/console/backups/schedule", {"enabled": "yes", "hour": "\u00b2", "target": str(usb)},
                           token_from="/console/backups")
    assert superscript.status_code == 303
    schedule = web.run(backup.read_schedule, web.services.db)
    assert schedule.enabled
    assert schedule.hour == 4
    assert schedule.target == str(usb)
    assert schedule.next_at is not None
    assert time.localtime(schedule.next_at).tm_hour == 4
    scheduler = backup.Scheduler(web.services.db, web.services.events, web.services.config.data, web.services.backups)
    web.run(scheduler.run_once, schedule)
    [made] = backup.list_backups(usb)
    status = web.get("/console").text
    assert "daily at 04:00" in status
    assert ">ok<" in status
    assert made.path.name in web.get("/console/backups").text
    assert web.post("/console/backups/create", {"keep": "\u00b2"}, token_from="/console/backups").status_code == 303
    wait_for(web, "Backup made")


def test_next_run_is_the_next_hour_of_the_day() -> None:
    base = time.mktime((2026, 3, 10, 2, 30, 0, 0, 0, -1))
    assert backup.next_run(base, 3) == base + 1800
    assert backup.next_run(base, 2) == base + 86400 - 1800
    tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")  # UTC+9, no summer time
    noon_utc = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC).timestamp()  # 21:00 in Tokyo
    assert backup.next_run(noon_utc, 3, tokyo) == dt.datetime(2026, 3, 11, 3, 0, tzinfo=tokyo).timestamp()
    assert backup.next_run(noon_utc, 22, tokyo) == noon_utc + 3600


def test_the_daily_hour_is_the_console_time_zone_s(web: WebClient) -> None:
    """The hour typed in the console is read in the box's time zone, the one the console shows the next run
    in: on a UTC machine with Asia/Tokyo chosen in the wizard, "at 4" ran at 13:00 in Tokyo."""
    web.run(web.services.settings.save, time_zone="Asia/Tokyo")  # as the wizard's step 1 does
    saved = web.post("/console/backups/schedule", {"enabled": "yes", "hour": "4", "target": ""},
                     token_from="/console/backups")
    assert saved.status_code == 303
    schedule = web.run(backup.read_schedule, web.services.db)
    assert schedule.next_at is not None
    assert dt.datetime.fromtimestamp(schedule.next_at, zoneinfo.ZoneInfo("Asia/Tokyo")).hour == 4
    assert re.search(r"Next backup \d{4}-\d\d-\d\d 04:00:00 JST", web.get("/console/backups").text)


def test_backup_with_a_passphrase_instead_of_the_key(web: WebClient) -> None:
    refused = web.post("/console/backups/create", {"passphrase": ""}, token_from="/console/backups")
    assert refused.status_code == 303
    assert web.services.backups.current is None  # no key and no passphrase: nothing started
    web.post("/console/backups/create", {"passphrase": "a long backup passphrase"}, token_from="/console/backups")
    wait_for(web, "Backup made")
    [item] = backup.list_backups(web.services.config.data.backups)
    checked = web.run(backup.verify, item.path, backup.Secret(passphrase="a long backup passphrase"),
                      web.services.config.data)
    assert checked.manifest["format"] == backup.FORMAT_VERSION


def _uploaded_backup(web: WebClient, tmp_path: Path) -> tuple[Path, str]:
    """A backup of the box with Alice's 2 messages, copied off the box (as if on the admin's computer)."""
    web.add_user()
    for n in range(2):
        web.run(web.services.store.deliver, [ALICE], f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    kit = web.run(backup.make_key, web.services.db, web.services.events, "x")
    made = web.run(backup.create, web.services.db, web.services.events, web.services.config.data)
    elsewhere = tmp_path / "laptop" / made.path.name
    elsewhere.parent.mkdir()
    made.path.rename(elsewhere)
    return elsewhere, kit.text


def test_uploaded_backup_shows_its_manifest_then_puts_one_mailbox_back(web: WebClient, tmp_path: Path) -> None:
    file, kit = _uploaded_backup(web, tmp_path)
    web.run(web.services.accounts.remove_user, ALICE)
    token = web.csrf("/console/backups")
    fields = {"csrf": token, "secret": kit, "what": "mailbox", "address": ALICE}
    # Without this session's CSRF token nothing is kept.
    forged = web.client.post("/console/backups/upload", data={**fields, "csrf": "forged"},
                             files={"backup": (file.name, file.read_bytes())})
    assert forged.status_code == 403
    page = web.client.post("/console/backups/upload", data=fields, files={"backup": (file.name, file.read_bytes())})
    assert page.status_code == 200, page.text
    assert "Confirm the restore" in page.text
    assert ALICE in page.text
    assert kit.splitlines()[-1] not in page.text  # the secret stays on the server
    [pending] = web.services.backups.pending.values()
    assert pending.manifest["messages"] == 2
    assert pending.path.read_bytes() == file.read_bytes()
    confirm = web.post("/console/backups/confirm", {"token": _token(page.text), "confirm": "yes"},
                       token_from="/console/backups")
    assert confirm.status_code == 303
    wait_for(web, f"Restored 2 messages into {ALICE}")
    assert len(web.run(web.services.store.snapshot, ALICE, "INBOX").messages) == 2
    assert not pending.path.exists()  # the upload is removed once used
    status = web.get("/console/backups/progress").json()
    assert status["job"]["kind"] == "restore"
    assert not status["job"]["running"]
    assert status["job"]["percent"] == 100


def test_an_uploads_manifest_is_read_without_starting_a_process(web: WebClient, tmp_path: Path) -> None:
    """The confirm page shows the manifest, the backup's first few kilobytes: they are read in the box's
    process. The restore's `unpack` child (a new interpreter, for the whole stream's speed) took 0.1 s of
    the page's time on a quiet machine and 1-2 s under load (the e2e test's wait for the manifest failed
    at load 12-18). A child's CPU time counts in RUSAGE_CHILDREN once it is reaped: none may be added."""
    file, kit = _uploaded_backup(web, tmp_path)

    def children_cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    before = children_cpu()
    page = web.client.post("/console/backups/upload", data={"csrf": web.csrf("/console/backups"), "secret": kit},
                           files={"backup": (file.name, file.read_bytes())})
    assert page.status_code == 200, page.text
    assert "Confirm the restore" in page.text
    assert children_cpu() == before


def test_an_upload_sent_as_a_browser_sends_it_is_read_whole(web: WebClient, tmp_path: Path) -> None:
    """A browser sends the form in the page's order: the token, the file, then the kit and the rest. A
    small file and the fields after it come in one piece of the body: its part had ended (and the next
    begun) before the reader looked at it, so it was taken for no file ('choose the backup file')."""
    file, kit = _uploaded_backup(web, tmp_path)
    boundary = "----browser-like-boundary"
    parts: list[tuple[str, str | bytes]] = [("csrf", web.csrf("/console/backups")), ("backup", file.read_bytes()),
                                           ("secret", kit), ("what", "box"), ("address", "")]
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        + (f'; filename="{file.name}"\r\nContent-Type: application/octet-stream'.encode() if isinstance(value, bytes)
           else b"")
        + b"\r\n\r\n" + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
        for name, value in parts) + f"--{boundary}--\r\n".encode()
    page = web.client.post("/console/backups/upload", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert page.status_code == 200, page.text[:300]
    assert "Confirm the restore" in page.text
    [pending] = web.services.backups.pending.values()
    assert pending.path.read_bytes() == file.read_bytes()


def test_an_uploaded_backup_is_the_box_users_alone_whatever_the_umask(web: WebClient, tmp_path: Path) -> None:
    """It holds the password hashes and the DKIM keys (encrypted), and waits beside the data directory
    for its confirmation: `make run` has the shell's umask, not the appliance unit's 0077."""
    file, kit = _uploaded_backup(web, tmp_path)
    with umask(0o022):
        page = web.client.post("/console/backups/upload", data={"csrf": web.csrf("/console/backups"), "secret": kit},
                               files={"backup": (file.name, file.read_bytes())})
    assert page.status_code == 200, page.text
    [pending] = web.services.backups.pending.values()
    assert pending.path.stat().st_mode & 0o777 == 0o600


def _token(page: str) -> str:
    found = re.search(r'name="token" value="([^"]+)"', page)
    assert found
    return found.group(1)


def test_an_upload_with_the_wrong_key_or_cancelled_leaves_nothing(web: WebClient, tmp_path: Path) -> None:
    file, kit = _uploaded_backup(web, tmp_path)
    root = web.services.config.data.root.resolve()

    def uploads() -> list[str]:
        return [p.name for p in root.parent.iterdir() if ".upload-" in p.name]

    wrong = web.client.post("/console/backups/upload", follow_redirects=True,
                            data={"csrf": web.csrf("/console/backups"), "secret": backup.new_kit("y").text},
                            files={"backup": (file.name, file.read_bytes())})
    assert "wrong emergency kit" in wrong.text
    assert uploads() == []
    page = web.client.post("/console/backups/upload", data={"csrf": web.csrf("/console/backups"), "secret": kit},
                           files={"backup": (file.name, file.read_bytes())})
    assert "Replace the whole box" in page.text
    assert len(uploads()) == 1
    cancelled = web.post("/console/backups/confirm", {"token": _token(page.text), "confirm": "no"},
                         token_from="/console/backups")
    assert cancelled.status_code == 303
    assert uploads() == []
    assert web.services.backups.current is None
    assert web.services.backups.staged is None


def test_an_upload_larger_than_the_free_space_is_refused_before_it_is_read(web: WebClient) -> None:
    huge = str(200 * 2**30)  # under the route's 256 GiB limit, but it and its unpacked copy fit no disk here
    answer = web.client.post("/console/backups/upload", content=b"x" * 10, headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": huge})
    assert answer.status_code == 413
    assert "free space" in answer.text


def test_download_progress_is_kept_for_the_page(web: WebClient) -> None:
    web.run(backup.make_key, web.services.db, web.services.events, "x")
    made = web.run(backup.create, web.services.db, web.services.events, web.services.config.data)
    got = web.get(f"/console/backups/download/{made.path.name}")
    assert got.content == made.path.read_bytes()
    status = web.get("/console/backups/progress").json()
    assert status["download"] == {"name": made.path.name, "percent": 100, "done": made.size, "total": made.size,
                                  "stage": "done"}
    assert 'id="download-progress"' in web.get("/console/backups").text


def test_restic_repository_set_in_the_console_and_the_newest_backup_sent(web: WebClient, tmp_path: Path) -> None:
    require_program("restic")
    from appliance import backup_restic

    repo = tmp_path / "restic-repo"
    password = "a restic password for the console"
    saved = web.post("/console/backups/restic", {"repo": str(repo), "password": password},
                     token_from="/console/backups")
    assert saved.status_code == 303
    page = web.get("/console/backups").text
    assert "restic repository made and set" in page
    assert f"Sending to <code>{repo}</code>" in page
    assert password not in page
    # Saved again without the password: the one set is kept.
    web.post("/console/backups/restic", {"repo": str(repo), "password": ""}, token_from="/console/backups")
    assert web.run(backup_restic.read_target, web.services.db) == backup_restic.Target(str(repo), password)
    web.run(backup.make_key, web.services.db, web.services.events, "x")
    made = web.run(backup.create, web.services.db, web.services.events, web.services.config.data)
    sent = web.post("/console/backups/restic-send", {}, token_from="/console/backups")
    assert sent.status_code == 303
    wait_for(web, "sent to the restic repository")
    [snap] = web.run(backup_restic.list_snapshots, web.services.db)
    assert snap.paths[0].endswith(made.path.name)
    assert password not in repr(web.run(web.services.db.fetchall, "SELECT * FROM events"))
    off = web.post("/console/backups/restic", {"repo": str(repo), "off": "yes"}, token_from="/console/backups")
    assert off.status_code == 303
    assert web.run(backup_restic.read_target, web.services.db) is None


def test_an_upload_nobody_confirms_is_removed_when_its_time_is_up(web: WebClient, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """It was removed only at the next upload or confirmation, which may never come: an administrator
    who left the confirmation page left a backup-sized file beside the data directory."""
    file, kit = _uploaded_backup(web, tmp_path)
    root = web.services.config.data.root.resolve()
    monkeypatch.setattr(backup, "PENDING_TTL", 0.2)
    page = web.client.post("/console/backups/upload", data={"csrf": web.csrf("/console/backups"), "secret": kit},
                           files={"backup": (file.name, file.read_bytes())})
    assert "Replace the whole box" in page.text
    [pending] = web.services.backups.pending.values()
    assert pending.path.exists()
    wait_until(lambda: not pending.path.exists(), seconds=10, what="the unconfirmed upload removed")
    assert web.services.backups.pending == {}
    assert not [p for p in root.parent.iterdir() if ".upload-" in p.name]
