"""How a download's file name is given in its Content-Disposition header. (An international domain
is shown by appliance.address.idn, which the CLI shares.)"""

from __future__ import annotations

import re
from urllib.parse import quote

_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._+-]")


def attachment(filename: str) -> str:
    """A Content-Disposition value for a download named `filename` (RFC 6266): a plain ASCII name, and
    the name itself in filename* (RFC 8187) when it has other characters. The names come from files
    and certificates: a quote or a line break in one made the header malformed, a letter outside
    Latin-1 a 500 (starlette encodes headers as Latin-1)."""
    plain = _UNSAFE_IN_FILENAME.sub("_", filename) or "download"
    if plain == filename:
        return f'attachment; filename="{plain}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"
