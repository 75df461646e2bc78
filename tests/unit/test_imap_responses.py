"""Response values render to the bytes RFC 3501 7 describes."""

from __future__ import annotations

from appliance.imap.responses import (
    Atom,
    Bye,
    Continuation,
    Data,
    FetchResponse,
    LiteralBytes,
    Preformatted,
    Raw,
    Tagged,
    UntaggedStatus,
    Value,
    fetch_line,
    render_value,
)


def test_status_responses() -> None:
    assert Tagged("a1", "OK", "done").to_bytes() == b"a1 OK done\r\n"
    assert Tagged("a1", "NO", "gone", "NONEXISTENT").to_bytes() == b"a1 NO [NONEXISTENT] gone\r\n"
    assert UntaggedStatus("OK", "x", "UIDVALIDITY 5").to_bytes() == b"* OK [UIDVALIDITY 5] x\r\n"
    assert Bye("later").to_bytes() == b"* BYE later\r\n"
    assert Continuation().to_bytes() == b"+ Ready\r\n"
    assert Continuation("").to_bytes() == b"+ \r\n"


def test_human_text_cannot_break_the_line() -> None:
    assert Tagged("a", "NO", "bad\r\nb2 OK injected").to_bytes() == b"a NO bad  b2 OK injected\r\n"


def test_strings_quoted_or_literal() -> None:
    assert render_value(b"plain") == b'"plain"'
    assert render_value(b'say "hi" \\o/') == b'"say \\"hi\\" \\\\o/"'
    assert render_value("Jörg") == b"{5}\r\nJ\xc3\xb6rg"  # 8-bit: a literal
    assert render_value(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert render_value(b"x" * 2000).startswith(b"{2000}\r\n")
    assert render_value(b"") == b'""'
    assert render_value(LiteralBytes(b"hi")) == b"{2}\r\nhi"


def test_values() -> None:
    assert render_value(None) == b"NIL"
    assert render_value(42) == b"42"
    assert render_value(Atom("\\Seen")) == b"\\Seen"
    assert render_value([b"a", None, [1, 2], []]) == b'("a" NIL (1 2) ())'
    assert render_value(Raw(b"(x)(y)")) == b"(x)(y)"


def test_data_and_fetch() -> None:
    assert Data("3 EXISTS").to_bytes() == b"* 3 EXISTS\r\n"
    assert Data("SEARCH 1 2").to_bytes() == b"* SEARCH 1 2\r\n"
    assert Data("LIST", (Atom("()"), b"/", b"INBOX")).to_bytes() == b'* LIST () "/" "INBOX"\r\n'
    fetch = FetchResponse(7, (("UID", 9), ("FLAGS", Atom("(\\Seen)")), ("BODY[]", LiteralBytes(b"hi"))))
    assert fetch.to_bytes() == b"* 7 FETCH (UID 9 FLAGS (\\Seen) BODY[] {2}\r\nhi)\r\n"
    assert Preformatted(b"* 1 FETCH (UID 1)\r\n").to_bytes() == b"* 1 FETCH (UID 1)\r\n"


def test_fetch_line_is_the_fetch_response() -> None:
    items: tuple[tuple[str, Value], ...] = (
        ("UID", 9), ("FLAGS", Atom("(\\Seen)")), ("ENVELOPE", Raw(b'("d" NIL)')), ("X", None), ("Y", b'q"uote'),
        ("Z", "t\u00e9xt"), ("L", [1, [b"a", None], Raw(b"(x)")]), ("BODY[HEADER.FIELDS (FROM)]", LiteralBytes(b"From: a\r\n\r\n")),
        ("BIG", b"x" * 5000), ("CRLF", b"a\r\nb"),
    )
    for count in range(len(items) + 1):
        assert fetch_line(3, items[:count]) == FetchResponse(3, items[:count]).to_bytes()
