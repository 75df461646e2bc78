"""IMAP sessions open per account, across the 143 and 993 listeners (Services.account_sessions); POP3
sessions per account, across 110 and 995, counted apart (Services.pop3_sessions), as they run side by side.

The listeners bound connections per address (50), per network (200) and in total (1000), but not per
account: one account's password, from five /24s, held all 1000 sessions of a listener (~290 kB of the
server's memory each, 290 MB), and every other user of the box was refused. Dovecot bounds an account's
sessions per client address (mail_max_userip_connections, 10); a family's devices behind one NAT
exceed that, so here the bound is per account, whatever the address, and high enough for every device
of a household with a few connections each (Thunderbird keeps up to 5).
"""

from __future__ import annotations

import collections

MAX_SESSIONS_PER_ACCOUNT = 100


class AccountSessions:
    def __init__(self, limit: int = MAX_SESSIONS_PER_ACCOUNT) -> None:
        self.limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    def open(self, account: str) -> bool:
        """Count one more session of `account`, unless it has `limit` already (then False)."""
        if self._open[account] >= self.limit:
            return False
        self._open[account] += 1
        return True

    def close(self, account: str) -> None:
        self._open[account] -= 1
        if self._open[account] <= 0:
            del self._open[account]

    def count(self, account: str) -> int:
        return self._open[account]
