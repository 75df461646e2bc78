"""The box's administrative use-cases, each one function with its side effects and its event.

`letterbox ...` (appliance/cli.py) and the web console (web/routes/*) both act through `Admin`: they
parse their input, call one method here and render what it returns. So a domain added by either gets
its DKIM key, a relay changed by either wakes the queue, and both leave the same event. Validation
that the person sees next to a form field stays in web/forms.py; the services check again here (and
may still refuse: a name taken meanwhile), so the CLI is held to the same rules.

An `Admin` is built from the running box's `Services` (`Admin.of`) or, in a CLI process, from the
data directory alone (`open_admin`). Events are recorded by topic ("domains", "mailboxes", ...) with
the same text whichever door the action came through, so the log reads the same for both.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import boot_reset, dkim_keys, sizes
from appliance.account_errors import AccountError, NotFound
from appliance.accounts import Accounts, AliasInfo, MailboxInfo, stored_domain
from appliance.address import idn
from appliance.config import DataLayout
from appliance.db import Database
from appliance.events import EventLog
from appliance.host_name import system_hostname
from appliance.queue.smarthost import Smarthost, SmarthostError
from appliance.settings import SETTABLE, Settable, Settings, parse_setting
from appliance.spam import outbound
from appliance.spam.greylist import Greylist, GreylistEntry

SPAM_LAYERS = ("dnsbl", "domain_blocklist", "early_talker", "greylist")  # the switches of save_spam_layers
# The data directories whose update outcome this process is recording now: the box's follower
# (update_outcome.py) and a look at the console's Updates page may come at once, and each would
# read status.json before the other marked it recorded.
_RECORDING_OUTCOME: set[Path] = set()

# The use-cases below import their modules inside themselves (issue 15): every CLI command opens an
# Admin, and `letterbox user list` should not load the certificates (cryptography x509, the ACME
# client), the backups (age, zstandard), dnspython or the update machinery that other use-cases need.
if TYPE_CHECKING:
    from argon2 import PasswordHasher

    from appliance import backup, backup_restic, bundle, certificates, dns_check, dns_records
    from appliance.queue.relay_check import RelayCheck
    from appliance.services import Services
    from appliance.spam.dnsbl import ListReport
    from appliance.store.mailstore import MailStore
    from appliance.tls import CertificateInfo



def _nothing() -> None:
    return None


def _nobody(port: int) -> Callable[[str], bool]:
    return lambda address: False


def _reaches_this_box(services: Services, port: int) -> Callable[[str], bool]:
    from appliance.queue.mx import reaches_this_box  # (dnspython: not for every CLI command)

    return reaches_this_box(services, port)


def nowhere_note(source: str, nowhere: Sequence[str]) -> str:
    """What the CLI and the console say of an alias's targets that lead nowhere (targets_going_nowhere)."""
    one = len(nowhere) == 1
    return (f"{', '.join(idn(t) for t in nowhere)} {'is' if one else 'are'} not a mailbox or alias of this box (yet):"
            f" mail for {idn(source)} does not reach {'it' if one else 'them'}")


@dataclass
class Admin:
    db: Database
    settings: Settings
    accounts: Accounts
    data: DataLayout
    events: EventLog
    # The box's name, read when used: the wizard renames the box while it runs.
    hostname: Callable[[], str]
    # The running box's mail store, to drop what it caches for a removed mailbox; None in a CLI process
    # (its sessions notice the removal through MailStore.mailbox_generation).
    store: MailStore | None = None
    # Tells the running queue to look for due work now; nothing in a CLI process (a running box reads
    # the settings before each message, so a change made here is in force for its next one).
    wake_queue: Callable[[], None] = field(default=_nothing)
    # The running box's certificate context (its live TLS, its port-80 answers); in a CLI process one
    # of its own is made on first use (answers through the db, read by the box that owns port 80).
    certificate_context: certificates.CertContext | None = None
    # Which addresses on a port reach the running box's own listeners (queue.mx.reaches_this_box), so
    # "Test the relay" refuses a relay that is the box itself; none in a CLI process.
    reaches_this_box: Callable[[int], Callable[[str], bool]] = field(default=_nobody)

    @classmethod
    def of(cls, services: Services) -> Admin:
        def wake() -> None:
            if services.queue is not None:
                services.queue.wake(sweep=True)  # a flush made waiting failure reports due too

        return cls(db=services.db, settings=services.settings, accounts=services.accounts, data=services.config.data, events=services.events,
                   hostname=lambda: services.hostname, store=services.store, wake_queue=wake,
                   certificate_context=services.certificates,
                   reaches_this_box=lambda port: _reaches_this_box(services, port))

    # --- domains ----------------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> str:
        """Add a mail domain and its DKIM key (mail from it is signed from the first message on)."""
        domain = await self.accounts.add_domain(name)
        await dkim_keys.ensure_key(self.db, self.data.dkim, domain)
        await self.events.record("domains", f"domain {domain} added")
        return domain

    async def remove_domain(self, name: str) -> str:
        domain = stored_domain(name)
        await self.accounts.remove_domain(domain)
        await self.events.record("domains", f"domain {domain} removed")
        return domain

    async def local_domain(self, name: str) -> str:
        """The canonical name of one of the box's domains; NotFound when it is not one."""
        domain = stored_domain(name)
        if not await self.accounts.is_local_domain(domain):
            raise NotFound(f"{domain[:100]} is not a domain of this box (letterbox domain add)")
        return domain

    async def rotate_dkim(self, name: str) -> dkim_keys.DkimKey:
        domain = await self.local_domain(name)
        key = await dkim_keys.rotate_key(self.db, self.data.dkim, domain)
        await self.events.record("dkim", f"new DKIM key for {domain}: selector {key.selector}")
        return key

    async def dns_records(self, name: str, ports: Mapping[str, int] | None = None) -> list[dns_records.DnsRecord]:
        from appliance import dns_records

        domain = await self.local_domain(name)
        return await dns_records.domain_records(self.db, self.data.dkim, domain, self.hostname(), ports)

    async def dns_zone_file(self, name: str, ports: Mapping[str, int] | None = None) -> str:
        """The same records as a zone-file snippet for the registrar's import or a BIND zone."""
        from appliance import dns_records

        domain = await self.local_domain(name)
        return dns_records.zone_file(domain, await self.dns_records(domain, ports))

    async def check_dns(self, name: str, ports: Mapping[str, int] | None = None) -> list[dns_check.CheckResult]:
        """Look every record of the domain up now; the results are kept for the console."""
        from appliance import dns_check

        domain = await self.local_domain(name)
        results = await dns_check.check_domain(self.db, self.data.dkim, domain, self.hostname(), ports)
        await dns_check.save_results(self.db, domain, results)
        counts = dns_check.summary(results)
        await self.events.record("dns", f"DNS check of {domain}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return results

    async def set_public_addresses(self, ipv4: str, ipv6: str) -> None:
        """The box's public addresses for the A/AAAA and SPF records ('' = none); checked by the caller's
        form (dns_records.valid_public_address)."""
        await self.settings.save(public_ipv4=ipv4, public_ipv6=ipv6)

    # --- mailboxes --------------------------------------------------------------------------------------

    async def create_mailbox(self, address: str, password: str, *, display_name: str = "",
                             quota_bytes: int = 0) -> MailboxInfo:
        info = await self.accounts.add_user(address, password, display_name=display_name, quota_bytes=quota_bytes)
        await self.events.record("mailboxes", f"mailbox {info.address} created")
        return info

    async def remove_mailbox(self, address: str) -> str | None:
        """Returns where its mail was moved (kept for trash.RETENTION_DAYS), None when it had none."""
        info = await self._mailbox(address)
        moved = await self.accounts.remove_user(info.address)
        if self.store is not None:
            self.store.forget_mailbox(info.address)  # nothing cached for it may serve the next owner
        await self.events.record("mailboxes", f"mailbox {info.address} removed")
        return moved

    async def update_mailbox(self, address: str, *, display_name: str | None = None, quota_bytes: int | None = None,
                             enabled: bool | None = None) -> MailboxInfo:
        """Change what is given (None: left as it is): display name, quota (0 = no limit), enabled."""
        before = await self._mailbox(address)
        after = await self.accounts.update_user(before.address, display_name=display_name, quota_bytes=quota_bytes,
                                                enabled=enabled)
        changes = []
        if after.enabled != before.enabled:
            changes.append("enabled" if after.enabled else "disabled")
            if not after.enabled and self.store is not None:
                self.store.wake_sessions(after.address)  # they end (a CLI process's: at their next look)
        if after.quota_bytes != before.quota_bytes:
            changes.append(f"quota {sizes.format_size(after.quota_bytes) or 'unlimited'}")
        if after.display_name != before.display_name:
            changes.append("display name")
        await self.events.record("mailboxes", f"mailbox {after.address} changed"
                                 + (f": {', '.join(changes)}" if changes else ""))
        return after

    async def set_mailbox_password(self, address: str, password: str, *, by_owner: bool = False) -> str:
        """A new password (its other sessions end). `by_owner`: the owner changed it after proving the
        current one (the console's account page); else an administrator set it."""
        info = await self._mailbox(address)
        await self.accounts.set_password(info.address, password)
        if self.store is not None:
            # Its IMAP and POP3 sessions logged in with the old password end: IDLE at once, the others
            # at their next command (a CLI process's change: SessionWatch, within a second).
            self.store.wake_sessions(info.address)
        await self.events.record("mailboxes", f"{info.address} changed their password" if by_owner
                                 else f"password of {info.address} set by an administrator")
        return info.address

    async def _mailbox(self, address: str) -> MailboxInfo:
        info = await self.accounts.get_user(address)
        if info is None:
            raise NotFound(f"no mailbox {address[:200]}")
        return info

    # --- aliases ----------------------------------------------------------------------------------------

    async def add_alias(self, source: str, targets: Sequence[str]) -> AliasInfo:
        info = await self.accounts.add_alias(source, list(targets))
        await self.events.record("aliases", f"alias {info.source} -> {', '.join(info.targets)} created")
        return info

    async def set_alias_targets(self, source: str, targets: Sequence[str]) -> AliasInfo:
        info = await self.accounts.set_alias_targets(source, list(targets))
        await self.events.record("aliases", f"alias {info.source} -> {', '.join(info.targets)} changed")
        return info

    async def targets_going_nowhere(self, info: AliasInfo) -> list[str]:
        """The alias's targets on this box's domains that reach no mailbox and no forward (a typo, a
        mailbox not made yet, or removed): mail for the alias does not reach them, and when none is
        left it is refused ("No such user here", or "alias loop"). Said where the alias is made, not left to be found."""
        nowhere = []
        for target in info.targets:
            _, _, domain = target.rpartition("@")
            if not await self.accounts.is_local_domain(domain):
                continue
            where = await self.accounts.resolver.resolve(target)  # uncached: the alias was just written
            if not where.mailboxes and not where.forwards:
                nowhere.append(target)
        return nowhere

    async def aliases_to_nowhere(self, address: str) -> list[str]:
        """After the mailbox `address` was removed: a note for each alias still delivering there (a
        catch-all to it then refused all the domain's other mail as an "alias loop", without a word)."""
        notes = []
        for info in await self.accounts.list_aliases():
            if address.lower() in (target.lower() for target in info.targets):
                nowhere = await self.targets_going_nowhere(info)
                if nowhere:
                    notes.append(nowhere_note(info.source, nowhere))
        return notes

    async def remove_alias(self, source: str) -> str:
        info = await self.accounts.get_alias(source)
        if info is None:
            raise NotFound(f"no alias {source[:200]}")
        await self.accounts.remove_alias(info.source)
        await self.events.record("aliases", f"alias {info.source} removed")
        return info.source

    # --- web administrators -----------------------------------------------------------------------------

    async def add_first_admin(self, name: str, password: str) -> str:
        """The wizard's administrator: only while there is none (AlreadyExists otherwise)."""
        await self.accounts.add_first_admin(name, password)
        name = name.strip().lower()
        await self.events.record("admins", f"administrator {name} created")
        return name

    async def add_admin(self, name: str, password: str) -> str:
        await self.accounts.add_admin(name, password)
        name = name.strip().lower()
        await self.events.record("admins", f"administrator {name} created")
        return name

    async def set_admin_password(self, name: str, password: str, *, by_owner: bool = False,
                                 reset_from: str = "") -> str:
        """A new password: the admin's other web sessions end, and the lockouts their account earned are
        lifted at its next login (auth.py). `reset_from`: where a boot-time reset came from (boot_reset.py)."""
        await self.accounts.set_admin_password(name, password)
        name = name.strip().lower()
        if reset_from:
            said = f"administrator password of {name} reset from {reset_from}"
        else:
            said = f"admin {name} changed their password" if by_owner else f"password of admin {name} set"
        await self.events.record("admins", said)
        return name

    async def reset_admin_password_from_boot(self, read: Callable[[], bytes], *,
                                             where: str = boot_reset.FROM_FILE) -> str:
        """The appliance's boot-time reset (boot_reset.py): the file's bytes from `read`, which may raise
        OSError; the named administrator's, the only one's or the first one's password set. Anything
        that stops it is an event too, and changes nothing. `where`: the file, or the boot menu's entry."""
        try:
            try:
                data = read()
            except OSError as exc:
                raise boot_reset.ResetFileProblem(f"the file could not be read ({exc.strerror or exc})") from None
            request = boot_reset.read_reset_file(data)
            name = request.name or await self.accounts.first_admin()
            if request.name is not None:
                admins = await self.accounts.list_admins()
                if request.name.strip().lower() not in admins:
                    # Not the line itself: it may be the password, put first by mistake.
                    raise boot_reset.ResetFileProblem(
                        "the first of the two lines names no administrator of this box (they are:"
                        f" {', '.join(admins) or 'none yet'})")
            if name is None:
                raise NotFound("the box has no administrator yet: the setup wizard makes the first one")
            return await self.set_admin_password(name, request.password, reset_from=where)
        except (boot_reset.ResetFileProblem, AccountError) as exc:
            await self.events.record("admins", f"administrator password not reset from {where}: {exc}")
            raise

    async def remove_admin(self, name: str) -> str:
        await self.accounts.remove_admin(name)
        name = name.strip().lower()
        await self.events.record("admins", f"administrator {name} removed")
        return name

    async def list_admins(self) -> list[str]:
        return await self.accounts.list_admins()

    # --- sending: direct or through a relay, and the queue ---------------------------------------------

    async def settable(self) -> list[tuple[Settable, str]]:
        """Each setting a person sets by name (`letterbox settings list`), with its value in force."""
        values = await self.settings.fresh()
        return [(s, s.shown(values)) for s in SETTABLE.values()]

    async def set_setting(self, name: str, text: str) -> str:
        """Set one setting by name, as `letterbox settings set` does; in force for the running box at
        its next use. SettingError (nothing saved) for an unknown name or a value it does not take.
        Returns the value as `settable` shows it."""
        changes = parse_setting(name, text)
        values = await self.settings.save(**changes)
        self.wake_queue()  # queue_hold and dns_resolver are the queue's
        shown = SETTABLE[name].shown(values)
        await self.events.record("settings", f"{name} set to {shown}")
        return shown

    async def relay(self) -> Smarthost | None:
        """The relay in force (None: direct delivery); SmarthostError when the stored one is unusable."""
        values = await self.settings.fresh()
        if values.relay_problem:
            raise SmarthostError(values.relay_problem)
        return values.relay

    async def set_relay(self, relay: Smarthost | None, *, tested: bool = False) -> None:
        """Store how mail leaves (None: straight to each domain's server) and have the running queue use
        it for its next message. `tested`: this relay just passed check_relay."""
        before = (await self.settings.fresh()).relay
        if relay is not None and tested:
            await self.settings.save(relay=relay, relay_tested=relay.describe())
        elif relay != before or relay is None:  # a password changed untested counts as untested too
            await self.settings.save(relay=relay, relay_tested="")
        else:
            await self.settings.save(relay=relay)
        self.wake_queue()
        if relay is None:
            await self.events.record("sending", "outbound mail goes directly to each domain's mail server")
        else:
            await self.events.record("sending", f"outbound mail goes through the relay {relay.describe()}")

    async def relay_tested(self, relay: Smarthost) -> bool:
        """Did this very relay (describe(): no password) pass "Test the relay"? One changed since, in the
        console or with `letterbox relay`, no longer counts as tested."""
        return (await self.settings.fresh()).relay_tested == relay.describe()

    async def test_relay(self, relay: Smarthost) -> RelayCheck:
        """Try the relay (never stored here); a failure is an event, a success is stored by the caller
        through set_relay(tested=True)."""
        from appliance.queue.relay_check import check_relay

        check = await check_relay(relay, helo_name=self.hostname(), resolver=(await self.settings.fresh()).dns_resolver,
                                  is_own=self.reaches_this_box(relay.port))
        if not check.ok:
            await self.events.record("sending", f"relay test of {relay.describe()} failed: {check.detail}")
        return check

    async def flush_queue(self, message_ids: Sequence[str] = ()) -> int:
        """Every deferred recipient (or those of `message_ids`) due now, and every failure report a
        local mailbox refused (a bounce to a full mailbox); returns how many recipients."""
        from appliance.queue import state as queue_state

        count = await queue_state.flush(self.db, message_ids)
        self.wake_queue()
        what = f"message{'s' if len(message_ids) > 1 else ''} {', '.join(message_ids)}" if message_ids else "queue"
        await self.events.record("sending", f"{what} flushed: {count} recipient{'' if count == 1 else 's'} due now")
        return count

    async def delete_queued(self, message_ids: Sequence[str]) -> list[str]:
        """Remove messages from the queue without a report to their sender; returns those removed."""
        from appliance.queue import state as queue_state

        deleted = await queue_state.delete(self.db, self.data.spool, list(message_ids))
        for message_id in deleted:
            await self.events.record("sending", f"message {message_id} deleted from the queue (no report sent)")
        return deleted

    # --- backups (the work is appliance/backup.py's; the event is logged there, once) -----------------

    async def make_backup_key(self) -> backup.Kit:
        """A new backup key; the returned emergency kit is its only copy of the secret half."""
        from appliance import backup

        return await backup.make_key(self.db, self.events, self.hostname())

    async def create_backup(self, *, to: Path | None = None, key_text: str = "", passphrase: str = "",
                            progress: backup.Progress | None = None, keep: int | None = None) -> backup.Created:
        from appliance import backup

        return await backup.create(self.db, self.events, self.data, to=to, key_text=key_text,
                                   passphrase=passphrase, progress=progress, keep=keep)

    async def restore_mailbox(self, path: Path, secret: backup.Secret, address: str,
                              folder: str | None = None, *,
                              progress: backup.Progress | None = None) -> backup.MailboxRestored:
        from appliance import backup

        return await backup.restore_mailbox(self.db, self.events, self.data, path, secret, address, folder,
                                            progress=progress)

    async def set_restic(self, repo: str, password: str) -> bool:
        from appliance import backup_restic

        return await backup_restic.configure(self.db, self.events, repo, password)

    async def send_to_restic(self, file: Path) -> str:
        from appliance import backup_restic

        return await backup_restic.send_file(self.db, self.events, file)

    async def restic_snapshots(self) -> list[backup_restic.Snapshot]:
        from appliance import backup_restic

        return await backup_restic.list_snapshots(self.db)

    async def fetch_from_restic(self, snapshot: str, into: Path) -> Path:
        from appliance import backup_restic

        return await backup_restic.fetch_file(self.db, self.events, snapshot, into)

    async def set_backup_schedule(self, *, enabled: bool, hour: int, target: str) -> None:
        from appliance import backup

        await backup.set_schedule(self.db, self.events, enabled=enabled, hour=hour, target=target)

    # --- certificates (the work and its event are appliance/certificates.py's) -------------------------

    def _certificates(self) -> certificates.CertContext:
        from appliance import certificates
        from appliance.tls import TlsManager

        if self.certificate_context is None:
            self.certificate_context = certificates.CertContext(
                db=self.db, tls=TlsManager(self.data.tls, self.hostname()), events=self.events,
                hostname=self.hostname, acme_dir=self.data.tls / "acme", http01=None, answers_tls_alpn=False)
        return self.certificate_context

    async def certificate_status(self) -> certificates.CertStatus:
        from appliance import certificates

        return await certificates.status(self._certificates())

    async def request_certificate(self, **options: str | None) -> tuple[CertificateInfo, certificates.NamesCheck]:
        """Order a certificate for the box's name and domains now, and wait for it (the CLI)."""
        from appliance import certificates

        return await certificates.request(self._certificates(), await self.accounts.list_domains(), **options)

    async def start_certificate_request(self, **options: str | None) -> bool:
        """The same order, followed in the background (the console's page shows its progress)."""
        from appliance import certificates

        return await certificates.start_request(self._certificates(), await self.accounts.list_domains(), **options)

    async def renew_certificate(self, *, force: bool = False) -> CertificateInfo | None:
        from appliance import certificates

        return await certificates.renew(self._certificates(), await self.accounts.list_domains(), force=force)

    async def import_certificate(self, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"") -> CertificateInfo:
        from appliance import certificates

        return await certificates.import_pem(self._certificates(), cert_pem, key_pem, chain_pem)

    async def self_signed_certificate(self) -> CertificateInfo:
        from appliance import certificates

        return await certificates.self_signed(self._certificates())

    # --- spam and abuse (issue 16) ------------------------------------------------------------------

    async def save_spam_layers(self, *, by: str, **layers: object) -> None:
        """Switch the connection-time layers and the outbound limits (SpamSettings fields: dnsbl,
        dnsbl_lists, domain_blocklist, domain_lists, early_talker, greylist, greylist_delay,
        outbound_messages_per_hour, outbound_recipients_per_hour); ValueError, with its reason, for a
        value SpamSettings refuses. In force for the next connection (read live)."""
        now = (await self.settings.fresh()).spam
        spam = replace(now, **layers)  # type: ignore[arg-type]  # checked by SpamSettings.__post_init__
        await self.settings.save(spam=spam)
        switched = ", ".join(f"{name} {'on' if value else 'off'}" for name in SPAM_LAYERS
                             if (value := getattr(spam, name)) != getattr(now, name))
        await self.events.record("spam", f"spam layers changed by {by}" + (f": {switched}" if switched else ""))

    async def greylist_entries(self, limit: int = 1000, *, passed: bool | None = None) -> list[GreylistEntry]:
        """The live greylist triplets, most recent first (`passed`: only those a retry got through, or
        only those still waiting)."""
        return await Greylist(self.db).entries(limit, passed=passed)

    async def clear_greylist(self, *, network: str | None = None, sender: str | None = None,
                             recipient: str | None = None) -> int:
        """Forget the matching triplets (every triplet, and the SPF-known domains, when nothing is
        given): their next mail is greylisted again. Returns how many went."""
        count = await Greylist(self.db).clear(network=network, sender=sender, recipient=recipient)
        parts = [f"{name} {value}" for name, value in (("network", network), ("sender", sender),
                                                        ("recipient", recipient)) if value is not None]
        what = "the whole greylist" if not parts else "greylist entries for " + ", ".join(parts)
        await self.events.record("spam", f"{what} cleared ({count} entr{'y' if count == 1 else 'ies'})")
        return count

    async def dnsbl_status(self) -> list[ListReport]:
        """Each configured DNS list and what it last answered: ok, refused (the list will not answer
        this resolver: Spamhaus through a public one), failing (timeouts), or unknown (never asked)."""
        from appliance.spam.dnsbl import list_reports

        spam = (await self.settings.fresh()).spam
        return await list_reports(self.db, spam.dnsbl_lists if spam.dnsbl else (),
                                  spam.domain_lists if spam.domain_blocklist else ())

    async def check_dnsbl(self) -> list[ListReport]:
        """Ask each configured list for its RFC 5782 test entry now (does it answer this box's
        resolver?), then report as dnsbl_status does."""
        from appliance.spam.dnsbl import Blocklists, ListStatus

        spam = (await self.settings.fresh()).spam
        blocklists = Blocklists(ListStatus(self.db), lambda: self.settings.now.dns_resolver)
        await blocklists.probe(spam.dnsbl_lists if spam.dnsbl else (),
                               spam.domain_lists if spam.domain_blocklist else ())
        return await self.dnsbl_status()

    async def outbound_suspensions(self) -> list[outbound.Suspension]:
        return await outbound.suspensions(self.db)

    async def lift_suspension(self, address: str) -> str:
        """Let a suspended mailbox send again (after its password was changed)."""
        mailbox = address.strip().lower()
        if not await outbound.lift_suspension(self.db, mailbox):
            raise NotFound(f"sending from {mailbox[:200]} is not suspended")
        await self.events.record("spam", f"sending from {mailbox} allowed again")
        return mailbox


    # --- updates (installed by letterbox-update, appliance/update.py, as root) -----------------------

    async def update_state(self) -> UpdateState:
        """The running version, the last update's outcome and whether an upload waits for letterbox-update."""
        from appliance import update

        await self.record_update_outcome()
        folder = self.data.root / update.UPDATES
        last = await asyncio.to_thread(update.read_status, self.data.root)
        waiting = await asyncio.to_thread((folder / update.INCOMING).exists)
        return UpdateState(running=update.running_version(), last=last, waiting=waiting)

    async def stage_update(self, upload: Path) -> bundle.BundleInfo:
        """Check a bundle and hand it to letterbox-update: it becomes DATA/updates/incoming.tar, which
        letterbox-update.path (root) watches. `upload` is moved when it is in DATA/updates already (the
        console's upload), else copied. BundleError when it is not a bundle this box can install."""
        from appliance import bundle, update

        info = await asyncio.to_thread(bundle.inspect, upload)
        running = update.running_version()
        if not update.is_newer(info.version, running):
            raise bundle.BundleError(f"Letterbox {info.version} is not newer than the running {running}")
        if info.machine and info.machine != os.uname().machine:
            raise bundle.BundleError(f"this bundle is for {info.machine}; this box is {os.uname().machine}")
        await asyncio.to_thread(_hand_over, upload, self.data.root / update.UPDATES)
        await self.events.record("update", f"Letterbox {info.version} uploaded (running {running}); letterbox-update"
                                           " installs it and restarts the box")
        return info


    async def record_update_outcome(self) -> None:
        """The outcome letterbox-update left in DATA/updates/status.json becomes an event, once: at start,
        and whenever the state is read (letterbox-update runs `letterbox update status` when it is done;
        as root, with the box stopped part of the time, it does not write the database itself)."""
        from appliance import update

        root = self.data.root
        if root in _RECORDING_OUTCOME:
            return
        _RECORDING_OUTCOME.add(root)
        try:
            last = await asyncio.to_thread(update.read_status, root)
            if not last or last.get("state") not in ("done", "failed") or last.get("recorded"):
                return
            await self.events.record("update", str(last.get("message", ""))[:500])
            await asyncio.to_thread(update.mark_recorded, root, last)
        finally:
            _RECORDING_OUTCOME.discard(root)


@dataclass(frozen=True)
class UpdateState:
    running: str
    last: dict[str, Any] | None  # DATA/updates/status.json: state, version, previous, message, at
    waiting: bool  # a bundle is in DATA/updates/incoming.tar, not taken yet


def _hand_over(upload: Path, folder: Path) -> None:
    from appliance import update

    folder.mkdir(mode=0o700, exist_ok=True)
    dest = folder / update.INCOMING
    if upload.parent.resolve() == folder.resolve():
        os.replace(upload, dest)
        return
    tmp = folder / f".upload-{secrets.token_hex(4)}"
    shutil.copyfile(upload, tmp)
    os.replace(tmp, dest)


@asynccontextmanager
async def open_admin(root: Path, hostname: Callable[[], str] | None = None, *,
                     hasher: PasswordHasher | None = None) -> AsyncIterator[Admin]:
    """An Admin on a data directory, for a process that is not the box (the CLI): its own database
    connection, no store, no queue to wake (a running box reads the database for each decision)."""
    layout = DataLayout(root)
    layout.create()
    db = await Database.open(layout.db)
    try:
        settings = await Settings.load(db, default_hostname=system_hostname())
        name = hostname or (lambda: settings.now.hostname)
        yield Admin(db=db, settings=settings, accounts=Accounts(db, data=layout, hasher=hasher), data=layout, events=EventLog(db), hostname=name)
    finally:
        await db.close()
