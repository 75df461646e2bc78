"""The appliance's reset of a forgotten administrator password: `letterbox-reset.txt`, written by the
owner onto the box's boot partition (the SD card's FAT, a VM disk's EFI partition) from any computer,
holds the new password; letterbox-reset.service hands its bytes to `letterbox admin reset-from-boot`
once at boot and then overwrites and deletes it (image/overlay/usr/local/sbin/letterbox-reset). Whoever
can write that partition can read every mailbox on the disk beside it, so the file asks for nothing
more. This module reads the file as any editor may have saved it (pure); Admin.reset_admin_password_from_boot
applies it with the function `letterbox admin passwd` and the console use."""

from __future__ import annotations

import codecs
import unicodedata
from dataclasses import dataclass

FILE_NAME = "letterbox-reset.txt"
# Where a reset came from, as its event says: the file, or (a VM, amd64) the boot menu's entry "a new
# administrator password on this screen", whose password letterbox-reset makes and shows on the console.
FROM_FILE = f"the boot partition ({FILE_NAME})"
FROM_MENU = "the boot menu (a new password shown on the console)"
# A password (passwords.MAX_PASSWORD_LENGTH) and a name fit many times over; anything larger is not a
# file written for this.
MAX_BYTES = 4096


class ResetFileProblem(ValueError):
    """Why the file was not used, in words for its writer (it goes into letterbox-reset-result.txt)."""


@dataclass(frozen=True)
class ResetRequest:
    name: str | None  # None: the only administrator, or the first one made (the wizard's)
    password: str


def read_reset_file(data: bytes) -> ResetRequest:
    """The password alone on a line (or twice), or the administrator's name on the first line and the
    password on the second. Blank lines and the spaces around each line are not part of them: Notepad's CRLF, a
    final newline or a space typed after the password must not make a password nobody can type."""
    if len(data) > MAX_BYTES:
        raise ResetFileProblem(f"the file is larger than {MAX_BYTES} bytes: it should hold one or two short lines")
    if data.lstrip().startswith(b"{\\rtf"):
        raise ResetFileProblem("the file was saved as formatted text (RTF, TextEdit's default on a Mac):"
                               " in TextEdit choose Format > Make Plain Text, then save it again")
    text = _decode(data)
    if any(unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\r\n\ufeff" for ch in text):
        raise ResetFileProblem("the file holds characters that are not text: write it with a plain text editor"
                               " (Notepad, TextEdit in plain text)")
    lines = [line.strip(" \t\ufeff") for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ResetFileProblem("the file is empty: write the new password in it, alone on the first line")
    if len(lines) > 2:
        raise ResetFileProblem("the file has more than two lines: write the new password alone, or the"
                               " administrator's name on the first line and the password on the second")
    if len(lines) == 1 or lines[0] == lines[1]:  # the password typed twice, as every form asks
        return ResetRequest(None, lines[-1])
    return ResetRequest(lines[0], lines[1])


def _decode(data: bytes) -> str:
    """UTF-8 (with or without the byte-order mark Notepad wrote before Windows 10 1903), or UTF-16 with
    its mark (Notepad's "Unicode"). Windows' legacy code pages are refused rather than guessed: a
    password read as the wrong letters would lock its owner out for good."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ResetFileProblem("the file is not UTF-8 text: save it again choosing the encoding UTF-8"
                               " (Notepad: File > Save as, Encoding)") from None
