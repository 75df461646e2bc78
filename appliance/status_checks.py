"""The status checklist (issue 18): is mail flowing, and what is there to fix, in plain words.

Each check returns one `Item`: green (ok), amber (warn), red (fail) or grey (unknown: the check could
not tell, e.g. DNS did not answer), with what was found and, unless green, what to do. `run_all` runs
every check (each bounded in time: one that hangs is "unknown", never a stuck page) and keeps the
results with their time in `status_checks`; the console shows the kept results and runs them again on
demand; `StatusSchedule` runs them in the background every few hours.

The checks that ask the network use the box's own resolver setting (as the mail path does) and
`Probes` for what cannot be asked on loopback in a test otherwise: the remote MX that the outbound
port-25 check connects to, and the kernel's clock state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import logging
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from appliance.address import idn
from appliance.db import Database
from appliance.disk_full import RESERVE_OCTETS, room_for, used_percent
from appliance.dns_check import load_results
from appliance.libc import libc
from appliance.queue.resolver import make_async_resolver
from appliance.spam import dnsbl
from appliance.spam.content_service import ContentStatus, content_settings, content_status
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.status")

Level = Literal["ok", "warn", "fail", "unknown"]
CHECK_TIMEOUT = 15.0  # seconds for one check; a slower one is "unknown"
EVERY = 6 * 3600.0  # background runs
FIRST_RUN_DELAY = 300.0  # after start: let the box settle (and a short test run never probe anything)
CERT_WARN_DAYS = 14
DISK_FAIL_PERCENT = 90
DISK_WARN_PERCENT = 80
BACKUP_MAX_AGE = 3 * 86400
DEFERRED_WARN_AGE = 86400
PORT25_TIMEOUT = 8.0


@dataclass(frozen=True)
class Item:
    key: str  # stable id: "dns", "ptr", "port25", "certificate", "backups", "disk", "queue", "content_filter", ...
    title: str
    level: Level
    summary: str  # what was found
    fix: str = ""  # what to do, when not ok
    link: str = ""  # the console page that fixes it
    checked_at: float = 0.0
    # Several pages that fix it, each named ((text, path), ...): the DNS item's domains, one page each;
    # shown instead of the one link's "Fix it".
    links: tuple[tuple[str, str], ...] = ()


@dataclass
class Probes:
    """What the network-facing checks connect to: replaced in tests by loopback servers and fakes."""

    port25_target: Callable[[], str] | None = None  # None: the `port25_probe` setting
    clock_synchronised: Callable[[], bool | None] = lambda: kernel_clock_synchronised()
    # "Now" for the checks (a certificate's days left, a backup's or a deferred message's age) and for
    # the alerts' once-a-day rule: tests move it forward instead of waiting days.
    clock: Callable[[], float] = time.time
    # Whether a program is installed here (rspamd, for the content filter's fix): tests say either.
    installed: Callable[[str], bool] = lambda name: shutil.which(name) is not None


# --- the checks -------------------------------------------------------------------------------------

def _domain_pages(domains: list[str], one: str, several: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """The DNS item's fix for `domains` (those with something to do): one domain's page is its "Fix it"
    link; several are each linked by name after the words for several ("the domain's page" over two
    domains' records sent a new administrator looking for which)."""
    pages = [(idn(domain), f"/console/domains/{quote(domain, safe='@')}") for domain in domains]
    if len(pages) == 1:
        return one, pages[0][1], ()
    return several, "/console/domains", tuple(pages)


async def check_dns(svc: Services) -> Item:
    domains = await svc.accounts.list_domains()
    if not domains:
        return Item("dns", "DNS records", "fail", "No mail domain yet.", "Add the domain you receive mail for.",
                    "/console/domains")
    missing: dict[str, list[str]] = {}
    unchecked: list[str] = []
    for domain in domains:
        last = await load_results(svc.db, domain)
        if last is None:
            unchecked.append(domain)
            continue
        records = [f"{r.rdtype} {r.name}" for r in last[1] if r.status != "found"]
        if records:
            missing[domain] = records
    if missing:
        records = [record for each in missing.values() for record in each]
        count = len(records)
        publish = (f"Publish {'this record' if count == 1 else f'these {count} records'} where you manage your DNS,"
                   " then check again on")
        fix, link, links = _domain_pages(list(missing), f"{publish} the domain's page.", f"{publish} each domain's page:")
        return Item("dns", "DNS records", "fail",
                    f"{count} record{'' if count == 1 else 's'} not found or not right at the last check: "
                    + ", ".join(records[:6]) + ("…" if count > 6 else ""), fix, link, links=links)
    if unchecked:
        fix, link, links = _domain_pages(unchecked, "Open the domain and press Check now.",
                                         "Open each domain and press Check now:")
        return Item("dns", "DNS records", "warn", "Not checked yet: " + ", ".join(map(idn, unchecked)), fix, link,
                    links=links)
    return Item("dns", "DNS records", "ok", f"Every record of {', '.join(map(idn, domains))} was found at the last check.")


def _resolver(svc: Services) -> dns.asyncresolver.Resolver:
    return make_async_resolver(svc.settings.now.dns_resolver, cached=False)  # a check sees what is there now


async def _names(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    try:
        answer = await resolver.resolve(name, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [r.to_text().rstrip(".").lower() for r in answer]


def _public_addresses(svc: Services, key: str, title: str) -> list[str] | Item:
    """The public addresses the checks of the box's own addresses ask about; an "unknown" item without."""
    values = svc.settings.now
    addresses = [a for a in (values.public_ipv4, values.public_ipv6) if a]
    return addresses or Item(key, title, "unknown", "The box's public address is not set.",
                             "Enter it on a domain's DNS page.", "/console/domains")


async def check_reverse_dns(svc: Services) -> Item:
    """PTR of each public address names the host name, and that name resolves back to the address
    (forward-confirmed reverse DNS, which many receivers require)."""
    addresses = _public_addresses(svc, "ptr", "Reverse DNS")
    if isinstance(addresses, Item):
        return addresses
    resolver = _resolver(svc)
    host = svc.hostname.lower()
    problems: list[str] = []
    try:
        for address in addresses:
            names = await _names(resolver, dns.reversename.from_address(address).to_text(), "PTR")
            if host not in names:
                problems.append(f"{address} is named {', '.join(names)}, not {host}" if names
                                else f"{address} has no reverse DNS name (PTR)")
                continue
            forward = await _names(resolver, host, "AAAA" if ipaddress.ip_address(address).version == 6 else "A")
            if str(ipaddress.ip_address(address)) not in {str(ipaddress.ip_address(f)) for f in forward}:
                problems.append(f"{host} does not resolve back to {address}")
    except dns.exception.DNSException as exc:
        return Item("ptr", "Reverse DNS", "unknown", f"DNS did not answer: {type(exc).__name__}",
                    "Check again later; if it lasts, check the DNS resolver setting (letterbox settings list).")
    if problems:
        return Item("ptr", "Reverse DNS", "fail", "; ".join(problems),
                    f"Ask whoever gives you the address (your internet or hosting provider) to set its reverse "
                    f"DNS name (PTR) to {host}. Many receivers refuse mail from an address without it.")
    return Item("ptr", "Reverse DNS", "ok", f"{', '.join(addresses)} named {host}, and back.")


async def check_blocklists(svc: Services) -> Item:
    """The box's own public addresses on the DNS blocklists it uses itself (receivers use the same)."""
    values = svc.settings.now
    addresses = _public_addresses(svc, "blocklists", "Blocklists")
    if isinstance(addresses, Item):
        return addresses
    resolver = _resolver(svc)
    listed: list[str] = []
    unusable: list[str] = []
    for zone in values.spam.dnsbl_lists:
        for address in addresses:
            answer = await dnsbl.ask(resolver, zone, dnsbl.ip_query_name(address, zone))
            if answer.listed:
                listed.append(f"{address} on {zone} ({', '.join(answer.codes)})")
            elif answer.state != dnsbl.OK:
                unusable.append(f"{zone}: {answer.detail}")
    if listed:
        return Item("blocklists", "Blocklists", "fail", "Listed: " + "; ".join(listed),
                    "Receivers refuse mail from a listed address. Look the address up on the list's website for "
                    "why and how to be removed (a compromised password sending spam is the usual cause).",
                    "/console/events")
    if unusable:
        return Item("blocklists", "Blocklists", "unknown", "Could not ask: " + "; ".join(unusable),
                    "Public resolvers are refused by Spamhaus: run a resolver of the box's own (unbound, say) and "
                    "point the box at it: letterbox settings set dns_resolver 127.0.0.1:53.")
    return Item("blocklists", "Blocklists", "ok",
                f"{', '.join(addresses)} not listed on {', '.join(values.spam.dnsbl_lists)}.")


async def check_port25(svc: Services, probes: Probes) -> Item:
    """A real TCP connection to a remote MX: home connections often block outbound port 25."""
    if svc.settings.now.relay is not None:
        return Item("port25", "Outbound port 25", "ok",
                    f"Not needed: mail leaves through the relay {svc.settings.now.relay.host}.")
    target = probes.port25_target() if probes.port25_target else svc.settings.now.port25_probe
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), PORT25_TIMEOUT)
    except socket.gaierror as exc:
        # Not a word about port 25: the name did not resolve (the box offline, or its DNS broken). It said
        # "port 25 looks blocked" and sent the administrator to ask the provider about the wrong thing.
        return Item("port25", "Outbound port 25", "unknown",
                    f"Could not look up {host} ({exc.strerror or exc}): whether port 25 is open could not be told.",
                    "Check the box's internet connection and its DNS: mail to other domains cannot leave while the "
                    "box cannot look names up.")
    except (OSError, TimeoutError, ValueError) as exc:
        return Item("port25", "Outbound port 25", "fail",
                    f"Could not connect to {target} ({type(exc).__name__}): outbound port 25 looks blocked.",
                    "Mail to other domains cannot leave directly. Ask your provider to open port 25, or send "
                    "through your provider's relay (smarthost).", "/console/sending")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Item("port25", "Outbound port 25", "ok", f"Connected to {target}: mail can leave directly.")


async def check_certificate(svc: Services, now: float) -> Item:
    info = await asyncio.to_thread(svc.tls.info)
    days = (info.not_after - dt.datetime.fromtimestamp(now, dt.UTC)).days
    if days < 0:
        return Item("certificate", "Certificate", "fail", f"Expired {-days} days ago.",
                    "Renew it now.", "/console/certificate")
    if info.self_signed:
        return Item("certificate", "Certificate", "warn", "Self-signed: mail programs warn about it.",
                    "Get a trusted certificate (Let's Encrypt).", "/console/certificate")
    if days <= CERT_WARN_DAYS:
        return Item("certificate", "Certificate", "fail", f"{days} days left, and renewal has not replaced it.",
                    "Renew it now and read the last renewal error.", "/console/certificate")
    failing = await _renewal_failing(svc)
    if failing:  # still valid, but a renewal was due and failed: say so before the 14 days come
        return Item("certificate", "Certificate", "fail", f"{days} days left, and renewing it failed: {failing[:200]}",
                    "Fix what the error names (DNS, port 80 reachable from the internet), then Renew now.",
                    "/console/certificate")
    return Item("certificate", "Certificate", "ok", f"Trusted, {days} days left.")


async def _renewal_failing(svc: Services) -> str:
    """The last renewal error while a retry is pending (certificates.py keeps both until a renewal works)."""
    from appliance import certificates

    if await svc.db.get_setting(certificates.SOURCE) != "acme" or not await svc.db.get_setting(certificates.NEXT_ATTEMPT):
        return ""
    return await svc.db.get_setting(certificates.LAST_ERROR) or ""


async def check_backups(svc: Services, now: float) -> Item:
    from appliance import backup

    schedule = await backup.read_schedule(svc.db, now)
    last = schedule.last
    if not schedule.enabled and not last:
        return Item("backups", "Backups", "warn", "No backup has been made and none is scheduled.",
                    "Make the backup key, download the emergency kit and turn on daily backups.",
                    "/console/backups")
    if last and not last.get("ok", False):
        return Item("backups", "Backups", "fail", f"The last backup failed: {str(last.get('text', ''))[:200]}",
                    "See the Backups page.", "/console/backups")
    at = float(last.get("at", 0)) if last else 0.0
    if now - at > BACKUP_MAX_AGE:
        return Item("backups", "Backups", "fail",
                    "The last backup is more than 3 days old." if at else "No backup has succeeded yet.",
                    "Make one now and check the schedule.", "/console/backups")
    return Item("backups", "Backups", "ok", "Last backup " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)))


async def check_disk(svc: Services, *, record: bool = True) -> Item:
    """`record`: keep today's sample for the chart (a run of the checklist), not when the status page only
    shows the disk as it is now (`current`)."""
    usage = await asyncio.to_thread(shutil.disk_usage, svc.config.data.root)
    used = used_percent(usage.used, usage.free)
    # What is used, as df and the percentage say it: total - free counted root's reserved blocks as used
    # (the chart showed 175 GiB where df and the page said 25 GiB, 24 %, on a disk reserving 150 GiB).
    if record:
        growth = await _record_disk(svc.db, usage.used, usage.total)
    else:
        growth = await _disk_growth(svc.db, usage.used)
    summary = f"{used}% used, {usage.free // 2**20:,} MiB free" + (
        f", growing {growth // 2**20:,} MiB a week." if growth is not None and growth > 0 else ".")
    if svc.text_index is not None:
        summary += f" Search index: {await svc.text_index.size_bytes() / 2**20:,.1f} MiB."
    refusing = not room_for(svc.config.data.root)
    if refusing:
        summary += (f" New mail is refused (senders retry later) until more than {RESERVE_OCTETS // 2**20} MiB"
                    " is free.")
    if refusing or used >= DISK_FAIL_PERCENT:
        return Item("disk", "Disk", "fail", summary, "Delete old mail or backups, or move to a bigger disk.",
                    "/console/backups")
    if used >= DISK_WARN_PERCENT:
        return Item("disk", "Disk", "warn", summary, "Plan for more space.")
    return Item("disk", "Disk", "ok", summary)


async def _record_disk(db: Database, used: int, total: int) -> int | None:
    """Keep today's use (one row a day); the growth over the last week when a sample that old exists."""
    today = dt.datetime.now(dt.UTC).date()
    await db.execute("INSERT INTO disk_samples (day, used, total) VALUES (?, ?, ?) ON CONFLICT(day) DO UPDATE"
                     " SET used = excluded.used, total = excluded.total", (today.isoformat(), used, total))
    return await _disk_growth(db, used)


async def _disk_growth(db: Database, used: int) -> int | None:
    """Growth since the sample of a week ago, when one that old exists."""
    today = dt.datetime.now(dt.UTC).date()
    row = await db.fetchone("SELECT used FROM disk_samples WHERE day <= ? ORDER BY day DESC LIMIT 1",
                            ((today - dt.timedelta(days=7)).isoformat(),))
    return used - int(row["used"]) if row else None


async def disk_history(db: Database, days: int = 30) -> list[tuple[dt.date, float]]:
    """(day, GiB used) for the chart."""
    since = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days - 1)).isoformat()
    rows = await db.fetchall("SELECT day, used FROM disk_samples WHERE day >= ? ORDER BY day", (since,))
    return [(dt.date.fromisoformat(str(r["day"])), round(int(r["used"]) / 2**30, 2)) for r in rows]


async def check_queue(svc: Services, now: float) -> Item:
    messages = await svc.spool.messages()
    waiting = [m for m in messages if any(r.attempts > 0 for r in m.recipients)]
    if not waiting:
        return Item("queue", "Outbound queue", "ok",
                    f"{len(messages)} message{'' if len(messages) == 1 else 's'} waiting, none deferred.")
    oldest = min(m.created_at for m in waiting)
    hours = int((now - oldest) // 3600)
    summary = f"{len(waiting)} deferred, the oldest for {hours} hours."
    if now - oldest > DEFERRED_WARN_AGE:
        return Item("queue", "Outbound queue", "warn", summary,
                    "See why on the Sending page (the last error of each recipient).", "/console/sending")
    return Item("queue", "Outbound queue", "ok", summary)


NO_SPAM_CHECKS = "If you do not want spam checking, switch the content filter off in the spam settings."


def _on_this_computer(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def content_filter_fix(status: ContentStatus, installed: Callable[[str], bool]) -> str:
    """What to do when rspamd is switched on and does not answer, for someone who has never heard of it:
    a box without rspamd (a checkout's `make run`) is told to install it, not to restart a service it
    does not have."""
    if "does not answer" not in status.problem:  # an address that cannot be used (not http://host:port)
        return f"Correct rspamd's address in the spam settings. {NO_SPAM_CHECKS}"
    if not _on_this_computer(urlsplit(status.scanner).hostname or ""):
        return (f"Check that rspamd runs on that machine and lets this box connect, or correct its address in "
                f"the spam settings. {NO_SPAM_CHECKS}")
    if not installed("rspamd"):
        return ("rspamd, the program that checks mail for spam, is not installed on this computer. Install it "
                f"(on Debian or Ubuntu: sudo apt install rspamd redis-server). {NO_SPAM_CHECKS}")
    return ("rspamd is installed here. Just after the box started, give it a few minutes: this turns green by "
            "itself. Otherwise start it (sudo systemctl restart redis-server rspamd), or, if it runs elsewhere, "
            f"correct its address in the spam settings. {NO_SPAM_CHECKS}")


async def check_content_filter(svc: Services, probes: Probes | None = None) -> Item:
    """Is rspamd answering (a ping now, as the console's spam page asks)? Off or silent, mail is
    delivered unfiltered (the MX never refuses or loses a message for a check that did not run)."""
    spam = svc.spam_content
    status: ContentStatus = (await spam.status() if spam is not None
                             else await content_status(content_settings(await svc.settings.fresh())))
    if not status.enabled:
        return Item("content_filter", "Content filter", "warn",
                    "Content filtering is switched off: only the checks at the door (blocklists, greylisting) "
                    "stop spam; the rest reaches the inboxes.",
                    "Turn the content filter on in the spam settings.", "/console/spam")
    if not status.available:
        return Item("content_filter", "Content filter", "fail",
                    f"The spam filter is not working: {status.problem}. Mail is delivered unchecked: it all "
                    "goes to the inboxes, none to Junk (nothing is lost).",
                    content_filter_fix(status, (probes or svc.status_probes).installed), "/console/spam")
    scanned = f", {status.scanned:,} messages scanned" if status.scanned is not None else ""
    return Item("content_filter", "Content filter", "ok", f"rspamd at {status.scanner} answers{scanned}.")


async def check_clock(probes: Probes) -> Item:
    synced = await asyncio.to_thread(probes.clock_synchronised)
    if synced is None:
        return Item("clock", "Time", "unknown", "The clock's synchronisation state cannot be read here.")
    if not synced:
        return Item("clock", "Time", "fail", "The clock is not synchronised.",
                    "Turn on time synchronisation (systemd-timesyncd): DKIM, TLS and greylisting need the right time.")
    return Item("clock", "Time", "ok", "The clock is synchronised.")


class _Timex(ctypes.Structure):
    # struct timex (sys/timex.h) on 64-bit Linux: 'modes' then 'offset'... 'status' is the 8th field,
    # padded to its full size so the kernel never writes past the buffer.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("rest", ctypes.c_long * 32)]


TIME_ERROR = 5  # adjtimex's return: the clock is not synchronised (STA_UNSYNC)


def kernel_clock_synchronised() -> bool | None:
    """What `timedatectl`'s "System clock synchronized" reads: adjtimex(2) with no change asked."""
    try:
        state = libc().adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != TIME_ERROR)


# --- running and keeping ----------------------------------------------------------------------------

async def run_all(svc: Services, probes: Probes | None = None, *, now: float | None = None) -> list[Item]:
    """Every check, each bounded by CHECK_TIMEOUT, concurrently; kept in the db with this time."""
    probes = probes or svc.status_probes
    at = probes.clock() if now is None else now
    checks: list[tuple[str, str, Awaitable[Item]]] = [
        ("dns", "DNS records", check_dns(svc)),
        ("ptr", "Reverse DNS", check_reverse_dns(svc)),
        ("blocklists", "Blocklists", check_blocklists(svc)),
        ("port25", "Outbound port 25", check_port25(svc, probes)),
        ("certificate", "Certificate", check_certificate(svc, at)),
        ("backups", "Backups", check_backups(svc, at)),
        ("disk", "Disk", check_disk(svc)),
        ("queue", "Outbound queue", check_queue(svc, at)),
        ("content_filter", "Content filter", check_content_filter(svc, probes)),
        ("clock", "Time", check_clock(probes)),
    ]
    results = await asyncio.gather(*(_bounded(key, title, check) for key, title, check in checks))
    items = [replace(i, checked_at=at) for i in results]
    before = {item.key: item.level for item in await load(svc.db)}
    await save(svc.db, items)
    await _alert(svc, items, before, probes.clock)
    return items


async def refresh_dns(svc: Services) -> None:
    """Look every domain's records up again (the background run does, so that a record that was right
    and went wrong shows, and is mailed about, without anyone pressing Check on the domain's page).
    Kept like the console's check, without an event each time (the checklist keeps its own time)."""
    from appliance import dns_check

    for domain in await svc.accounts.list_domains():
        results = await dns_check.check_domain(svc.db, svc.config.data.dkim, domain, svc.hostname,
                                               svc.config.published_ports())
        await dns_check.save_results(svc.db, domain, results, svc.status_probes.clock())


async def check_everything(svc: Services) -> list[Item]:
    """A whole run, in the background or from the console's Check now: the domains' DNS records looked
    up again, then every check (and the alert mails they call for)."""
    try:
        await asyncio.wait_for(refresh_dns(svc), CHECK_TIMEOUT)
    except Exception:  # DNS that does not answer: the checklist shows the last results
        log.exception("the DNS records could not be checked again")
    return await run_all(svc)


async def _alert(svc: Services, items: list[Item], before: dict[str, Level], clock: Callable[[], float]) -> None:
    """The postmaster's alert mails (appliance/alerts.py); a failure to mail never fails the checks."""
    from appliance.alerts import Alerts
    from appliance.postmaster import mail_postmaster

    async def mail(subject: str, text: str) -> bool:
        return await mail_postmaster(svc, subject, text)

    try:
        await Alerts(svc.db, mail, lambda: svc.hostname, clock).after_checks(items, before)
    except Exception:
        log.exception("status alerts could not be mailed")


async def _bounded(key: str, title: str, check: Awaitable[Item]) -> Item:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT)
    except TimeoutError:
        return Item(key, title, "unknown", f"No answer within {CHECK_TIMEOUT:.0f} seconds.", "Check again later.")
    except Exception as exc:  # one broken check must not hide the others
        log.exception("status check %s failed", key)
        return Item(key, title, "unknown", f"The check failed: {type(exc).__name__}", "Check again later.")


async def save(db: Database, items: list[Item]) -> None:
    async with db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO status_checks (key, title, level, summary, fix, link, checked_at, links)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET title = excluded.title, level = excluded.level,"
            " summary = excluded.summary, fix = excluded.fix, link = excluded.link, checked_at = excluded.checked_at,"
            " links = excluded.links",
            [(i.key, i.title, i.level, i.summary, i.fix, i.link, int(i.checked_at),
              json.dumps(i.links) if i.links else "") for i in items])


_ORDER = {"fail": 0, "warn": 1, "unknown": 2, "ok": 3}


def _problems_first(items: list[Item]) -> list[Item]:
    return sorted(items, key=lambda i: (_ORDER.get(i.level, 9), i.key))


async def load(db: Database) -> list[Item]:
    """The kept results, the problems first."""
    rows = await db.fetchall("SELECT key, title, level, summary, fix, link, checked_at, links FROM status_checks")
    items = [Item(str(r["key"]), str(r["title"]), r["level"], str(r["summary"]), str(r["fix"]), str(r["link"]),
                  float(r["checked_at"]), tuple((str(text), str(path)) for text, path in json.loads(r["links"] or "[]")))
             for r in rows]
    return _problems_first(items)


async def current(svc: Services) -> list[Item]:
    """What the status page shows: the kept results, but the disk as it is now (one statvfs). The runs are
    hours apart, and a disk that filled since the last one (a big backup, a mail storm) showed green or
    amber on the page while new mail was already refused."""
    kept = await load(svc.db)
    if not any(item.key == "disk" for item in kept):
        return kept
    disk = await _bounded("disk", "Disk", check_disk(svc, record=False))
    return _problems_first([replace(disk, checked_at=item.checked_at) if item.key == "disk" else item
                            for item in kept])


async def start_status_checks(svc: Services) -> StatusSchedule:
    schedule = StatusSchedule(svc)
    schedule.start()
    return schedule


class StatusSchedule:
    """Runs the checks in the background: FIRST_RUN_DELAY after start, then every EVERY seconds."""

    def __init__(self, svc: Services, *, first_delay: float = FIRST_RUN_DELAY, every: float = EVERY) -> None:
        self._svc = svc
        self._first_delay = first_delay
        self._every = every
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-checks")

    async def run_once(self) -> list[Item]:
        return await check_everything(self._svc)

    async def _run(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            if self._svc.settings.now.status_checks:
                try:
                    await self.run_once()
                except Exception:  # the next run tries again
                    log.exception("status checks failed")
            await asyncio.sleep(self._every)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
