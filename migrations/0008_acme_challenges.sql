-- Letterbox schema, version 8: pending ACME http-01 answers (issue 13).
-- An order started by the CLI (`letterbox cert request`) runs in another process than the box that
-- owns port 80: the answers go through the db, which the port-80 listener also reads.
CREATE TABLE acme_challenges (
    token TEXT PRIMARY KEY,
    key_authorization TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
