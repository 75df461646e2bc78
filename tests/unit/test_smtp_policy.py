"""Relay, recipient and sender decisions (appliance/smtp/policy.py): pure, no server."""

from __future__ import annotations

import pytest

from appliance.address import Address
from appliance.smtp.policy import (
    BAD_RECIPIENT_SYNTAX,
    BAD_SENDER_SYNTAX,
    LITERAL_REFUSED,
    MAILBOX_FULL,
    NEED_SMTPUTF8,
    NOT_OWNED_SENDER,
    NULL_SENDER_REFUSED,
    SENDER_OK,
    TOO_MANY_RECIPIENTS,
    RecipientFacts,
    RecipientRoute,
    Reply,
    SmtpReject,
    declared_size,
    echo,
    is_bare_postmaster,
    parse_recipient,
    parse_sender,
    postmaster_domain,
    recipient_route,
    sender_verdict,
)

OURS = "ourdomain.test"


def route(facts: RecipientFacts, *, authenticated: bool = False, so_far: int = 0, limit: int = 100
          ) -> RecipientRoute | Reply:
    return recipient_route(facts, authenticated=authenticated, accepted_so_far=so_far, max_recipients=limit)


def facts_for(text: str, *, local_domains: frozenset[str] = frozenset({OURS}),
              known: dict[str, tuple[str, ...]] | None = None) -> RecipientFacts:
    """What the handler would look up, with a fixed directory: only `known` canonical addresses resolve."""
    address = parse_recipient(text, smtputf8=False)
    local = not address.is_literal and address.domain in local_domains
    mailboxes = (known or {}).get(address.canonical, ()) if local else ()
    return RecipientFacts(address, local, mailboxes)


# The open-relay battery from issue 3, plus more: none may be routed anywhere for a stranger.
RELAY_ATTEMPTS = [
    "<user@external.test>",
    f"<user%external.test@{OURS}>",
    f'<"user@external.test"@{OURS}>',
    f"<@{OURS}:user@external.test>",
    f"<@{OURS},@other.test:user@external.test>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<user@external.test.>",
    "<USER@EXTERNAL.TEST>",
    "<User@External.Test>",
    f"<external.test!user@{OURS}>",
    f"<user@external.test@{OURS}>",
    f"<user%external.test@{OURS.upper()}>",
    f"<\"user%external.test\"@{OURS}>",
    f"<user@{OURS}.external.test>",
    f"<user@external.test%{OURS}>",
    "<user@xn--bcher-kva.example>",
]


@pytest.mark.parametrize("text", RELAY_ATTEMPTS)
def test_relay_attempts_are_never_routed_for_unauthenticated_clients(text: str) -> None:
    try:
        facts = facts_for(text, known={f"user@{OURS}": (f"user@{OURS}",)})
    except SmtpReject as reject:
        assert not reject.reply.positive  # noqa: PT017  a property test: route or reject, never a positive reject
        return
    decision = route(facts)
    assert isinstance(decision, Reply), f"{text} was routed: {decision}"
    assert decision.code in (550, 554)


def test_relay_denied_reply_is_554_5_7_1() -> None:
    decision = route(facts_for("<user@external.test>"))
    assert isinstance(decision, Reply)
    assert (decision.code, decision.status) == (554, "5.7.1")
    assert "Relay access denied" in decision.text


def test_unknown_local_user_is_550_5_1_1() -> None:
    decision = route(facts_for(f"<nobody@{OURS}>"))
    assert isinstance(decision, Reply)
    assert (decision.code, decision.status) == (550, "5.1.1")


def test_percent_and_bang_are_plain_local_parts_nobody_owns() -> None:
    for text in (f"<user%external.test@{OURS}>", f"<external.test!user@{OURS}>", f'<"user@external.test"@{OURS}>'):
        decision = route(facts_for(text))
        assert isinstance(decision, Reply), text
        assert decision.status == "5.1.1", text


def test_known_local_user_any_case_is_routed_locally() -> None:
    known: dict[str, tuple[str, ...]] = {f"alice@{OURS}": (f"alice@{OURS}",)}
    for text in (f"<alice@{OURS}>", f"<ALICE@{OURS.upper()}>", f"<Alice@{OURS}.>", f"<@relay.test:alice@{OURS}>"):
        decision = route(facts_for(text, known=known))
        assert decision == RecipientRoute(f"alice@{OURS}", (f"alice@{OURS}",)), text


def test_authenticated_user_may_send_anywhere_but_to_literals() -> None:
    decision = route(facts_for("<Bob@Example.NET>"), authenticated=True)
    assert decision == RecipientRoute("Bob@example.net", remote="Bob@example.net")
    assert route(facts_for("<user@[192.0.2.1]>"), authenticated=True) == LITERAL_REFUSED
    # Still no such user at home, authenticated or not.
    decision = route(facts_for(f"<nobody@{OURS}>"), authenticated=True)
    assert isinstance(decision, Reply)
    assert decision.status == "5.1.1"


def test_alias_forwards_are_routed_even_for_strangers() -> None:
    address = Address("sales", OURS)
    facts = RecipientFacts(address, True, (), ("partner@external.test",))
    assert route(facts) == RecipientRoute(f"sales@{OURS}", (), ("partner@external.test",))
    assert route(facts).outbound == ("partner@external.test",)  # type: ignore[union-attr]


def test_recipient_limit_and_full_mailboxes() -> None:
    known: dict[str, tuple[str, ...]] = {f"alice@{OURS}": (f"alice@{OURS}",)}
    assert route(facts_for(f"<alice@{OURS}>", known=known), so_far=100) == TOO_MANY_RECIPIENTS
    full = RecipientFacts(Address("alice", OURS), True, (f"alice@{OURS}",), (), {f"alice@{OURS}": True})
    assert route(full) == MAILBOX_FULL
    assert (MAILBOX_FULL.code, MAILBOX_FULL.status) == (452, "4.2.2")
    # An alias reaching a full and a non-full mailbox is accepted (the full one is bounced later).
    two = RecipientFacts(Address("team", OURS), True, ("a@x", "b@x"), (), {"a@x": True, "b@x": False})
    assert isinstance(route(two), RecipientRoute)


def test_sender_rules() -> None:
    alice = Address("alice", OURS)
    assert sender_verdict(alice, service="smtp", principal=None, owns_sender=False) == SENDER_OK
    assert sender_verdict(None, service="smtp", principal=None, owns_sender=False) == SENDER_OK
    assert sender_verdict(None, service="lmtp", principal=None, owns_sender=False) == SENDER_OK
    assert sender_verdict(alice, service="submission", principal="alice@x", owns_sender=True) == SENDER_OK
    assert sender_verdict(alice, service="submission", principal="bob@x", owns_sender=False) == NOT_OWNED_SENDER
    assert (NOT_OWNED_SENDER.code, NOT_OWNED_SENDER.status) == (553, "5.7.1")
    assert sender_verdict(None, service="submissions", principal="bob@x", owns_sender=False) == NULL_SENDER_REFUSED
    assert sender_verdict(alice, service="submission", principal=None, owns_sender=False).code == 530


def test_parse_sender_and_recipient() -> None:
    assert parse_sender("<>", smtputf8=False) is None
    assert parse_sender("<a@b.test>", smtputf8=False) == Address("a", "b.test")
    with pytest.raises(SmtpReject) as err:
        parse_sender("<a@@b>", smtputf8=False)
    assert err.value.reply == BAD_SENDER_SYNTAX
    with pytest.raises(SmtpReject) as err:
        parse_recipient("<>", smtputf8=False)
    assert err.value.reply == BAD_RECIPIENT_SYNTAX
    with pytest.raises(SmtpReject) as err:
        parse_recipient("<jörg@bücher.test>", smtputf8=False)
    assert err.value.reply == NEED_SMTPUTF8
    assert parse_recipient("<jörg@bücher.test>", smtputf8=True) == Address("jörg", "xn--bcher-kva.test")


def test_bare_postmaster() -> None:
    assert is_bare_postmaster("<Postmaster>")
    assert is_bare_postmaster("postmaster")
    assert not is_bare_postmaster("<postmaster@x.test>")
    assert postmaster_domain("mail.example.test", ["a.test", "example.test"]) == "example.test"
    assert postmaster_domain("box.local", ["a.test", "b.test"]) == "a.test"
    assert postmaster_domain("box.local", []) is None


def test_declared_size_and_echo() -> None:
    assert declared_size(["BODY=8BITMIME", "SIZE=1234"]) == 1234
    assert declared_size(["SIZE=x"]) == 0
    assert declared_size([]) == 0
    assert echo("a\x00b") == "a?b"
    assert echo("x" * 500).endswith("...")
    assert len(echo("x" * 500)) == 103
    assert str(Reply(250, "2.0.0", "Ok")) == "250 2.0.0 Ok"


def test_postmaster_mailboxes_rule() -> None:
    from appliance.smtp.policy import MailboxFacts, postmaster_mailboxes

    boxes = [MailboxFacts("zed@b.test", True, 1), MailboxFacts("amy@a.test", True, 3),
             MailboxFacts("old@a.test", False, 0), MailboxFacts("bea@a.test", True, 2)]
    assert postmaster_mailboxes([], boxes, "a.test") == ("bea@a.test",)  # oldest enabled of the primary
    assert postmaster_mailboxes([], boxes, "c.test") == ("zed@b.test",)  # else the oldest at all
    assert postmaster_mailboxes(["root", "AMY@a.test", "old@a.test"], boxes, "a.test") == ("amy@a.test",)
    assert postmaster_mailboxes(["root"], [], "a.test") == ()
