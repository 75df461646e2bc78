"""address_list: RFC 5322 address lists read in linear time, as Dovecot reads them for ENVELOPE.

DOVECOT holds what Dovecot 2.3 answered for FETCH ENVELOPE of a message whose To: is each value
(literals shown without their CRLF); the old parsers (email.headerregistry for groups, getaddresses
otherwise) lost routes and decoded encoded words inside groups, kept the quotes of quoted local
parts, named an address by a comment before it, and cost up to 0.7 s for a hostile 16 KiB field.
"""

from __future__ import annotations

import io
import time

import pytest

from appliance import address_list
from appliance.imap.fetch import _address_list, envelope_text, first_display, first_mailbox
from appliance.imap.mime import scan
from appliance.imap.search import address_texts

DOVECOT = [
    ('"Smith, John" <john.smith@example.com> (Work)',
     '(("Smith, John" NIL "john.smith" "example.com"))'),
    ('secretary@example.com',
     '((NIL NIL "secretary" "example.com"))'),
    ('undisclosed-recipients:;',
     '((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'),
    ('Team: ann@example.com, "Bo B." <bo@example.com>;, solo@example.com',
     '((NIL NIL "Team" NIL)(NIL NIL "ann" "example.com")("Bo B." NIL "bo" "example.com")(NIL NIL NIL NIL)(NIL NIL "solo" "example.com"))'),
    ('<@relay.example.net:hidden@example.com>',
     '((NIL "@relay.example.net" "hidden" "example.com"))'),
    ('MAILER DAEMON <>',
     '(("MAILER DAEMON" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'),
    ('bob@example.test, <>, Undisclosed <@>',
     '((NIL NIL "bob" "example.test")(NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN")("Undisclosed" "INVALID_ROUTE" "MISSING_MAILBOX" "MISSING_DOMAIN"))'),
    ('"Only Name" <>',
     '(("Only Name" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'),
    ('Jörg <joerg>',
     '(({5}Jörg NIL "joerg" "MISSING_DOMAIN"))'),
    ('a@b.example (x)',
     '(("x" NIL "a" "b.example"))'),
    ('=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>',
     '(("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de"))'),
    ('"Bob, the builder" <bob@example.test>, carol@example.test',
     '(("Bob, the builder" NIL "bob" "example.test")(NIL NIL "carol" "example.test"))'),
    ('user2: blah@domain1.org;',
     '((NIL NIL "user2" NIL)(NIL NIL "blah" "domain1.org")(NIL NIL NIL NIL))'),
    ('user2@domain2.org (foo bar)',
     '(("foo bar" NIL "user2" "domain2.org"))'),
    ('foo bar <User1@domain1.org>, x@y',
     '(("foo bar" NIL "User1" "domain1.org")(NIL NIL "x" "y"))'),
    ('a: xx@xx.org, yy@yy.org;',
     '((NIL NIL "a" NIL)(NIL NIL "xx" "xx.org")(NIL NIL "yy" "yy.org")(NIL NIL NIL NIL))'),
    ('empty:;',
     '((NIL NIL "empty" NIL)(NIL NIL NIL NIL))'),
    ('d',
     '((NIL NIL "d" "MISSING_DOMAIN"))'),
    ('b@c.d',
     '((NIL NIL "b" "c.d"))'),
    ('John Q. Public <jqp@example.com>',
     '(("John Q. Public" NIL "jqp" "example.com"))'),
    ('"john doe"@example.com',
     '((NIL NIL "john doe" "example.com"))'),
    ('"john \\"x\\" doe"@example.com',
     '((NIL NIL "john \\"x\\" doe" "example.com"))'),
    ('(comment) a@b',
     '((NIL NIL "a" "b"))'),
    ('(comment) <a@b>',
     '((NIL NIL "a" "b"))'),
    ('<a@b> (comment)',
     '((NIL NIL "a" "b"))'),
    ('a@b (c1) (c2)',
     '(("c2" NIL "a" "b"))'),
    ('a@b@c',
     '((NIL NIL "a" "b"))'),
    ('g: a@b, (c) c@d;, e@f',
     '((NIL NIL "g" NIL)(NIL NIL "a" "b")(NIL NIL "c" "d")(NIL NIL NIL NIL)(NIL NIL "e" "f"))'),
    ('g: <@a,@b:c@d>;',
     '((NIL NIL "g" NIL)(NIL "@a,@b" "c" "d")(NIL NIL NIL NIL))'),
    ('<@a,@b:c@d>',
     '((NIL "@a,@b" "c" "d"))'),
    ('<@a, @b:c@d>',
     '((NIL "@a,@b" "c" "d"))'),
    ('Name <a@[127.0.0.1]>',
     '(("Name" NIL "a" "[127.0.0.1]"))'),
    ('a@[127.0.0.1]',
     '((NIL NIL "a" "[127.0.0.1]"))'),
    ('g: "x y" <a@b>, "z" <c@d>;',
     '((NIL NIL "g" NIL)("x y" NIL "a" "b")("z" NIL "c" "d")(NIL NIL NIL NIL))'),
    ('=?utf-8?q?na=C3=AFve?= <a@b.c>',
     '(("=?utf-8?q?na=C3=AFve?=" NIL "a" "b.c"))'),
    ('g: =?utf-8?q?na=C3=AFve?= <a@b.c>;',
     '((NIL NIL "g" NIL)("=?utf-8?q?na=C3=AFve?=" NIL "a" "b.c")(NIL NIL NIL NIL))'),
    ('g: =?utf-8?q?na=C3=AFve?= <a@b.c>, Ünïcode <u@v>;',
     '((NIL NIL "g" NIL)("=?utf-8?q?na=C3=AFve?=" NIL "a" "b.c")({9}Ünïcode NIL "u" "v")(NIL NIL NIL NIL))'),
    ('a@b;',
     '((NIL NIL "a" "b"))'),
    (':;',
     '((NIL NIL "" NIL)(NIL NIL NIL NIL))'),
    ('<>',
     '((NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'),
    ('Name <a@b>, Other <>',
     '(("Name" NIL "a" "b")("Other" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'),
    ('a@b, c',
     '((NIL NIL "a" "b")(NIL NIL "c" "MISSING_DOMAIN"))'),
    ('"quoted@at" <a@b>',
     '(("quoted@at" NIL "a" "b"))'),
    ('<a@b> (c)',
     '((NIL NIL "a" "b"))'),
    ('a@b (c) , d@e',
     '(("c" NIL "a" "b")(NIL NIL "d" "e"))'),
    ('"a b"@c (d)',
     '(("d" NIL "a b" "c"))'),
    ('g: "x"@y (z);',
     '((NIL NIL "g" NIL)("z" NIL "x" "y")(NIL NIL NIL NIL))'),
    ('a@b (x (y) z)',
     '(("x (y) z" NIL "a" "b"))'),
    ('a@b.example ((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((x))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))',
     '(("(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((x)))))))))))))))))))))))))))))))))))))))))))))))))))))))))))" NIL "a" "b.example"))'),
    ('a@b (x\\) y)',
     '(("x) y" NIL "a" "b"))'),
    ('<c (note) @ d.example>',
     '((NIL NIL "c" "d.example"))'),
    ('g: (c) a@b (d);',
     '((NIL NIL "g" NIL)("d" NIL "a" "b")(NIL NIL NIL NIL))'),
    ('g: Ünïcode <u@v>;',
     '((NIL NIL "g" NIL)({9}Ünïcode NIL "u" "v")(NIL NIL NIL NIL))'),
    ('Team: <@a.example,@b.example:x@y.example>, "Bo B." <bo@example.com>;',
     '((NIL NIL "Team" NIL)(NIL "@a.example,@b.example" "x" "y.example")("Bo B." NIL "bo" "example.com")(NIL NIL NIL NIL))'),
    ('g1: a@b;, g2: ;, c@d',
     '((NIL NIL "g1" NIL)(NIL NIL "a" "b")(NIL NIL NIL NIL)(NIL NIL "g2" NIL)(NIL NIL NIL NIL)(NIL NIL "c" "d"))'),
]


@pytest.mark.parametrize(("value", "answer"), DOVECOT, ids=[v[:40] for v, _ in DOVECOT])
def test_envelope_addresses_match_dovecot(value: str, answer: str) -> None:
    data = f"From: a@b.c\r\nTo: {value}\r\n\r\n".encode()
    ours = envelope_text(scan(io.BytesIO(data)).headers).decode().replace("\r\n", "")
    assert f" {answer} NIL NIL NIL NIL)" in ours


def test_raw_8bit_name_in_a_group_is_kept_as_written() -> None:
    # Was: email.header.Header refused the surrogate-escaped octets, and the FETCH failed.
    data = "To: g: Ünïcode <u@v>, =?utf-8?q?na=C3=AFve?= <a@b.c>;\r\n\r\n".encode()
    ours = envelope_text(scan(io.BytesIO(data)).headers)
    assert b'((NIL NIL "g" NIL)({9}\r\n\xc3\x9cn\xc3\xafcode NIL "u" "v")("=?utf-8?q?na=C3=AFve?=" NIL "a" "b.c")' in ours


def hostile(size: int) -> dict[str, str]:
    """Fields of about `size` characters built to be slow: groups (email.headerregistry took 0.24 s
    for 16 KiB), comments and quoted strings in groups, source routes, encoded words, nesting, runs
    of one special, bad addr-specs."""
    def fill(unit: str, head: str = "", tail: str = "") -> str:
        return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail
    return {
        "group": fill("a@example.com, ", "friends: ", ";"),
        "groups": fill("g: a@example.com, b@example.org;, "),
        "comments": fill("(a comment (nested)) a@b.c, ", "g: ", ";"),
        "quoted": fill('"quoted \\" string" <q@example.com>, ', "g: ", ";"),
        "route": fill("@d.example,", "g: <", "x@y.z>;"),
        "encoded": fill("=?utf-8?q?na=C3=AFve?= <a@b.c>, ", "g: ", ";"),
        "nested_comment": "g: " + "(" * (size // 2) + ")" * (size // 2) + " a@b;",
        "nested_group": "g:" * (size // 2) + "a@b;",
        "colons": ":" * size,
        "angles": "<" * size,
        "ats": fill("@", "g: ", ";"),
        "bad": fill("a@b@c, ", "g: ", ";"),
        "atoms": fill("a ", "g: ", ";"),
    }


SMALL, LARGE = hostile(16 * 1024), hostile(256 * 1024)  # the MX takes 256 KiB of header


@pytest.mark.parametrize("name", sorted(SMALL))
def test_hostile_fields_cost_linear_time(name: str) -> None:
    """16 KiB of each costs 1-9 ms here under load (0.1-0.7 s with the old parsers, issue 19), 256
    KiB 16 times that; the bounds leave room for a loaded machine."""
    costs = []
    for text in (SMALL[name], LARGE[name]):
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            _address_list.__wrapped__(text)
            first_mailbox(text)
            first_display(text)
            address_texts(text)
            best = min(best, time.process_time() - start)
        costs.append(best)
    assert costs[0] < 0.1, costs
    assert costs[1] < 1.5, costs


@pytest.mark.parametrize("value", [v for v, _ in DOVECOT] + list(SMALL.values()), ids=lambda v: v[:30])
def test_sort_keys_are_the_first_envelope_address(value: str) -> None:
    """SORT reads only the first address (parse's `first`): the same as the whole list's first."""
    found = address_list.parse(value)
    assert address_list.parse(value, first=True) == found[:1]
    assert first_mailbox(value) == next((e.mailbox for e in found if e.mailbox), "")
    if found and found[0].domain is None:
        assert first_display(value) == (found[0].mailbox, False)


def test_search_texts_are_the_envelope_addresses() -> None:
    """SEARCH FROM/TO/CC/BCC read the same addresses as ENVELOPE: a source route is no address (the
    old splitter searched "@b"), a group's name is unquoted, a quoted local part keeps its quotes."""
    assert address_texts("<@a,@b:c@d>") == ["c@d"]
    assert address_texts('"Smith, John": "john doe"@example.com, "q\\"x"@b (note);') == [
        "Smith, John", '"john doe"@example.com', 'note <"q\\"x"@b>']
    assert address_texts("=?utf-8?q?J=C3=B6rg?= <j@example.org>, Name <>") == ["Jörg <j@example.org>", "Name"]


@pytest.mark.parametrize("name", ["angles", "colons", "nested_group", "group"])
def test_sort_keys_read_only_the_first_address(name: str) -> None:
    """SORT's key of a 256 KiB field cuts only the tokens before its first address: 0.4 ms here
    under load (11-220 ms when every token was cut first, or a run of ":" or "<" was one per char)."""
    text = LARGE[name]
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        first_mailbox(text)
        first_display(text)
        best = min(best, time.process_time() - start)
    assert best < 0.01, best


def test_a_group_in_a_group_is_read_as_dovecot_reads_it() -> None:
    # Dovecot: the inner name is an address without a domain and the rest of it is skipped, so a
    # To: of 20,000 nested groups names no one (SEARCH TO finds none of the names inside it).
    assert _address_list.__wrapped__("x: y: a@b;;") == b'(NIL NIL "x" NIL)(NIL NIL "y" "MISSING_DOMAIN")(NIL NIL NIL NIL)'
    assert address_texts("g:" * 20_000 + "alice@example.org" + ";" * 20_000) == ["g", "g"]
