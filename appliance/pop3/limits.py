"""Every bound the POP3 listeners enforce, as named constants and one value object tests can shrink."""

from __future__ import annotations

from dataclasses import dataclass

# One command line, CRLF included. RFC 2449 4 allows clients 255 octets; RFC 5034 4 lifts that limit for
# SASL responses, so lines are allowed longer (a PLAIN response with a long password), but bounded.
MAX_LINE_OCTETS = 8 * 1024
# Invalid, unknown or misplaced commands in one connection before the server hangs up.
MAX_BAD_COMMANDS = 20
# Failed logins in one connection before the server hangs up (the shared throttle slows them too).
MAX_AUTH_FAILURES = 3
# RFC 1939 3: an inactivity autologout timer must be of at least 10 minutes.
IDLE_TIMEOUT = 10 * 60.0
# The whole pre-auth phase, from connect to a successful login, must fit in this many seconds.
PREAUTH_TIMEOUT = 120.0
# One command line, from its first byte to its CRLF, must arrive within this many seconds (a deadline,
# not a timer each byte restarts: issue 11 item 7).
COMMAND_TIMEOUT = 60.0
# Seconds for a TLS handshake (implicit TLS on 995 or after STLS).
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
# Message file bytes read per step when streaming RETR/TOP: big enough for throughput, small enough that
# a 50 MB message never sits in memory whole.
STREAM_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Pop3Limits:
    max_line_octets: int = MAX_LINE_OCTETS
    max_bad_commands: int = MAX_BAD_COMMANDS
    max_auth_failures: int = MAX_AUTH_FAILURES
    idle_timeout: float = IDLE_TIMEOUT
    preauth_timeout: float = PREAUTH_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    max_connections_per_network: int = MAX_CONNECTIONS_PER_NETWORK
    max_preauth_connections: int = MAX_PREAUTH_CONNECTIONS
    max_connections: int = MAX_CONNECTIONS
    stress_fraction: float = STRESS_FRACTION
    stressed_preauth_timeout: float = STRESSED_PREAUTH_TIMEOUT
    stream_chunk: int = STREAM_CHUNK


DEFAULT_LIMITS = Pop3Limits()
