-- Letterbox schema, version 19: SEARCH SUBJECT from the message cache without a Python object per
-- message (issue 19: 0.04x of Dovecot at 10k messages). `search_subject` holds what RFC 3501 6.4.4
-- SUBJECT compares a needle with: each Subject field's value unfolded, RFC 2047 encoded words
-- decoded, casefolded, the values joined by a NUL (a needle without a NUL cannot match across two).
-- NULL where the row's fields are not exact (the file is read, as before) and in rows written
-- before this version (such a message is searched through its cached fields, as before).

ALTER TABLE message_cache ADD COLUMN search_subject TEXT;
