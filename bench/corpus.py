"""The messages the side-by-side benchmark gives both servers: realistic MIME (plain text, quoted-printable,
multipart/alternative, attachments, replies with References), about 1 to 6 KiB each, generated
deterministically from the message number so every run and every server sees the same bytes.

A folder is written once as Maildir files in cur/ (Dovecot-style names with S= and flags), then copied
into each server's Maildir for every round, so the copies cannot leak state between rounds. Copied, not
hard-linked: a file with more than one link is what a real Maildir's files are not (delivered, appended
or moved in, each has one), and Letterbox checks such a file by a stat at every use of its cached row
(appliance/store/file_watch.py: a write through another link is not seen by its watch of the folder).
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

# Words to build subjects and bodies from; SUBJECT_WORD is in one subject in ten, BODY_WORD in one body
# in a hundred (and in no header), so SEARCH SUBJECT / SEARCH BODY have a known, small answer.
WORDS = ("meeting", "report", "budget", "garden", "school", "holiday", "photos", "dinner", "weekend",
         "project", "family", "update", "question", "answer", "letter", "order", "delivery", "tomorrow",
         "morning", "evening", "please", "thanks", "regards", "schedule", "train", "ticket", "doctor",
         "birthday", "present", "recipe", "kitchen", "window")
SUBJECT_WORD = "invoice"
BODY_WORD = "zebrafish"
BASE_TIME = 1_700_000_000


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _paragraphs(rng: random.Random, n: int, marker: bool) -> str:
    paras = []
    for _ in range(rng.randint(2, 6)):
        paras.append(" ".join(_sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 5))))
    if marker:
        paras.insert(1, f"The {BODY_WORD} tank needs cleaning, see message {n}.")
    # Lines of at most 76 octets (RFC 5322 section 2.1.1 recommends 78).
    lines: list[str] = []
    for para in paras:
        line = ""
        for word in para.split():
            if len(line) + len(word) + 1 > 72:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.extend([line, ""])
    return "\r\n".join(lines)


def _headers(n: int, rng: random.Random, user: str) -> str:
    sender = rng.randint(0, 49)
    subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    if n % 10 == 0:
        subject = f"{SUBJECT_WORD} {n} {subject}"
    if n % 7 == 3:
        subject = f"=?utf-8?q?Gr=C3=BC=C3=9Fe_{n}?= {subject}"  # RFC 2047 encoded-word
    when = BASE_TIME + n * 60
    date = format_datetime(datetime.fromtimestamp(when, UTC))
    lines = [
        f"Return-Path: <sender{sender}@example.org>",
        f"Received: from mx{sender % 5}.example.org (mx{sender % 5}.example.org [192.0.2.{sender % 250 + 1}])\r\n"
        f"\tby mail.bench.test with ESMTPS id {n:08X}; {date}",
        f'From: "Sender {sender}" <sender{sender}@example.org>',
        f"To: {user}",
    ]
    if n % 4 == 0:
        lines.append(f"Cc: friend{n % 13}@example.net, other{n % 17}@example.com")
    lines += [f"Subject: {subject}", f"Date: {date}", f"Message-ID: <m{n}.{sender}@example.org>"]
    if n % 3 == 1 and n > 1:
        lines += [f"In-Reply-To: <m{n - 1}.0@example.org>",
                  f"References: <m{max(0, n - 2)}.0@example.org> <m{n - 1}.0@example.org>"]
    lines.append("MIME-Version: 1.0")
    return "\r\n".join(lines) + "\r\n"


def message(n: int, user: str) -> bytes:
    """Message number `n` for `user`: one of four shapes, chosen by n."""
    rng = random.Random(n)
    head = _headers(n, rng, user)
    text = _paragraphs(rng, n, marker=n % 100 == 7)
    shape = n % 4
    if shape == 0:
        return (head + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
                + text + "\r\n").encode()
    boundary = f"=_b{n:06d}"
    if shape == 1:
        html = "<html><body>" + "".join(f"<p>{p}</p>\r\n" for p in text.split("\r\n\r\n")) + "</body></html>"
        return (head + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
                f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
                f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
                f"--{boundary}--\r\n").encode()
    if shape == 2:
        blob = rng.randbytes(rng.randint(600, 3000))
        encoded = base64.encodebytes(blob).decode().replace("\n", "\r\n")
        return (head + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                f"This is a multi-part message in MIME format.\r\n"
                f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
                f"--{boundary}\r\nContent-Type: application/pdf; name=\"scan{n}.pdf\"\r\n"
                f"Content-Disposition: attachment; filename=\"scan{n}.pdf\"\r\n"
                f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}"
                f"--{boundary}--\r\n").encode()
    qp = text.replace("=", "=3D") + "\r\nGr=C3=BC=C3=9Fe, J=C3=BCrgen"
    return (head + "Content-Type: text/plain; charset=utf-8; format=flowed\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + "\r\n").encode()


def make_maildir(maildir: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)


def write_folder(maildir: Path, count: int, user: str) -> int:
    """`count` messages into maildir/cur, every third \\Seen and every seventh \\Flagged (a mailbox
    copied in from another server); returns the total size in octets."""
    make_maildir(maildir)
    total = 0
    for n in range(count):
        data = message(n, user)
        flags = ("F" if n % 7 == 0 else "") + ("S" if n % 3 == 0 else "")
        name = f"{BASE_TIME + n}.M{n}P1.bench,S={len(data)},W={len(data)}:2,{flags}"
        with open(maildir / "cur" / name, "wb") as f:
            f.write(data)
        total += len(data)
    return total


def write_big_message(maildir: Path, mib: int, user: str) -> int:
    """One text message of `mib` MiB in new/ (the POP3 RETR row); returns its size."""
    make_maildir(maildir)
    head = f"From: big@example.org\r\nTo: {user}\r\nSubject: big\r\nMIME-Version: 1.0\r\n\r\n".encode()
    line = b".dotted line, stuffed on the way out " + b"x" * 38 + b"\r\n"  # 77 octets
    data = head + line * ((mib * 1024 * 1024 - len(head)) // len(line))
    (maildir / "new" / f"{BASE_TIME}.M1P1.bench,S={len(data)}").write_bytes(data)
    return len(data)


def write_mbox(path: Path, count: int, user: str) -> None:
    """An mbox of `count` messages for imaptest's APPENDs (its `mbox=` option)."""
    with path.open("wb") as out:
        for n in range(count):
            out.write(b"From sender@example.org Mon Jan  1 10:00:00 2024\n")
            body = message(n, user).replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")
            out.write(body + b"\n")


def maildir_copy(source: Path, dest: Path) -> None:
    """A copy of a Maildir, times kept (cp -a: 1-6 KiB files, some 400 MB at 100k)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        os.rmdir(dest)  # only an empty placeholder may be replaced
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
