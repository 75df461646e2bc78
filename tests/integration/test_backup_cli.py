"""`letterbox backup ...` (issue 14): the standard-tool restore path, every refusal leaving the box
unchanged, kill -9 during a restore, and one mailbox put back into a box."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tarfile
import time
from functools import partial
from pathlib import Path

import pyrage
import pytest
import zstandard

from appliance import age_stream, backup, backup_stream
from appliance.accounts import Accounts
from appliance.config import DataLayout
from appliance.db import Database
from appliance.store.mailstore import MailStore
from tests.conftest import LETTERBOX, require_program
from tests.support.backup_progress import AtFirstFile
from tests.support.polling import wait_until

PASSWORD = "correct horse battery staple 9"
ALICE, BOB = "alice@one.test", "bob@two.test"


def run(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(data), *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def message(n: int, size: int = 0) -> bytes:
    return (f"From: x@far.test\r\nTo: {ALICE}\r\nSubject: {n}\r\n\r\nbody {n}\r\n").encode() + \
        (os.urandom(size // 2).hex().encode() if size else b"")


def make_box(root: Path, messages: int = 6, size: int = 0) -> DataLayout:
    layout = DataLayout(root)
    layout.create()

    async def fill() -> None:
        db = await Database.open(layout.db)
        try:
            accounts = Accounts(db, data=layout)
            for address in (ALICE, BOB):
                domain = address.split("@")[1]
                if domain not in await accounts.list_domains():
                    await accounts.add_domain(domain)
                await accounts.add_user(address, PASSWORD)
            store = MailStore(layout.mail, db, Accounts(db))
            for n in range(messages):
                await store.deliver([ALICE, BOB] if n % 2 else [ALICE], message(n, size))
            await store.create_folder(ALICE, "Keep")
            await store.append(ALICE, "Keep", message(999), frozenset({"\\Seen", "$Important"}), None)
            await db.set_setting("hostname", "box.one.test")
        finally:
            await db.close()

    asyncio.run(fill())
    (layout.dkim / "one.test.s1.pem").write_text("not really a key\n")
    return layout


def state(root: Path) -> dict[str, str]:
    """Everything in a data directory (files and their bytes; the db by its rows)."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[str(Path(dirpath, d).relative_to(root)) + "/"] = ""
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if name.startswith("letterbox.db"):
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    conn = sqlite3.connect(root / "letterbox.db")
    try:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            rows = sorted(map(repr, conn.execute(f'SELECT * FROM "{table}"')))  # noqa: S608  table names from sqlite_master
            out[f"db:{table}"] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    finally:
        conn.close()
    return out


def siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir())


@pytest.fixture
def made(tmp_path: Path) -> tuple[DataLayout, Path, Path]:
    """A box with a backup key and one backup: (layout, backup file, kit file)."""
    layout = make_box(tmp_path / "box" / "data")
    kit = tmp_path / "kit.txt"
    assert run(layout.root, "backup", "key", "--kit-to", str(kit)).returncode == 0
    created = run(layout.root, "backup", "create")
    assert created.returncode == 0, created.stderr
    [item] = backup.list_backups(layout.backups)
    return layout, item.path, kit


def test_standard_tools_restore_path(made: tuple[DataLayout, Path, Path], tmp_path: Path) -> None:
    """The README's commands, without Letterbox: age -d -i kit.txt FILE | zstd -d | tar -x."""
    require_program("age")
    require_program("zstd")
    layout, file, kit = made
    out = tmp_path / "by-hand"
    out.mkdir()
    subprocess.run(f"age -d -i {kit} {file} | zstd -d | tar -x", shell=True, check=True, cwd=out, timeout=60)  # noqa: S602  the documented by-hand pipeline, paths from tmp_path
    assert json.loads((out / backup.MANIFEST_NAME).read_text())["mailboxes"][0]["address"] == ALICE
    subprocess.run(["sha256sum", "--quiet", "-c", backup.CHECKSUMS_NAME], check=True, cwd=out, timeout=60)
    for sub in ("cur", "new"):
        for p in (layout.mail / "one.test" / "alice" / sub).iterdir():
            assert (out / "mail/one.test/alice" / sub / p.name).read_bytes() == p.read_bytes()
    assert (out / "dkim/one.test.s1.pem").read_text() == "not really a key\n"
    with sqlite3.connect(out / "letterbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 6 + 3 + 1


def test_cli_create_list_verify_and_passphrase(made: tuple[DataLayout, Path, Path], tmp_path: Path) -> None:
    layout, file, kit = made
    listed = run(layout.root, "backup", "list")
    assert str(file) in listed.stdout
    verified = run(layout.root, "backup", "verify", str(file), "--key-file", "-", stdin=kit.read_text())
    assert verified.returncode == 0, verified.stderr
    assert "every checksum matches" in verified.stdout, verified.stderr
    assert ": 2 domains, 2 mailboxes, 10 messages" in verified.stdout
    phrase = tmp_path / "phrase"
    phrase.write_text("a long and secret passphrase\n")
    usb = tmp_path / "usb"
    usb.mkdir()
    created = run(layout.root, "backup", "create", "--to", str(usb), "--passphrase-file", str(phrase))
    assert created.returncode == 0, created.stderr
    [item] = backup.list_backups(usb)
    assert item.path.name.startswith("letterbox-box.one.test-")
    ok = run(layout.root, "backup", "verify", str(item.path), "--passphrase-file", str(phrase))
    assert ok.returncode == 0, ok.stderr
    # The reference implementation opens it too (age's scrypt recipient).
    plain = pyrage.passphrase.decrypt(item.path.read_bytes(), "a long and secret passphrase")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(plain)[:512].find(b"letterbox-manifest") >= 0


def _craft(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], recipient: str, *,
           schema: int | None = None, sums: dict[str, str] | None = None, mailboxes: tuple[str, ...] = ()) -> None:
    """A backup-like file made by hand, for the refusal cases."""
    manifest = json.dumps({"format": 1, "schema": schema or 7, "host": "x",
                           "mailboxes": [{"address": a} for a in mailboxes]}).encode()
    computed = {backup.MANIFEST_NAME: hashlib.sha256(manifest).hexdigest()}
    with open(path, "wb") as sink, backup._encrypting(sink, recipient, "") as plain:  # noqa: SIM117  one stream layer per line: the pipeline reads top-down
        with zstandard.ZstdCompressor().stream_writer(plain, closefd=False) as z:
            with tarfile.open(fileobj=z, mode="w|") as tar:
                info = tarfile.TarInfo(backup.MANIFEST_NAME)
                info.size = len(manifest)
                tar.addfile(info, io.BytesIO(manifest))
                for info, data in entries:
                    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
                    if info.isreg():
                        computed[info.name] = hashlib.sha256(data).hexdigest()
                text = "".join(f"{d}  {n}\n" for n, d in (sums or computed).items()).encode()
                info = tarfile.TarInfo(backup.CHECKSUMS_NAME)
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))


def _entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def _refusals(tmp_path: Path, file: Path, kit: Path) -> list[tuple[str, Path, list[str], str]]:
    recipient = backup.recipient_of(kit.read_text())
    other = tmp_path / "other-kit.txt"
    other.write_text(backup.new_kit("x").text)
    phrase = tmp_path / "phrase"
    phrase.write_text("not the passphrase\n")
    data = file.read_bytes()
    truncated = tmp_path / "truncated.tar.zst.age"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    corrupted = tmp_path / "corrupted.tar.zst.age"
    corrupted.write_bytes(data[:2000] + bytes([data[2000] ^ 1]) + data[2001:])
    crafted: dict[str, Path] = {}
    db = b"SQLite format 3\x00" + b"\x00" * 100
    for label, entries, extra in (
        ("newer", [_entry("letterbox.db", db)], {"schema": 99}),
        ("mismatch", [_entry("letterbox.db", db)], {"sums": {"letterbox.db": "0" * 64}}),
        ("dotdot", [_entry("../evil", b"x")], {}),
        ("absolute", [_entry("/tmp/evil", b"x")], {}),  # noqa: S108  a hostile archive's member name
        ("symlink", [_entry("mail/link", kind=tarfile.SYMTYPE, link="/etc")], {}),
        ("hardlink", [_entry("mail/hard", kind=tarfile.LNKTYPE, link="letterbox.db")], {}),
        ("device", [_entry("mail/dev", kind=tarfile.CHRTYPE)], {}),
        # The second copy in the folder of the first: the quick way through _Unpacking.member.
        ("twice", [_entry("letterbox.db", db), _entry("mail/x", b"a"), _entry("mail/x", b"b")], {}),
    ):
        p = tmp_path / f"{label}.tar.zst.age"
        _craft(p, entries, recipient, **extra)
        crafted[label] = p
    key = ["--key-file", str(kit)]
    return [
        ("wrong kit", file, ["--key-file", str(other)], "wrong emergency kit"),
        ("wrong passphrase", file, ["--passphrase-file", str(phrase)], "not protected by a passphrase"),
        ("truncated", truncated, key, "damaged or incomplete"),
        ("corrupted", corrupted, key, "damaged or incomplete"),
        ("newer schema", crafted["newer"], key, "newer Letterbox"),
        ("manifest mismatch", crafted["mismatch"], key, "do not match"),
        ("..", crafted["dotdot"], key, "outside the data directory"),
        ("absolute", crafted["absolute"], key, "outside the data directory"),
        ("symlink", crafted["symlink"], key, "link or device"),
        ("hard link", crafted["hardlink"], key, "link or device"),
        ("device", crafted["device"], key, "link or device"),
        ("twice", crafted["twice"], key, "appears twice"),
    ]


def test_every_refusal_leaves_the_box_unchanged(made: tuple[DataLayout, Path, Path], tmp_path: Path) -> None:
    """Each case through the application functions the CLI and the web call (verify, full restore,
    one mailbox), and a few through the CLI for its one-line message."""
    layout, file, kit = made
    before, around = state(layout.root), siblings(layout.root)
    for label, path, args, needle in _refusals(tmp_path, file, kit):
        text = Path(args[1]).read_text()
        secret = backup.Secret(passphrase=text.splitlines()[0]) if args[0] == "--passphrase-file" \
            else backup.Secret.from_text(text)
        for attempt in (
            backup.verify(path, secret, layout),
            backup.restore(layout, path, secret),
            _restore_alice(layout, path, secret),
        ):
            with pytest.raises(backup.BackupError, match=needle):
                asyncio.run(attempt)
            assert state(layout.root) == before, label
            assert siblings(layout.root) == around, label
        if label in ("wrong kit", "truncated", ".."):
            result = run(layout.root, "backup", "restore", str(path), *args)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1, result.stderr
            assert len(lines) == 1, result.stderr
            assert needle in lines[0], result.stderr
            assert state(layout.root) == before, label
            assert siblings(layout.root) == around, label
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/evil").exists()  # noqa: S108  checks the hostile name was not written


async def _restore_alice(layout: DataLayout, path: Path, secret: backup.Secret) -> None:
    from appliance.events import EventLog

    db = await Database.open(layout.db)
    try:
        await backup.restore_mailbox(db, EventLog(db), layout, path, secret, ALICE)
    finally:
        await db.close()


def test_a_backup_whose_database_is_damaged_is_refused_in_words(made: tuple[DataLayout, Path, Path],
                                                                tmp_path: Path) -> None:
    """An archive whose checksums match (whoever made it listed them) but whose letterbox.db is not a
    Letterbox database: the restore printed sqlite3's traceback (the console said "failed:
    DatabaseError"), and so did a mailbox restore; now one line, and the box is unchanged."""
    layout, _file, kit = made
    before, around = state(layout.root), siblings(layout.root)
    recipient = backup.recipient_of(kit.read_text())
    for label, db in (("not sqlite", b"not a database at all\n" * 200),
                      ("no tables", _empty_sqlite(tmp_path / "empty.db"))):
        crafted = tmp_path / f"{label}.tar.zst.age"
        _craft(crafted, [_entry("letterbox.db", db)], recipient, mailboxes=(ALICE,))
        for extra in ((), ("--mailbox", ALICE), "verify"):
            action = ("verify",) if extra == "verify" else ("restore",)
            result = run(layout.root, "backup", *action, str(crafted), "--key-file", str(kit),
                         *(() if extra == "verify" else extra))
            assert result.returncode == 1, (label, extra, result.stdout)
            assert result.stderr.startswith("letterbox: the backup's database is damaged or not a Letterbox"
                                            " database ("), (label, extra, result.stderr)
            assert result.stderr.strip().endswith("nothing was changed"), (label, extra, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (label, extra, result.stderr)
            assert state(layout.root) == before, (label, extra)
            assert siblings(layout.root) == around, (label, extra)


def test_two_backups_of_the_same_second_each_write_a_file_of_their_own(made: tuple[DataLayout, Path, Path]) -> None:
    """Both wrote `NAME.partial`: the second truncated the first's file and renamed it into place, then
    the first went on writing into it. The second was reported made and was damaged."""
    layout, _file, kit = made
    recipient = backup.recipient_of(kit.read_text())
    out = layout.backups / "letterbox-box.one.test-20261201T030327Z.tar.zst.age"
    seconds: list[backup.Created] = []
    first = backup.create_backup(layout, out, recipient=recipient, progress=AtFirstFile(
        lambda: seconds.append(backup.create_backup(layout, out, recipient=recipient))))
    assert len(seconds) == 1
    assert first.path == seconds[0].path == out
    checked = asyncio.run(backup.verify(out, backup.Secret.from_text(kit.read_text()), layout))
    assert checked.manifest["messages"] == first.manifest["messages"]
    assert not [p.name for p in layout.backups.iterdir() if p.name.endswith(".partial")]


def test_a_backup_whose_database_names_paths_outside_is_refused(made: tuple[DataLayout, Path, Path],
                                                               tmp_path: Path) -> None:
    """The box makes paths of its domains, mailboxes and folders (mail/<domain>/<local>/.<folder>): a
    database whose domain was '../../outside' was restored, exit 0 (the store, which checks the names
    again, then refused that mailbox in tracebacks at every start); a folder with a '.' in a level ended
    the restore in a StoreError traceback. Refused now, nothing changed."""
    layout, _file, kit = made
    before, around = state(layout.root), siblings(layout.root)
    recipient = backup.recipient_of(kit.read_text())
    for label, change, needle in (
        ("domain", "UPDATE domains SET name = '../../outside' WHERE name = 'one.test'", "names a domain '../../outside'"),
        ("mailbox", "UPDATE mailboxes SET local_part = '..' WHERE local_part = 'alice'", "names a mailbox '..'"),
        ("folder", "UPDATE folders SET name = 'a.b' WHERE name = 'Keep'", "has a folder the box cannot hold"),
    ):
        db_file = tmp_path / f"{label}.db"
        with contextlib.closing(sqlite3.connect(layout.db)) as live:
            live.execute("VACUUM INTO ?", (str(db_file),))
        with contextlib.closing(sqlite3.connect(db_file)) as db:
            db.execute(change)
            db.commit()
        crafted = tmp_path / f"{label}.tar.zst.age"
        _craft(crafted, [_entry("letterbox.db", db_file.read_bytes())], recipient)
        for action in ("restore", "verify"):
            result = run(layout.root, "backup", action, str(crafted), "--key-file", str(kit))
            assert result.returncode == 1, (label, action, result.stdout)
            assert result.stderr.startswith("letterbox: refused: the backup's database"), (label, result.stderr)
            assert needle in result.stderr, (label, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (label, result.stderr)
            assert state(layout.root) == before, label
            assert siblings(layout.root) == around, label
    assert not (layout.root.parent.parent / "outside").exists()


def test_a_backup_that_unpacks_to_more_than_the_free_space_is_refused_before_writing(
        made: tuple[DataLayout, Path, Path], tmp_path: Path) -> None:
    """A zstd frame of zeros unpacks terabytes from a few KiB, into the file system the running box
    shares: each file's size is counted against the free space (less the reserve kept for new mail)
    before it is written. Here a message file says it holds 1 TiB (its first 4 MiB of zeros follow):
    before, those were written and the restore failed only where the stream ended, or at ENOSPC."""
    layout, _file, kit = made
    before, around = state(layout.root), siblings(layout.root)
    manifest = json.dumps({"format": 1, "schema": 7, "host": "x", "mailboxes": [{"address": ALICE}]}).encode()
    crafted = tmp_path / "bomb.tar.zst.age"
    with open(crafted, "wb") as sink, backup._encrypting(sink, backup.recipient_of(kit.read_text()), "") as plain:  # noqa: SIM117  one stream layer per line
        with zstandard.ZstdCompressor().stream_writer(plain, closefd=False) as z:
            z.write(backup_stream.header(backup.MANIFEST_NAME, len(manifest)) + manifest + backup_stream.padding(len(manifest)))
            z.write(backup_stream.header("mail/one.test/alice/cur/1.bomb", 2**40))
            for _ in range(4):
                z.write(bytes(1024 * 1024))
    assert crafted.stat().st_size < 64 * 1024
    for extra in ((), ("--mailbox", ALICE)):
        result = run(layout.root, "backup", "restore", str(crafted), "--key-file", str(kit), *extra)
        assert result.returncode == 1, (extra, result.stdout)
        assert result.stderr.startswith("letterbox: refused: the backup unpacks to more than the free space"), \
            (extra, result.stderr)
        assert state(layout.root) == before, extra
        assert siblings(layout.root) == around, extra


def test_a_backup_to_another_folder_writes_only_the_encrypted_file_there(made: tuple[DataLayout, Path, Path],
                                                                         tmp_path: Path) -> None:
    """`backup create --to /media/usb`: the database's snapshot, in clear (password hashes, the restic
    and relay passwords), was written into that folder while the backup ran, and left there for good
    when the backup was killed. It is made beside the database now; what killed backups left (a
    snapshot, a partial file, an hour old) goes at the next backup."""
    layout, _file, kit = made
    usb = tmp_path / "usb"
    usb.mkdir()
    stale = [layout.root / ".backup-snapshot-0123456789ab.db", usb / "letterbox-x-20261130T030000Z.tar.zst.age.1234abcd.partial"]
    fresh = usb / "letterbox-x-20261201T030000Z.tar.zst.age.5678ef01.partial"  # a backup running beside this one
    for path in [*stale, fresh]:
        path.write_bytes(b"left by a killed backup")
    for path in stale:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    seen: list[list[str]] = []
    made_now = backup.create_backup(layout, usb / "letterbox-box.one.test-20261201T040000Z.tar.zst.age",
                                    recipient=backup.recipient_of(kit.read_text()),
                                    progress=AtFirstFile(lambda: seen.append(sorted(p.name for p in usb.iterdir()))))
    [during] = seen
    assert [n for n in during if n != fresh.name and not n.startswith(made_now.path.name + ".")] == []
    assert sorted(p.name for p in usb.iterdir()) == sorted([made_now.path.name, fresh.name])
    assert not stale[0].exists()
    assert not list(layout.root.glob(".backup-snapshot-*"))


def test_the_last_backup_names_a_file_of_the_data_directory_from_it(made: tuple[DataLayout, Path, Path],
                                                                    tmp_path: Path) -> None:
    """The Backups page's 'The last backup (...): Backup made: /var/lib/letterbox/data/backups/letterbox-...'
    spelt out the data directory (in the README's screenshot, a pytest temporary path): a file in it is
    named from it, 'backups/letterbox-...', as the page names that folder; one elsewhere in full."""
    layout, file, _kit = made

    def last_text() -> str:
        with contextlib.closing(sqlite3.connect(layout.db)) as db:
            (value,) = db.execute("SELECT value FROM settings WHERE key = ?", (backup.LAST_SETTING,)).fetchone()
        return str(json.loads(value)["text"])

    assert last_text() == f"Backup made: backups/{file.name}"
    usb = tmp_path / "usb"
    usb.mkdir()
    assert run(layout.root, "backup", "create", "--to", str(usb)).returncode == 0
    [elsewhere] = usb.iterdir()
    assert last_text() == f"Backup made: {elsewhere}"


def _empty_sqlite(path: Path) -> bytes:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    return path.read_bytes()


def test_passphrase_backup_refuses_a_wrong_passphrase(tmp_path: Path) -> None:
    sink = io.BytesIO()
    with age_stream.passphrase_writer(sink, "right one") as plain:
        plain.write(b"x" * 200_000)
    with pytest.raises(age_stream.AgeError, match="wrong passphrase"):  # noqa: SIM117  the raise must come from entering the reader
        with age_stream.passphrase_reader(io.BytesIO(sink.getvalue()), "wrong one"):
            pass
    with age_stream.passphrase_reader(io.BytesIO(sink.getvalue()), "right one") as reader:
        assert reader.read() == b"x" * 200_000
    with pytest.raises(age_stream.AgeError, match=r"damaged|truncated"):  # noqa: SIM117  the raise may come from entering or reading
        with age_stream.passphrase_reader(io.BytesIO(sink.getvalue()[:-70_000]), "right one") as reader:
            reader.read()


def test_full_restore_keeps_the_old_data_aside(made: tuple[DataLayout, Path, Path], tmp_path: Path) -> None:
    layout, file, kit = made
    before = state(layout.root)
    # Changes after the backup: a new mailbox; the restore takes the box back to the backup.
    assert run(layout.root, "domain", "add", "three.test").returncode == 0
    restored = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit))
    assert restored.returncode == 0, restored.stderr
    assert "three.test" not in run(layout.root, "domain", "list").stdout
    [aside] = [p for p in layout.root.parent.iterdir() if ".before-restore-" in p.name]
    assert "three.test" in run(aside, "domain", "list").stdout
    assert (layout.backups / file.name).exists()  # the backups stay with the box
    after = state(layout.root)
    assert {k for k in after if not k.startswith("db:")} == {k for k in before if not k.startswith("db:")}


# Up to eight restores started and killed, each between CLI runs and whole-tree snapshots: 22 s alone, 120 s
# (the default limit) at load 17 beside three other workers: a slower restore is killed mid-way in every round,
# so the loop runs all its rounds instead of ending at the first finished restore.
@pytest.mark.timeout(300)
def test_kill_during_restore_leaves_old_or_new(tmp_path: Path) -> None:
    """kill -9 at several moments after the restore began unpacking: the data directory is the old
    one or the restored one, complete, never a mix."""
    layout = make_box(tmp_path / "box" / "data", messages=120, size=60_000)
    kit = tmp_path / "kit.txt"
    assert run(layout.root, "backup", "key", "--kit-to", str(kit)).returncode == 0
    assert run(layout.root, "backup", "create").returncode == 0
    [item] = backup.list_backups(layout.backups)
    file = tmp_path / item.path.name
    shutil.move(item.path, file)
    reference = tmp_path / "ref" / "data"
    assert run(reference, "backup", "restore", str(file), "--key-file", str(kit)).returncode == 0
    new_state = {k for k in state(reference) if not k.startswith("db:")}
    outcomes = []
    for i in range(8):
        assert run(layout.root, "domain", "add", f"old{i}.test").returncode == 0
        old_state = state(layout.root)
        proc = subprocess.Popen([LETTERBOX, "--data", str(layout.root), "backup", "restore", str(file),
                                 "--key-file", str(kit)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(partial(_restoring_or_done, layout.root, proc), seconds=30, interval=0.005,
                   what="the restore under way")
        time.sleep(0.04 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = state(layout.root)
        if now == old_state:
            outcomes.append("old")
            continue
        assert {k for k in now if not k.startswith("db:")} == new_state, i
        assert f"old{i}.test" not in run(layout.root, "domain", "list").stdout
        outcomes.append("new")
        break
    assert "old" in outcomes  # at least one kill landed mid-restore


def _restoring_or_done(root: Path, proc: subprocess.Popen[bytes]) -> bool:
    return any(".restore-" in n for n in siblings(root)) or proc.poll() is not None


def test_one_mailbox_back_into_a_box(made: tuple[DataLayout, Path, Path]) -> None:
    layout, file, kit = made
    with sqlite3.connect(layout.db) as db:
        (old_hash,) = db.execute("SELECT password_hash FROM mailboxes WHERE local_part = 'alice'").fetchone()
    removed = run(layout.root, "user", "remove", ALICE)
    assert removed.returncode == 0
    alice = layout.mail / "one.test" / "alice"
    assert not alice.exists()
    bob = {p.name for p in (layout.mail / "two.test" / "bob").rglob("*") if p.is_file()}
    result = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE)
    assert result.returncode == 0, result.stderr
    assert "restored 7 messages into alice@one.test (mailbox made again)" in result.stdout
    assert {p.name for p in (layout.mail / "two.test" / "bob").rglob("*") if p.is_file()} == bob
    files = [p for sub in ("cur", "new") for p in (alice / sub).iterdir()]
    assert len(files) == 6
    assert len(list((alice / ".Keep" / "cur").iterdir())) == 1
    with sqlite3.connect(layout.db) as db:
        (hash_,) = db.execute("SELECT password_hash FROM mailboxes WHERE local_part = 'alice'").fetchone()
    assert hash_ == old_hash  # its owner logs in with the same password
    # Again: nothing is doubled.
    again = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE)
    assert "restored 0 messages" in again.stdout, again.stderr


def test_one_mailbox_back_is_named_as_user_add_names_it(made: tuple[DataLayout, Path, Path]) -> None:
    """`--mailbox Alice@One.Test.` (case, a root dot; 'bob@bücher.example' for its xn-- form) said "the
    backup holds no mailbox", though `user add` takes each of these for the address it stores."""
    layout, file, kit = made
    assert run(layout.root, "user", "remove", ALICE).returncode == 0
    result = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", "Alice@One.Test.")
    assert result.returncode == 0, result.stderr
    assert "restored 7 messages into alice@one.test (mailbox made again)" in result.stdout
    wrong = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", "not an address")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("letterbox: not a valid email address: 'not an address'"), wrong.stderr


def test_one_folder_back_names_a_missing_folder_and_changes_nothing(made: tuple[DataLayout, Path, Path]) -> None:
    """A mistyped --folder said "restored 0 messages" with exit 0, and a removed mailbox was made
    again, empty; now it is refused with the backup's folders, and the box is unchanged."""
    layout, file, kit = made
    assert run(layout.root, "user", "remove", ALICE).returncode == 0
    before = state(layout.root)
    wrong = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE,
                "--folder", "keep")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("letterbox: the backup holds no folder keep in alice@one.test"
                                    " (its folders: INBOX, Archive, Drafts, Junk, Keep, Sent, Trash)")
    assert state(layout.root) == before
    right = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE,
                "--folder", "Keep")
    assert right.returncode == 0, right.stderr
    assert "restored 1 messages into alice@one.test (mailbox made again)" in right.stdout
    inbox = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE,
                "--folder", "inbox")
    assert "restored 6 messages" in inbox.stdout, inbox.stderr


def test_backup_list_of_a_box_without_backups_says_so_on_stderr(tmp_path: Path) -> None:
    """A new user's `backup list` on a box that has none printed nothing at all; stdout stays empty
    for scripts, and a hint goes to stderr."""
    data = tmp_path / "data"
    assert run(data, "domain", "add", "one.test").returncode == 0
    listed = run(data, "backup", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""
    assert "no backups in" in listed.stderr
    assert "letterbox backup create" in listed.stderr


def test_one_mailbox_back_killed_once_the_account_is_made_keeps_its_password(made: tuple[DataLayout, Path, Path]) -> None:
    """The restore made the account again with a random password and set the backup's hash in a second
    transaction: killed between the two (strace: SIGKILL at its second WAL sync, the account's), the
    mailbox stayed with a password nobody knew, and a restore run again left it so (the mailbox was
    there). Now the account comes back with its hash in one transaction."""
    layout, file, kit = made
    with sqlite3.connect(layout.db) as db:
        (old_hash,) = db.execute("SELECT password_hash FROM mailboxes WHERE local_part = 'alice'").fetchone()
    assert run(layout.root, "user", "remove", ALICE).returncode == 0
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "signal=none", "-P", str(layout.root / "letterbox.db-wal"),
         "-e", "trace=fdatasync,fsync", "-e", "inject=fdatasync,fsync:signal=SIGKILL:when=2",
         LETTERBOX, "--data", str(layout.root), "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE],
        capture_output=True, text=True, timeout=120)
    assert killed.returncode in (-9, 137), (killed.returncode, killed.stdout, killed.stderr)
    with sqlite3.connect(layout.db) as db:
        row = db.execute("SELECT password_hash FROM mailboxes WHERE local_part = 'alice'").fetchone()
    assert row is not None, "the kill came before the account was made"
    assert row[0] == old_hash
    # Run again, as its user would: the mail is all there (copied now, or before the kill).
    result = run(layout.root, "backup", "restore", str(file), "--key-file", str(kit), "--mailbox", ALICE)
    assert result.returncode == 0, result.stderr
    alice = layout.mail / "one.test" / "alice"
    assert len([p for sub in ("cur", "new") for p in (alice / sub).iterdir()]) == 6
    assert len(list((alice / ".Keep" / "cur").iterdir())) == 1


def test_the_manifest_line_counts_in_words() -> None:
    """verify's and restore's line said "1 domains, 1 mailboxes, 1 messages" of a one-person box."""
    from appliance.cli import _manifest_line

    manifest = {"created": "2026-12-02T00:48:47Z", "host": "mail.example.test", "domains": ["example.test"],
                "mailboxes": [{"address": "alice@example.test"}], "messages": 1}
    assert _manifest_line(manifest) == "made 2026-12-02T00:48:47Z on mail.example.test: 1 domain, 1 mailbox, 1 message"
    manifest["mailboxes"] = []
    assert _manifest_line(manifest).endswith(": 1 domain, 0 mailboxes, 1 message")
