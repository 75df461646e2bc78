-- Letterbox schema, version 6: IMAP subscriptions are names, kept apart from the folders.

-- RFC 3501 6.3.6: the server must not remove a name from the subscription list because the mailbox
-- is gone, so DELETE keeps it (a folder re-created later is subscribed again), and CREATE subscribes
-- nothing. A per-folder flag (folders.subscribed, no longer read) could do neither. A mailbox's list
-- is filled on its first access after this migration (appliance/store/mailstore.py `_setup`): every
-- folder it has then, except the ones unsubscribed before, as all folders used to count as subscribed.
CREATE TABLE subscriptions (
    mailbox_id INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,  -- IMAP name, '/' separator, as in folders.name
    PRIMARY KEY (mailbox_id, name)
) WITHOUT ROWID;

-- The mailboxes whose subscription list has been filled.
CREATE TABLE subscriptions_ready (
    mailbox_id INTEGER PRIMARY KEY REFERENCES mailboxes(id) ON DELETE CASCADE
);
