-- The status checklist's last results (appliance/status_checks.py): one row per check, replaced at each run.
CREATE TABLE status_checks (
    key TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('ok', 'warn', 'fail', 'unknown')),
    summary TEXT NOT NULL,
    fix TEXT NOT NULL DEFAULT '',
    link TEXT NOT NULL DEFAULT '',
    checked_at INTEGER NOT NULL
);
