"""Every bound the IMAP listeners enforce, as named constants and one value object tests can shrink."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.message_spool import SPOOL_AFTER_OCTETS

# One command line (between literals), CRLF included. Dovecot uses 64 KiB as well: long UID sets from
# clients like Thunderbird and mbsync fit easily.
MAX_LINE_OCTETS = 64 * 1024
# A literal inside any command but APPEND (passwords, search strings, folder names).
MAX_LITERAL_OCTETS = 64 * 1024
# The message literal of APPEND: the largest message the box keeps (a little above the SMTP limit, so a
# message that was delivered can always be copied back in by a client).
MAX_APPEND_OCTETS = 64 * 1024 * 1024
# An APPEND command's literals past this many octets go to a spool file as they come, not memory
# (appliance/imap/server.py): a client trickling a 64 MiB message holds this much of the box's budget.
APPEND_IN_MEMORY_OCTETS = SPOOL_AFTER_OCTETS
# Everything one command may carry besides the APPEND message: lines plus small literals.
MAX_COMMAND_OCTETS = 1024 * 1024
# The same before a login, when a command is LOGIN, AUTHENTICATE, ID, STARTTLS or CAPABILITY (ID's
# RFC 2971 maximum is ~32 KiB): 1 MiB let each of the 600 connections a listener keeps for clients
# not logged in hold a megabyte of literals, 1.2 GB over 143 and 993 for anyone who can connect.
MAX_PREAUTH_COMMAND_OCTETS = 64 * 1024
# Literals in one command (guards against a flood of empty literals).
MAX_LITERALS_PER_COMMAND = 1000
# Malformed commands in a row before the server says BYE.
MAX_BAD_COMMANDS = 10
# RFC 3501 5.4: the autologout timer of an authenticated session is at least 30 minutes.
AUTHENTICATED_TIMEOUT = 30 * 60.0
# Before login a client has no reason to be slow: the whole pre-auth phase, from connect to a
# successful login, must fit in this many seconds (a deadline, not a timer reset by each read).
PREAUTH_TIMEOUT = 120.0
# One command, from its first byte to its last (line and literals), must arrive within this many
# seconds; a literal adds its announced size at MIN_LITERAL_RATE. A client trickling a byte at a
# time cannot hold a connection by never finishing its line (issue 11 item 7).
COMMAND_TIMEOUT = 60.0
MIN_LITERAL_RATE = 128 * 1024  # octets/s, about 1 Mbit/s: a 64 MB APPEND gets 60 + 512 s
# RFC 2177 3: clients re-issue IDLE at least every 29 minutes; the same 30 minute timer applies.
IDLE_TIMEOUT = AUTHENTICATED_TIMEOUT
# Seconds for a TLS handshake (implicit TLS on 993 or after STARTTLS).
TLS_HANDSHAKE_TIMEOUT = 30.0
# A client that stops reading: seconds one write may wait for the socket to drain.
WRITE_TIMEOUT = 300.0
# Concurrent connections per client address, per network (/24, /64), not yet logged in, and in total
# per listener. The pre-auth pool is smaller than the total: logged-in sessions always have room.
MAX_CONNECTIONS_PER_CLIENT = 50
MAX_CONNECTIONS_PER_NETWORK = 200
MAX_PREAUTH_CONNECTIONS = 600
MAX_CONNECTIONS = 1000
# Stress (Postfix's stress-adaptive behaviour): when the pre-auth pool is this full, a connection
# not yet logged in gets STRESSED_PREAUTH_TIMEOUT from its connect instead of PREAUTH_TIMEOUT.
STRESS_FRACTION = 0.5
STRESSED_PREAUTH_TIMEOUT = 10.0
# MIME nesting and part count a structure scan follows; deeper or further parts are treated as opaque.
MAX_MIME_DEPTH = 40
MAX_MIME_PARTS = 2000
# Header block of one MIME part kept in memory for parsing; the rest of a huge header is skipped.
MAX_HEADER_OCTETS = 256 * 1024
# Patterns in one LIST (RFC 5258 allows a list): each is matched against every folder.
MAX_LIST_PATTERNS = 100
# Parsed message structures kept per session, in octets of their header blocks (plus a fixed cost
# per part): a client reading a message fetches its parts one by one. Message lists are served
# from the message cache (imap/fetch_cache.py) and never come here.
STRUCTURE_CACHE_OCTETS = 1024 * 1024
# Messages larger than this are searched as raw bytes instead of decoded MIME text.
MAX_DECODED_SEARCH_OCTETS = 8 * 1024 * 1024
# RFC 5267 4.2 searches kept up to date per session: each is re-run after every change to the
# folder, so a client cannot make every change cost it unbounded searches (more get NOUPDATE).
MAX_SEARCH_CONTEXTS = 16


@dataclass(frozen=True)
class ImapLimits:
    max_line_octets: int = MAX_LINE_OCTETS
    max_literal_octets: int = MAX_LITERAL_OCTETS
    max_append_octets: int = MAX_APPEND_OCTETS
    append_in_memory_octets: int = APPEND_IN_MEMORY_OCTETS
    max_command_octets: int = MAX_COMMAND_OCTETS
    max_preauth_command_octets: int = MAX_PREAUTH_COMMAND_OCTETS
    max_literals_per_command: int = MAX_LITERALS_PER_COMMAND
    max_bad_commands: int = MAX_BAD_COMMANDS
    authenticated_timeout: float = AUTHENTICATED_TIMEOUT
    preauth_timeout: float = PREAUTH_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT
    min_literal_rate: int = MIN_LITERAL_RATE
    idle_timeout: float = IDLE_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    max_connections_per_network: int = MAX_CONNECTIONS_PER_NETWORK
    max_preauth_connections: int = MAX_PREAUTH_CONNECTIONS
    max_connections: int = MAX_CONNECTIONS
    stress_fraction: float = STRESS_FRACTION
    stressed_preauth_timeout: float = STRESSED_PREAUTH_TIMEOUT


DEFAULT_LIMITS = ImapLimits()
