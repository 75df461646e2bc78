"""Maildir++ on disk (appliance/store/maildir.py): names, flags, keywords, durable writes, debris."""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.store import maildir
from appliance.store.maildir import Keywords, WriteJob
from appliance.store.model import StoreError

UNIQUE = re.compile(r"^\d+\.M\d+P\d+Q\d+\.[^/:,]+,S=(\d+)$")


# --- folder names -------------------------------------------------------------------------------

def test_folder_paths_follow_maildir_plus_plus(tmp_path: Path) -> None:
    assert maildir.folder_path(tmp_path, "INBOX") == tmp_path
    assert maildir.folder_path(tmp_path, "Sent") == tmp_path / ".Sent"
    assert maildir.folder_path(tmp_path, "A/B/C") == tmp_path / ".A.B.C"
    assert maildir.folder_path(tmp_path, "INBOX/Sub") == tmp_path / ".INBOX.Sub"
    assert maildir.folder_name(".A.B.C") == "A/B/C"
    assert maildir.folder_name(".Sent") == "Sent"


@pytest.mark.parametrize("dirname", ["cur", "new", "tmp", ".", "..", ".DOVECOT-TRASHED", "..A", ".A..B", ".A.",
                                     ".INBOX", ".inbox"])
def test_directories_that_are_not_folders(dirname: str) -> None:
    assert maildir.folder_name(dirname) is None


def test_a_dot_inside_a_name_is_refused_clearly() -> None:
    with pytest.raises(StoreError, match=r"'\.' cannot be used"):
        maildir.folder_path(Path("/x"), "v1.2")
    with pytest.raises(StoreError, match="empty level"):
        maildir.name_levels("A//B")
    with pytest.raises(StoreError, match="too long"):
        maildir.name_levels("x" * 300)


def test_inbox_is_canonical_in_any_case() -> None:
    assert maildir.canonical_name("inbox") == "INBOX"
    assert maildir.canonical_name("InBoX/Sub") == "INBOX/Sub"
    assert maildir.canonical_name("Inboxes") == "Inboxes"


@given(st.lists(st.text(st.characters(blacklist_characters="./", min_codepoint=0x20, max_codepoint=0x7E),
                        min_size=1, max_size=12), min_size=1, max_size=4))
def test_folder_names_round_trip(levels: list[str]) -> None:
    name = "/".join(levels)
    if levels[0].upper() == "INBOX" and len(levels) == 1:
        return
    path = maildir.folder_path(Path("/m"), name)
    assert maildir.folder_name(path.name) == name


# --- unique names and flags ---------------------------------------------------------------------

def test_unique_names_follow_the_convention_and_never_repeat() -> None:
    names = {maildir.unique_name(4096) for _ in range(2000)}
    assert len(names) == 2000
    for name in list(names)[:20]:
        m = UNIQUE.match(name)
        assert m, name
        assert m.group(1) == "4096", name
        assert f"P{os.getpid()}Q" in name


def test_file_names_carry_flags_in_the_info() -> None:
    assert maildir.split_filename("123.M1P2Q3.host,S=10:2,FS") == ("123.M1P2Q3.host,S=10", "FS")
    assert maildir.split_filename("123.M1P2Q3.host,S=10") == ("123.M1P2Q3.host,S=10", "")
    assert maildir.split_filename("123.host:1,experimental") == ("123.host", "")
    assert maildir.cur_filename("base", "RS") == "base:2,RS"


def test_flags_round_trip_through_letters() -> None:
    keywords = Keywords(("$Forwarded", "Work"))
    upper, names = maildir.split_flags({"\\Seen", "\\flagged", "\\Recent", "\\Bogus", "Work", "$Forwarded"})
    assert upper == "FS"  # \Recent is the server's, unknown system flags are dropped
    letters = maildir.encode_letters(upper, sorted(names), keywords)
    assert letters == "FSab"
    back = maildir.decode_letters(letters, keywords)
    assert back == ("FS", ("$Forwarded", "Work"))
    assert maildir.imap_flags(*back) == {"\\Seen", "\\Flagged", "$Forwarded", "Work"}
    assert maildir.imap_flags("DFPRST", ()) == {"\\Draft", "\\Flagged", "\\Answered", "\\Seen", "\\Deleted"}


def test_passed_and_unknown_letters_are_kept() -> None:
    keywords = Keywords(("Work",))
    # P (passed) has no IMAP flag, 'z' no keyword name: an IMAP flag change must not drop either.
    assert maildir.kept_letters("PSaz", keywords) == "Pz"
    assert maildir.decode_letters("PSaz", keywords) == ("PS", ("Work",))


def test_keywords_file_is_dovecots(tmp_path: Path) -> None:
    (tmp_path / "dovecot-keywords").write_text("0 $Junk\n1 NonJunk\n3 Later\n")
    keywords = maildir.read_keywords(tmp_path)
    assert keywords.letter_of("$junk") == "a"  # keywords match case-insensitively
    assert keywords.letter_of("Later") == "d"
    assert keywords.name_of("c") is None
    grown = keywords.with_keywords({"Work", "$JUNK"})
    assert grown.letter_of("Work") == "c"  # the free slot first; no letter is ever reassigned
    maildir.write_keywords(tmp_path, grown)
    assert (tmp_path / "dovecot-keywords").read_text() == "0 $Junk\n1 NonJunk\n2 Work\n3 Later\n"
    assert maildir.read_keywords(tmp_path) == grown
    assert [p.name for p in tmp_path.iterdir()] == ["dovecot-keywords"]


def test_a_folder_has_room_for_26_keywords() -> None:
    full = Keywords(()).with_keywords({f"k{i:02d}" for i in range(26)})
    assert full.letter_of("k25") == "z"
    with pytest.raises(StoreError, match="too many keywords"):
        full.with_keywords({"one-more"})
    with pytest.raises(StoreError):
        Keywords(()).with_keywords({"two words"})


def test_dovecot_uidlists_are_read(tmp_path: Path) -> None:
    (tmp_path / "dovecot-uidlist").write_text(
        "3 V1700000000 N7 G3085f01b7f11094c501100008c4a11c1\n"
        "4 :1700000001.M1P1.host,S=10\n"
        "6 W12 :1700000002.M1P1.host,S=11\n"
    )
    uidlist = maildir.read_uidlist(tmp_path)
    assert uidlist is not None
    assert (uidlist.uidvalidity, uidlist.uidnext) == (1700000000, 7)
    assert dict(uidlist.uids) == {"1700000001.M1P1.host,S=10": 4, "1700000002.M1P1.host,S=11": 6}
    (tmp_path / "dovecot-uidlist").write_text("1 1600000000 3\n2 1600000001.host:2,S\n")
    old = maildir.read_uidlist(tmp_path)
    assert old is not None
    assert old.uidvalidity == 1600000000
    assert dict(old.uids) == {"1600000001.host": 2}
    (tmp_path / "dovecot-uidlist").write_text("garbage\n")
    assert maildir.read_uidlist(tmp_path) is None


# --- files --------------------------------------------------------------------------------------

def test_a_written_message_is_whole_in_new_and_tmp_is_empty(tmp_path: Path) -> None:
    maildir.make_maildir(tmp_path, folder=False)
    data = b"Subject: x\r\n\r\n" + b"y" * 100_000
    base = maildir.unique_name(len(data))
    maildir.write_message(WriteJob(tmp_path, base, "new", base, 1_600_000_000), data)
    assert (tmp_path / "new" / base).read_bytes() == data
    assert os.stat(tmp_path / "new" / base).st_mtime == 1_600_000_000  # INTERNALDATE, as Dovecot reads it
    assert list((tmp_path / "tmp").iterdir()) == []
    assert maildir.list_messages(tmp_path) == {base: ("new", base)}


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    maildir.make_maildir(tmp_path, folder=False)
    job = WriteJob(tmp_path, "x", "new", "x", None)
    (tmp_path / "new").rmdir()  # the rename fails
    with pytest.raises(FileNotFoundError):
        maildir.write_message(job, b"data")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_folders_get_the_maildirfolder_marker(tmp_path: Path) -> None:
    assert maildir.make_maildir(tmp_path / ".Sent", folder=True)
    assert sorted(p.name for p in (tmp_path / ".Sent").iterdir()) == ["cur", "maildirfolder", "new", "tmp"]
    assert not maildir.make_maildir(tmp_path / ".Sent", folder=True)
    (tmp_path / ".DOVECOT-TRASHED").mkdir()
    (tmp_path / "stray").mkdir()
    maildir.make_maildir(tmp_path / ".A.B", folder=True)
    assert maildir.discover_folders(tmp_path) == ["A/B", "Sent"]


def test_listing_skips_dot_files_and_prefers_cur(tmp_path: Path) -> None:
    maildir.make_maildir(tmp_path, folder=False)
    (tmp_path / "new" / "1.a.host").write_bytes(b"x")
    (tmp_path / "cur" / "1.a.host:2,S").write_bytes(b"x")  # moved by another program while we listed
    (tmp_path / "cur" / ".nfs000").write_bytes(b"x")
    assert maildir.list_messages(tmp_path) == {"1.a.host": ("cur", "1.a.host:2,S")}


def test_debris_is_cleaned_in_every_maildir(tmp_path: Path) -> None:
    box = tmp_path / "ex.test" / "alice"
    maildir.make_maildir(box, folder=False)
    maildir.make_maildir(box / ".Sent", folder=True)
    (box / "tmp" / "half").write_bytes(b"partial")
    (box / ".Sent" / "tmp" / "half2").write_bytes(b"partial")
    (box / "new" / "whole").write_bytes(b"kept")
    (box / ".DOVECOT-TRASHED" / "cur").mkdir(parents=True)
    # Beside the files they replace: what a kill between the write and the rename leaves.
    (box / "dovecot-uidlist.4242.tmp").write_text("3 V1 N1\n")
    (box / "subscriptions.4242.tmp").write_text("V\t2\n\n")
    (box / ".Sent" / f"{maildir.KEYWORDS_FILE}.{maildir.unique_name(9)}").write_text("0 $Label1\n")
    (box / ".Sent" / maildir.KEYWORDS_FILE).write_text("0 $Label1\n")
    (box / "dovecot-uidlist").write_text("3 V1 N1\n")
    assert maildir.clean_debris(tmp_path) == 6
    assert sorted(p.name for p in box.iterdir() if p.is_file()) == ["dovecot-uidlist"]
    assert sorted(p.name for p in (box / ".Sent").iterdir() if p.is_file()) == sorted([maildir.FOLDER_MARKER, maildir.KEYWORDS_FILE])
    assert list((box / "tmp").iterdir()) == []
    assert list((box / ".Sent" / "tmp").iterdir()) == []
    assert (box / "new" / "whole").exists()
    assert not (box / ".DOVECOT-TRASHED").exists()
    assert maildir.clean_debris(tmp_path / "missing") == 0


def test_copies_are_hard_links_and_all_or_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in (src, dst):
        maildir.make_maildir(d, folder=False)
    (src / "cur" / "a:2,S").write_bytes(b"one")
    maildir.copy_messages([(src / "cur" / "a:2,S", WriteJob(dst, "b", "cur", "b:2,S", None))])
    assert os.stat(dst / "cur" / "b:2,S").st_ino == os.stat(src / "cur" / "a:2,S").st_ino
    with pytest.raises(FileNotFoundError):
        maildir.copy_messages([
            (src / "cur" / "a:2,S", WriteJob(dst, "c", "cur", "c:2,", None)),
            (src / "cur" / "gone", WriteJob(dst, "d", "cur", "d:2,", None)),
        ])
    assert sorted(p.name for p in (dst / "cur").iterdir()) == ["b:2,S"]


def test_open_message_follows_a_rename(tmp_path: Path) -> None:
    maildir.make_maildir(tmp_path, folder=False)
    (tmp_path / "cur" / "base:2,S").write_bytes(b"body")
    with maildir.open_message(tmp_path / "new" / "base") as f:
        assert f.read() == b"body"
    with pytest.raises(FileNotFoundError):
        maildir.open_message(tmp_path / "cur" / "other:2,")


# --- wire sizes -----------------------------------------------------------------------------------

def crlf(data: bytes) -> bytes:
    """The reference: every LF without a CR before it written as CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


@pytest.mark.parametrize("data", [
    b"", b"x", b"a\r\nb\r\n", b"a\nb\n", b"\n\n\n", b"a\r\nb\nc\r\n\n", b"\r\n\n\r\r\n", b"lone\rcr\r",
    b"no end of line\n last",
])
def test_bare_lfs_are_counted(data: bytes) -> None:
    assert len(data) + maildir.bare_lfs(data) == len(crlf(data))
    assert maildir.count_wire_size(io.BytesIO(data).read) == len(crlf(data))


def test_a_crlf_cut_by_a_chunk_boundary_is_one_line_end() -> None:
    data = b"ab\r\ncd\ne\r\n"
    for chunk in range(1, len(data) + 1):  # every cut, including between CR and LF at offsets 3 and 10
        assert maildir.count_wire_size(io.BytesIO(data).read, chunk) == len(data) + 1, chunk
    assert maildir.bare_lfs(b"\nx\n", prev_cr=True) == 1
    assert maildir.bare_lfs(b"\nx\n", prev_cr=False) == 2
    # A CR ending one chunk and a CR starting the next: the LF after the second is not bare.
    assert maildir.count_wire_size(io.BytesIO(b"a\r\r\nb\n").read, 2) == len(crlf(b"a\r\r\nb\n"))


@given(st.binary(max_size=200).map(lambda b: bytes(b"\r\nx"[c % 3] for c in b)), st.integers(1, 17))
def test_counting_in_chunks_matches_the_whole(data: bytes, chunk: int) -> None:
    assert maildir.count_wire_size(io.BytesIO(data).read, chunk) == len(crlf(data))


def test_a_large_file_is_counted_in_chunks(tmp_path: Path) -> None:
    line = b"0123456789" * 7 + b"\n"
    data = bytearray(line * 50_000)  # about 3.5 MB: several chunks
    data[maildir.WIRE_CHUNK - 1:maildir.WIRE_CHUNK + 1] = b"\r\n"  # a CRLF across the first boundary
    path = tmp_path / "1700000000.M1P1.other,S=3550000:2,S"
    path.write_bytes(bytes(data))
    assert maildir.wire_size(path) == len(crlf(bytes(data)))
    crlf_only = tmp_path / "crlf"
    crlf_only.write_bytes(crlf(bytes(data)))
    assert maildir.wire_size(crlf_only) == os.path.getsize(crlf_only)


def test_dovecots_w_size_in_the_name_is_used_without_reading() -> None:
    assert maildir.name_wire_size("1700000000.M1P1.host,S=100,W=104") == 104
    assert maildir.name_wire_size("1700000000.M1P1.host,W=104,S=100") == 104
    assert maildir.name_wire_size("1700000000.M1P1.host,S=100") is None
    assert maildir.name_wire_size("1700000000.M1P1.host") is None
    assert maildir.name_wire_size("1700000000.M1P1.host,W=") is None
    assert maildir.name_wire_size("1700000000.M1P1.host,W=1x") is None
    assert maildir.name_wire_size("1700000000.M1P1.host,W=\u00b2") is None  # isdigit() but no number
    assert maildir.name_wire_size("1700000000.M1P1.host\\054W=5,S=4") is None  # an escaped comma of the host
    # The info after ':2,' is not part of the unique name; the file need not be read (nor exist).
    assert maildir.wire_size(Path("/nonexistent/cur/1.M1P1.host,S=10,W=12:2,S")) == 12
    with pytest.raises(FileNotFoundError):
        maildir.wire_size(Path("/nonexistent/cur/1.M1P1.host,S=10:2,S"))


def test_delivery_order_reads_the_unpadded_microseconds() -> None:
    # Within one second, M99999 came before M100000 although it sorts after it as text.
    names = ["1700000000.M100000P7Q2.host,S=5", "1700000000.M99999P7Q1.host,S=5",
             "1699999999.M999999P7Q9.host", "courier.name", "1700000001.other"]
    assert sorted(names, key=maildir.delivery_order) == [
        "courier.name", "1699999999.M999999P7Q9.host", "1700000000.M99999P7Q1.host,S=5",
        "1700000000.M100000P7Q2.host,S=5", "1700000001.other"]


_NAME_PARTS = st.text(alphabet="0123456789.MPQSW=,:2abc\u0663", max_size=12)


@given(st.lists(_NAME_PARTS, min_size=1, max_size=6).map("".join))
def test_sized_name_reads_what_the_general_functions_read(filename: str) -> None:
    # The first listing's one match (index.py) must give the same sizes and delivery order as the
    # three general functions, or not match at all (then those are used).
    for name in (filename, "1700000000.M12P3.host,S=" + filename, "1700000000.M12P3Q4.h,S=10,W=12" + filename):
        named = maildir.sized_name(name)
        if named is None:
            continue
        base = name.partition(":")[0]
        assert (int(named[1]), int(named[2]), base) == maildir.delivery_order(base)
        assert int(named[3]) == maildir.name_size(base)
        assert int(named[4]) == maildir.name_wire_size(base)


def test_sized_name_matches_dovecot_names() -> None:
    for name in ("1700000000.M12P3Q4.host,S=10,W=12", "1700000000.M12P3Q4.host,S=10,W=12:2,FS",
                 "1700000000.M12P3Q4.host,S=10,W=12,X=1:2,", "1700000000.M12P3.ho\\054st,S=10,W=12"):
        assert maildir.sized_name(name) is not None, name
    for name in ("1700000000.M12P3Q4.host,S=10", "1700000000.M12P3Q4.host,W=12,S=10", "courier,S=1,W=2",
                 "1700000000.M12P3Q4.host,S=1x,W=12"):
        assert maildir.sized_name(name) is None, name


def test_an_expunge_keeps_a_file_a_listing_missed_while_another_program_renamed_it(tmp_path: Path) -> None:
    """A listing of a directory another program renames in can miss a file (readdir in several calls
    over a folder of thousands): unlink_messages said such a file was removed elsewhere (None), its
    name was not kept (FolderIndex.unremoved), and the next listing indexed the expunged message
    again. A file no listing showed is now "maybe still there" (False): about 3 in 100 tries missed."""
    for sub in maildir.SUBDIRS:
        (tmp_path / sub).mkdir()
    for i in range(3000):
        (tmp_path / "cur" / f"{1_700_000_000 + i}.M{i}P1.other:2,S").touch()
    base = "1700009999.M1P2.other"
    kept_for_later = 0
    for _ in range(150):
        first = tmp_path / "cur" / f"{base}:2,S"
        first.touch()
        stop = threading.Event()

        def rename_on(name: Path = first, stop: threading.Event = stop) -> None:
            flags = "RS"
            while not stop.is_set():
                other = name.with_name(f"{base}:2,{flags}")
                try:
                    os.rename(name, other)
                except FileNotFoundError:  # removed by the expunge
                    return
                name, flags = other, "S" if flags == "RS" else "RS"

        renamer = threading.Thread(target=rename_on)
        renamer.start()
        try:
            [outcome] = maildir.unlink_messages(tmp_path, [str(first)])
        finally:
            stop.set()
            renamer.join()
        if base in maildir.list_messages(tmp_path):
            assert outcome is False
            kept_for_later += 1
            for leftover in (tmp_path / "cur").glob(f"{base}:*"):
                leftover.unlink()
