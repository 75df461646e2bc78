"""The side-by-side benchmark (bench/side_by_side.py, what `make bench` prints) at a tiny size, so it cannot
rot: a private Dovecot and Postfix and Letterbox each started once per row group, every row of the table
filled for both, and both servers' SEARCH answers agreeing on the same messages."""

from __future__ import annotations

import os

import pytest

from bench import side_by_side, wall
from tests.conftest import require_program

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = ["--sizes", "30", "--rounds", "1", "--smtp-messages", "20", "--submissions", "2", "--deliveries", "10",
        "--appends", "3", "--pop3-mib", "1", "--stress-secs", "3", "--timeout", "120", "--settle", "0"]


@pytest.mark.timeout(600)  # minutes on a loaded machine (each interpreter and server start costs seconds)
def test_side_by_side_table_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    for program in ("dovecot", "doveadm", "postfix", "smtp-source"):
        require_program(program)
    assert side_by_side.main(TINY) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| work")]
    for work in ("SMTP in, smtp-source 20", "submission, new connection", "POP3 RETR", "imaptest stress",
                 "IMAP SELECT, cold", "IMAP SELECT, same session", "UID FETCH 1:* (FLAGS)",
                 "FETCH 1:* (ENVELOPE BODYSTRUCTURE)", "Thunderbird's first header fetch", "SEARCH SUBJECT",
                 "SEARCH BODY", "IMAP APPEND", "LMTP delivery", "idle after start: RSS", "after the IMAP runs"):
        assert any(row.startswith(f"| {work}") for row in rows), (work, table)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if "not built" in cells[0]:
            assert not os.path.exists(side_by_side.IMAPTEST)
            continue
        assert cells[2] != "n/a", row
        assert cells[4] != "n/a", row
        assert not cells[2].startswith(">"), row
        if "server CPU per" in cells[0] and "0.00 ms" in (cells[2], cells[4]):
            # 20 messages can cost a server less than one clock tick (10 ms) of CPU: no ratio to give.
            assert cells[5] == "n/a", row
            continue
        assert cells[5].endswith("×"), row  # a ratio for every row
    # 30 messages: numbers 0, 10, 20 have the subject word; number 7 the body word. Both servers agree.
    assert any(row.startswith("| SEARCH SUBJECT (finds 3)") for row in rows), table
    assert any(row.startswith("| SEARCH BODY (finds 1)") for row in rows), table


@pytest.mark.timeout(300)
def test_wall_accounting_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/wall.py (where each far IMAP row's time goes) runs its rows and prints a figure for each."""
    assert wall.main(["--size", "30"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "cold SELECT", "Thunderbird's first header fetch", "FETCH 1:* (ENVELOPE BODYSTRUCTURE), second session",
        "SEARCH SUBJECT"], table
    for row in rows:
        assert int(row.split("|")[2].strip().replace(",", "")) >= 0, row
