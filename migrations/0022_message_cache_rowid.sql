-- letterbox: foreign-keys-off
-- Letterbox schema, version 22: the message cache as a table with rowids (issue 19).
--
-- A WITHOUT ROWID table keeps its rows in an index b-tree, whose pages hold at most 1,002 octets of
-- a row (4 KiB pages): a message cache row is about 1.1 KB (ENVELOPE, BODYSTRUCTURE, BODY, the
-- header fields), so nine rows in ten put their last 600 octets in an overflow page of their own.
-- A row cost a 4 KiB page and more: 4.3 KB of database a message, each write a page more to the WAL
-- and its checkpoint, each read a page more. A table b-tree's leaf holds up to 4,061 octets of a
-- row, so the same rows take 1.5 KB a message (with the primary key's index). Same columns,
-- same key, same foreign key; the rows are copied in key order.

CREATE TABLE message_cache_rows (
    folder_id      INTEGER NOT NULL,
    uid            INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    file_size      INTEGER NOT NULL,
    file_mtime_ns  INTEGER NOT NULL,
    file_inode     INTEGER NOT NULL,
    envelope       BLOB NOT NULL,
    bodystructure  BLOB NOT NULL,
    body           BLOB NOT NULL,
    fields         BLOB NOT NULL,
    fields_exact   INTEGER NOT NULL,  -- 1: parsing `fields` gives the header's values of those fields
    search_subject TEXT,              -- migration 0019
    PRIMARY KEY (folder_id, uid),
    FOREIGN KEY (folder_id, uid) REFERENCES messages(folder_id, uid) ON DELETE CASCADE
);

INSERT INTO message_cache_rows (folder_id, uid, version, file_size, file_mtime_ns, file_inode, envelope,
                                bodystructure, body, fields, fields_exact, search_subject)
    SELECT folder_id, uid, version, file_size, file_mtime_ns, file_inode, envelope, bodystructure, body,
           fields, fields_exact, search_subject
    FROM message_cache ORDER BY folder_id, uid;

DROP TABLE message_cache;

ALTER TABLE message_cache_rows RENAME TO message_cache;

-- Migration 0021's covering index for SEARCH SUBJECT, again (it went with the old table).
CREATE INDEX message_cache_subject ON message_cache
    (folder_id, version, uid, file_size, file_mtime_ns, file_inode, search_subject)
    WHERE search_subject IS NOT NULL;
