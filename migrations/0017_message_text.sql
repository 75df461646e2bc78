-- Letterbox schema, version 17: a full-text index of message text for SEARCH BODY and TEXT (issue 19).
--
-- One row per indexed message: rowid = folder_id << 32 | uid (UIDs are 32-bit, RFC 3501 2.3.1.1), so a
-- folder is one rowid range. `header` holds the decoded header lines and `body` the decoded text parts,
-- both casefolded, exactly the strings a scan of the file searches (appliance/imap/search.py), so
-- the index gives the same answers. The trigram tokenizer matches substrings of 3 characters or more
-- (RFC 3501 6.4.4 SEARCH is substring matching); `case_sensitive 1` because the text is already
-- casefolded (the tokenizer's own folding would differ from Python's casefold on some letters).
-- Filled in the background after delivery (appliance/imap/fts.py); a message without a row is
-- scanned. The trigger below takes a row out with its message (expunge, move, folder or mailbox
-- deletion: those delete the messages row, directly or by cascade).

CREATE VIRTUAL TABLE message_text USING fts5(header, body, tokenize = 'trigram case_sensitive 1');

-- How far each folder is indexed: every message with a UID up to indexed_uid has been looked at
-- (indexed, or left to the scan when it cannot be). A new UIDVALIDITY starts the folder again.
CREATE TABLE message_text_folders (
    folder_id   INTEGER PRIMARY KEY REFERENCES folders(id) ON DELETE CASCADE,
    uidvalidity INTEGER NOT NULL,
    indexed_uid INTEGER NOT NULL
);

CREATE TRIGGER message_text_gone AFTER DELETE ON messages BEGIN
    DELETE FROM message_text WHERE rowid = (old.folder_id << 32) | old.uid;
END;
