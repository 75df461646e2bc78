"""The octets of incoming messages held in memory at once, across the box.

SMTP DATA (the MX, submission, LMTP) and IMAP APPEND read a message into memory whole before it is
written. Each session was bounded (36 MiB, 64 MiB) but not their sum: one logged-in user's ten
APPENDs of 59 MB held 574 MB of the server's memory, and fifty from one address or any senders'
DATA on port 25 at once would have run the box out of memory. Here every session takes its message's
octets from one budget as they are announced or arrive, and gives them back when the command is
answered; a message that does not fit is refused with a temporary error (SMTP 452 4.3.1, IMAP NO
[UNAVAILABLE]) and the client tries again later, as it would for a full queue (Postfix's 452 4.3.1).
One network may hold at most half of it, so one party cannot take it all: an IPv4 /24, an IPv6 site
(/48, RFC 6177, as the connection limits judge a full pre-auth pool: counted per /64, the two /64s of
any home's /56 took the whole budget).
"""

from __future__ import annotations

import collections

from appliance.channel import network_of, site_of

# Room for seven of the largest SMTP messages or four of the largest APPENDs at once.
MESSAGE_MEMORY_OCTETS = 256 * 1024 * 1024
NETWORK_SHARE = 0.5
BUSY_TEXT = "Too many messages being received at once, try again later"


class MessageMemory:
    """The box's one budget (Services.message_memory); sessions hold their part through a Hold."""

    def __init__(self, limit: int = MESSAGE_MEMORY_OCTETS) -> None:
        self.limit = limit
        self.held = 0
        self._by_network: collections.Counter[str] = collections.Counter()

    def hold(self, peer: str) -> Hold:
        return Hold(self, site_of(network_of(peer)))

    def others(self, hold: Hold | None = None) -> int:
        """Octets of messages being received that are not `hold`'s: each will be written to the data
        disk, so a check of its room counts them (disk_full.room_for), or concurrent messages would
        each find the room and together leave less than the reserve."""
        return self.held - (hold.octets if hold is not None else 0)

    def _take(self, network: str, octets: int) -> bool:
        if self.held + octets > self.limit or self._by_network[network] + octets > self.limit * NETWORK_SHARE:
            return False
        self.held += octets
        self._by_network[network] += octets
        return True

    def _give_back(self, network: str, octets: int) -> None:
        self.held -= octets
        self._by_network[network] -= octets
        if self._by_network[network] <= 0:
            del self._by_network[network]


class Hold:
    """One session's share of the budget: take() as a message comes, release() once it is answered."""

    def __init__(self, budget: MessageMemory, network: str) -> None:
        self._budget = budget
        self._network = network
        self.octets = 0

    def take(self, octets: int) -> bool:
        """Whether `octets` more may be held (then they are); nothing is taken when not."""
        if not self._budget._take(self._network, octets):
            return False
        self.octets += octets
        return True

    def release(self) -> None:
        if self.octets:
            self._budget._give_back(self._network, self.octets)
            self.octets = 0
