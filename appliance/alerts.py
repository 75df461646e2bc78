"""Alert mails to the postmaster (issue 18): what the status checklist finds wrong, mailed locally so
they arrive even when outbound mail is what broke.

After each run of the checklist, `Alerts.after_checks` compares with what was mailed before (kept in
`status_alerts`): a problem gets one mail, again at most once a day while it lasts, and one more mail
when it is fixed. The problems mailed about: a certificate close to its end (or self-signed past its
renewal), a full disk, mail deferred for over a day, a failed or old backup, DNS records that were
right and went wrong, the box's address on a blocklist. Items that are only "attention" at setup (no
backup yet, a self-signed certificate) are not mailed: the checklist shows them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from appliance.db import Database
from appliance.status_checks import Item

log = logging.getLogger("letterbox.alerts")

ALERTED = ("certificate", "disk", "queue", "backups", "dns", "blocklists")
REPEAT_AFTER = 86400.0  # while a problem lasts, one mail a day

Mailer = Callable[[str, str], Awaitable[bool]]  # (subject, text) -> delivered


def _is_problem(item: Item, before: str | None, open_already: bool) -> bool:
    if item.key not in ALERTED:
        return False
    if item.key == "queue":
        return item.level == "warn"  # deferred for over a day
    if item.key == "dns" and not open_already and before != "ok":
        return False  # records never published yet are the checklist's to show; a mail is for a change
    return item.level == "fail"


class Alerts:
    def __init__(self, db: Database, mail: Mailer, hostname: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._mail = mail
        self._hostname = hostname
        self._clock = clock

    async def after_checks(self, items: Sequence[Item], before: Mapping[str, str] | None = None) -> list[str]:
        """Mail what is due; `before` is each check's level at the previous run. Returns the subjects
        mailed (for the log and tests)."""
        before = before or {}
        now = self._clock()
        rows = await self._db.fetchall("SELECT key, since, last_mailed FROM status_alerts")
        open_alerts = {str(r["key"]): (float(r["since"]), float(r["last_mailed"])) for r in rows}
        sent: list[str] = []
        for item in items:
            known = open_alerts.get(item.key)
            if _is_problem(item, before.get(item.key), known is not None):
                if known is None or now - known[1] >= REPEAT_AFTER:
                    subject = f"[{self._hostname()}] Problem: {item.title}"
                    text = (f"{item.summary}\n\nWhat to do: {item.fix or 'see the status page'}\n\n"
                            f"Status page: https://{self._hostname()}{item.link or '/console'}\n")
                    if await self._mail(subject, text):
                        sent.append(subject)
                    since = known[0] if known else now
                    await self._db.execute(
                        "INSERT INTO status_alerts (key, since, last_mailed) VALUES (?, ?, ?) ON CONFLICT(key)"
                        " DO UPDATE SET last_mailed = excluded.last_mailed", (item.key, int(since), int(now)))
            elif known is not None and item.level == "ok":
                subject = f"[{self._hostname()}] Fixed: {item.title}"
                if await self._mail(subject, f"{item.summary}\n\nThe problem mailed earlier is gone.\n"):
                    sent.append(subject)
                await self._db.execute("DELETE FROM status_alerts WHERE key = ?", (item.key,))
        for subject in sent:
            log.info("alert mailed: %s", subject)
        return sent
