-- letterbox: foreign-keys-off
-- Letterbox schema, version 7: row ids of domains, mailboxes, aliases and folders are never reused.
--
-- With `id INTEGER PRIMARY KEY` SQLite gives a new row max(id)+1, so deleting the newest mailbox and
-- creating another handed the new one the old id, and everything keyed by that id (the store's cache,
-- the folders of the index) belonged to the dead mailbox (issue 10 item 1). AUTOINCREMENT keeps the
-- highest id ever used in sqlite_sequence and never goes below it. SQLite cannot add AUTOINCREMENT
-- in place, so each table is rebuilt (https://www.sqlite.org/lang_altertable.html, "Making Other
-- Kinds Of Table Schema Changes"): the runner turns foreign keys off around this migration (the
-- first line above asks for it) so dropping a table does not cascade, and runs
-- `PRAGMA foreign_key_check` before it commits. Rows keep their ids; the references stay valid.

CREATE TABLE domains_v7 (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,          -- lower-case A-label form
    created_at INTEGER NOT NULL
);
INSERT INTO domains_v7 (id, name, created_at) SELECT id, name, created_at FROM domains;
DROP TABLE domains;
ALTER TABLE domains_v7 RENAME TO domains;

CREATE TABLE mailboxes_v7 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    domain_id     INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    local_part    TEXT NOT NULL,               -- lower-case
    display_name  TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,               -- argon2id
    quota_bytes   INTEGER NOT NULL DEFAULT 0,  -- 0 = unlimited
    enabled       INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    UNIQUE (domain_id, local_part)
);
INSERT INTO mailboxes_v7 (id, domain_id, local_part, display_name, password_hash, quota_bytes, enabled, created_at)
    SELECT id, domain_id, local_part, display_name, password_hash, quota_bytes, enabled, created_at FROM mailboxes;
DROP TABLE mailboxes;
ALTER TABLE mailboxes_v7 RENAME TO mailboxes;

CREATE TABLE aliases_v7 (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    local_part TEXT NOT NULL,                  -- '' means catch-all @domain
    created_at INTEGER NOT NULL,
    UNIQUE (domain_id, local_part)
);
INSERT INTO aliases_v7 (id, domain_id, local_part, created_at) SELECT id, domain_id, local_part, created_at FROM aliases;
DROP TABLE aliases;
ALTER TABLE aliases_v7 RENAME TO aliases;

CREATE TABLE folders_v7 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,               -- 'INBOX', 'Sent', 'Archive/2024' (IMAP name, '/' separator)
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,  -- room for CONDSTORE
    subscribed    INTEGER NOT NULL DEFAULT 1,
    UNIQUE (mailbox_id, name)
);
INSERT INTO folders_v7 (id, mailbox_id, name, uidvalidity, uidnext, highestmodseq, subscribed)
    SELECT id, mailbox_id, name, uidvalidity, uidnext, highestmodseq, subscribed FROM folders;
DROP TABLE folders;
ALTER TABLE folders_v7 RENAME TO folders;

-- The outbound queue records each attempt `WHERE id = <recipient row id>` from a job it holds in
-- memory; a recipient deleted meanwhile (`letterbox queue delete`) must not hand its id to the next
-- message's recipient, or that attempt's outcome would land on the wrong row.
CREATE TABLE queue_recipients_v7 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
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
    dsn_sent      INTEGER NOT NULL DEFAULT 0,   -- the failure report for this recipient is out
    report_id     TEXT,                         -- 0005: Message-ID of a report being handed to a local mailbox
    report_started INTEGER NOT NULL DEFAULT 0   -- 0005
);
INSERT INTO queue_recipients_v7 (id, message_id, recipient, domain, state, attempts, next_attempt, last_error,
                                 delay_notified, updated_at, status, remote, tls, last_attempt, dsn_sent, report_id,
                                 report_started)
    SELECT id, message_id, recipient, domain, state, attempts, next_attempt, last_error,
           delay_notified, updated_at, status, remote, tls, last_attempt, dsn_sent, report_id,
           report_started FROM queue_recipients;
DROP TABLE queue_recipients;
ALTER TABLE queue_recipients_v7 RENAME TO queue_recipients;
CREATE INDEX queue_recipients_due ON queue_recipients(state, next_attempt);
