"""Mailbox names and LIST patterns (RFC 3501 5.1, 6.3.8)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap.names import Wildcards, canonical, invalid_reason, pattern_regex, with_parents
from appliance.imap.responses import encode_astring

NAMES = ["INBOX", "Sent", "Archive", "Archive/2023", "Archive/2024", "Archive/2024/Q1", "Work/Projects"]


def matching(reference: str, pattern: str) -> list[str]:
    regex = pattern_regex(reference, pattern)
    return [n for n in with_parents(NAMES) if regex.match(n)]


@pytest.mark.parametrize(("reference", "pattern", "expected"), [
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


@pytest.mark.parametrize(("name", "ok"), [
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


def _reference_regex(pattern: str) -> re.Pattern[str]:
    """The backtracking translation the matcher replaced: right, but exponential on some patterns."""
    body = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.compile(body + r"\Z", re.DOTALL)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab/*%", max_size=8), st.text(alphabet="ab/", max_size=10))
def test_wildcards_agree_with_a_regex(pattern: str, name: str) -> None:
    assert Wildcards(pattern).match(name) == bool(_reference_regex(pattern).match(name))


@pytest.mark.parametrize(("pattern", "short_match"), [
    ("*%" * 20_000 + "x", False),
    ("*" * 5_000, True),
    ("%" * 30_000 + "x", False),
    ("a*" * 10_000 + "b", False),
    ("*a" * 127 + "*", True),
    ("*a" * 10_000, False),
])
def test_pathological_patterns_match_in_linear_time(pattern: str, short_match: bool) -> None:
    # Issue 10 item 4: a regex built from these backtracked for seconds per name, on the event loop.
    name = "a" * 200 + "/" + "a" * 54
    regex = pattern_regex("", pattern)
    started = time.process_time()
    for _ in range(100):
        regex.match(name)
    # 100 matches of a 255-character name; the regex needed minutes. A generous bound (CPU time).
    assert time.process_time() - started < 5.0
    assert regex.match("a/" * 127 + "a") is short_match


def test_listing_many_folders_costs_linear_time() -> None:
    # Each implied parent used to be checked for children against every folder (quadratic), and all
    # of it ran on the event loop; big listings now go to a thread, and must be cheap anyway.
    from appliance.imap.session import _ListJob
    from appliance.store.model import FolderInfo

    folders = {f"Group{n}/Leaf": FolderInfo(f"Group{n}/Leaf", None, True, False) for n in range(10_000)}
    job = _ListJob("", ("*", "%/%"), folders, set(), False, False, False, False)
    started = time.process_time()
    lines = job.lines(list(folders))
    assert time.process_time() - started < 5.0
    assert len(lines) == 20_000
    assert 'LIST (\\Noselect \\HasChildren) "/" Group0' in lines
    assert 'LIST (\\HasNoChildren) "/" Group0/Leaf' in lines
