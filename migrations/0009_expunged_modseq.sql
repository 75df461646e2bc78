-- Letterbox schema, version 9: the expunges of each folder with their mod-sequence (RFC 7162).
--
-- A QRESYNC client reselecting a folder gives the mod-sequence it last saw; the server answers
-- `* VANISHED (EARLIER) uids` with the messages expunged since (RFC 7162 3.2.5.2). The message row
-- is gone once expunged, so the UID and the mod-sequence of its expunge are kept here.
-- `expunges_known_since`: expunges with a mod-sequence above it are all recorded; a folder that
-- existed before this table has its highest mod-sequence of the time there, and a client that
-- last synced before that is told every UID it knows that no longer exists (RFC 7162 3.2.5.2
-- allows UIDs expunged earlier to be reported).

CREATE TABLE expunged (
    folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid       INTEGER NOT NULL,
    modseq    INTEGER NOT NULL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
CREATE INDEX expunged_by_modseq ON expunged(folder_id, modseq);

ALTER TABLE folders ADD COLUMN expunges_known_since INTEGER NOT NULL DEFAULT 0;
UPDATE folders SET expunges_known_since = highestmodseq;
