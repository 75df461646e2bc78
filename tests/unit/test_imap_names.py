"""Mailbox names and LIST patterns (RFC 3501 5.1, 6.3.8)."""

from __future__ import annotations

import pytest

from appliance.imap.names import canonical, invalid_reason, pattern_regex, with_parents
from appliance.imap.responses import encode_astring

NAMES = ["INBOX", "Sent", "Archive", "Archive/2023", "Archive/2024", "Archive/2024/Q1", "Work/Projects"]


def matching(reference: str, pattern: str) -> list[str]:
    regex = pattern_regex(reference, pattern)
    return [n for n in with_parents(NAMES) if regex.match(n)]


@pytest.mark.parametrize("reference,pattern,expected", [
    ("", "*", ["INBOX", "Sent", "Archive", "Archive/2023", "Archive/2024", "Archive/2024/Q1", "Work/Projects",
               "Work"]),
    ("", "%", ["INBOX", "Sent", "Archive", "Work"]),
    ("", "Archive/%", ["Archive/2023", "Archive/2024"]),
    ("Archive/", "%", ["Archive/2023", "Archive/2024"]),
    ("Archive", "%", ["Archive/2023", "Archive/2024"]),
    ("", "Archive*", ["Archive", "Archive/2023", "Archive/2024", "Archive/2024/Q1"]),
    ("", "inbox", ["INBOX"]),
    ("", "In%", ["INBOX"]),
    ("", "%/%", ["Archive/2023", "Archive/2024", "Work/Projects"]),
    ("", "Nope", []),
])
def test_patterns(reference: str, pattern: str, expected: list[str]) -> None:
    assert matching(reference, pattern) == expected


def test_implied_parents() -> None:
    assert with_parents(["a/b/c", "x"]) == {"a/b/c": True, "a": False, "a/b": False, "x": True}


def test_canonical() -> None:
    assert canonical("inbox") == "INBOX"
    assert canonical("Inbox/Sub") == "INBOX/Sub"
    assert canonical("Sent") == "Sent"


@pytest.mark.parametrize("name,ok", [
    ("Sent", True), ("Archive/2024", True), ("&AOQ-nderungen", True), ("Stra&AN8-e/x", True),
    ("", False), ("a//b", False), ("/a", False), ("a/", False), ("a*", False), ("a%b", False),
    ("Mr. Smith", False), (".hidden", False), ("bad&name", False), ("Zoë", False), ("x" * 300, False),
])
def test_valid_names(name: str, ok: bool) -> None:
    assert (invalid_reason(name) is None) == ok


def test_list_names_are_astrings() -> None:
    assert encode_astring("INBOX") == b"INBOX"
    assert encode_astring("Sent Items") == b'"Sent Items"'
    assert encode_astring("NIL") == b'"NIL"'
    assert encode_astring('a"b') == b'"a\\"b"'
