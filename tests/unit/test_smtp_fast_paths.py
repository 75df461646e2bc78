"""The MX's shortcuts (issue 19) answer exactly what aiosmtpd's own code answers: the address parser's
fast path for plain `<local@domain>` paths, and the per-class look-ups of SMTP.__init__."""

from __future__ import annotations

import asyncio
import inspect
import logging
from types import SimpleNamespace
from typing import Any

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from appliance.smtp import class_members
from appliance.smtp.handler import SmtpHandler
from appliance.smtp.limits import DEFAULT_LIMITS
from appliance.smtp.server import _SIMPLE_PATH, ConnectionTracker, LetterboxLMTP, LetterboxSMTP


def aiosmtpd_getaddr(arg: str, limit: int) -> tuple[str | None, str | None]:
    """aiosmtpd's own parser, a failure counted as unparsable (as LetterboxSMTP._getaddr does)."""
    try:
        return SMTP._getaddr(SimpleNamespace(local_part_limit=limit), arg)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001  the parser's crashes on odd input are what the wrapper hides
        return None, None


def ours(arg: str, limit: int) -> tuple[str | None, str | None]:
    smtp = LetterboxSMTP.__new__(LetterboxSMTP)  # only what _getaddr reads
    smtp.local_part_limit, smtp._malformed, smtp._client_ip = limit, 0, "192.0.2.1"
    return smtp._getaddr(arg)


PATH_PIECES = st.sampled_from(["<", ">", "@", ".", "a", "Z", "0", "+", "-", "_", "'", " ", "\t", "(", ")",
                               '"', "[", "]", ":", ",", "\\", "é", "SIZE=10", " BODY=8BITMIME", "x" * 70])


@settings(max_examples=600, deadline=None)
@given(st.lists(PATH_PIECES, max_size=14).map("".join), st.sampled_from([0, 64]))
@example("<sender@elsewhere.test>", 64)
@example("<sender@elsewhere.test> SIZE=2048 BODY=8BITMIME", 64)
@example("<a@b.c>  (comment) SIZE=1", 64)
@example("<a.b+tag@x-y.z>rest", 64)
@example("<>", 64)
@example("<> SIZE=1", 64)
@example("<" + "a" * 65 + "@b.c>", 64)
@example("<" + "a" * 65 + "@b.c>", 0)
@example("<a..b@c>", 64)
@example(" <a@b.c>", 64)
def test_address_fast_path_answers_as_aiosmtpd(arg: str, limit: int) -> None:
    assert ours(arg, limit) == aiosmtpd_getaddr(arg, limit)


def test_the_fast_path_takes_the_usual_paths() -> None:
    """The shortcut is used where it matters: without it the answer would still be equal, and slow."""
    for arg in ("<sender@elsewhere.test>", "<rcpt@bench.test> NOTIFY=NEVER", "<a.b+c@x-y.example>"):
        assert _SIMPLE_PATH.match(arg), arg
    for arg in ("<>", '<"quoted"@x.y>', "<a@[127.0.0.1]>", "<é@x.y>", "<a@b.c"):
        assert _SIMPLE_PATH.match(arg) is None, arg


@pytest.mark.parametrize("protocol", [LetterboxSMTP, LetterboxLMTP])
def test_per_class_lookups_build_the_tables_aiosmtpd_builds(protocol: type[LetterboxSMTP]) -> None:
    class_members.install()

    async def build() -> None:
        handler = SmtpHandler.__new__(SmtpHandler)
        handler.service = "smtp"
        smtp = protocol(handler, limits=DEFAULT_LIMITS, tracker=ConnectionTracker(DEFAULT_LIMITS),
                        hostname="mx.test", loop=asyncio.get_running_loop())
        for obj in (smtp, handler):
            # The protocol's commands are bound when asked for (_CommandTable), not listed here.
            lazy = obj is smtp
            assert class_members.wanted_names(obj) == [
                n for n in dir(obj) if n.startswith(class_members.WANTED_PREFIXES)
                and not (lazy and n.startswith("smtp_"))]
            assert class_members.auth_members(obj) == [
                (n, v) for n, v in inspect.getmembers(obj) if n.startswith("auth_")]
        assert set(smtp._auth_methods) == {"LOGIN", "PLAIN"}
        assert set(smtp._handle_hooks) == {n[len("handle_"):] for n in dir(handler) if n.startswith("handle_")}
        commands = dict(smtp._smtp_methods.items())  # how HELP lists them
        assert set(commands) == {n[len("smtp_"):] for n in dir(smtp) if n.startswith("smtp_")}
        assert smtp._ehlo_hook_ver == "new"
        # Bound to this instance, not to the one the class was first seen with.
        assert all(method.__self__ is smtp for method in commands.values())
        assert all(smtp._smtp_methods.get(name) == method for name, method in commands.items())
        assert smtp._smtp_methods.get("NOSUCH") == smtp._smtp_unknown

    asyncio.run(build())


def test_command_lines_are_logged_only_when_their_level_is_on() -> None:
    """aiosmtpd logs each command line at DEBUG and INFO; the box's `mail.log` is at WARNING, where
    the arguments are not even copied, and at DEBUG the line is logged as aiosmtpd does (masked)."""
    class_members.install()
    logger = logging.getLogger("mail.log")
    level = logger.level
    seen: list[tuple[Any, ...]] = []
    try:
        logger.setLevel(logging.WARNING)
        aiosmtpd.smtp.sanitized_log(lambda *args: seen.append(args), "%r", b"AUTH PLAIN c2VjcmV0\r\n")
        assert seen == []
        logger.setLevel(logging.DEBUG)
        aiosmtpd.smtp.sanitized_log(lambda *args: seen.append(args), "%r", b"AUTH PLAIN c2VjcmV0\r\n")
        assert seen == [("%r", b"AUTH PLAIN ********\r\n")]
    finally:
        logger.setLevel(level)
