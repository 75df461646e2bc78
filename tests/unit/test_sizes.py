"""The one size parser behind `letterbox user add --quota` and the console's quota field (issue 10 item 16)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.sizes import MAX_BYTES, format_size, limit_text, parse_size
from web.forms import parse_quota


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("1024", 1024), ("1.5G", 1536 * 1024**2), ("1.5g", 1536 * 1024**2), ("500M", 500 * 1024**2),
    ("2 GiB", 2 * 1024**3), ("2GB", 2 * 1024**3), ("0.5K", 512), (".5k", 512), ("1.T", 1024**4), ("10b", 10),
    (" 3G ", 3 * 1024**3), ("0.1K", 102),
])
def test_sizes_people_type(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_quota(text) == size  # the console reads them the same way


@pytest.mark.parametrize("text", ["", "lots", "-1", "1e3", "1,5G", "1.5X", "G", "1..5G", "١٢", "9" * 41,
                                  "99999999999999T"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_empty_quota_in_the_console_is_no_limit() -> None:
    assert parse_quota("  ") == 0


@given(st.integers(min_value=0, max_value=MAX_BYTES))
def test_format_reads_back(size: int) -> None:
    assert parse_size(format_size(size) or "0") == size


@given(st.text(max_size=60))
def test_any_text_is_a_size_or_a_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert 0 <= parse_size(text) <= MAX_BYTES


def test_limit_text_says_the_limit_both_ways() -> None:
    assert limit_text(36 * 1024 * 1024) == "36 MiB (37748736 octets)"
    assert limit_text(64 * 1024 * 1024) == "64 MiB (67108864 octets)"
    assert limit_text(10_000) == "10000 octets"
