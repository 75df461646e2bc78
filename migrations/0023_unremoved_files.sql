-- Letterbox schema, version 23: the files of expunged messages that could not be removed yet.
--
-- An expunge is in memory, and may be told to other sessions, before its file is unlinked (STORE and
-- EXPUNGE are pipelined on the database's thread). A file another program kept renaming, or whose
-- unlink failed (EPERM, EIO), is still on disk after its row was deleted: its unique name is kept
-- here, so that no listing, after a restart too, takes it for a new message; the listing that finds
-- it removes it, and the row goes once its file is gone.

CREATE TABLE unremoved_files (
    folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    basename  TEXT NOT NULL,
    PRIMARY KEY (folder_id, basename)
) WITHOUT ROWID;
