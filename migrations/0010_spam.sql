-- Letterbox schema, version 10: spam and abuse defence (issue 16), the state of its layers.

-- Every spam decision any layer made (DNS blocklists, early talkers, greylisting, the content filter,
-- outbound limits), for the console's Spam page. Written in batches by appliance/spam/decisions.py
-- (never a commit of its own per SMTP command) and pruned after some days.
--   layer:   dnsbl | dbl | early-talker | greylist | rspamd | outbound-limit | outbound-suspended ...
--   verdict: accept | junk | defer | reject
--   recipients: the envelope recipients, one per line ('' when refused before RCPT)
--   score: the content filter's score (NULL for the layers that have none)
--   queue_id: the Received: id or the outbound queue's message id, when there is one
CREATE TABLE spam_decisions (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    client_ip   TEXT NOT NULL DEFAULT '',
    helo        TEXT NOT NULL DEFAULT '',
    sender      TEXT NOT NULL DEFAULT '',
    recipients  TEXT NOT NULL DEFAULT '',
    layer       TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    score       REAL,
    queue_id    TEXT
);
CREATE INDEX spam_decisions_at ON spam_decisions(at);

-- Greylisting (appliance/spam/greylist.py): one row per triplet (client network /24 or /64, envelope
-- sender, recipient). `passed_at` is set when a retry came after the delay; a passed triplet is kept
-- until `expires` (35 days after its last use by default), one never retried until its retry window ends.
CREATE TABLE greylist (
    network     TEXT NOT NULL,
    sender      TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    passed_at   INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 1,
    expires     INTEGER NOT NULL,
    PRIMARY KEY (network, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX greylist_expires ON greylist(expires);

-- Sender domains that passed SPF from a client that then got through greylisting: mail from such a
-- domain with an SPF pass is not greylisted again until `expires`.
CREATE TABLE greylist_spf_domains (
    domain      TEXT PRIMARY KEY,
    passed_at   INTEGER NOT NULL,
    expires     INTEGER NOT NULL
) WITHOUT ROWID;

-- What each DNS blocklist answered lately (appliance/spam/dnsbl.py), for the status page: 'ok',
-- 'refused' (the list refuses this resolver: Spamhaus's 127.255.255.x, DBL's 127.0.1.255 / 127.0.0.1
-- error codes), 'failing' (timeouts, SERVFAIL).
CREATE TABLE spam_list_status (
    list        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    checked_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- A mailbox whose sending is suspended (a burst of refused outbound recipients: a stolen password
-- at work); its submissions get 4xx until an administrator lifts it.
CREATE TABLE outbound_suspended (
    mailbox     TEXT PRIMARY KEY,
    since       INTEGER NOT NULL,
    reason      TEXT NOT NULL
) WITHOUT ROWID;
