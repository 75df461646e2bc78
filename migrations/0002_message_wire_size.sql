-- Letterbox schema, version 2: the size of each message as sent over the wire.

-- IMAP RFC822.SIZE and POP3 LIST count every line end as CRLF; a file another program wrote may
-- use bare LF, so this differs from `size` (on disk). NULL until measured: rows indexed by an
-- earlier version get it at their folder's next listing (appliance/store/index.py).
ALTER TABLE messages ADD COLUMN wire_size INTEGER;
