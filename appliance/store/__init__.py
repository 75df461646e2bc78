"""Maildir storage with a SQLite UID index."""
