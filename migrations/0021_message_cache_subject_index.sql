-- Letterbox schema, version 21: SEARCH SUBJECT reads a covering index of the message cache (issue 19).
-- A SEARCH SUBJECT decides each message from its row's stamp and `search_subject` alone
-- (appliance/store/message_cache.py, subject_hits), but the rows also hold ENVELOPE, BODYSTRUCTURE,
-- BODY and the header fields, two or three rows to a page: reading 10k of them was 28 ms of SQLite,
-- the largest share of the search. This index holds only what the search reads, some sixty octets a
-- message with subject text, so the same rows come from a tenth of the pages (8.5 ms). Rows without
-- a subject text (fields not exact) are not in it: the search reads them the other way.

CREATE INDEX message_cache_subject ON message_cache
    (folder_id, version, uid, file_size, file_mtime_ns, file_inode, search_subject)
    WHERE search_subject IS NOT NULL;
