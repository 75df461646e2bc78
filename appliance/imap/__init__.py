"""IMAP4rev1 (RFC 3501) server: sans-IO protocol core, session logic, asyncio glue."""
