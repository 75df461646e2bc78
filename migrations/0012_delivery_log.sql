-- The delivery log (appliance/delivery_log.py): one row per recipient of every message in and out.
CREATE TABLE delivery_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    result TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    size INTEGER,
    detail TEXT NOT NULL DEFAULT '',
    check_name TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    queue_id TEXT,
    message_id TEXT,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX delivery_log_at ON delivery_log (at);
CREATE INDEX delivery_log_owner ON delivery_log (owner, id);
