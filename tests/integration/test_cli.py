"""The `letterbox` command as a user runs it: clear one-line errors, non-zero exit on bad input."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LETTERBOX


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
    added = run(data, "user", "add", "Alice@Example.org", "--name", "Alice", "--quota", "1G",
                "--password-stdin", stdin="correct horse battery staple\n")
    assert added.returncode == 0, added.stderr
    listing = run(data, "user", "list").stdout
    assert "alice@example.org" in listing and "1024M" in listing
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
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, args: tuple[str, ...], stdin: str | None,
                                        needle: str) -> None:
    data = tmp_path / "data"
    assert run(data, "domain", "add", "example.org").returncode == 0
    assert_one_line_error(run(data, *args, stdin=stdin), needle)


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
