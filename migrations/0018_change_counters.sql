-- Change counters (issue 19): one number per kind of data that hot paths cache, raised by a trigger
-- in the same transaction as every change, by any connection (the serving box, the CLI in another
-- process, a restore's migration). A cache in the box keeps what it read with the counter it read
-- before (appliance/db.py ChangeCounters) and drops it when the number moved, so a domain, user,
-- alias or setting changed anywhere takes effect at the next message without a database round
-- trip per look-up (PRAGMA data_version moves with every delivery, so it cannot tell these apart).

CREATE TABLE change_counters (
    name TEXT PRIMARY KEY,
    n INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

INSERT INTO change_counters (name) VALUES ('accounts'), ('settings');

CREATE TRIGGER domains_insert_counted AFTER INSERT ON domains BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER domains_update_counted AFTER UPDATE ON domains BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER domains_delete_counted AFTER DELETE ON domains BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER mailboxes_insert_counted AFTER INSERT ON mailboxes BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER mailboxes_update_counted AFTER UPDATE ON mailboxes BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER mailboxes_delete_counted AFTER DELETE ON mailboxes BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER aliases_insert_counted AFTER INSERT ON aliases BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER aliases_update_counted AFTER UPDATE ON aliases BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER aliases_delete_counted AFTER DELETE ON aliases BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER alias_targets_insert_counted AFTER INSERT ON alias_targets BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER alias_targets_update_counted AFTER UPDATE ON alias_targets BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER alias_targets_delete_counted AFTER DELETE ON alias_targets BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'accounts';
END;

CREATE TRIGGER settings_insert_counted AFTER INSERT ON settings BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'settings';
END;

CREATE TRIGGER settings_update_counted AFTER UPDATE ON settings BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'settings';
END;

CREATE TRIGGER settings_delete_counted AFTER DELETE ON settings BEGIN
    UPDATE change_counters SET n = n + 1 WHERE name = 'settings';
END;
