"""The fast paths of describing a message for the message cache give what the exact ones give: the
in-memory scan (mime.scan_bytes) the line reader's Part tree, the leaves' remembered BODYSTRUCTURE
text (fetch._leaf_text) what rendering their fields gives, describe() of a small file (read whole)
the streamed row. Over the MIME corpus, the benchmark's messages, and mangled and generated ones."""

from __future__ import annotations

import io
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap import fetch, fetch_cache, mime
from appliance.imap.limits import MAX_HEADER_OCTETS
from appliance.imap.mime import Part, scan, scan_bytes
from appliance.imap.responses import Raw, Value, render_value
from bench import corpus

CORPUS = Path(__file__).parent.parent / "corpus" / "mime"
SAMPLES = [path.read_bytes() for path in sorted(CORPUS.glob("*.eml"))] + [
    corpus.message(n, "reader@bench.test") for n in range(24)]
# What a mangling inserts: line ends, delimiter-like lines, type fields that open parts.
PIECES = (b"\r\n", b"\r\n\r\n", b"--", b"-- ", b"\r", b"\n", b" ", b"\t", b":",
          b"Content-Type: multipart/mixed; boundary=x\r\n", b"\r\n--x\r\n", b"\r\n--x--\r\n",
          b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n")
_DELIMITER = re.compile(rb"\r?\n(--[^\r\n]*)")


def _tree(part: Part) -> tuple[object, ...]:
    """What a Part holds, its header fields included (a Message has no equality of its own)."""
    headers = part.headers
    return (part.header, part.body, list(headers.raw_items()), headers.get_default_type(), part.maintype,
            part.subtype, part.lines, part.complete, part.placeholder, [_tree(c) for c in part.children])


def _exact_structures(part: Part) -> tuple[Value, Value]:
    """body_structures with every leaf's fields read and rendered (no remembered text)."""
    if part.is_multipart:
        pairs = [_exact_structures(c) for c in part.children]
        headers = part.headers
        subtype = fetch._spelled_type(part)[1]
        return ([Raw(b"".join(render_value(e) for e, _ in pairs)), subtype, fetch._params(headers) or None,
                 fetch._disposition(headers), fetch._language(headers), fetch._nstring(headers, "Content-Location")],
                [Raw(b"".join(render_value(b) for _, b in pairs)), subtype])
    return fetch._part_structures(part)


def _check(data: bytes) -> None:
    root = scan(io.BytesIO(data))
    assert _tree(scan_bytes(data)) == _tree(root)
    assert [render_value(v) for v in fetch.body_structures(root)] == [render_value(v) for v in _exact_structures(root)]
    stamp = (len(data), 0, 0)
    assert fetch_cache.describe(io.BytesIO(data), stamp) == fetch_cache._row(
        root, data[:min(root.header.end, MAX_HEADER_OCTETS)], stamp)


def _mangled(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        choice = rng.random()
        if choice < 0.3:
            del out[at:at + rng.randint(1, 20)]
        elif choice < 0.85:
            delimiters = _DELIMITER.findall(bytes(out))
            piece = (rng.choice(delimiters) + rng.choice((b"", b"--", b"  "))
                     if delimiters and rng.random() < 0.6 else rng.choice(PIECES))
            out[at:at] = (b"\r\n" if rng.random() < 0.7 else b"") + piece + (b"\r\n" if rng.random() < 0.7 else b"")
        else:
            del out[at:]
    return bytes(out)


@pytest.mark.parametrize("data", SAMPLES, ids=range(len(SAMPLES)))
def test_samples(data: bytes) -> None:
    _check(data)
    _check(data.replace(b"\r\n", b"\n"))  # the line reader's own cases (bare LF) go to it


def test_mangled_samples() -> None:
    rng = random.Random(19)
    memory = 0
    for _ in range(1500):
        data = _mangled(rng.choice(SAMPLES).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), rng)
        _check(data)
        try:
            mime._MemoryScan(data, data.count(b"\n")).part([], 0, "text/plain")
            memory += data.count(b"\n") == data.count(b"\r\n")
        except mime._Doubtful:
            pass
    assert memory > 1000  # most of them took the memory path


_LINE = st.sampled_from([
    b"", b"--b", b"--b--", b"--b  ", b"--c", b"--c--", b"--", b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: multipart/alternative; boundary=\"c\"", b"Content-Type: message/rfc822", b"Content-Type: text/plain",
    b"Content-Type: multipart/digest; boundary=c", b"Content-Transfer-Encoding: base64", b"Subject: x", b" folded",
    b"text", b"From someone", b":", b"X: y\r", b"=?utf-8?q?a?=",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINE, max_size=30), st.booleans())
def test_generated(lines: list[bytes], final_line_end: bool) -> None:
    data = b"\r\n".join(lines) + (b"\r\n" if final_line_end else b"")
    _check(data)


def test_long_header_and_line_go_to_the_line_reader() -> None:
    long_header = b"Content-Type: multipart/mixed; boundary=b\r\n" + b"X: " + b"y" * mime.HEADER_PROBE + b"\r\n\r\n--b\r\n\r\nz\r\n--b--\r\n"
    long_line = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n--" + b"b" * mime.READ_LIMIT + b"\r\n--b--\r\n"
    for data in (long_header, long_line):
        with pytest.raises(mime._Doubtful):
            mime._MemoryScan(data, data.count(b"\n")).part([], 0, "text/plain")
        _check(data)


def test_large_file_streamed(tmp_path: Path) -> None:
    """A file above WHOLE_READ is scanned from the file, as before; the row is the same."""
    attachment = b"QUJD" * (fetch_cache.WHOLE_READ // 3)
    data = (b"Subject: big\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"hi\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b"\r\n".join(attachment[i:i + 76] for i in range(0, len(attachment), 76)) + b"\r\n--b--\r\n")
    assert len(data) > fetch_cache.WHOLE_READ
    path = tmp_path / "big"
    path.write_bytes(data)
    with path.open("rb") as f:
        streamed = fetch_cache.describe(f, (len(data), 0, 0))
    assert streamed == fetch_cache.describe_bytes(data, (len(data), 0, 0))


_PARAMETER_TEXT = st.lists(st.sampled_from([" ", "\t", '"', "=", "x", "a b", "\\", "<", ">", "'", "*", ";", "\r\n ",
                                            '"x"', "=_b1", "<x>", '""', "\x0b", "\x85", "\xe9", "\xa0"]), max_size=5)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["multipart/mixed", "multipart/alternative ", "multipart/x=y", '"multipart/mixed"']),
       st.sampled_from([";", "; ", ";\r\n\t", ""]), st.sampled_from(["boundary", "BOUNDARY", " Boundary", "boundary*", "b"]),
       _PARAMETER_TEXT, _PARAMETER_TEXT)
def test_plain_boundary(kind: str, semicolon: str, name: str, before: list[str], after: list[str]) -> None:
    """mime._plain_boundary gives what compat32's get_param gives, or leaves it to it."""
    value = kind + semicolon + name + "".join(before) + "=" + "".join(after)
    headers = mime.parse_header(b"Content-Type: " + value.encode("utf-8") + b"\r\n")
    plain = mime._plain_boundary(headers.get("Content-Type"))
    assert plain is None or plain == headers.get_param("boundary")


# What a parameter list is made of: names, separators, values quoted or not, blanks, comments, escapes.
_PARAM_PIECES = st.sampled_from(["text/plain", "multipart/mixed", ";", "; ", " ;", "=", " = ", '"', "\\", "(",
                                 ")", " ", "\t", "\x0b", "\x1c", "\r\n ", "\n\t", "charset", "name", "Boundary",
                                 "format", "a*", "x*0*", "utf-8", "=_b0001", "scan 1.pdf", "'", "\udcff", "é", ""])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PARAM_PIECES, max_size=14))
def test_simple_params_match_the_character_loop(pieces: list[str]) -> None:
    value = "".join(pieces)
    assert fetch.parse_params(value) == fetch._scanned_params(mime.unfold(value))


@pytest.mark.parametrize("value", [
    'text/plain; charset=utf-8', 'text/plain; charset="utf-8"; format=flowed', 'application/pdf; name="scan1.pdf"',
    'multipart/alternative; boundary="=_b000001"', 'a/b ; x = y ;z="q;r" ', 'a/b; x=y\x0b', 'a/b; x=', 'a/b; x=""',
    'a/b;; x=y', 'a/b; x=y;', 'a/b; x=a=b', 'a/b; x="a\\"b"', 'a/b; x=(c)y', 'a/b; x*=utf-8\'\'%41'])
def test_simple_params_cases(value: str) -> None:
    assert fetch.parse_params(value) == fetch._scanned_params(mime.unfold(value))


_BLANKS = st.sampled_from(["", " ", "\t", "  ", "\x0b", "\r\n ", "\r\n\t"])
_NAME = st.sampled_from(["charset", "name", "boundary", "Format", "x.y", "a*", "a b", "", "n;", "é"])
_VALUE = st.sampled_from(["utf-8", '"utf-8"', '"a b"', '""', "a b", '"a;b"', "=_b1", '"=_b1"', '"a\\"b"', "a(b)",
                          '"x', "a\x1cb", "a\x1c", "\udcff", '"\udcff"', "", "(c) d"])


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(["text/plain", "multipart/mixed", " a/b ", "a/b=c", '"a/b"', ""]),
       st.lists(st.tuples(_BLANKS, _NAME, _BLANKS, _BLANKS, _VALUE, _BLANKS), min_size=1, max_size=4))
def test_parameter_lists_match_the_character_loop(kind: str, params: list[tuple[str, ...]]) -> None:
    value = kind + "".join(f";{b1}{name}{b2}={b3}{v}{b4}" for b1, name, b2, b3, v, b4 in params)
    assert fetch.parse_params(value) == fetch._scanned_params(mime.unfold(value))


@pytest.mark.parametrize("data", [
    b"x" * 200_000,  # one line, no colon, no line end (an APPEND's literal can be anything)
    b"Subject: a\r\n" + b"x" * 200_000 + b"\r\n\r\nbody\r\n",
    b"x" * 200_000 + b"\n\nbody\n",
], ids=["no-line-end", "after-a-field", "bare-lf"])
def test_a_long_line_without_a_colon_is_described_in_linear_time(data: bytes) -> None:
    """The plain-fields regex looked for a field name's colon from every position of such a line
    and backtracked over the rest of it each time: 1 KB took 21 ms, 70 KB over 20 s, a thread (and
    the GIL) held by one APPEND. A name is now at most 128 characters, taken without backtracking;
    a longer one goes to the line reader, which gives the same answer."""
    start = time.process_time()
    row = fetch_cache.describe_bytes(data, (len(data), 0, 0))
    assert time.process_time() - start < 5  # about 0.15 s here; minutes before
    assert row is not None


def test_a_field_name_longer_than_the_regex_takes_is_still_read() -> None:
    name = b"X-" + b"n" * 200
    data = name + b": long\r\nSubject: kept\r\n\r\nbody\r\n"
    parsed = mime.parse_header(data.split(b"\r\n\r\n")[0] + b"\r\n")
    assert (parsed[name.decode()], parsed["Subject"]) == ("long", "kept")
    assert b'"kept"' in fetch_cache.describe_bytes(data, (len(data), 0, 0)).envelope
