"""Errors that carry their IMAP reply: a handler raises, the session answers the command with it."""

from __future__ import annotations

from typing import Literal


class ImapError(Exception):
    status: Literal["NO", "BAD"] = "NO"

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class ImapNo(ImapError):
    """The command was understood and failed (RFC 3501 7.1.2): tagged NO [code] text."""


class ImapBad(ImapError):
    """The command is not acceptable here or its arguments are wrong (RFC 3501 7.1.3): tagged BAD."""

    status: Literal["NO", "BAD"] = "BAD"
