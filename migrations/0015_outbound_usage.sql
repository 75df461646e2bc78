-- Outbound limits (appliance/spam/outbound.py) kept across restarts: otherwise a stolen password plus
-- a few restarts of the box would lift the hourly limits. One row per accepted submitted message
-- (messages = 1, recipients = its count) and per report of recipients refused for good by other
-- servers (refused = their count); the limits sum the rows of the last hour, older rows are deleted.
CREATE TABLE outbound_usage (
    id          INTEGER PRIMARY KEY,
    mailbox     TEXT NOT NULL,
    at          REAL NOT NULL,  -- unix seconds (wall clock: it must mean the same after a restart)
    messages    INTEGER NOT NULL DEFAULT 0,
    recipients  INTEGER NOT NULL DEFAULT 0,
    refused     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbound_usage_mailbox_at ON outbound_usage(mailbox, at);
