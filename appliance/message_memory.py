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

SMTP DATA keeps only its first octets in memory (message_spool.SPOOL_AFTER_OCTETS), the rest in a
spool file on the data disk, counted here as `spooled` (the disk reserve sees them: Spill): slow senders
trickling large messages held 36 MiB each for up to 30 minutes, and a few filled the budget. The
spool has a bound of its own, SPOOL_OCTETS, half of it per network as the memory's: without it the
MX's 500 connections could spool 18 GiB, and slow senders would fill a small disk to its reserve
(then every sender gets 452 4.3.1) as they filled the memory; with it they can keep out only large
messages, and only from several networks at once. Once its
dot has come, a spooled message is read back whole (the checks and the delivery take bytes) within a
second bound, READ_BACK_OCTETS, in turn: a large message waits there (READ_BACK_WAIT at most)
rather than taking the room the small messages being received need.

IMAP APPEND announces its literal's size: past SPOOL_AFTER_OCTETS of a command's literals the rest goes
to spool files too (imap/server.py). The octets announced for them and not yet written count as
`coming` in others(): the disk reserve checks of other messages see them as they saw them in memory.
"""

from __future__ import annotations

import asyncio
import collections

from appliance.channel import network_of, site_of
from appliance.smtp.limits import DATA_CHUNK_TIMEOUT, MAX_MESSAGE_OCTETS

# Room for seven of the largest SMTP messages or four of the largest APPENDs at once.
MESSAGE_MEMORY_OCTETS = 256 * 1024 * 1024
NETWORK_SHARE = 0.5
BUSY_TEXT = "Too many messages being received at once, try again later"
# Octets in spool files at once: 56 of the largest SMTP messages (28 from one network).
SPOOL_OCTETS = 2 * 1024 * 1024 * 1024
# Spooled messages read back at once, after their dot: two of the largest.
READ_BACK_OCTETS = 2 * MAX_MESSAGE_OCTETS
# How long one waits for its turn: less than the session's timer after the last chunk (the reply then
# is 452 4.3.1, and the client tries again later).
READ_BACK_WAIT = DATA_CHUNK_TIMEOUT * 2 / 3


class Shared:
    """Octets counted against a limit, of which one network may have at most NETWORK_SHARE."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._by_network: collections.Counter[str] = collections.Counter()

    def take(self, network: str, octets: int) -> bool:
        if self.total + octets > self.limit or self._by_network[network] + octets > self.limit * NETWORK_SHARE:
            return False
        self.total += octets
        self._by_network[network] += octets
        return True

    def give_back(self, network: str, octets: int) -> None:
        self.total -= octets
        self._by_network[network] -= octets
        if self._by_network[network] <= 0:
            del self._by_network[network]


class MessageMemory:
    """The box's one budget (Services.message_memory); sessions hold their part through a Hold."""

    def __init__(self, limit: int = MESSAGE_MEMORY_OCTETS, read_back_limit: int = READ_BACK_OCTETS,
                 spool_limit: int = SPOOL_OCTETS) -> None:
        self.memory = Shared(limit)
        self.disk = Shared(spool_limit)  # octets in spool files (on the data disk, not in memory)
        self.read_back_limit = read_back_limit
        self.read_back = 0  # octets of spooled messages read back into memory
        self.coming = 0  # octets of IMAP APPEND literals announced for a spool file, not yet written
        self._turn = asyncio.Lock()  # FIFO: a large message is not passed for ever by smaller ones
        self._room = asyncio.Event()

    @property
    def limit(self) -> int:
        return self.memory.limit

    @limit.setter
    def limit(self, octets: int) -> None:
        self.memory.limit = octets

    @property
    def held(self) -> int:
        return self.memory.total

    @property
    def spooled(self) -> int:
        return self.disk.total

    def hold(self, peer: str) -> Hold:
        return Hold(self, site_of(network_of(peer)))

    def others(self, hold: Hold | None = None) -> int:
        """Octets in memory of messages being received that are not `hold`'s: each will be written to
        the data disk, so a check of its room counts them (disk_full.room_for), or concurrent messages
        would each find the room and together leave less than the reserve. Spooled octets are on the
        disk already (its free space says so), and their file is gone before their delivery writes."""
        total = self.held + self.read_back + self.coming
        return total - (hold.octets + hold.read_back + hold.coming if hold is not None else 0)

    async def _read_back(self, octets: int, wait: float) -> bool:
        try:
            async with asyncio.timeout(wait), self._turn:
                # One message always fits when no other is read back (it is at most the SMTP limit).
                while self.read_back and self.read_back + octets > self.read_back_limit:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            return False
        self.read_back += octets
        return True

    def _read_back_done(self, octets: int) -> None:
        self.read_back -= octets
        self._room.set()


class Hold:
    """One session's share of the budget: take() as a message comes, release() once it is answered."""

    def __init__(self, budget: MessageMemory, network: str) -> None:
        self._budget = budget
        self._network = network
        self.octets = 0  # in memory, of the budget
        self.spooled = 0  # in a spool file
        self.read_back = 0  # read back from it, of READ_BACK_OCTETS
        self.coming = 0  # announced for a spool file (an IMAP APPEND's literal), not yet written

    def take(self, octets: int) -> bool:
        """Whether `octets` more may be held (then they are); nothing is taken when not."""
        if not self._budget.memory.take(self._network, octets):
            return False
        self.octets += octets
        return True

    def spool(self, octets: int) -> bool:
        """Whether `octets` more may be written to this message's spool file (then they count)."""
        if not self._budget.disk.take(self._network, octets):
            return False
        self.spooled += octets
        return True

    def expect(self, octets: int) -> None:
        """`octets` of an announced literal will come and go to a spool file (others() counts them)."""
        self.coming += octets
        self._budget.coming += octets

    def arrived(self, octets: int) -> None:
        """`octets` of those came (written to the spool file, or dropped after a refusal)."""
        octets = min(octets, self.coming)
        self.coming -= octets
        self._budget.coming -= octets

    async def take_back(self, octets: int, wait: float = READ_BACK_WAIT) -> bool:
        """Whether the spooled message of `octets` (all of it) may be read back into memory, in turn
        with the others (then its spooled octets count as read back); False after `wait` seconds."""
        if not await self._budget._read_back(octets, wait):
            return False
        self.read_back += octets
        self._unspool()
        return True

    def _unspool(self) -> None:
        if self.spooled:
            self._budget.disk.give_back(self._network, self.spooled)
            self.spooled = 0

    def release(self) -> None:
        if self.octets:
            self._budget.memory.give_back(self._network, self.octets)
            self.octets = 0
        self._unspool()
        self.arrived(self.coming)
        if self.read_back:
            self._budget._read_back_done(self.read_back)
            self.read_back = 0

