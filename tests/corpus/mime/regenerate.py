"""Rebuild expected.json: what Dovecot (the reference IMAP server) answers for each corpus message.

Run by hand against a private Dovecot that has the .eml files saved into bob's INBOX in name order
(see PEERS.md for running one): `python regenerate.py 127.0.0.1 PORT bob PASSWORD`. The unit tests
compare Letterbox's FETCH rendering with these answers; the few places where we deliberately differ
are listed in tests/unit/test_imap_fetch.py.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from appliance.imap.mime import Part, scan  # noqa: E402

ITEMS = ["BODYSTRUCTURE", "BODY", "ENVELOPE", "RFC822.SIZE", "BODY.PEEK[]", "BODY.PEEK[HEADER]",
         "BODY.PEEK[TEXT]", "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", "BODY.PEEK[HEADER.FIELDS.NOT (FROM SUBJECT)]",
         "BODY.PEEK[TEXT]<0.10>", "BODY.PEEK[]<5.20>", "BODY.PEEK[9]", "BODY.PEEK[1.9]"]


def part_paths(message: Part, prefix: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], bool]]:
    """Every section path inside a message (RFC 3501 6.4.5 numbering), with whether that part is a
    message/rfc822 (which has HEADER and TEXT sections of its own)."""
    out: list[tuple[tuple[int, ...], bool]] = []
    children = message.children if message.is_multipart else [message]
    for i, child in enumerate(children, start=1):
        path = (*prefix, i)
        out.append((path, child.is_message))
        if child.is_message:
            out += part_paths(child.children[0], path)
        elif child.is_multipart:
            out += _parts_of(child, path)
    return out


def _parts_of(multipart: Part, path: tuple[int, ...]) -> list[tuple[tuple[int, ...], bool]]:
    out: list[tuple[tuple[int, ...], bool]] = []
    for i, child in enumerate(multipart.children, start=1):
        sub = (*path, i)
        out.append((sub, child.is_message))
        if child.is_message:
            out += part_paths(child.children[0], sub)
        elif child.is_multipart:
            out += _parts_of(child, sub)
    return out


def items_for(data: bytes) -> list[str]:
    root = scan(io.BytesIO(data))
    items = list(ITEMS)
    for path, is_message in part_paths(root):
        spec = ".".join(map(str, path))
        items += [f"BODY.PEEK[{spec}]", f"BODY.PEEK[{spec}.MIME]"]
        if is_message:
            items += [f"BODY.PEEK[{spec}.HEADER]", f"BODY.PEEK[{spec}.TEXT]",
                      f"BODY.PEEK[{spec}.HEADER.FIELDS (SUBJECT)]"]
    return items


def fetch_raw(sock_file: io.BufferedRWPair, tag: int, uid: int, item: str) -> bytes:
    """The bytes after the item name in the FETCH response (value only, literals inline)."""
    sock_file.write(f"t{tag} UID FETCH {uid} ({item})\r\n".encode())
    sock_file.flush()
    response = b""
    while True:
        line = sock_file.readline()
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        response += line
        if m:
            response += sock_file.read(int(m.group(1)))
            continue
        if line.startswith(f"t{tag} ".encode()):
            break
    return response.split(b" FETCH (", 1)[1].rsplit(b")\r\nt", 1)[0]


def main() -> None:
    import socket

    host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sock = socket.create_connection((host, port))
    f = sock.makefile("rwb")
    f.readline()
    f.write(f'a LOGIN "{user}" "{password}"\r\nb SELECT INBOX\r\n'.encode())
    f.flush()
    while not f.readline().startswith(b"b "):
        pass
    expected: dict[str, dict[str, str]] = {}
    tag = 0
    for uid, path in enumerate(sorted(HERE.glob("*.eml")), start=1):
        answers: dict[str, str] = {}
        for item in items_for(path.read_bytes()):
            tag += 1
            raw = fetch_raw(f, tag, uid, item)
            answers[item] = raw.decode("latin-1")
        expected[path.name] = answers
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
