-- Disk use once a day (appliance/status_checks.py), for the status page's chart and the growth per week.
CREATE TABLE disk_samples (
    day TEXT PRIMARY KEY,  -- YYYY-MM-DD, UTC
    used INTEGER NOT NULL,
    total INTEGER NOT NULL
);
