-- Letterbox schema, version 1. Plain SQL; applied once, in a transaction, by appliance/db.py.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE domains (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,          -- lower-case A-label form
    created_at INTEGER NOT NULL
);

CREATE TABLE mailboxes (
    id            INTEGER PRIMARY KEY,
    domain_id     INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    local_part    TEXT NOT NULL,               -- lower-case
    display_name  TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,               -- argon2id
    quota_bytes   INTEGER NOT NULL DEFAULT 0,  -- 0 = unlimited
    enabled       INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    UNIQUE (domain_id, local_part)
);

CREATE TABLE aliases (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    local_part TEXT NOT NULL,                  -- '' means catch-all @domain
    created_at INTEGER NOT NULL,
    UNIQUE (domain_id, local_part)
);

CREATE TABLE alias_targets (
    alias_id INTEGER NOT NULL REFERENCES aliases(id) ON DELETE CASCADE,
    target   TEXT NOT NULL,                    -- a full address, local or external
    PRIMARY KEY (alias_id, target)
);

CREATE TABLE admins (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

-- Mail index: one row per Maildir folder, one per message file.
CREATE TABLE folders (
    id            INTEGER PRIMARY KEY,
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,               -- 'INBOX', 'Sent', 'Archive/2024' (IMAP name, '/' separator)
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,  -- room for CONDSTORE
    subscribed    INTEGER NOT NULL DEFAULT 1,
    UNIQUE (mailbox_id, name)
);

CREATE TABLE messages (
    folder_id     INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL,
    basename      TEXT NOT NULL,               -- Maildir unique name, without the ':2,' info
    flags         TEXT NOT NULL DEFAULT '',    -- Maildir flag letters, sorted (D F P R S T)
    keywords      TEXT NOT NULL DEFAULT '',    -- space separated IMAP keywords
    size          INTEGER NOT NULL,
    internaldate  INTEGER NOT NULL,            -- unix seconds
    modseq        INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (folder_id, uid),
    UNIQUE (folder_id, basename)
) WITHOUT ROWID;

-- Outbound queue: one row per message in spool/, one per recipient.
CREATE TABLE queue_messages (
    id           TEXT PRIMARY KEY,             -- also the spool file name
    sender       TEXT NOT NULL,                -- '' for the null sender
    size         INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    auth_user    TEXT                          -- submitting user, for DKIM signing
);

CREATE TABLE queue_recipients (
    id            INTEGER PRIMARY KEY,
    message_id    TEXT NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    recipient     TEXT NOT NULL,
    domain        TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'queued',   -- queued | delivered | failed
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  INTEGER NOT NULL,
    last_error    TEXT NOT NULL DEFAULT '',     -- the remote reply or local problem of the last attempt
    delay_notified INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL,
    status        TEXT NOT NULL DEFAULT '',     -- RFC 3463 code of the last attempt, e.g. '4.4.1'
    remote        TEXT NOT NULL DEFAULT '',     -- 'mx.example.net[192.0.2.1]' that gave the reply
    tls           TEXT NOT NULL DEFAULT '',     -- 'TLSv1.3 TLS_AES_256_GCM_SHA384'; '' = plain text
    last_attempt  INTEGER NOT NULL DEFAULT 0,
    dsn_sent      INTEGER NOT NULL DEFAULT 0    -- the failure report for this recipient is out
);
CREATE INDEX queue_recipients_due ON queue_recipients(state, next_attempt);

-- Recent events for the console (never secrets).
CREATE TABLE events (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    text    TEXT NOT NULL
);
