"""The `letterbox` command as a user runs it: clear one-line errors, non-zero exit on bad input."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.conftest import LETTERBOX, ServedBox, pick_port_offset
from tests.support.polling import wait_until


def run(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LETTERBOX, "--data", str(data), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("letterbox: ")
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr


def test_domains_users_aliases_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "domain", "add", "Example.ORG").returncode == 0
    assert run(data, "domain", "list").stdout.split() == ["example.org"]
    added = run(data, "user", "add", "Alice@Example.org", "--name", "Alice", "--quota", "1.5G",
                "--password-stdin", stdin="correct horse battery staple\n")
    assert added.returncode == 0, added.stderr
    listing = run(data, "user", "list").stdout
    assert "alice@example.org" in listing
    assert "\t1.5G" in listing
    with sqlite3.connect(data / "letterbox.db") as db:
        assert db.execute("SELECT quota_bytes FROM mailboxes").fetchone() == (1536 * 1024**2,)
    assert run(data, "alias", "add", "postmaster@example.org", "alice@example.org").returncode == 0
    assert "postmaster@example.org\talice@example.org" in run(data, "alias", "list").stdout
    changed = run(data, "user", "passwd", "alice@example.org", "--password-stdin",
                  stdin="another long passphrase\n")
    assert changed.returncode == 0, changed.stderr
    with sqlite3.connect(data / "letterbox.db") as db:
        (hash_,) = db.execute("SELECT password_hash FROM mailboxes").fetchone()
    assert hash_.startswith("$argon2id$")
    assert "another long passphrase" not in (data / "letterbox.db").read_bytes().decode("latin-1")
    assert run(data, "alias", "remove", "postmaster@example.org").returncode == 0
    assert run(data, "user", "remove", "alice@example.org").returncode == 0
    assert run(data, "user", "list").stdout.strip() == ""


def test_an_empty_list_says_so_in_one_line_on_stderr(tmp_path: Path) -> None:
    """`alias list` with no aliases printed nothing at all, as did `user list` and `domain list`, where
    `backup list` said so: every list command now says it on stderr, its stdout (for scripts) empty."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")  # makes the box
    run(data, "domain", "remove", "example.org")
    empty = {("domain", "list"): "no domains yet: `letterbox domain add NAME` adds one",
             ("admin", "list"): "no administrators yet: `letterbox admin add NAME` adds one",
             ("user", "list"): "no mailboxes yet: `letterbox user add ADDRESS` adds one",
             ("alias", "list"): "no aliases yet: `letterbox alias add SOURCE TARGET...` adds one",
             ("spam", "greylist", "list"): "no greylist entries",
             ("spam", "greylist", "list", "--waiting"): "no greylist entries waiting",
             ("spam", "suspended", "list"): "no mailbox is suspended from sending",
             ("backup", "list"): f"no backups in {data / 'backups'} yet: `letterbox backup create` makes one"}
    for args, note in empty.items():
        listed = run(data, *args)
        assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", note + "\n"), args
    run(data, "domain", "add", "bücher.example")
    assert run(data, "user", "list", "bücher.example").stderr == (
        "no mailboxes in bücher.example (xn--bcher-kva.example) yet: `letterbox user add ADDRESS` adds one\n")
    assert run(data, "alias", "list", "xn--bcher-kva.example").stderr.startswith(
        "no aliases in bücher.example (xn--bcher-kva.example) yet:")
    assert run(data, "domain", "list").stderr == ""


def test_an_international_domain_is_named_as_the_console_names_it(tmp_path: Path) -> None:
    """`domain add bücher.example` answered 'added domain xn--bcher-kva.example' alone; the console
    says 'bücher.example (xn--bcher-kva.example)' (appliance.address.idn, shared), and so does every
    CLI line naming a domain or an address, lists too."""
    data = tmp_path / "data"
    book, book_a = "bücher.example", "xn--bcher-kva.example"
    assert run(data, "domain", "add", book).stdout == f"added domain {book} ({book_a}), with its DKIM key\n"
    assert run(data, "domain", "add", "example.org").stdout == "added domain example.org, with its DKIM key\n"
    assert run(data, "domain", "list").stdout.splitlines() == ["example.org", f"{book} ({book_a})"]  # stored order
    anna = f"anna@{book} (anna@{book_a})"
    added = run(data, "user", "add", f"anna@{book_a}", "--password-stdin", stdin="a long enough password\n")
    assert added.stdout == f"added mailbox {anna}\n"
    assert run(data, "user", "quota", f"anna@{book}", "1G").stdout == f"quota of {anna}: 1G\n"
    assert run(data, "user", "disable", f"anna@{book}").stdout == f"mailbox {anna} disabled\n"
    assert run(data, "user", "list", book).stdout == f"{anna}\t\t1G  (disabled)\n"
    alias = run(data, "alias", "add", f"info@{book}", f"anna@{book}", f"ben@{book}")
    assert alias.stdout == f"added alias info@{book} (info@{book_a}) -> {anna}, ben@{book} (ben@{book_a})\n"
    assert alias.stderr == (f"letterbox: note: ben@{book} (ben@{book_a}) is not a mailbox or alias of this box (yet):"
                            f" mail for info@{book} (info@{book_a}) does not reach it\n")
    assert run(data, "alias", "list").stdout == f"info@{book} (info@{book_a})\t{anna}, ben@{book} (ben@{book_a})\n"
    assert run(data, "dkim", "rotate", book).stdout.startswith(f"new DKIM key for {book} ({book_a}): selector ")
    assert run(data, "alias", "remove", f"info@{book}").stdout == f"removed alias info@{book} (info@{book_a})\n"
    assert run(data, "user", "remove", f"anna@{book}").stdout.startswith(f"removed mailbox {anna}")
    assert run(data, "domain", "remove", book).stdout == f"removed domain {book} ({book_a})\n"


def test_a_refusal_names_an_international_domain_as_the_console_does(tmp_path: Path) -> None:
    """The accounts' refusals, which the console's forms show too, said the domain in xn-- alone."""
    data = tmp_path / "data"
    run(data, "domain", "add", "bücher.example")
    again = run(data, "domain", "add", "BÜCHER.example")
    assert again.stderr == "letterbox: domain bücher.example (xn--bcher-kva.example) already exists\n"
    nope = run(data, "user", "add", "x@nöpe.example", "--password-stdin", stdin="a long enough password\n")
    assert nope.stderr == "letterbox: unknown domain nöpe.example (xn--npe-sna.example): add the domain first\n"
    assert run(data, "alias", "add", "info@nöpe.example", "x@example.org").stderr == nope.stderr
    assert run(data, "domain", "remove", "nöpe.example").stderr == "letterbox: no domain nöpe.example (xn--npe-sna.example)\n"


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (("user", "add", "bob@unknown.test", "--password-stdin"), "a long enough password\n", "domain"),
        (("user", "add", "not an address", "--password-stdin"), "a long enough password\n", "address"),
        (("user", "add", "bob@example.org", "--password-stdin"), "\n", "password"),
        (("user", "add", "bob@example.org", "--password-stdin"), "short\n", "password"),
        (("domain", "add", "example.org"), None, "exists"),
        (("domain", "add", "bad..example"), None, "domain"),
        (("domain", "add", "--", "-bad-.example"), None, "domain"),
        (("user", "remove", "nobody@example.org"), None, "nobody@example.org"),
        (("alias", "add", "x@example.org", "not an address"), None, "address"),
        # Issue 10 item 8: an IP address, or anything not a DNS name, is never a mail domain.
        (("domain", "add", "10.0.0.1"), None, "IP address"),
        (("domain", "add", "192.168.1.5."), None, "IP address"),
        (("domain", "add", "::1"), None, "IP address"),
        (("domain", "add", "1.2.3.4.5"), None, "number"),
        (("domain", "add", "localhost"), None, "dot"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, args: tuple[str, ...], stdin: str | None,
                                        needle: str) -> None:
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.org").returncode == 0
    assert_one_line_error(run(data, *args, stdin=stdin), needle)


@pytest.mark.parametrize("args", [("user", "add", "bob@example.org"), ("user", "passwd", "alice@example.org"),
                                  ("admin", "add", "boss")])
def test_a_password_on_stdin_that_is_not_utf8_gives_one_clear_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A latin-1 password (a script's file, an old terminal) ended in a UnicodeEncodeError traceback
    at hashing, after the address was checked."""
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.org").returncode == 0
    assert run(data, "user", "add", "alice@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    before = run(data, "user", "list").stdout
    result = subprocess.run([LETTERBOX, "--data", str(data), *args, "--password-stdin"],
                            input=b"a long \xe9nough password\n", capture_output=True, timeout=60)
    assert_one_line_error(subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                                      result.stderr.decode()), "not UTF-8")
    assert run(data, "user", "list").stdout == before
    fine = subprocess.run([LETTERBOX, "--data", str(data), *args, "--password-stdin"],
                          input="a long énough password\r\n".encode(), capture_output=True, timeout=60)
    assert fine.returncode == 0, fine.stderr


@pytest.mark.parametrize("args", [("user", "add", "bob@example.org"), ("user", "passwd", "alice@example.org"),
                                  ("admin", "add", "boss")])
def test_a_password_of_more_than_one_line_on_stdin_gives_one_clear_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    """--password-stdin took the first line and dropped the rest: 'correct horse' NL 'battery staple' made
    the password 'correct horse' (long enough for the policy), and the owner's 'correct horse battery
    staple' never worked. A password cannot hold a line break (the policy refuses control characters), so
    input of more than one line is refused, nothing changed; one line with or without its line end is
    the password."""
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.org").returncode == 0
    assert run(data, "user", "add", "alice@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    with sqlite3.connect(data / "letterbox.db") as db:
        before = db.execute("SELECT local_part, password_hash FROM mailboxes ORDER BY local_part").fetchall()
    for stdin in ("correct horse\nbattery staple\n", "correct horse battery\n\n", "correct horse battery\r\nmore"):
        assert_one_line_error(run(data, *args, "--password-stdin", stdin=stdin), "more than one line")
    with sqlite3.connect(data / "letterbox.db") as db:
        assert db.execute("SELECT local_part, password_hash FROM mailboxes ORDER BY local_part").fetchall() == before
    assert "boss" not in run(data, "admin", "list").stdout
    fine = run(data, *args, "--password-stdin", stdin="correct horse battery staple")
    assert fine.returncode == 0, fine.stderr


def test_duplicate_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    first = run(data, "user", "add", "bob@example.org", "--password-stdin", stdin="a long enough password\n")
    assert first.returncode == 0, first.stderr
    again = run(data, "user", "add", "BOB@example.org", "--password-stdin", stdin="a long enough password\n")
    assert_one_line_error(again, "exists")


def test_password_prompt_needs_a_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    result = run(data, "user", "add", "bob@example.org", stdin="")
    assert_one_line_error(result, "--password-stdin")


def run_into_closed_pipe(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run with stdout a real pipe whose reader has already gone (`letterbox ... | head` after head has
    exited): every write to it fails with EPIPE."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [LETTERBOX, "--data", str(data), *args], input=stdin, stdout=writer, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )
    finally:
        os.close(writer)


def test_a_closed_stdout_ends_every_command_quietly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.org").returncode == 0
    commands: list[tuple[tuple[str, ...], str]] = [
        (("user", "add", "alice@example.org", "--password-stdin"), "a long enough password\n"),
        (("user", "list"), ""),
        (("domain", "list"), ""),
        (("alias", "add", "info@example.org", "alice@example.org"), ""),
        (("alias", "list"), ""),
        (("queue", "list"), ""),
        (("dns", "records", "example.org"), ""),
        (("relay", "show"), ""),
        (("--help",), ""),
        (("user", "--help"), ""),
    ]
    for args, stdin in commands:
        result = run_into_closed_pipe(data, *args, stdin=stdin)
        # argparse already swallows a failed write of its help (and exits 0); everything else is ours.
        expected = 0 if "--help" in args else 141
        assert result.returncode == expected, (args, result.returncode, result.stderr)
        assert result.stderr == "", (args, result.stderr)
    # The commands that change something still did it, before finding nobody to tell.
    assert "alice@example.org" in run(data, "user", "list").stdout
    assert "info@example.org" in run(data, "alias", "list").stdout


def test_serve_keeps_serving_after_its_stdout_reader_went_away(tmp_path: Path, ca: trustme.CA) -> None:
    box = ServedBox(tmp_path, ca)
    box.offset = pick_port_offset()
    reader, writer = os.pipe()
    os.close(reader)
    with box.log_path.open("wb") as log:
        proc = subprocess.Popen(
            [LETTERBOX, "serve", "--listen", "127.0.0.1", "--port-offset", str(box.offset),
             "--hostname", "mx.test"],
            stdout=writer, stderr=log, env=box.env(),
        )
    os.close(writer)
    try:
        def started() -> bool:
            # The log line written after the signal handlers are in place (the announce lines went nowhere).
            assert proc.poll() is None, box.log_path.read_text()
            return b"letterbox.events: start:" in box.log_path.read_bytes()

        wait_until(started, seconds=30, what="the start event in the log of serve")
        with socket.create_connection(("127.0.0.1", box.port("pop3")), timeout=10) as conn:
            assert conn.recv(100).startswith(b"+OK")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stderr = box.log_path.read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "BrokenPipe" not in stderr, stderr


def test_bad_quota_says_what_a_size_looks_like(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    result = run(data, "user", "add", "bob@example.org", "--quota", "lots", "--password-stdin",
                 stdin="a long enough password\n")
    assert result.returncode != 0
    assert "not a size: 'lots'" in result.stderr
    assert "1.5G" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("quota", ["0.5", "0.0000001K", ".9b"])
def test_a_quota_below_one_byte_is_refused_not_taken_as_no_limit(tmp_path: Path, quota: str) -> None:
    """'0.5' (meant as half a gigabyte) was 0 bytes once its fraction was dropped, and 0 is no limit:
    the mailbox a quota was meant to bound got none. Nothing is changed."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert run(data, "user", "add", "bob@example.org", "--quota", "1G", "--password-stdin",
               stdin="a long enough password\n").returncode == 0
    for args in (("user", "quota", "bob@example.org", quota),
                 ("user", "add", "carol@example.org", "--quota", quota, "--password-stdin")):
        result = run(data, *args, stdin="a long enough password\n")
        assert result.returncode == 2, result.stderr
        assert f"less than one byte: {quota!r}" in result.stderr
        assert "Traceback" not in result.stderr
    assert run(data, "user", "list").stdout.split() == ["bob@example.org", "1G"]


@pytest.mark.parametrize(("args", "needle"), [
    (("smtp.example.net:587",), "--port"),  # its port typed with the name: DNS was asked for 'smtp.example.net:587'
    (("[smtp.example.net]",), "host name or address"),
    (("smtp.example.net", "--ca-file", "{missing}"), "cannot use the CA file"),
    (("smtp.example.net", "--ca-file", "{not_pem}"), "cannot use the CA file"),
])
def test_a_relay_given_wrongly_is_refused_with_one_line_and_nothing_saved(
        tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    """Both were saved, and then every outbound message was deferred: a name with its port in it
    never resolves, and a CA file that is missing or holds no certificate failed each delivery's TLS
    set-up. Checked as the relay is set, one line, nothing saved."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    files = {"missing": str(tmp_path / "missing.pem"), "not_pem": str(not_pem)}
    result = run(data, "relay", "set", *(arg.format(**files) for arg in args))
    assert_one_line_error(result, needle)
    assert run(data, "relay", "show").stdout.startswith("no relay")


@pytest.mark.parametrize("offset", ["70000", "-25", "ten"])
def test_a_port_offset_that_leaves_the_ports_is_refused_before_anything_starts(tmp_path: Path, offset: str) -> None:
    """`serve --port-offset 70000` ended in a traceback from bind(), and -25 put SMTP on port 0, a port
    the kernel picks at random."""
    data = tmp_path / "data"
    result = run(data, "serve", "--port-offset", offset)
    assert result.returncode == 2
    assert "argument --port-offset:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()


@pytest.mark.parametrize("name", ["a b", "x" * 300 + ".org", "mail..example.org"])
def test_a_host_name_that_is_no_dns_name_is_refused_before_anything_starts(tmp_path: Path, name: str) -> None:
    """`serve --hostname 'a b'` was taken, and every SMTP client was greeted '220 a b ESMTP'."""
    data = tmp_path / "data"
    result = run(data, "serve", "--listen", "127.0.0.1", "--port-offset", str(pick_port_offset()), "--hostname", name)
    assert result.returncode == 2
    assert "argument --hostname: not a valid domain name" in result.stderr
    assert not data.exists()


def test_alias_and_mailbox_never_share_an_address(tmp_path: Path) -> None:
    """Issue 10 item 10: an alias named like a mailbox would take all of its mail; refused both ways."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert run(data, "user", "add", "bob@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    assert_one_line_error(run(data, "alias", "add", "Bob@example.org", "eve@elsewhere.test"), "is a mailbox")
    # Explicitly keeping a copy is a forward, not a takeover.
    kept = run(data, "alias", "add", "bob@example.org", "bob@example.org", "bob@elsewhere.test")
    assert kept.returncode == 0, kept.stderr
    assert run(data, "alias", "add", "sales@example.org", "bob@example.org").returncode == 0
    again = run(data, "user", "add", "sales@example.org", "--password-stdin", stdin="a long enough password\n")
    assert_one_line_error(again, "already an alias")


def test_an_alias_that_delivers_only_to_itself_is_refused(tmp_path: Path) -> None:
    """loop@ -> loop@ with no mailbox there was made and then refused every message ('No such user
    here'); found by newuser36's walkthrough in the console. With another target, or a mailbox of that
    name (a copy kept), it is an alias like any other."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert_one_line_error(run(data, "alias", "add", "loop@example.org", "Loop@example.org"), "only to itself")
    assert run(data, "alias", "list").stdout == ""
    made = run(data, "alias", "add", "loop@example.org", "loop@example.org", "bob@elsewhere.test")
    assert made.returncode == 0, made.stderr
    assert run(data, "user", "add", "kept@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    assert run(data, "alias", "add", "kept@example.org", "kept@example.org").returncode == 0


def test_an_alias_to_no_mailbox_is_made_with_a_note(tmp_path: Path) -> None:
    """`alias add sales@ alcie@` (a typo) was made without a word, and mail for sales@ then got "No such
    user here"; it is still made (the mailbox may come next), with a note saying where mail does not go."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert run(data, "user", "add", "alice@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    made = run(data, "alias", "add", "sales@example.org", "alcie@example.org", "bob@elsewhere.test")
    assert made.returncode == 0, made.stderr
    assert made.stderr == ("letterbox: note: alcie@example.org is not a mailbox or alias of this box (yet): mail for"
                           " sales@example.org does not reach it\n")
    fine = run(data, "alias", "add", "info@example.org", "alice@example.org", "sales@example.org")
    assert (fine.returncode, fine.stderr) == (0, "")


def test_removing_a_mailbox_an_alias_delivers_to_says_so(tmp_path: Path) -> None:
    """`user remove` of the catch-all's only target left the domain refusing all other mail without a word."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert run(data, "user", "add", "carol@example.org", "--password-stdin", stdin="a long enough password\n").returncode == 0
    assert run(data, "alias", "add", "@example.org", "carol@example.org").returncode == 0
    removed = run(data, "user", "remove", "carol@example.org")
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr.splitlines()[-1] == ("letterbox: note: carol@example.org is not a mailbox or alias of this"
                                               " box (yet): mail for @example.org does not reach it")


def test_removed_mailbox_mail_is_moved_aside_and_the_address_starts_empty(tmp_path: Path) -> None:
    """Issue 10 item 1, from the CLI: the Maildir leaves mail/ for deleted/, so the same address created
    again sees nothing of it."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    password = "a long enough password\n"
    assert run(data, "user", "add", "jonh@example.org", "--password-stdin", stdin=password).returncode == 0
    maildir = data / "mail" / "example.org" / "jonh"
    (maildir / "new").mkdir(parents=True)
    (maildir / "new" / "1.M1P1.box").write_bytes(b"Subject: private\r\n\r\njonh's secret\r\n")
    removed = run(data, "user", "remove", "jonh@example.org")
    assert removed.returncode == 0, removed.stderr
    assert "deleted" in removed.stdout
    assert "30 days" in removed.stdout
    assert not maildir.exists()
    [entry] = (data / "deleted").iterdir()
    assert entry.name.endswith("-mailbox-jonh@example.org")
    assert (entry / "mail" / "new" / "1.M1P1.box").read_bytes().endswith(b"jonh's secret\r\n")
    assert run(data, "user", "add", "jonh@example.org", "--password-stdin", stdin=password).returncode == 0
    assert not maildir.exists()


def test_removed_domain_takes_its_dkim_keys_along(tmp_path: Path) -> None:
    """Issue 10 item 8: removing a domain left dkim/<domain>/ behind, reused if the name came back."""
    data = tmp_path / "data"
    run(data, "domain", "add", "example.org")
    assert run(data, "dkim", "rotate", "example.org").returncode == 0
    keys = data / "dkim" / "example.org"
    assert list(keys.glob("*.key"))
    assert run(data, "domain", "remove", "example.org").returncode == 0
    assert not keys.exists()
    [entry] = (data / "deleted").iterdir()
    assert entry.name.endswith("-domain-example.org")
    assert list((entry / "dkim").glob("*.key"))
    with sqlite3.connect(data / "letterbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM settings WHERE key LIKE 'dkim_selector:%'").fetchone() == (0,)


def test_version_is_printed() -> None:
    run = subprocess.run([LETTERBOX, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0
    assert re.fullmatch(r"letterbox \d+\.\d+\.\d+\S*\n", run.stdout)


@pytest.mark.parametrize(
    "args",
    [("cert", "status"), ("user", "list"), ("domain", "list"), ("queue", "list"), ("backup", "list"),
     ("spam", "status"), ("relay", "show"), ("update", "status")],
)
def test_a_command_on_a_mistyped_data_directory_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A command that needs a box refuses a --data that names none, with one line and status 1, and
    leaves no directory behind (it used to make a whole new box at the typo)."""
    typo = tmp_path / "letterbx"
    result = run(typo, *args)
    assert_one_line_error(result, "does not exist")
    assert result.returncode == 1
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(empty, *args)
    assert_one_line_error(result, "no letterbox.db")
    assert list(empty.iterdir()) == []


def test_the_first_commands_of_a_box_still_make_it(tmp_path: Path) -> None:
    """`domain add` (the README's scripted setup) and `admin add` (the wizard's first step) make the box
    in a new directory, as `serve` does; a whole-box restore is tested in test_backup_cli.py."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(first, "domain", "add", "example.org").returncode == 0
    assert (first / "letterbox.db").is_file()
    made = run(second, "admin", "add", "root", "--password-stdin", stdin="a long enough password\n")
    assert made.returncode == 0, made.stderr
    assert run(second, "admin", "list").stdout.split() == ["root"]


def test_a_locked_database_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """The running box can hold SQLite's write lock for longer than the CLI's 5 s busy wait on a starved
    machine (seen in the appliance VM): the command says so in one line and changes nothing."""
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.test").returncode == 0
    holder = sqlite3.connect(data / "letterbox.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long transaction of the box holds it
        result = run(data, "domain", "add", "second.example")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_one_line_error(result, "database is locked")
    assert "try again" in result.stderr
    listed = run(data, "domain", "list")
    assert "second.example" not in listed.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="root running the CLI on the box user's data")
@pytest.mark.parametrize("args", [("domain", "add", "two.test"), ("user", "list"), ("serve",)])
def test_root_on_the_box_users_data_is_refused_and_writes_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`sudo letterbox --data /var/lib/letterbox/data domain add two.test` made the domain's DKIM key
    as root, mode 0600, in the data of a box that runs as `letterbox`: the box could not read it. Root
    is now told to run the command as the directory's owner, and nothing is written."""
    data = tmp_path / "data"
    assert run(data, "domain", "add", "one.test").returncode == 0
    nobody = 65534
    for path in (data, *data.rglob("*")):
        os.chown(path, nobody, nobody)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in data.rglob("*"))
    result = run(data, *args)
    assert_one_line_error(result, f"run this as {_user_name(nobody)} (sudo -u {_user_name(nobody)} letterbox --data")
    assert result.returncode == 1
    assert [p for p in (data, *data.rglob("*")) if p.stat().st_uid != nobody] == []
    assert sorted((str(p), p.stat().st_mtime_ns) for p in data.rglob("*")) == before


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
