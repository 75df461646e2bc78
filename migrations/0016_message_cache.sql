-- Letterbox schema, version 16: a per-message cache of what IMAP clients fetch for message lists
-- (issue 19), after Dovecot's dovecot.index.cache: ENVELOPE, BODYSTRUCTURE and BODY as rendered, and
-- the header fields clients ask for (HEADER.FIELDS, header SEARCH and SORT keys), so a FETCH of
-- those needs no message file read. Written with the message row at delivery and APPEND, and on
-- first need for a file another program put there (appliance/store/message_cache.py).
--
-- A row is valid for the file it was computed from: `file_size`, `file_mtime_ns` and `file_inode`
-- are compared with the file's before use (a file changed behind the box's back is described
-- again), and `version` with the code's (a rendering fix recomputes old rows). The row goes with
-- its message (expunge, folder removal) through the foreign key.

CREATE TABLE message_cache (
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
    PRIMARY KEY (folder_id, uid),
    FOREIGN KEY (folder_id, uid) REFERENCES messages(folder_id, uid) ON DELETE CASCADE
) WITHOUT ROWID;
