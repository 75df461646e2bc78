-- Problems of the status checklist that were mailed to the postmaster (appliance/alerts.py): one row per
-- open problem, removed when it is fixed (and the "fixed" mail sent).
CREATE TABLE status_alerts (
    key TEXT PRIMARY KEY,
    since INTEGER NOT NULL,
    last_mailed INTEGER NOT NULL
);
