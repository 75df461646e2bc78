"""The `letterbox` command: argparse and printing only; every action is a service call.

Each command imports what it uses inside its own function (issue 15): building the parser and
`letterbox --help`/`--version` import a few stdlib modules, `letterbox user list` the accounts and the
database but not the certificates, backups or the mail services (`serve` imports those). Module-level
imports here are only the light ones; tests/unit/test_import_cost.py holds the line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from appliance import sizes
from appliance.account_errors import AccountError
from appliance.config import DataLayout, ServeConfig, default_data_dir
from appliance.db_errors import DatabaseError

if TYPE_CHECKING:
    from appliance.accounts import AliasInfo
    from appliance.admin import Admin
    from appliance.db import Database

T = TypeVar("T")


class CliError(Exception):
    """Printed as one line; exit status 1 (`status`)."""

    status = 1


class CliUsageError(CliError):
    """A value the command does not take (as argparse's own errors): exit status 2."""

    status = 2


# What a shell reports for a program ended by SIGPIPE (128 + 13): `letterbox user list | head` exits
# as `ls | head` would, so `set -o pipefail` scripts can still tell that the output was cut short.
EXIT_STDOUT_CLOSED = 141


def parse_size(text: str) -> int:
    """'500M', '1.5G', '0' -> bytes, by appliance.sizes (the web console's rule too)."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_port_offset(text: str) -> int:
    """--port-offset N, such that every port stays a port (70000 was a traceback from bind(), and -25
    made port 25 port 0: a port the kernel picks)."""
    from appliance.config import STANDARD_PORTS

    low, high = 1 - min(STANDARD_PORTS.values()), 65535 - max(STANDARD_PORTS.values())
    try:
        offset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not low <= offset <= high:
        raise argparse.ArgumentTypeError(f"{offset} would take a port out of 1-65535: give {low} to {high}"
                                         " (make run uses 10000)")
    return offset


def parse_hostname(text: str) -> str:
    """--hostname NAME, a DNS name as the wizard's (without its public-name rules: a test box may be
    box.test): 'a b' was taken, and greeted every SMTP client as '220 a b ESMTP'."""
    from appliance.accounts.checks import mail_domain

    try:
        return mail_domain(text)
    except AccountError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# What is read of standard input after the password's line: only whether there is anything.
PASSWORD_STDIN_BOUND = 4096
# A certificate, key, chain or secret file named on the command line: read no further than one could be
# (appliance.tls refuses a PEM file above 256 KiB).
MAX_FILE_READ = 256 * 1024


def read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        # Bytes the locale's codec cannot read come as surrogates (surrogateescape, as in C.UTF-8) or
        # as a decoding error: a latin-1 password ended in a UnicodeEncodeError traceback at hashing.
        try:
            line = sys.stdin.readline()
            # The rest of the input must be empty: a second line was dropped, and 'correct horse' NL
            # 'battery staple' made the password 'correct horse'. Not read from a terminal, where the
            # line typed with --password-stdin ends at Enter.
            rest = "" if sys.stdin.isatty() else sys.stdin.read(PASSWORD_STDIN_BOUND)
        except UnicodeDecodeError:
            line, rest = "\udcff", ""
        if any("\udc80" <= ch <= "\udcff" for ch in line):
            raise CliError("the password on standard input is not UTF-8 text")
        password = line.removesuffix("\n").removesuffix("\r")
        if rest or "\r" in password:
            raise CliError("the password on standard input has more than one line: give it alone, on one line")
        return password
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise CliError("the two passwords differ")
    return first


# The commands that make a box in an empty or missing data directory: `serve`, the first steps of a box
# set up from the CLI (`domain add`, as in the README's example, and `admin add`, the wizard's first
# step), and disaster recovery onto a new machine: a whole-box restore, its `verify` beforehand, and
# `backup restic set`, which names the repository to fetch the backup from.
CREATES_BOX = {("serve", None), ("domain", "add"), ("admin", "add"), ("backup", "verify"), ("backup", "restore"),
               ("backup", "restic", "set")}


def creates_box(args: argparse.Namespace) -> bool:
    if getattr(args, "mailbox", None) and args.command == "backup":
        return False  # `backup restore --mailbox` puts one mailbox back into an existing box
    command = (args.command, getattr(args, "action", None))
    if command == ("backup", "restic"):
        return (*command, args.restic_action) in CREATES_BOX
    return command in CREATES_BOX


def require_owner(root: Path) -> None:
    """Refuse root on a data directory that belongs to the box's own user (`letterbox` on the image
    and after install.sh): `sudo letterbox --data /var/lib/letterbox/data domain add ...` left a DKIM
    key (and a WAL, a mail folder...) only root could read, which the box then could not."""
    if os.geteuid() != 0:
        return
    try:
        owner = root.stat().st_uid
    except FileNotFoundError:
        return
    if owner == 0:
        return
    import pwd

    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    raise CliError(f"{root} belongs to the user {name}, and files root made there would be unreadable to the box:"
                   f" run this as {name} (sudo -u {name} letterbox --data {root} ...)")


def require_box(args: argparse.Namespace) -> None:
    """Refuse a command that needs a box when --data names none, before anything is created there: a
    mistyped `--data /srv/letterbx cert status` used to leave a whole new data directory behind."""
    require_owner(Path(args.data))
    if creates_box(args):
        return
    layout = DataLayout(Path(args.data))
    if not layout.db.is_file():
        where = "does not exist" if not layout.root.exists() else "holds no Letterbox box (no letterbox.db)"
        raise CliError(f"the data directory {layout.root} {where}: check --data (or LETTERBOX_DATA); a new box"
                       " is made by `letterbox serve`, `letterbox domain add` or `letterbox admin add`")


async def open_db(args: argparse.Namespace) -> Database:
    from appliance.db import Database

    layout = DataLayout(Path(args.data))
    layout.create()
    return await Database.open(layout.db)


def run_admin(args: argparse.Namespace, action: Callable[[Admin], Awaitable[T]]) -> T:
    """One use-case of appliance/admin.py on the data directory, as the console would run it."""
    import asyncio

    from appliance.admin import open_admin

    hostname: str | None = getattr(args, "hostname", None)

    async def act() -> T:
        async with open_admin(Path(args.data), (lambda: hostname) if hostname else None) as admin:
            return await action(admin)

    return asyncio.run(act())


# --- serve -----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from appliance.app import StartupError, serve_forever

    # The appliance's unit has UMask=0077; `make run` has the shell's (often 022). Every file the box
    # makes is its user's alone either way: an upload, a backup's snapshot, a temporary file.
    os.umask(0o077)
    config = ServeConfig(
        data=DataLayout(Path(args.data)),
        listen=args.listen,
        port_offset=args.port_offset,
        hostname=args.hostname,
    )
    try:
        asyncio.run(serve_forever(config, announce=_announce))
    except StartupError as exc:
        raise CliError(str(exc)) from exc


# --- domains, users, aliases, admins ---------------------------------------------------------------

def print_rows(rows: Iterable[str], empty: str) -> None:
    """A list command's lines; when there are none, one line saying so, on stderr: a script reading
    stdout still gets no lines, and a person is not left wondering whether the command did anything."""
    printed = False
    for row in rows:
        print(row)
        printed = True
    if not printed:
        print(empty, file=sys.stderr)


def _in_domain(domain: str | None) -> str:
    """'in bücher.example (xn--bcher-kva.example) ' for a list of one domain's (as typed, when it does not parse)."""
    from appliance.account_errors import InvalidAddress
    from appliance.accounts import stored_domain
    from appliance.address import idn

    if not domain:
        return ""
    try:
        return f"in {idn(stored_domain(domain))} "
    except InvalidAddress:
        return f"in {domain} "


# A domain or an address is named as the console names it (appliance.address.idn): an international
# domain in Unicode with its xn-- form beside, 'bücher.example (xn--bcher-kva.example)'.

def cmd_domain(args: argparse.Namespace) -> None:
    from appliance.address import idn

    if args.action == "add":
        print(f"added domain {idn(run_admin(args, lambda admin: admin.add_domain(args.name)))}, with its DKIM key")
    elif args.action == "remove":
        print(f"removed domain {idn(run_admin(args, lambda admin: admin.remove_domain(args.name)))}")
    else:
        print_rows((idn(name) for name in run_admin(args, lambda admin: admin.accounts.list_domains())),
                   "no domains yet: `letterbox domain add NAME` adds one")


def cmd_user(args: argparse.Namespace) -> None:
    from appliance.address import idn, parse_address

    password = read_password(args) if args.action in ("add", "passwd") else ""
    if args.action == "add":
        info = run_admin(args, lambda admin: admin.create_mailbox(
            args.address, password, display_name=args.name or "", quota_bytes=args.quota))
        print(f"added mailbox {idn(info.address)}")
    elif args.action == "passwd":
        print(f"password changed for {idn(run_admin(args, lambda admin: admin.set_mailbox_password(args.address, password)))}")
    elif args.action == "remove":
        from appliance.store import trash

        async def remove(admin: Admin) -> tuple[str | None, list[str]]:
            return await admin.remove_mailbox(args.address), await admin.aliases_to_nowhere(args.address)

        moved, notes = run_admin(args, remove)
        kept = f" (its mail is kept {trash.RETENTION_DAYS} days in {moved})" if moved else ""
        print(f"removed mailbox {idn(parse_address(args.address).canonical)}{kept}")
        for note in notes:
            print(f"letterbox: note: {note}", file=sys.stderr)
    elif args.action in ("enable", "disable"):
        info = run_admin(args, lambda admin: admin.update_mailbox(args.address, enabled=args.action == "enable"))
        print(f"mailbox {idn(info.address)} {args.action}d")
    elif args.action == "quota":
        info = run_admin(args, lambda admin: admin.update_mailbox(args.address, quota_bytes=args.size))
        print(f"quota of {idn(info.address)}: {sizes.format_size(info.quota_bytes) or 'unlimited'}")
    else:
        print_rows((f"{idn(info.address)}\t{info.display_name}\t{sizes.format_size(info.quota_bytes) or 'unlimited'}"
                    + ("" if info.enabled else "  (disabled)")
                    for info in run_admin(args, lambda admin: admin.accounts.list_users(args.domain))),
                   f"no mailboxes {_in_domain(args.domain)}yet: `letterbox user add ADDRESS` adds one")


def cmd_alias(args: argparse.Namespace) -> None:
    from appliance.address import idn

    if args.action == "add":
        from appliance.admin import nowhere_note

        async def add(admin: Admin) -> tuple[AliasInfo, list[str]]:
            info = await admin.add_alias(args.source, args.targets)
            return info, await admin.targets_going_nowhere(info)

        info, nowhere = run_admin(args, add)
        print(f"added alias {idn(info.source)} -> {', '.join(idn(t) for t in info.targets)}")
        if nowhere:
            print(f"letterbox: note: {nowhere_note(info.source, nowhere)}", file=sys.stderr)
    elif args.action == "remove":
        print(f"removed alias {idn(run_admin(args, lambda admin: admin.remove_alias(args.source)))}")
    else:
        print_rows((f"{idn(info.source)}\t{', '.join(idn(t) for t in info.targets)}"
                    for info in run_admin(args, lambda admin: admin.accounts.list_aliases(args.domain))),
                   f"no aliases {_in_domain(args.domain)}yet: `letterbox alias add SOURCE TARGET...` adds one")


def cmd_admin(args: argparse.Namespace) -> None:
    password = read_password(args) if args.action in ("add", "passwd") else ""
    if args.action == "add":
        print(f"added administrator {run_admin(args, lambda admin: admin.add_admin(args.name, password))}")
    elif args.action == "passwd":
        print(f"password changed for administrator "
              f"{run_admin(args, lambda admin: admin.set_admin_password(args.name, password))}")
    elif args.action == "reset-from-boot":
        print(f"the password of administrator {reset_from_boot(args)} was reset")
    elif args.action == "remove":
        print(f"removed administrator {run_admin(args, lambda admin: admin.remove_admin(args.name))}")
    else:
        print_rows(run_admin(args, lambda admin: admin.list_admins()),
                   "no administrators yet: `letterbox admin add NAME` adds one")


def reset_from_boot(args: argparse.Namespace) -> str:
    """The appliance's letterbox-reset.service: the boot partition's reset file on standard input (or
    why root could not open it), for Admin.reset_admin_password_from_boot."""
    from appliance.boot_reset import FROM_FILE, FROM_MENU, MAX_BYTES, ResetFileProblem

    def read() -> bytes:
        if args.unreadable:
            raise OSError(args.unreadable)
        return sys.stdin.buffer.read(MAX_BYTES + 1)

    where = FROM_MENU if args.from_menu else FROM_FILE
    try:
        return run_admin(args, lambda admin: admin.reset_admin_password_from_boot(read, where=where))
    except ResetFileProblem as exc:
        raise CliError(str(exc)) from None


# --- queue -----------------------------------------------------------------------------------------

def cmd_queue(args: argparse.Namespace) -> None:
    import asyncio

    from appliance.queue.spool import Spool, format_queue

    async def act() -> None:
        db = await open_db(args)
        try:
            print(format_queue(await Spool(DataLayout(Path(args.data)).spool, db).messages()))
        finally:
            await db.close()

    asyncio.run(act())


def cmd_queue_flush(args: argparse.Namespace) -> None:
    from appliance.queue import state as queue_state
    from appliance.queue.service import POLL_INTERVAL, SWEEP_INTERVAL

    async def act(admin: Admin) -> int:
        # A mistyped id said "0 recipients due now", exit 0, as if there were simply nothing to do.
        unknown = await queue_state.missing(admin.db, args.ids)
        if unknown:
            raise CliError(f"not in the queue: {', '.join(unknown)}; nothing was flushed")
        return await admin.flush_queue(args.ids)

    count = run_admin(args, act)
    print(f"{count} recipient{'s' if count != 1 else ''} due now; "
          f"a running Letterbox tries them within {POLL_INTERVAL:.0f} s (a failure report waiting for room in"
          f" a mailbox within {SWEEP_INTERVAL:.0f} s)")


def cmd_queue_delete(args: argparse.Namespace) -> None:
    deleted = run_admin(args, lambda admin: admin.delete_queued(args.ids))
    for queue_id in deleted:
        print(f"deleted {queue_id} (no report is sent)")
    missing = [i for i in args.ids if i not in deleted]
    if missing:
        raise CliError(f"not in the queue: {', '.join(missing)}")


# --- relay (smarthost) ------------------------------------------------------------------------------

def cmd_relay(args: argparse.Namespace) -> None:
    from appliance.queue.smarthost import DEFAULT_PORTS, Smarthost, SmarthostError

    password = read_password(args) if args.action == "set" and args.user else ""
    if args.action == "set" and args.ca_file:
        from appliance.plain_errors import plain
        from appliance.queue.client import CaFileError, verifying_context

        try:
            verifying_context(args.ca_file)  # checked now, not at every delivery after it is saved
        except CaFileError as exc:
            raise CliError(plain(exc.text)) from None

    async def act(admin: Admin) -> Smarthost | None:
        if args.action == "set":
            relay = Smarthost(host=args.host, port=args.port or DEFAULT_PORTS[args.tls], tls=args.tls,
                              user=args.user or "", password=password, ca_file=args.ca_file or "")
            await admin.set_relay(relay)
            return relay
        if args.action == "off":
            await admin.set_relay(None)
            return None
        return await admin.relay()

    try:
        relay = run_admin(args, act)
    except SmarthostError as exc:
        raise CliError(str(exc)) from None
    if relay is None:
        print("no relay: mail goes straight to each domain's mail server (port 25)")
    else:
        print(f"relay: {relay.describe()}" + (" (set)" if args.action == "set" else ""))


# --- settings --------------------------------------------------------------------------------------

def cmd_settings(args: argparse.Namespace) -> None:
    from appliance.settings import SettingError

    if args.action == "list":
        rows = run_admin(args, lambda admin: admin.settable())
        name_width = max(len(s.name) for s, _ in rows)
        value_width = max(len(shown) for _, shown in rows)
        for settable, shown in rows:
            print(f"{settable.name:<{name_width}}  {shown:<{value_width}}  {settable.does}; takes {settable.accepts}")
        return
    try:
        shown = run_admin(args, lambda admin: admin.set_setting(args.name, args.value))
    except SettingError as exc:
        raise CliUsageError(f"{exc}; nothing was saved") from None
    print(f"{args.name} = {shown}: in force now, a running box uses it from its next use")


# --- dkim ------------------------------------------------------------------------------------------

def cmd_dkim(args: argparse.Namespace) -> None:
    from appliance.address import idn

    key = run_admin(args, lambda admin: admin.rotate_dkim(args.domain))
    print(f"new DKIM key for {idn(key.domain)}: selector {key.selector}, used for all mail from now on")
    print("publish this record (the old one can go once mail signed with it has been delivered):")
    print(f"{key.record_name}. IN TXT \"{key.txt_record()}\"")


# --- dns -----------------------------------------------------------------------------------------

def cmd_dns(args: argparse.Namespace) -> None:
    from appliance import dns_check, dns_records

    if args.action == "records":
        print(dns_records.format_table(run_admin(args, lambda admin: admin.dns_records(args.domain))))
        return
    if args.action == "zone":
        print(run_admin(args, lambda admin: admin.dns_zone_file(args.domain)), end="")
        return
    results = run_admin(args, lambda admin: admin.check_dns(args.domain))
    print(dns_check.format_results(results))
    problems = sum(r.status != "found" for r in results)
    if problems:
        raise CliError(f"{problems} record{'s are' if problems != 1 else ' is'} not right yet (see above)")


# --- spam ----------------------------------------------------------------------------------------

def _message_files(paths: Sequence[str]) -> list[Path]:
    """Each PATH: a message file, or a Maildir folder (its cur/ and new/), for `spam learn`."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for sub in ("cur", "new"):
                if (path / sub).is_dir():
                    files.extend(sorted(p for p in (path / sub).iterdir() if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{name}: no such file or Maildir folder")
    return files


def _content_settings(args: argparse.Namespace) -> Any:
    from appliance.spam import content_service

    return content_service.content_settings(run_admin(args, lambda admin: admin.settings.fresh()))


def cmd_spam_status(args: argparse.Namespace) -> None:
    import asyncio

    from appliance.spam import content_service

    content = _content_settings(args)
    status = asyncio.run(content_service.content_status(content))
    print(status.headline)
    print(f"rspamd: {status.scanner}; junk at {content.junk_score:g}, reject at {content.reject_score:g}")
    if status.scanned is not None:
        print(f"checked: {status.scanned}, learned: {status.learned}" + (f" ({status.bayes})" if status.bayes else ""))
    if content.enabled and not status.available:
        raise CliError("content filtering is off: mail is accepted unchecked until rspamd answers")


def cmd_spam_learn(args: argparse.Namespace) -> None:
    import asyncio

    from appliance.spam import content_service
    from appliance.spam.rspamd import RspamdUnavailable

    content = _content_settings(args)
    files = _message_files(args.paths)
    counts: dict[str, int] = {}

    async def learn_all() -> None:
        for path in files:
            try:
                outcome = await content_service.learn_message(
                    content, path.read_bytes(), spam=args.kind == "spam", mailbox=args.mailbox or "")
            except (RspamdUnavailable, ValueError) as exc:
                raise CliError(f"{path}: {exc}") from None
            word = outcome.split(":", 1)[0]
            counts[word] = counts.get(word, 0) + 1
            if args.verbose_learn:
                print(f"{path}: {outcome}")

    asyncio.run(learn_all())
    print(f"{len(files)} message{'s' if len(files) != 1 else ''} as {args.kind}: "
          + (", ".join(f"{n} {word}" for word, n in sorted(counts.items())) or "nothing to learn"))


# --- cert ----------------------------------------------------------------------------------------

def cmd_cert(args: argparse.Namespace) -> None:  # noqa: C901  dispatch of the five cert subcommands; each branch only parses and renders
    from appliance import acme_terms, certificates
    from appliance.tls import CertificateProblem

    eab_hmac_key = _eab_hmac_key(args) if args.action == "request" else None

    def read(path: str | None, what: str) -> bytes:
        if not path:
            return b""
        try:
            # Bounded: /dev/zero, a device or a pipe without end was read until the memory ran out.
            with open(path, "rb") as f:
                pem = f.read(MAX_FILE_READ + 1)
        except OSError as exc:
            raise CliError(f"cannot read the {what} {path}: {exc.strerror}") from None
        if len(pem) > MAX_FILE_READ:
            raise CliError(f"the {what} {path} is too large to be one (more than {MAX_FILE_READ // 1024} KiB)")
        return pem

    async def act(admin: Admin) -> list[str]:
        try:
            lines: list[str] = []
            if args.action == "request":
                directory = acme_terms.LETS_ENCRYPT_STAGING if args.staging else args.directory
                if args.ca_file:
                    await admin.db.set_setting(certificates.CA_FILE, args.ca_file)
                info, names = await admin.request_certificate(
                    directory=directory, email=args.email, eab_kid=args.eab_kid, eab_hmac_key=eab_hmac_key)
                lines += [f"left out: {reason}" for reason in names.left_out]
                lines.append(f"issued for {', '.join(info.names)} by {info.issuer}, until {info.not_after:%Y-%m-%d}")
                lines.append("a running box serves it within a few seconds")
            elif args.action == "renew":
                renewed = await admin.renew_certificate(force=args.force)
                lines.append("not due yet (use --force to renew now)" if renewed is None else
                             f"renewed: serial {renewed.serial:x}, until {renewed.not_after:%Y-%m-%d}")
            elif args.action == "import":
                info = await admin.import_certificate(read(args.cert, "certificate"), read(args.key, "key"),
                                                      read(args.chain, "chain"))
                lines.append(f"installed for {', '.join(info.names)} from {info.issuer}, until {info.not_after:%Y-%m-%d}")
            elif args.action == "self-signed":
                info = await admin.self_signed_certificate()
                lines.append(f"self-signed certificate for {admin.hostname()}, until {info.not_after:%Y-%m-%d}")
            else:
                st = await admin.certificate_status()
                lines += [
                    f"source:       {st.source}{'' if st.trusted else ' (mail programs warn about it)'}",
                    f"names:        {', '.join(st.info.names) or '-'}",
                    f"issuer:       {st.info.issuer}",
                    f"valid until:  {st.info.not_after:%Y-%m-%d %H:%M} UTC",
                    f"next renewal: {f'{st.next_renewal:%Y-%m-%d %H:%M} UTC' if st.next_renewal else '-'}",
                    f"directory:    {st.directory}",
                ]
                if st.order.phase not in ("idle", "issued"):
                    lines.append(f"last order:   {st.order.phase}: {st.order.message}")
                if st.last_error:
                    lines.append(f"last error:   {st.last_error}")
            return lines
        except (acme_terms.AcmeProblem, CertificateProblem) as exc:
            raise CliError(str(exc)) from None

    for line in run_admin(args, act):
        print(line)


EAB_HMAC_ENV = "LETTERBOX_EAB_HMAC_KEY"


def _eab_hmac_key(args: argparse.Namespace) -> str | None:
    """The EAB HMAC key from --eab-hmac-key-file, LETTERBOX_EAB_HMAC_KEY or (certbot's flag, warned about)
    --eab-hmac-key. It is a secret that lets anyone open accounts on the CA in the owner's name: never echoed."""
    if args.eab_hmac_key_file is not None:
        return _read_secret_file(args.eab_hmac_key_file, "HMAC key").split()[0]
    if args.eab_hmac_key is not None:
        print(f"letterbox: warning: --eab-hmac-key is visible to other users of this machine (ps, shell history):"
              f" use --eab-hmac-key-file FILE or {EAB_HMAC_ENV}", file=sys.stderr)
        return str(args.eab_hmac_key)
    return os.environ.get(EAB_HMAC_ENV, "").strip() or None


# --- backup ----------------------------------------------------------------------------------------

def _read_secret_file(name: str | None, what: str) -> str:
    """A key or passphrase from a file, or from standard input for '-': never from argv."""
    if name is None:
        return ""
    try:
        if name == "-":
            text = sys.stdin.read(MAX_FILE_READ + 1)
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read(MAX_FILE_READ + 1)
    except OSError as exc:  # (its strerror alone: str(exc) names the path a second time)
        raise CliError(f"cannot read the {what} file {name}: {exc.strerror}") from None
    except UnicodeError:
        raise CliError(f"cannot read the {what} file {name}: it is not UTF-8 text") from None
    if len(text) > MAX_FILE_READ:
        raise CliError(f"the {what} file {name} is too large to be one (more than {MAX_FILE_READ // 1024} KiB)")
    if not text.strip():
        raise CliError(f"the {what} file {name} is empty")
    return text


def _secret(args: argparse.Namespace) -> Any:
    from appliance import backup

    text = _read_secret_file(args.key_file, "key") or _read_secret_file(args.passphrase_file, "passphrase")
    if not text:
        raise CliError("give the emergency kit with --key-file FILE or a passphrase with --passphrase-file FILE"
                       " ('-' reads standard input)")
    if args.passphrase_file:
        return backup.Secret(passphrase=text.splitlines()[0])
    return backup.Secret.from_text(text)


def _counted(count: object, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _manifest_line(manifest: dict[str, Any]) -> str:
    return (f"made {manifest.get('created')} on {manifest.get('host')}: "
            f"{_counted(len(manifest.get('domains', [])), 'domain', 'domains')}, "
            f"{_counted(len(manifest.get('mailboxes', [])), 'mailbox', 'mailboxes')}, "
            f"{_counted(manifest.get('messages'), 'message', 'messages')}")


async def _restic(admin: Any, args: argparse.Namespace) -> None:
    """`letterbox backup restic ...`: the password comes from a file or stdin, never from argv."""
    if args.restic_action == "set":
        password = _read_secret_file(args.password_file, "password").splitlines()[0]
        made = await admin.set_restic(args.repo, password)
        print(f"restic repository {'made and ' if made else ''}set: the daily backup is sent to it")
    elif args.restic_action == "off":
        await admin.set_restic("", "")
        print("restic copies off")
    elif args.restic_action == "send":
        print(f"sent as snapshot {await admin.send_to_restic(Path(args.file))}")
    elif args.restic_action == "list":
        for snap in await admin.restic_snapshots():
            print(f"{snap.id}\t{snap.time}\t{' '.join(snap.paths)}")
    else:
        print(await admin.fetch_from_restic(args.snapshot, Path(args.to)))


async def _restore_whole(layout: DataLayout, args: argparse.Namespace) -> None:
    from appliance import backup
    from appliance.data_lock import DataDirInUse, DataDirLock

    # Held while the restore runs: swapping the directory under a running box would leave it writing
    # into the old one, and a box started meanwhile removes staging directories.
    lock = DataDirLock(layout.root)
    try:
        lock.acquire()
    except DataDirInUse:
        raise CliError("letterbox serve is running on this data directory: stop it first, or restore"
                       " from the console (Backups), which restarts the box on the restored data") from None
    except FileNotFoundError:
        pass  # a new machine: no box to keep out yet
    try:
        restored = await backup.restore(layout, Path(args.file), _secret(args))
    finally:
        lock.release()
    kept = f"; the old data is kept in {restored.kept_aside}" if restored.kept_aside else ""
    print(f"restored {_manifest_line(restored.manifest)}{kept}")


def cmd_backup(args: argparse.Namespace) -> None:
    import asyncio

    from appliance import backup
    from appliance.address import idn
    from appliance.admin import open_admin

    layout = DataLayout(Path(args.data))

    async def act() -> None:
        if args.action == "list":
            print_rows((f"{item.path}\t{sizes.format_size(item.size) or '0'}" for item in backup.list_backups(layout.backups)),
                       f"no backups in {layout.backups} yet: `letterbox backup create` makes one")
            return
        if args.action == "verify":
            checked = await backup.verify(Path(args.file), _secret(args), layout)
            print(f"{args.file}: every checksum matches ({checked.files} files); {_manifest_line(checked.manifest)}")
            return
        if args.action == "restore" and not args.mailbox:
            await _restore_whole(layout, args)
            return
        async with open_admin(layout.root) as admin:
            if args.action == "key":
                kit = await admin.make_backup_key()
                fd = os.open(args.kit_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(kit.text)
                print(f"new backup key {kit.recipient}; emergency kit written to {args.kit_to}:"
                      " keep it away from the box, it is not shown again")
            elif args.action == "restic":
                await _restic(admin, args)
            elif args.action == "create":
                key = _read_secret_file(args.key_file, "key")
                passphrase = _read_secret_file(args.passphrase_file, "passphrase").splitlines()
                made = await admin.create_backup(to=Path(args.to) if args.to else None,
                                                 key_text=key, passphrase=passphrase[0] if passphrase else "")
                print(f"{made.path}\t{made.size} bytes\t{made.manifest['messages']} messages")
            else:
                done = await admin.restore_mailbox(Path(args.file), _secret(args), args.mailbox, args.folder)
                again = " (mailbox made again)" if done.created else ""
                print(f"restored {done.messages} messages into {idn(done.address)}{again}")

    try:
        asyncio.run(act())
    except backup.BackupError as exc:
        raise CliError(str(exc)) from exc


# --- spam: the connection-time layers ----------------------------------------------------------------

def _when(stamp: int | None) -> str:
    import datetime as dt

    return "-" if stamp is None else dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_spam_greylist(args: argparse.Namespace) -> None:
    if args.greylist_action == "list":
        print_rows((f"{e.network}\t{e.sender}\t{e.recipient}\t"
                    + (f"passed {_when(e.passed_at)}" if e.passed_at is not None else "waiting")
                    + f"\tattempts {e.attempts}\tlast {_when(e.last_seen)}\texpires {_when(e.expires)}"
                    for e in run_admin(args, lambda admin: admin.greylist_entries(passed=args.passed))),
                   "no greylist entries" + {True: " that passed", False: " waiting"}.get(args.passed, ""))
        return
    if not (args.all or args.network or args.sender or args.recipient):
        raise CliError("say which triplets to clear (--network, --sender, --recipient) or --all")
    count = run_admin(args, lambda admin: admin.clear_greylist(
        network=args.network, sender=args.sender, recipient=args.recipient))
    print(f"cleared {count} greylist entr{'y' if count == 1 else 'ies'}")


def cmd_spam_lists(args: argparse.Namespace) -> None:
    for report in run_admin(args, lambda admin: admin.check_dnsbl() if args.check else admin.dnsbl_status()):
        detail = f": {report.detail}" if report.detail else ""
        print(f"{report.zone}\t{report.kind}\t{report.state}{detail}\t(last seen {_when(report.checked_at)})")


def cmd_spam_suspended(args: argparse.Namespace) -> None:
    from appliance.address import idn

    if args.suspended_action == "lift":
        print(f"{idn(run_admin(args, lambda admin: admin.lift_suspension(args.address)))} may send again")
        return
    print_rows((f"{idn(s.mailbox)}\tsince {_when(s.since)}\t{s.reason}"
                for s in run_admin(args, lambda admin: admin.outbound_suspensions())),
               "no mailbox is suspended from sending")


# --- parser ----------------------------------------------------------------------------------------

def letterbox_version() -> str:
    from appliance.version import running_version

    return running_version()


class VersionAction(argparse.Action):
    """`--version`, with the version read only when asked: importlib.metadata is not free, and no other
    command needs it (argparse's own action wants the text when the parser is built)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(f"letterbox {letterbox_version()}")
        parser.exit()


# --- update ----------------------------------------------------------------------------------------

def cmd_update(args: argparse.Namespace) -> None:
    from appliance.bundle import BundleError

    if args.action == "status":
        state = run_admin(args, lambda admin: admin.update_state())
        print(f"running: Letterbox {state.running}")
        if state.waiting:
            print("waiting: an uploaded bundle, for letterbox-update")
        if state.last:
            print(f"last update: {state.last.get('state')}: {state.last.get('message')}")
        return
    try:
        info = run_admin(args, lambda admin: admin.stage_update(Path(args.bundle)))
    except BundleError as exc:
        raise CliError(str(exc)) from None
    print(f"Letterbox {info.version} handed to letterbox-update: the box restarts on it (or stays on"
          f" {letterbox_version()} if it does not come up); `letterbox update status` tells the outcome")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letterbox", description="A complete mail server in one box.")
    parser.add_argument("--data", default=str(default_data_dir()),
                        help="data directory (default: $LETTERBOX_DATA or ./data)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run every service of the box")
    serve.add_argument("--listen", default="0.0.0.0", help="address to listen on (default: all)")  # noqa: S104  a mail server serves the network by design
    serve.add_argument("--port-offset", type=parse_port_offset, default=0, help="add N to every standard port")
    serve.add_argument("--hostname", type=parse_hostname, default=None, help="the box's host name (default: setting, else system)")
    serve.set_defaults(func=cmd_serve)

    domain = sub.add_parser("domain", help="mail domains")
    dsub = domain.add_subparsers(dest="action", required=True)
    dsub.add_parser("add").add_argument("name")
    dsub.add_parser("remove").add_argument("name")
    dsub.add_parser("list")
    domain.set_defaults(func=cmd_domain)

    user = sub.add_parser("user", help="mailboxes")
    usub = user.add_subparsers(dest="action", required=True)
    add = usub.add_parser("add")
    add.add_argument("address")
    add.add_argument("--name", help="display name")
    add.add_argument("--quota", type=parse_size, default=0, help="e.g. 2G or 1.5G; 0 = unlimited")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd = usub.add_parser("passwd")
    passwd.add_argument("address")
    passwd.add_argument("--password-stdin", action="store_true")
    usub.add_parser("remove").add_argument("address")
    usub.add_parser("enable", help="it can log in and receive mail again").add_argument("address")
    usub.add_parser("disable", help="no login, no mail accepted for it; its mail is kept").add_argument("address")
    uquota = usub.add_parser("quota", help="set the storage limit")
    uquota.add_argument("address")
    uquota.add_argument("size", type=parse_size, help="e.g. 2G or 1.5G; 0 = unlimited")
    usub.add_parser("list").add_argument("domain", nargs="?")
    user.set_defaults(func=cmd_user)

    admin = sub.add_parser("admin", help="administrators of the web console")
    adsub = admin.add_subparsers(dest="action", required=True)
    for action in ("add", "passwd"):
        admin_action = adsub.add_parser(action)
        admin_action.add_argument("name")
        admin_action.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    adsub.add_parser("remove", help="refused for the last one").add_argument("name")
    reset = adsub.add_parser("reset-from-boot", help="the appliance image's boot-time reset: the reset file"
                             " (the new password, or a name and the password on two lines) on standard input")
    reset.add_argument("--unreadable", metavar="REASON", default="", help="the file could not be opened: say why")
    reset.add_argument("--from-menu", action="store_true", help="the password was made for the boot menu's entry")
    adsub.add_parser("list")
    admin.set_defaults(func=cmd_admin)

    alias = sub.add_parser("alias", help="aliases and forwards ('@domain' is a catch-all)")
    asub = alias.add_subparsers(dest="action", required=True)
    aadd = asub.add_parser("add")
    aadd.add_argument("source")
    aadd.add_argument("targets", nargs="+")
    asub.add_parser("remove").add_argument("source")
    asub.add_parser("list").add_argument("domain", nargs="?")
    alias.set_defaults(func=cmd_alias)

    # Other parts of the box (queue, dns, dkim, backup) add their subcommands below this line.
    relay = sub.add_parser("relay", help="send all outbound mail through a relay (smarthost)")
    rsub = relay.add_subparsers(dest="action", required=True)
    rsub.add_parser("show", help="the relay in force, if any")
    rsub.add_parser("off", help="deliver straight to each domain's mail server again")
    rset = rsub.add_parser("set", help="use a relay from now on")
    rset.add_argument("host")
    rset.add_argument("--port", type=int, help="default: 587 with starttls, 465 with implicit")
    rset.add_argument("--tls", choices=("starttls", "implicit"), default="starttls")
    rset.add_argument("--user", help="login name; the password comes from a prompt or --password-stdin")
    rset.add_argument("--password-stdin", action="store_true")
    rset.add_argument("--ca-file", help="PEM file of the CA to trust for the relay instead of the system's")
    relay.set_defaults(func=cmd_relay)

    settings = sub.add_parser("settings", help="the box's settings by name (dns_resolver, queue_hold...)")
    ssub = settings.add_subparsers(dest="action", required=True)
    ssub.add_parser("list", help="each setting, its value and what it does")
    sset = ssub.add_parser("set", help="change one; a running box uses it from its next use, no restart")
    sset.add_argument("name")
    sset.add_argument("value")
    settings.set_defaults(func=cmd_settings)

    queue = sub.add_parser("queue", help="outbound mail waiting for delivery")
    qsub = queue.add_subparsers(dest="action", required=True)
    qsub.add_parser("list", help="spooled messages and the state of each recipient")
    queue.set_defaults(func=cmd_queue)
    qflush = qsub.add_parser("flush", help="try every deferred recipient (or those of IDs) now")
    qflush.add_argument("ids", nargs="*", metavar="ID")
    qflush.set_defaults(func=cmd_queue_flush)
    qdelete = qsub.add_parser("delete", help="remove messages from the queue without a bounce")
    qdelete.add_argument("ids", nargs="+", metavar="ID")
    qdelete.set_defaults(func=cmd_queue_delete)

    dkim = sub.add_parser("dkim", help="DKIM signing keys of the box's domains")
    dksub = dkim.add_subparsers(dest="action", required=True)
    dksub.add_parser("rotate", help="a new key under a new selector, in force at once").add_argument("domain")
    dkim.set_defaults(func=cmd_dkim)

    bk = sub.add_parser("backup", help="encrypted backups of the whole box, and restores")
    bksub = bk.add_subparsers(dest="action", required=True)
    bkey = bksub.add_parser("key", help="make the backup key; writes the emergency kit (shown once)")
    bkey.add_argument("--kit-to", required=True, help="file to write the emergency kit to (must not exist)")
    bcreate = bksub.add_parser("create", help="make a backup now (default: into backups/)")
    bcreate.add_argument("--to", help="a folder (e.g. a mounted USB disk) or a file name")
    bsecret = bcreate.add_mutually_exclusive_group()
    bsecret.add_argument("--key-file", help="encrypt to this kit or age1... key instead of the box's")
    bsecret.add_argument("--passphrase-file", help="encrypt with the passphrase in this file ('-': stdin)")
    bksub.add_parser("list", help="the backups under backups/")
    for action, text in (("verify", "decrypt and check every checksum, change nothing"),
                         ("restore", "replace the box's data with a backup (stop serve first), or --mailbox")):
        p = bksub.add_parser(action, help=text)
        p.add_argument("file")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--key-file", help="the emergency kit ('-': stdin)")
        g.add_argument("--passphrase-file", help="the passphrase ('-': stdin)")
        if action == "restore":
            p.add_argument("--mailbox", help="put back only this mailbox, into the running box")
            p.add_argument("--folder", help="with --mailbox: only this folder")
    brestic = bksub.add_parser("restic", help="off-box copies of the backups in a restic repository")
    rsub = brestic.add_subparsers(dest="restic_action", required=True)
    rset = rsub.add_parser("set", help="the repository (made if new) and its password; the daily backup is sent to it")
    rset.add_argument("--repo", required=True, help="a restic repository: a path, sftp:..., s3:..., rest:...")
    rset.add_argument("--password-file", required=True, help="the repository's password ('-': stdin)")
    rsub.add_parser("off", help="forget the repository (its snapshots stay in it)")
    rsub.add_parser("send", help="send a backup file to the repository now").add_argument("file")
    rsub.add_parser("list", help="the Letterbox snapshots in the repository")
    rfetch = rsub.add_parser("fetch", help="get a snapshot's backup file back (then `backup restore` it)")
    rfetch.add_argument("snapshot")
    rfetch.add_argument("--to", required=True, help="the folder to write the backup file into")
    bk.set_defaults(func=cmd_backup)

    dns = sub.add_parser("dns", help="the DNS records a domain needs, and a live check of them")
    dnsub = dns.add_subparsers(dest="action", required=True)
    for action, text in (("records", "print the records to create"),
                         ("zone", "print them as a zone-file snippet (names relative to the domain)"),
                         ("check", "look each record up; exit 1 unless all are right")):
        dns_action = dnsub.add_parser(action, help=text)
        dns_action.add_argument("domain")
        dns_action.add_argument("--hostname", help="the box's host name (default: the setting, else the system's)")
    dns.set_defaults(func=cmd_dns)

    upd = sub.add_parser("update", help="newer versions of Letterbox (installed by letterbox-update)")
    upsub = upd.add_subparsers(dest="action", required=True)
    upsub.add_parser("status", help="the running version and the outcome of the last update")
    upsub.add_parser("upload", help="hand a bundle to letterbox-update, as the console's Updates page does"
                     ).add_argument("bundle", help="letterbox-bundle-VERSION-MACHINE.tar (make bundle)")
    upd.set_defaults(func=cmd_update)

    cert = sub.add_parser("cert", help="the box's TLS certificate (Let's Encrypt or any ACME CA, or your own)")
    csub = cert.add_subparsers(dest="action", required=True)
    csub.add_parser("status", help="what is served, from where, the next renewal and the last error")
    creq = csub.add_parser("request", help="order a certificate now (http-01 through the running box's port 80)")
    where = creq.add_mutually_exclusive_group()
    where.add_argument("--staging", action="store_true", help="Let's Encrypt's staging CA (untrusted, for trying)")
    where.add_argument("--directory", metavar="URL", help="the ACME directory of another CA (RFC 8555)")
    creq.add_argument("--email", metavar="ADDR", help="contact address for the CA's expiry notices")
    creq.add_argument("--eab-kid", help="External Account Binding key ID (CAs that require it)")
    hmac_key = creq.add_mutually_exclusive_group()
    hmac_key.add_argument("--eab-hmac-key-file", metavar="PATH",
                          help=f"the External Account Binding HMAC key (base64url) from this file ('-': stdin);"
                               f" or set {EAB_HMAC_ENV}")
    hmac_key.add_argument("--eab-hmac-key", metavar="KEY",
                          help="the HMAC key on the command line, where other users see it (certbot's flag)")
    creq.add_argument("--ca-file", help="PEM file of the CA to trust for the directory's HTTPS (a private CA)")
    csub.add_parser("renew", help="renew when due").add_argument("--force", action="store_true",
                                                                  help="renew now even if not due")
    cimp = csub.add_parser("import", help="install your own certificate and key (PEM)")
    cimp.add_argument("cert", metavar="CERT")
    cimp.add_argument("key", metavar="KEY")
    cimp.add_argument("--chain", metavar="FILE", help="intermediate certificates, if not in CERT")
    csub.add_parser("self-signed", help="go back to a self-signed certificate")
    cert.set_defaults(func=cmd_cert)

    spam = sub.add_parser("spam", help="spam and abuse defence: blocklists, greylisting, content filter, limits")
    spam_actions = spam.add_subparsers(dest="action", required=True, metavar="ACTION")
    # Each `spam` subcommand is its own parser with its own func (set_defaults): the connection-time
    # layers' commands (greylist, lists, suspended) and the content filter's (status, learn) side by side.
    add_spam_envelope_commands(spam_actions)
    spam_actions.add_parser(
        "status", help="is the content filter (rspamd) answering (exit status 1 when filtering is off), its counts",
    ).set_defaults(func=cmd_spam_status)
    slearn = spam_actions.add_parser("learn", help="teach rspamd messages as spam or ham (files or Maildir folders)")
    slearn.add_argument("kind", choices=("spam", "ham"))
    slearn.add_argument("paths", nargs="+", metavar="PATH", help="a message file or a Maildir folder")
    slearn.add_argument("--mailbox", metavar="ADDR", help="whose statistics (when rspamd keeps them per user)")
    slearn.add_argument("--each", dest="verbose_learn", action="store_true", help="one line per message")
    slearn.set_defaults(func=cmd_spam_learn)
    return parser


def add_spam_envelope_commands(spam_actions: Any) -> None:
    grey = spam_actions.add_parser("greylist", help="greylisted (client network, sender, recipient) triplets")
    gsub = grey.add_subparsers(dest="greylist_action", required=True)
    glist = gsub.add_parser("list", help="the triplets, most recently seen first")
    which = glist.add_mutually_exclusive_group()
    which.add_argument("--passed", action="store_const", const=True, dest="passed", help="only those let through")
    which.add_argument("--waiting", action="store_const", const=False, dest="passed", help="only those not yet retried")
    gclear = gsub.add_parser("clear", help="forget triplets (their next mail is greylisted again)")
    gclear.add_argument("--network", help="a client network as listed, e.g. 192.0.2.0/24")
    gclear.add_argument("--sender", help="an envelope sender ('<>' for the null sender)")
    gclear.add_argument("--recipient")
    gclear.add_argument("--all", action="store_true", help="every triplet (needed when no other option is given)")
    grey.set_defaults(func=cmd_spam_greylist)
    lists = spam_actions.add_parser("lists", help="the DNS blocklists and whether each answers this box's resolver")
    lists.add_argument("--check", action="store_true", help="ask each list for its test entry now")
    lists.set_defaults(func=cmd_spam_lists)
    susp = spam_actions.add_parser("suspended", help="mailboxes whose sending is suspended")
    ssub = susp.add_subparsers(dest="suspended_action")
    ssub.add_parser("list")
    ssub.add_parser("lift", help="let the mailbox send again").add_argument("address")
    susp.set_defaults(func=cmd_spam_suspended)


def _announce(line: str) -> None:
    """A line for whoever watches `serve`. A reader that went away (`letterbox serve | head -3`) must
    not stop the server: its later lines are dropped, nothing else changes."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so neither a later print nor the interpreter's
    final flush meets the closed pipe again (that flush is what prints 'Exception ignored ...')."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Python ignores SIGPIPE, so a closed stdout (`letterbox user list | head`) shows up
    as BrokenPipeError from whichever print or flush meets it, for every command (argparse's --help
    included): end quietly then, as a C program killed by SIGPIPE would."""
    try:
        try:
            return _run(argv)
        finally:
            # Output to a pipe is block-buffered: flush here, inside the try, so a reader that has gone
            # is noticed now and not at interpreter exit, where it can no longer be caught.
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_STDOUT_CLOSED


class _StampFormatter(logging.Formatter):
    """logging's default time stamp (`2026-11-30 09:38:30,123`), its date and time formatted once
    per second rather than for every record: `serve` logs a few lines per message (issue 19)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:  # a tuple, replaced whole: threads that log see one or the other
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(record.created)))
        return f"{cached[1]},{int(record.msecs):03d}"  # logging's default_msec_format


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The admin commands print their own one-line outcome; their INFO log lines would only repeat it.
    quiet = args.func is not cmd_serve
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_StampFormatter(handler.formatter._fmt if handler.formatter else None))
    # What the format above never shows, not looked up for every record (the logging HOWTO's
    # "Optimization"): the caller's frame, thread, process; `serve` logs a few lines per message.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        require_box(args)
        args.func(args)
    except (CliError, AccountError, DatabaseError) as exc:
        print(f"letterbox: {exc}", file=sys.stderr)
        return getattr(exc, "status", 1)
    except Exception as exc:
        # SQLite's own words ("database is locked" after the 5 s busy wait, "disk I/O error", "attempt to
        # write a readonly database") in one line, not a traceback: on a starved machine the running box
        # can hold the write lock for longer than that, and trying again is all a user can do then.
        # sqlite3 is looked up, not imported: `import appliance.cli` stays without it (test_import_cost).
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(exc, sqlite3.OperationalError):
            raise
        busy = "locked" in str(exc) or "busy" in str(exc)
        hint = ": the running box is busy writing to it; try again in a moment" if busy else ""
        print(f"letterbox: the database {DataLayout(Path(args.data)).db}: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
