"""Live checks of the records of dns_records.py: is each one published, missing, or set to something else?

Each record is looked up with dnspython through the box's resolver (the `dns_resolver` setting, else
the system's) and marked:
- found:   the published data does what the record asks (an MX naming this box among others counts);
- missing: no such name, or no data of that type;
- wrong:   data is there but does not do it; the values found are shown so the person can compare;
- error:   the lookup itself failed (timeout, no server answered): nothing can be said yet.
The last results of each domain are kept in a setting so the status page can show them without
waiting for DNS.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from appliance.db import Database
from appliance.dns_records import DnsRecord, domain_records
from appliance.queue.resolver import make_async_resolver
from appliance.settings import read_settings

Status = Literal["found", "missing", "wrong", "error"]
STATUSES: tuple[Status, ...] = ("found", "missing", "wrong", "error")
RESULTS_SETTING_PREFIX = "dns_check:"
CHECK_LIFETIME = 10.0  # seconds for one record's lookups; the checks run in parallel
MAX_SHOWN_VALUES = 10  # values found that are shown for one record
MAX_SHOWN_CHARS = 500  # of one value (a TXT record can be long)


@dataclass(frozen=True)
class CheckResult:
    key: str  # DnsRecord.key
    rdtype: str
    name: str
    status: Status
    found: tuple[str, ...] = ()  # the values published (for "wrong", what to compare with)
    note: str = ""  # one line: why it is wrong, or what failed


def _host(text: str) -> str:
    return text.rstrip(".").lower()


def _clip(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for value in values:
        out.append(value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "...")
        if len(out) == MAX_SHOWN_VALUES:
            break
    return tuple(out)


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    """The rdata of `name`/`rdtype` as text (TXT strings joined, RFC 7208 3.3); [] for no data."""
    try:
        answer = await resolver.resolve(dns.name.from_text(name), rdtype, raise_on_no_answer=False,
                                        lifetime=CHECK_LIFETIME)
    except dns.resolver.NXDOMAIN:
        return []
    if answer.rrset is None:
        return []
    values = []
    wanted = dns.rdatatype.from_text(rdtype)
    for rdata in answer.rrset:
        if rdata.rdtype != wanted:
            continue
        if rdtype == "TXT":
            values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
        else:
            values.append(rdata.to_text())
    return values


def _tags(record: str) -> dict[str, str]:
    """'v=DKIM1; k=rsa; p=...' -> tags (RFC 6376 3.2 tag-list), whitespace inside values removed."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def _spf_authorises(record: str, hostname: str, addresses: Sequence[str]) -> bool:
    terms = {t.lstrip("+") for t in record.lower().split()[1:]}
    allowed = {"mx", f"a:{hostname}"} | {f"ip{4 if ':' not in a else 6}:{a.lower()}" for a in addresses}
    return bool(terms & allowed)


async def _spf_passes(resolver: dns.asyncresolver.Resolver, domain: str, hostname: str, addresses: Sequence[str]) -> bool:
    """The record evaluated as receivers do (a CIDR range, an include, a redirect, `a`): True when each
    of the box's addresses passes. The words alone miss those: `ip4:192.0.2.7/32` or an include was
    "wrong" on the status page, and in the daily alert, while every receiver said pass."""
    if not addresses:
        return False
    from appliance.inbound_auth import check_spf  # (pyspf: loaded for this check only)

    same = dns.resolver.Resolver(configure=False)
    same.__dict__.update(resolver.__dict__)  # the same servers, options and cache, answering on a thread

    def evaluate() -> bool:
        return all(check_spf(same, address, f"postmaster@{domain}", hostname)[0].result == "pass"
                   for address in addresses)

    return await asyncio.to_thread(evaluate)


async def check_record(  # noqa: C901  one judgement per record kind (MX, A, SPF, DKIM, DMARC, PTR...)
    resolver: dns.asyncresolver.Resolver, record: DnsRecord, *, hostname: str, addresses: Sequence[str] = ()
) -> CheckResult:
    """Look one record up and judge what is published. Never raises for DNS trouble: status 'error'."""
    hostname = _host(hostname)

    def result(status: Status, found: Iterable[str] = (), note: str = "") -> CheckResult:
        return CheckResult(record.key, record.rdtype, record.name, status, _clip(found), note)

    try:
        if record.rdtype == "MX":
            found = await _lookup(resolver, record.name, "MX")
            if not found:
                return result("missing")
            if any(_host(v.split()[-1]) == hostname for v in found):
                return result("found", found)
            return result("wrong", found, f"no MX names {hostname}")

        if record.rdtype in ("A", "AAAA"):
            found = await _lookup(resolver, record.name, record.rdtype)
            if not found:
                return result("missing")
            if record.value is None or record.value in found:
                return result("found", found)
            return result("wrong", found, f"{record.name} does not point to {record.value}")

        if record.rdtype == "CNAME":
            # A CNAME to the box, or A/AAAA records with the box's own addresses, both work.
            cname = await _lookup(resolver, record.name, "CNAME")
            if cname:
                if any(_host(v) == hostname for v in cname):
                    return result("found", cname)
                return result("wrong", cname, f"points to another host than {hostname}")
            direct = await _lookup(resolver, record.name, "A") + await _lookup(resolver, record.name, "AAAA")
            if not direct:
                return result("missing")
            if addresses and set(direct) & set(addresses):
                return result("found", direct)
            return result("wrong", direct, f"not an alias of {hostname}")

        if record.rdtype == "SRV":
            found = await _lookup(resolver, record.name, "SRV")
            if not found:
                return result("missing")
            assert record.value is not None
            want_port = record.value.split()[2]
            for value in found:
                parts = value.split()
                if len(parts) == 4 and parts[2] == want_port and _host(parts[3]) == hostname:
                    return result("found", found)
            return result("wrong", found, f"no entry for {hostname} port {want_port}")

        if record.rdtype == "PTR":
            found = await _lookup(resolver, record.name, "PTR")
            if not found:
                return result("missing")
            if any(_host(v) == hostname for v in found):
                return result("found", found)
            return result("wrong", found, f"the address is named otherwise, not {hostname}")

        if record.rdtype == "TXT":
            return await _check_txt(resolver, record, hostname, addresses, result)
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration) as exc:
        return result("error", note=f"the lookup failed: {type(exc).__name__}")
    except dns.exception.DNSException as exc:
        return result("error", note=f"the lookup failed: {exc}"[:200])
    return result("error", note=f"cannot check {record.rdtype} records")


async def _check_txt(
    resolver: dns.asyncresolver.Resolver, record: DnsRecord, hostname: str, addresses: Sequence[str],
    result: Callable[..., CheckResult],
) -> CheckResult:
    found = await _lookup(resolver, record.name, "TXT")
    if record.key == "spf":
        spf = [v for v in found if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 ")]
        if not spf:
            return result("missing", found)
        if len(spf) > 1:  # RFC 7208 4.5: more than one record is a permanent error for receivers
            return result("wrong", spf, "more than one SPF record: receivers ignore them all; keep one")
        if _spf_authorises(spf[0], hostname, addresses) or await _spf_passes(resolver, record.name, hostname, addresses):
            return result("found", spf)
        return result("wrong", spf, "the SPF record does not allow this box to send (add 'mx')")
    if record.key == "dkim":
        keys = [v for v in found if "p" in _tags(v)]
        if not keys:
            return result("missing", found)
        assert record.value is not None
        want = _tags(record.value)["p"]
        if any(_tags(v)["p"] == want for v in keys):
            return result("found", keys)
        return result("wrong", keys, "another key is published under this selector")
    if record.key == "dmarc":
        dmarc = [v for v in found if v.replace(" ", "").upper().startswith("V=DMARC1")]
        if not dmarc:
            return result("missing" if not found else "wrong", found,
                          "" if not found else "TXT data without v=DMARC1")
        if len(dmarc) > 1:  # RFC 7489 6.6.3: more than one record means no policy at all
            return result("wrong", dmarc, "more than one DMARC record: receivers ignore them all; keep one")
        return result("found", dmarc)
    if not found:
        return result("missing")
    return result("found" if record.value in found else "wrong", found)


async def check_records(
    records: Sequence[DnsRecord], resolver: dns.asyncresolver.Resolver, *, hostname: str
) -> list[CheckResult]:
    """Every record at once (in parallel), results in the order of `records`."""
    addresses = [r.value for r in records if r.rdtype in ("A", "AAAA") and r.value]
    return list(await asyncio.gather(
        *(check_record(resolver, r, hostname=hostname, addresses=addresses) for r in records)
    ))


async def box_resolver(db: Database) -> dns.asyncresolver.Resolver:
    return make_async_resolver((await read_settings(db)).dns_resolver, cached=False)


async def check_domain(
    db: Database, dkim_dir: Path, domain: str, hostname: str, ports: Mapping[str, int] | None = None
) -> list[CheckResult]:
    """The whole table of one of the box's domains, checked through the box's resolver."""
    records = await domain_records(db, dkim_dir, domain, hostname, ports)
    return await check_records(records, await box_resolver(db), hostname=hostname)


def summary(results: Sequence[CheckResult]) -> dict[Status, int]:
    counts: dict[Status, int] = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] += 1
    return counts


def format_results(results: Sequence[CheckResult]) -> str:
    """For the terminal: status, type, name, then what was found when it is not right."""
    width = max((len(r.name) for r in results), default=4)
    lines = []
    for r in results:
        lines.append(f"{r.status.upper():<8} {r.rdtype:<5} {r.name:<{width}}".rstrip())
        if r.status != "found":
            if r.note:
                lines.append(f"         {r.note}")
            for value in r.found:
                lines.append(f"         found: {value}")
    return "\n".join(lines)


# --- last results, for the status page ----------------------------------------------------------------

def _setting(domain: str) -> str:
    return RESULTS_SETTING_PREFIX + domain.lower()


async def save_results(db: Database, domain: str, results: Sequence[CheckResult], now: float | None = None) -> None:
    payload = {
        "at": int(now if now is not None else time.time()),
        "results": [[r.key, r.rdtype, r.name, r.status, list(r.found), r.note] for r in results],
    }
    await db.set_setting(_setting(domain), json.dumps(payload))


async def load_results(db: Database, domain: str) -> tuple[int, list[CheckResult]] | None:
    """(unix time of the check, results) of the last check of `domain`, or None if never checked."""
    raw = await db.get_setting(_setting(domain))
    if not raw:
        return None
    try:
        payload = json.loads(raw)
        results = [
            CheckResult(str(k), str(t), str(n), s if s in STATUSES else "error", tuple(map(str, f)), str(note))
            for k, t, n, s, f, note in payload["results"]
        ]
        return int(payload["at"]), results
    except (ValueError, KeyError, TypeError):
        return None
