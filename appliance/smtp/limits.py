"""Every bound the SMTP listeners enforce, as named constants and one value object tests can shrink."""

from __future__ import annotations

from dataclasses import dataclass

# RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per message; more get 452 4.5.3.
MAX_RECIPIENTS = 100
# RFC 5321 4.5.3.1.6 sets a text line at 1000 octets with CRLF, but real senders (newsletter tools,
# HTML mail without a transfer encoding) send longer ones, and Postfix's smtpd and Dovecot's LMTP take
# them: refusing bounced that mail. A message line may be this long (with CRLF and any transparency
# dot); it is joined from reads of READ_LIMIT_OCTETS, so it costs no more than the message size allows.
MAX_TEXT_LINE_OCTETS = 1024 * 1024
# The stream reader's limit: the most it holds of a line per read. asyncio stops reading a session once
# twice this is buffered, so it bounds every session's buffer (commands are checked against their own
# limits below once read).
READ_LIMIT_OCTETS = 64 * 1024
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with CRLF.
MAX_COMMAND_OCTETS = 512
# RFC 4954 4: an AUTH line with an initial response may be longer than 512; RFC 5321's 1000-octet text
# line (+1 as before) bounds it.
MAX_AUTH_COMMAND_OCTETS = 1001
# RFC 4954 4: a response line to a 334 challenge may be longer than a command; 12288 octets is the size
# it names for such lines (with CRLF). Longer: 500 5.5.6 (RFC 4954 6), and the session goes on.
MAX_AUTH_RESPONSE_OCTETS = 12288
# Message size, advertised with SIZE (RFC 1870) and enforced with 552 5.3.4. Large enough for a 25 MB
# attachment after base64.
MAX_MESSAGE_OCTETS = 36 * 1024 * 1024
# RFC 5321 4.5.3.2.7: wait at least 5 minutes for the next command.
COMMAND_TIMEOUT = 300.0
# RFC 5321 4.5.3.2.5/6: 3 minutes for each chunk of DATA; the whole transfer is bounded as well so a
# client dribbling one byte at a time cannot hold a connection for ever.
DATA_CHUNK_TIMEOUT = 180.0
MAX_DATA_SECONDS = 1800.0
# Errors (5xx replies) a client may provoke before it is told 421 and disconnected (Postfix's
# smtpd_hard_error_limit is 20 as well). Reset by every accepted message.
MAX_ERRORS = 20
# Commands that carry no mail (NOOP, RSET, VRFY, EXPN, HELP, HELO/EHLO) a session may send before each
# further one counts as an error, as Postfix's smtpd_junk_command_limit; 1 while the listener is crowded
# (Postfix's stress). Every accepted message starts the count over.
MAX_JUNK_COMMANDS = 100
# Concurrent connections per client address, per network (/24, /64), before the first transaction or
# login, and in total per listener. The pre-auth pool is smaller than the total: sessions that send
# mail or logged in always have room.
MAX_CONNECTIONS_PER_CLIENT = 20
MAX_CONNECTIONS_PER_NETWORK = 100
MAX_PREAUTH_CONNECTIONS = 400
MAX_CONNECTIONS = 500
# From connect to the first accepted MAIL FROM (MX) or a successful AUTH (submission): a deadline, so
# a client cannot sit on a slot by sending a harmless command every 299 s.
PREAUTH_TIMEOUT = 300.0
# Stress, as Postfix's stress-adaptive behaviour (smtpd_timeout 10 s under stress): when the pre-auth
# pool is this full, a connection still in its pre-auth phase gets STRESSED_PREAUTH_TIMEOUT from its
# connect.
STRESS_FRACTION = 0.5
STRESSED_PREAUTH_TIMEOUT = 10.0
# Seconds for an implicit-TLS (465) handshake.
TLS_HANDSHAKE_TIMEOUT = 30.0
# RFC 5321 6.3: a message with this many Received: headers is looping.
MAX_RECEIVED_HEADERS = 50


@dataclass(frozen=True)
class SmtpLimits:
    max_recipients: int = MAX_RECIPIENTS
    max_message_octets: int = MAX_MESSAGE_OCTETS
    command_timeout: float = COMMAND_TIMEOUT
    data_chunk_timeout: float = DATA_CHUNK_TIMEOUT
    max_data_seconds: float = MAX_DATA_SECONDS
    max_errors: int = MAX_ERRORS
    max_junk_commands: int = MAX_JUNK_COMMANDS
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    max_connections_per_network: int = MAX_CONNECTIONS_PER_NETWORK
    max_preauth_connections: int = MAX_PREAUTH_CONNECTIONS
    max_connections: int = MAX_CONNECTIONS
    preauth_timeout: float = PREAUTH_TIMEOUT
    stress_fraction: float = STRESS_FRACTION
    stressed_preauth_timeout: float = STRESSED_PREAUTH_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    max_received_headers: int = MAX_RECEIVED_HEADERS


DEFAULT_LIMITS = SmtpLimits()
