"""Each use-case the CLI and the console share, done once through `letterbox` (its main(), on a data
directory) and once through the web console (real app under starlette's TestClient, logged in as the
admin), from the same starting state: the database rows (ids, timestamps and password hashes left
out), the files (DKIM keys, mail moved aside) and the events come out the same. Both doors call
appliance/admin.py, so a difference here is a drift between them."""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import cli
from appliance.admin import Admin, open_admin
from appliance.passwords import verify_password
from appliance.queue.smarthost import Smarthost
from appliance.queue.spool import Spool
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, DOMAIN, FAST, HOSTNAME, web_client

NEW_PASSWORD = "a brand new long passphrase"
OTHER = "other.test"
QUEUED = "0123456789ABCDEF0123"  # a fixed queue id, so both boxes hold the same queued message


async def _deferred_message(admin: Admin) -> None:
    """One message from alice to a remote address, deferred for a day after a first attempt."""
    await Spool(admin.data.spool, admin.db).enqueue(ALICE, ["someone@elsewhere.test"], b"Subject: hi\r\n\r\nHello.\r\n",
                                                    auth_user=ALICE, queue_id=QUEUED)
    await admin.db.execute("UPDATE queue_recipients SET next_attempt = next_attempt + 86400, attempts = 1,"
                           " last_error = '451 4.3.0 try later'")


async def _base(admin: Admin) -> None:
    """The box past its wizard: an admin, the domain, alice, and a second empty domain."""
    await admin.add_first_admin(ADMIN, ADMIN_PASSWORD)
    await admin.add_domain(DOMAIN)
    await admin.add_domain(OTHER)
    await admin.create_mailbox(ALICE, ALICE_PASSWORD, display_name="Alice")
    await admin.add_alias(f"postmaster@{DOMAIN}", [ALICE])
    # The host name stored, as the wizard leaves it: the CLI reads it, the console is given it.
    for key, value in (("setup_step", "7"), ("setup_done", "1"), ("setup_domain", DOMAIN), ("hostname", HOSTNAME)):
        await admin.db.set_setting(key, value)


@dataclass(frozen=True)
class Case:
    name: str
    cli: list[str]
    web_path: str
    web_form: dict[str, str]
    stdin: str = ""
    extra_start: Callable[[Admin], Awaitable[object]] | None = None
    # (address, password) that must log in afterwards in both databases
    password: tuple[str, str] | None = None
    web_token_from: str = "/console"
    expect_event: str = ""
    web_status: int = 303  # a download answers 200
    # What must come out the same from both data directories' files, beyond the db (and be there)
    files: Callable[[Path], object] | None = None


def _certificate(root: Path) -> object:
    """The certificate the box serves: its names and whether it is self-signed."""
    from cryptography import x509

    from appliance.tls import CERT_FILE, describe

    info = describe(x509.load_pem_x509_certificate((root / "tls" / CERT_FILE).read_bytes()))
    return info.names, info.self_signed


def _kit_written(root: Path) -> object:
    """The emergency kit holds the secret half of the key whose public half the box keeps."""
    from appliance import backup

    with sqlite3.connect(root / "letterbox.db") as db:
        (recipient,) = db.execute("SELECT value FROM settings WHERE key = ?", (backup.RECIPIENT_SETTING,)).fetchone()
    kit = (root.parent / f"{root.name}-kit.txt").read_text(encoding="utf-8")
    return backup.recipient_of(kit) == recipient


CASES = [
    Case("domain add", ["domain", "add", "New.Test"], "/console/domains", {"domain": "new.test"},
         expect_event="domain new.test added"),
    Case("domain remove", ["domain", "remove", OTHER], f"/console/domains/{OTHER}/delete", {},
         expect_event=f"domain {OTHER} removed"),
    Case("mailbox create", ["user", "add", f"bob@{DOMAIN}", "--name", "Bob", "--quota", "1.5G", "--password-stdin"],
         "/console/mailboxes", {"local": "bob", "domain": DOMAIN, "name": "Bob", "quota": "1.5G",
                                "password": NEW_PASSWORD, "password2": NEW_PASSWORD},
         stdin=NEW_PASSWORD + "\n", password=(f"bob@{DOMAIN}", NEW_PASSWORD), expect_event=f"mailbox bob@{DOMAIN} created"),
    Case("mailbox remove", ["user", "remove", ALICE], f"/console/mailboxes/{ALICE}/delete", {},
         extra_start=lambda admin: admin.remove_alias(f"postmaster@{DOMAIN}"), expect_event=f"mailbox {ALICE} removed"),
    Case("mailbox disable", ["user", "disable", ALICE], f"/console/mailboxes/{ALICE}",
         {"name": "Alice", "quota": ""}, expect_event=f"mailbox {ALICE} changed: disabled"),
    Case("mailbox enable", ["user", "enable", ALICE], f"/console/mailboxes/{ALICE}",
         {"name": "Alice", "quota": "", "enabled": "on"},
         extra_start=lambda admin: admin.update_mailbox(ALICE, enabled=False),
         expect_event=f"mailbox {ALICE} changed: enabled"),
    Case("mailbox quota", ["user", "quota", ALICE, "1.5G"], f"/console/mailboxes/{ALICE}",
         {"name": "Alice", "quota": "1.5G", "enabled": "on"}, expect_event=f"mailbox {ALICE} changed: quota 1.5G"),
    Case("password by admin", ["user", "passwd", ALICE, "--password-stdin"], f"/console/mailboxes/{ALICE}/password",
         {"password": NEW_PASSWORD, "password2": NEW_PASSWORD}, stdin=NEW_PASSWORD + "\n",
         password=(ALICE, NEW_PASSWORD), expect_event=f"password of {ALICE} set by an administrator"),
    Case("alias add", ["alias", "add", f"info@{DOMAIN}", ALICE, "someone@elsewhere.test"], "/console/aliases",
         {"local": "info", "domain": DOMAIN, "targets": f"{ALICE}\nsomeone@elsewhere.test"},
         expect_event=f"alias info@{DOMAIN} -> {ALICE}, someone@elsewhere.test created"),
    Case("alias remove", ["alias", "remove", f"postmaster@{DOMAIN}"], f"/console/aliases/postmaster@{DOMAIN}/delete",
         {}, expect_event=f"alias postmaster@{DOMAIN} removed"),
    Case("relay set", ["relay", "set", "relay.example.test", "--port", "2525"], "/console/sending",
         {"mode": "relay", "relay_host": "relay.example.test", "relay_port": "2525", "relay_tls": "starttls",
          "save_untested": "on", "action": "save"},
         expect_event="outbound mail goes through the relay relay.example.test:2525 (starttls)"),
    Case("relay off", ["relay", "off"], "/console/sending", {"mode": "direct", "action": "save"},
         extra_start=lambda admin: admin.set_relay(Smarthost("relay.example.test", 587)),
         expect_event="outbound mail goes directly to each domain's mail server"),
    Case("queue flush", ["queue", "flush"], "/console/sending/retry", {}, extra_start=_deferred_message,
         expect_event="queue flushed: 1 recipient due now"),
    Case("queue flush one", ["queue", "flush", QUEUED], f"/console/sending/{QUEUED}/retry", {},
         extra_start=_deferred_message, expect_event=f"message {QUEUED} flushed: 1 recipient due now"),
    Case("queue delete", ["queue", "delete", QUEUED], f"/console/sending/{QUEUED}/delete", {},
         extra_start=_deferred_message, expect_event=f"message {QUEUED} deleted from the queue (no report sent)"),
    Case("backup key", ["backup", "key", "--kit-to", "{kit}"], "/console/backups/key", {},
         web_token_from="/console/backups", web_status=200, files=_kit_written,
         expect_event="new backup key <backup key>...; emergency kit handed out"),
    Case("certificate self-signed", ["cert", "self-signed"], "/console/certificate/self-signed", {},
         web_token_from="/console/certificate", files=_certificate,
         expect_event=f"self-signed certificate made for {HOSTNAME}"),
]


def _prepare(root: Path, case: Case) -> None:
    async def go() -> None:
        async with open_admin(root, lambda: "mail.example.test", hasher=FAST) as admin:
            await _base(admin)
            if case.extra_start is not None:
                await case.extra_start(admin)

    asyncio.run(go())


def _snapshot(root: Path) -> dict[str, object]:
    with sqlite3.connect(root / "letterbox.db") as db:
        def rows(sql: str) -> list[tuple[object, ...]]:
            return sorted(db.execute(sql).fetchall(), key=repr)

        settings = rows("SELECT key, value FROM settings")
        snapshot: dict[str, object] = {
            "domains": rows("SELECT name FROM domains"),
            "mailboxes": rows("SELECT d.name, m.local_part, m.display_name, m.quota_bytes, m.enabled"
                              " FROM mailboxes m JOIN domains d ON d.id = m.domain_id"),
            "aliases": rows("SELECT d.name, a.local_part, t.target FROM aliases a JOIN domains d ON d.id = a.domain_id"
                            " JOIN alias_targets t ON t.alias_id = a.id"),
            "admins": rows("SELECT username FROM admins"),
            # A DKIM selector is made from the time, a backup key at random: that there is one, not which;
            # the certificate order's state says when it was set.
            "settings": [(k, "<selector>" if str(k).startswith("dkim_selector:") else
                          "<backup key>" if k == "backup_recipient" else
                          re.sub(r'"at": \d+', '"at": <time>', str(v)) if k == "cert_order_state" else v)
                         for k, v in settings],
            # Due now or later: a flush makes the recipient due (its exact time is the clock's).
            "queue": rows("SELECT m.id, m.sender, r.recipient, r.state, r.attempts, r.last_error,"
                          " r.next_attempt <= CAST(strftime('%s', 'now') AS INTEGER) FROM queue_messages m"
                          " JOIN queue_recipients r ON r.message_id = m.id"),
            "events": [(kind, re.sub(r"age1[0-9a-z]+", "<backup key>", text)) for kind, text in
                       db.execute("SELECT kind, text FROM events WHERE text NOT LIKE 'login:%' ORDER BY id")],
        }
    dkim = root / "dkim"
    snapshot["dkim keys"] = sorted((p.parent.name, p.suffix) for p in dkim.rglob("*.key")) if dkim.exists() else []
    snapshot["spool"] = sorted(p.name for p in (root / "spool").rglob("*") if p.is_file())
    deleted = root / "deleted"
    snapshot["moved aside"] = sorted(
        (re.sub(r"^.*?-(mailbox|domain)-", r"\1 ", entry.name), sorted(p.name for p in entry.iterdir()))
        for entry in deleted.iterdir()) if deleted.exists() else []
    return snapshot


def _login_works(root: Path, address: str, password: str) -> bool:
    local, domain = address.split("@")
    with sqlite3.connect(root / "letterbox.db") as db:
        (hashed,) = db.execute("SELECT m.password_hash FROM mailboxes m JOIN domains d ON d.id = m.domain_id"
                               " WHERE d.name = ? AND m.local_part = ?", (domain, local)).fetchone()
    return bool(verify_password(hashed, password))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_and_console_leave_the_same_state(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    by_cli, by_web = tmp_path / "cli", tmp_path / "web"
    _prepare(by_cli, case)
    _prepare(by_web, case)
    assert _snapshot(by_cli) == _snapshot(by_web)

    monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    kit = tmp_path / "cli-kit.txt"
    assert cli.main(["--data", str(by_cli), *(arg.replace("{kit}", str(kit)) for arg in case.cli)]) == 0

    with web_client(by_web) as web:
        web.login(ADMIN, ADMIN_PASSWORD)
        response = web.post(case.web_path, case.web_form, token_from=case.web_token_from)
        assert response.status_code == case.web_status, response.text[:2000]
        if case.web_status == 200:  # the download: kept where the CLI writes its kit
            (tmp_path / "web-kit.txt").write_bytes(response.content)

    after_cli, after_web = _snapshot(by_cli), _snapshot(by_web)
    assert after_cli == after_web
    events = after_cli["events"]
    assert isinstance(events, list)
    assert case.expect_event in [text for _, text in events], events
    if case.files is not None:
        assert case.files(by_cli) == case.files(by_web)
        assert case.files(by_cli)
    if case.password:
        assert _login_works(by_cli, *case.password)
        assert _login_works(by_web, *case.password)


def test_domain_added_by_the_cli_signs_its_mail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The drift of issue 12: `letterbox domain add` made no DKIM key (only a later `dns records` did),
    so mail from a domain added on the command line left unsigned. Now the key is there at once, and
    it is the key the queue signs with."""
    from appliance import dkim_keys
    from appliance.db import Database

    data = tmp_path / "data"
    assert cli.main(["--data", str(data), "domain", "add", "signed.test"]) == 0
    assert "added domain signed.test" in capsys.readouterr().out
    keys = list((data / "dkim" / "signed.test").glob("*.key"))
    assert len(keys) == 1

    async def current() -> dkim_keys.DkimKey | None:
        db = await Database.open(data / "letterbox.db")
        try:
            return await dkim_keys.current_key(db, data / "dkim", "signed.test")
        finally:
            await db.close()

    key = asyncio.run(current())
    assert key is not None
    assert keys[0].stem == key.selector


def test_admin_commands_and_one_name_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`letterbox admin ...` acts through the same use-cases as the console, and an admin name is
    judged by one rule (appliance/accounts.py) whether it comes from the CLI or the wizard: a name
    with '@' could never log in (the login form takes it for a mailbox), so both refuse it."""
    from web import wizard

    data = tmp_path / "data"

    def letterbox(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return cli.main(["--data", str(data), *args])

    assert letterbox("admin", "add", "Boss", "--password-stdin", stdin=NEW_PASSWORD + "\n") == 0
    assert letterbox("admin", "add", "second", "--password-stdin", stdin=NEW_PASSWORD + "\n") == 0
    capsys.readouterr()
    assert letterbox("admin", "list") == 0
    assert capsys.readouterr().out.split() == ["boss", "second"]
    assert letterbox("admin", "add", "boss@example.test", "--password-stdin", stdin=NEW_PASSWORD + "\n") == 1
    cli_error = capsys.readouterr().err
    wizard_error = wizard.check_admin_name("boss@example.test")
    assert wizard_error
    assert wizard_error in cli_error
    assert letterbox("admin", "passwd", "boss", "--password-stdin", stdin="yet another long passphrase\n") == 0
    assert letterbox("admin", "remove", "second") == 0
    assert letterbox("admin", "remove", "boss") == 1  # the last one stays
    assert "last admin" in capsys.readouterr().err
    with sqlite3.connect(data / "letterbox.db") as db:
        events = [text for (text,) in db.execute("SELECT text FROM events WHERE kind = 'admins' ORDER BY id")]
    assert events == ["administrator boss created", "administrator second created", "password of admin boss set",
                      "administrator second removed"]


def test_zone_file_is_the_same_from_the_cli_and_the_console(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: the records as a zone-file snippet, one Admin function behind both doors."""
    root = tmp_path / "box"

    async def base() -> None:
        async with open_admin(root, lambda: "mail.example.test", hasher=FAST) as admin:
            await _base(admin)
            await admin.db.set_setting("hostname", "mail.example.test")

    asyncio.run(base())
    capsys.readouterr()
    assert cli.main(["--data", str(root), "dns", "zone", DOMAIN]) == 0
    by_cli = capsys.readouterr().out
    with web_client(root) as web:
        web.login(ADMIN, ADMIN_PASSWORD)
        page = web.get(f"/console/domains/{DOMAIN}")
        assert f'href="/console/domains/{DOMAIN}/zone"' in page.text
        assert '<code class="relative">_dmarc</code>' in page.text
        response = web.get(f"/console/domains/{DOMAIN}/zone")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == f'attachment; filename="{DOMAIN}.zone"'
    assert response.text == by_cli
    assert f"$ORIGIN {DOMAIN}." in by_cli
    assert "._domainkey" in by_cli
