"""The boot partition's reset file as the editors of a family's computers save it (appliance/boot_reset.py)."""

from __future__ import annotations

import codecs

import pytest

from appliance.boot_reset import MAX_BYTES, ResetFileProblem, ResetRequest, read_reset_file

NEW = "a new long password é"


@pytest.mark.parametrize("data", [
    NEW.encode(),
    (NEW + "\n").encode(),
    b"\xef\xbb\xbf" + (NEW + "\r\n").encode(),  # Notepad before Windows 10 1903: BOM and CRLF
    ("\r\n  " + NEW + " \r\n\r\n").encode(),  # blank lines, a space typed after it
    (NEW + "\r").encode(),  # classic Mac line end
    ("\ufeff" + NEW + "\r\n").encode("utf-16-le"),  # Notepad's "Unicode": UTF-16 with its mark
    codecs.BOM_UTF16_BE + (NEW + "\n").encode("utf-16-be"),  # the other byte order, with its mark
    (NEW + "\n" + NEW + "\n").encode(),  # typed twice, as every password form asks
])
def test_the_password_alone(data: bytes) -> None:
    assert read_reset_file(data) == ResetRequest(None, NEW)


def test_a_name_then_the_password() -> None:
    assert read_reset_file(b"\xef\xbb\xbfAlice\r\n" + NEW.encode() + b"\r\n") == ResetRequest("Alice", NEW)


@pytest.mark.parametrize(("data", "said"), [
    (b"", "the file is empty"),
    (b"\xef\xbb\xbf\r\n \r\n", "the file is empty"),
    (b"one\ntwo\nthree\n", "more than two lines"),
    (b"{\\rtf1\\ansi\\ansicpg1252\\cocoartf2709 a new long password}", "Make Plain Text"),
    ("a new long pässword\r\n".encode("cp1252"), "not UTF-8 text"),
    (b"\xff\xfe\x00", "not UTF-8 text"),  # a UTF-16 mark and half a character
    (b"a new\x00long password", "not text"),
    (b"\x1b[31mred\n", "not text"),
    (b"x" * (MAX_BYTES + 1), "larger than"),
])
def test_refused_with_words_for_its_writer(data: bytes, said: str) -> None:
    with pytest.raises(ResetFileProblem, match=said.replace("(", r"\(")) as refused:
        read_reset_file(data)
    assert "long password" not in str(refused.value)  # never the file's own words
