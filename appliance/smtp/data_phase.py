"""The DATA phase: the message after 354, read line by line up to the lone dot (RFC 5321 4.5.2).

aiosmtpd's own reader refuses any line longer than its stream reader's limit, and while it drains one it
keeps every fragment until the line ends (an endless line grew without bound). Here the reader's limit
only sizes each read: a longer line is joined from its fragments up to MAX_TEXT_LINE_OCTETS, and a
message that breaks a bound is drained to its dot keeping nothing, then refused (RFC 5321 4.2.5: the
reply comes after the dot, and the session goes on).
"""

from __future__ import annotations

import asyncio

# aiosmtpd's texts, so the rewording (server.REWORDED) and LMTP's per-recipient replies apply.
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
_END = b".\r\n"


async def read_message(reader: asyncio.StreamReader, *, max_line: int, max_octets: int) -> bytes | str:
    """The message, dot-unstuffed, or the refusal (LINE_TOO_LONG / TOO_MUCH_DATA) once it has all been
    read. max_line counts a line with its CRLF and any transparency dot; max_octets the whole DATA."""
    lines: list[bytes] = []
    fragments: list[bytes] = []  # the line being read, while it is longer than the reader's limit
    line_octets = 0
    total = 0
    refusal: str | None = None
    while True:
        try:
            chunk = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as overrun:
            chunk = await reader.read(overrun.consumed)  # a fragment: the reader never splits a CRLF
        if not line_octets and chunk == _END:
            break
        total += len(chunk)
        line_octets += len(chunk)
        if refusal is None:
            if total > max_octets:
                refusal = TOO_MUCH_DATA
            elif line_octets > max_line:
                refusal = LINE_TOO_LONG
            if refusal is not None:
                lines.clear()
                fragments.clear()
        if not chunk.endswith(b"\r\n"):
            if refusal is None:
                fragments.append(chunk)
            continue
        line_octets = 0
        if refusal is not None:
            continue
        if fragments:
            fragments.append(chunk)
            chunk = b"".join(fragments)
            fragments.clear()
        lines.append(chunk[1:] if chunk[:1] == b"." else chunk)
    return refusal if refusal is not None else b"".join(lines)
