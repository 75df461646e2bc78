"""FETCH rendering (ENVELOPE, BODY, BODYSTRUCTURE, sections) against a corpus of real-world MIME messages.

tests/corpus/mime/expected.json holds what Dovecot 2.3 (the reference server) answers for every
message and section of the corpus (regenerate.py there made it). Letterbox must answer the same,
byte for byte, except in the few places listed in DELIBERATE_DIFFERENCES.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap import fetch as fetching
from appliance.imap.commands import BodySection, Fetch, FetchItem, Section
from appliance.imap.fetch import (
    FileSlice,
    MessageFacts,
    body_structure,
    envelope,
    header_fields,
    internaldate,
    item_values,
    to_crlf,
)
from appliance.imap.mime import Span, scan
from appliance.imap.parser import parse_command
from appliance.imap.responses import FetchResponse, Streamed, render_value

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "mime"
EXPECTED: dict[str, dict[str, str]] = json.loads((CORPUS / "expected.json").read_text())

# Where we answer differently from Dovecot on purpose, with the reason.
DELIBERATE_DIFFERENCES = {
    # A base64-encoded message/rfc822 (seen in bounces): Dovecot parses the base64 as a header and
    # so keeps the line end before the next delimiter in the part (42 octets, 1 line); we keep to
    # RFC 2046 5.1.1 (that line end belongs to the delimiter: 40 octets, 0 lines).
    ("16_base64_rfc822.eml", "BODYSTRUCTURE"),
    ("16_base64_rfc822.eml", "BODY"),
    ("16_base64_rfc822.eml", "BODY.PEEK[3]"),
}


def fetch_items(text: str) -> tuple[FetchItem, ...]:
    command = parse_command([f"a FETCH 1 ({text})".encode()])
    assert isinstance(command, Fetch)
    return command.items


def render_item(data: bytes, item_text: str) -> bytes:
    f = io.BytesIO(data)
    root = scan(f)
    facts = MessageFacts(7, ("\\Seen",), root.body.wire_end, 0)
    values = item_values(fetch_items(item_text), facts, f, root, reopen=lambda: io.BytesIO(data))
    return FetchResponse(1, tuple(values)).to_bytes()


CASES = sorted((name, item) for name, items in EXPECTED.items() for item in items)


@pytest.mark.parametrize(("name", "item"), CASES, ids=[f"{n[:2]}:{i}" for n, i in CASES])
def test_matches_dovecot(name: str, item: str) -> None:
    data = (CORPUS / name).read_bytes()
    dovecot = re.sub(r"^UID \d+ ", "", EXPECTED[name][item]).encode("latin-1")
    ours = render_item(data, item)
    expected = b"* 1 FETCH (" + dovecot + b")\r\n"
    if (name, item) in DELIBERATE_DIFFERENCES:
        assert ours != expected
        return
    assert ours == expected


def test_every_corpus_message_has_expectations() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.eml")) == sorted(EXPECTED)


# --- our own answers where we differ, and edge cases the corpus does not cover --------------------

def structure(data: bytes, extensible: bool = True) -> bytes:
    return render_value(body_structure(scan(io.BytesIO(data)), extensible))


def test_multipart_without_parts_keeps_its_type_with_one_empty_part() -> None:
    # Issue 17: as Dovecot, a multipart without a boundary (or without any part) stays a multipart
    # with one empty text/plain part; its text is still BODY[TEXT].
    data = (CORPUS / "07_multipart_no_boundary.eml").read_bytes()
    assert structure(data) == (b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" '
                               b'NIL NIL NIL NIL)')
    assert render_item(data, "BODY.PEEK[1]") == b"* 1 FETCH (BODY[1] {0}\r\n)\r\n"
    assert render_item(data, "BODY.PEEK[TEXT]").endswith(b"--whatever--\r\n)\r\n")


def test_lf_only_message_is_served_with_crlf() -> None:
    crlf = (CORPUS / "04_forwarded_rfc822.eml").read_bytes()
    lf = (CORPUS / "09_lf_only_forwarded.eml").read_bytes()
    assert b"\r\n" not in lf
    for item in ("BODY.PEEK[]", "BODYSTRUCTURE", "BODY.PEEK[2.TEXT]", "BODY.PEEK[]<100.200>", "BODY.PEEK[2.1]"):
        assert render_item(lf, item) == render_item(crlf, item)


def test_large_sections_stream_from_a_file_handle() -> None:
    body = b"x" * 1_000_000
    data = b"Subject: big\r\n\r\n" + body
    f = io.BytesIO(data)
    root = scan(f)
    facts = MessageFacts(1, (), len(data), 0)
    values = item_values(fetch_items("BODY.PEEK[TEXT]"), facts, f, root, reopen=lambda: io.BytesIO(data))
    value = values[0][1]
    assert isinstance(value, Streamed)
    assert value.source.length == len(body)
    assert b"".join(value.source.chunks()) == body


def test_file_slice_partial_and_crlf_across_chunks() -> None:
    data = b"a\nb\r\nc\n" * 50_000  # CR and LF will fall on chunk edges
    wire = to_crlf(data, False)
    f = io.BytesIO(data)
    root = scan(f)
    assert root.header.wire_size + root.body.wire_size == len(wire)
    whole = Span(0, len(data), 0, len(wire))
    for partial in [(0, 10), (3, 1), (99_999, 400_000), (len(wire) - 5, 100), (len(wire) + 5, 10)]:
        sliced = FileSlice(io.BytesIO(data), whole, partial)
        got = b"".join(sliced.chunks())
        assert got == wire[partial[0]:partial[0] + partial[1]]
        assert sliced.length == len(got)


def test_header_fields_keeps_continuations_and_order() -> None:
    header = b"Received: a\r\n\tb\r\nSubject: s\r\n x\r\nX-A: 1\r\nsubject: again\r\n\r\n"
    assert header_fields(header, ("SUBJECT",), False) == b"Subject: s\r\n x\r\nsubject: again\r\n\r\n"
    assert header_fields(header, ("SUBJECT",), True) == b"Received: a\r\n\tb\r\nX-A: 1\r\n\r\n"
    assert header_fields(header, ("NOPE",), False) == b"\r\n"


def test_partial_of_header_fields() -> None:
    data = b"From: a@b.c\r\nSubject: hello\r\n\r\nbody\r\n"
    out = render_item(data, "BODY.PEEK[HEADER.FIELDS (SUBJECT)]<2.5>")
    assert out == b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)]<2> {5}\r\nbject)\r\n"


def test_rfc822_items() -> None:
    data = b"From: a@b.c\r\nSubject: hi\r\n\r\nbody\r\n"
    assert render_item(data, "RFC822.HEADER") == b"* 1 FETCH (RFC822.HEADER {28}\r\nFrom: a@b.c\r\nSubject: hi\r\n\r\n)\r\n"
    assert render_item(data, "RFC822.TEXT") == b"* 1 FETCH (RFC822.TEXT {6}\r\nbody\r\n)\r\n"
    assert render_item(data, "RFC822") == b"* 1 FETCH (RFC822 {34}\r\n" + data + b")\r\n"
    assert render_item(data, "RFC822.SIZE UID FLAGS") == b"* 1 FETCH (RFC822.SIZE 34 UID 7 FLAGS (\\Seen))\r\n"


def test_envelope_defaults_and_empty_fields() -> None:
    data = b"From: a@b.c\r\nSubject:\r\nTo: \r\n\r\n"
    env = render_value(envelope(scan(io.BytesIO(data)).headers))
    # RFC 3501 7.4.2: Sender and Reply-To default to From; an empty To has no addresses.
    assert env == (b'(NIL "" ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL NIL)')


def test_envelope_missing_domain_and_raw_8bit() -> None:
    data = "From: Jörg <joerg>\r\nTo: \"Q\\\"uote\" <q@x.y>\r\n\r\n".encode()
    env = render_value(envelope(scan(io.BytesIO(data)).headers))
    assert b'{5}\r\nJ\xc3\xb6rg NIL "joerg" "MISSING_DOMAIN"' in env
    assert b'("Q\\"uote" NIL "q" "x.y")' in env


def test_nested_message_section_numbers() -> None:
    data = (CORPUS / "04_forwarded_rfc822.eml").read_bytes()
    f = io.BytesIO(data)
    root = scan(f)
    got = item_values([BodySection(Section((2, 2), "MIME"), peek=True)], MessageFacts(1, (), 0, 0), f, root)
    assert render_value(got[0][1]) == b"{27}\r\nContent-Type: text/html\r\n\r\n"


def test_deep_nesting_is_bounded() -> None:
    depth = 200
    data = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(depth)
    ) + b"--b%d\r\n\r\nleaf\r\n" % depth
    out = structure(data)  # no recursion error; parts past the bound are opaque
    assert out.count(b'"mixed"') <= 41


def test_many_parts_are_bounded() -> None:
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 5000 + b"--b--\r\n"
    assert structure(data).count(b'"plain"') <= 2000


def test_binary_garbage_does_not_break_the_scan() -> None:
    import random

    rng = random.Random(7)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
        data = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + data
        structure(data)


def test_internaldate_format() -> None:
    text = internaldate(0)
    assert re.fullmatch(rb'"[ \d]\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"', text)


@pytest.mark.parametrize("block", [3, 4, 5, 7, 16, 61])
def test_block_skipping_gives_the_same_structure(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.imap.mime as mime

    names = sorted(EXPECTED)
    before = {n: structure((CORPUS / n).read_bytes()) for n in names}
    monkeypatch.setattr(mime, "SKIP_BLOCK", block)
    for name in names:
        data = (CORPUS / name).read_bytes()
        assert structure(data) == before[name], name
        for item in ("BODY.PEEK[]", "BODY.PEEK[TEXT]", "BODY.PEEK[1]", "BODY.PEEK[2]"):
            assert render_item(data, item) == render_item_unpatched(data, item, monkeypatch), (name, item)


def render_item_unpatched(data: bytes, item: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    import appliance.imap.mime as mime

    with monkeypatch.context() as m:
        m.setattr(mime, "SKIP_BLOCK", 1024 * 1024)
        return render_item(data, item)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_only_scan_answers_header_items_the_same(name: str) -> None:
    from appliance.imap.fetch import needs_structure
    from appliance.imap.mime import scan_header

    data = (CORPUS / name).read_bytes()
    items = fetch_items("ENVELOPE RFC822.HEADER BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (FROM TO)] "
                        "BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)]<3.40> RFC822.SIZE FLAGS")
    assert not any(needs_structure(i) for i in items)
    facts = MessageFacts(7, ("\\Seen",), len(data), 0)
    full = item_values(items, facts, io.BytesIO(data), scan(io.BytesIO(data)))
    light = item_values(items, facts, io.BytesIO(data), scan_header(io.BytesIO(data)))
    assert FetchResponse(1, tuple(full)).to_bytes() == FetchResponse(1, tuple(light)).to_bytes()


def test_envelope_of_deeply_nested_comments() -> None:
    # email.utils.getaddresses recurses once per nested comment: RecursionError ended the session.
    # The comment names the address, as Dovecot's last comment after an addr-spec does.
    data = b"From: a@b.example " + b"(" * 5000 + b"x" + b")" * 5000 + b"\r\nTo: <c (note) @ d.example>\r\n\r\n"
    env = render_value(envelope(scan(io.BytesIO(data)).headers))
    assert b"(" * 4999 + b"x" + b")" * 4999 + b' NIL "a" "b.example"))' in env
    assert b'((NIL NIL "c" "d.example"))' in env


_FIELD_LINES = st.sampled_from([
    b"Subject: hi", b"From: a@b", b" folded", b"\tfolded", b"X-Other: x", b"Subject : spaced", b"cc:lower",
    b"no colon", b"\xff: v", b":novalue", b"  Subject: indented", b"SUBJECT:", b"From x: y", b"",
    b"\x0bSubject: vt", b"\x0c \x0bSubject: ff", b"Subject\x0c: z", b"X:Y: w", b"x-other : q",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_FIELD_LINES, st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])), max_size=10),
       st.sampled_from([b"\r\n", b"\r\nbody\r\n", b""]),
       st.lists(st.sampled_from(["SUBJECT", "FROM", "CC", "X-OTHER", "NO COLON", "", "SUBJECT ", "X:Y", "X.OTHER"]),
                min_size=1, max_size=3),
       st.booleans())
def test_header_fields_of_a_crlf_block_match_the_line_loop(
        lines: list[tuple[bytes, bytes]], end: bytes, wanted: list[str], exclude: bool) -> None:
    """header_fields' regex for blocks with CRLF line ends only gives what its line loop gives."""
    header = b"".join(a + b for a, b in lines) + end
    names = fetching._wanted_names(tuple(wanted))
    assert header_fields(header, tuple(wanted), exclude) == fetching._line_header_fields(header, names, exclude)


_TOP_ITEMS = "BODY.PEEK[] BODY.PEEK[TEXT] RFC822 RFC822.TEXT BODY.PEEK[]<7.30> BODY.PEEK[TEXT]<0.5> RFC822.SIZE UID"


def _top_answers_the_same(data: bytes) -> None:
    from appliance.imap.fetch import needs_walk, scan_for
    from appliance.imap.mime import scan_top

    items = fetch_items(_TOP_ITEMS)
    assert not any(needs_walk(i) for i in items)
    facts = MessageFacts(7, ("\\Seen",), len(data), 0)
    full = item_values(items, facts, io.BytesIO(data), scan(io.BytesIO(data)))
    top = scan_top(io.BytesIO(data), fields=False)
    assert not top.complete
    assert top.ended
    light = item_values(items, facts, io.BytesIO(data), top)
    assert FetchResponse(1, tuple(full)).to_bytes() == FetchResponse(1, tuple(light)).to_bytes()
    chosen = scan_for(io.BytesIO(data), False, True, False)
    assert (chosen.header, chosen.body, chosen.ended) == (top.header, top.body, True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_top_scan_answers_whole_message_items_the_same(name: str) -> None:
    """BODY[], BODY[TEXT], RFC822 and RFC822.TEXT from scan_top (the top header and the message's end,
    no walk of the parts) are what the whole MIME walk gives, at every block size of its skipping."""
    data = (CORPUS / name).read_bytes()
    _top_answers_the_same(data)


@pytest.mark.parametrize("block", [3, 4, 5, 7, 16])
def test_top_scan_is_the_same_at_any_block_size(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.imap.mime as mime

    monkeypatch.setattr(mime, "SKIP_BLOCK", block)
    for name in sorted(EXPECTED):
        _top_answers_the_same((CORPUS / name).read_bytes())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"Subject: x", b"Content-Type: multipart/mixed; boundary=b", b"--b", b"--b--",
                                 b"", b"text", b"\r", b"x\ry", b"--", b"Content-Type: message/rfc822"]), max_size=25),
       st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b""]), min_size=25, max_size=25))
def test_top_scan_matches_the_walk_for_any_line_ends(lines: list[bytes], ends: list[bytes]) -> None:
    """Bare LFs and CRs anywhere (the wire length counts each bare LF as two octets), delimiters of
    every kind: the top scan's spans are the walk's."""
    _top_answers_the_same(b"".join(line + end for line, end in zip(lines, ends, strict=False)))


def test_body_items_are_not_answered_from_a_header_only_scan() -> None:
    from appliance.imap.mime import scan_header

    data = (CORPUS / "03_mixed_attachment.eml").read_bytes()
    for text in ("BODY.PEEK[]", "BODY.PEEK[TEXT]", "RFC822.TEXT", "BODY.PEEK[1]"):
        with pytest.raises(AssertionError):
            item_values(fetch_items(text), MessageFacts(7, (), len(data), 0), io.BytesIO(data),
                        scan_header(io.BytesIO(data)))
