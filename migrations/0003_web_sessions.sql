-- Letterbox schema, version 3: web console sessions kept server-side, so they can be ended.

-- The signed cookie carries a random token; this table holds its SHA-256 (a copy of the db gives no
-- usable cookie). Logging out deletes the row, so a copied cookie stops working at once; changing a
-- password, disabling or deleting a mailbox, or removing an admin deletes every row of that account
-- (appliance/accounts.py, in the same transaction as the change).
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('admin', 'mailbox')),
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX web_sessions_account ON web_sessions (kind, name);
