"""POP3 (RFC 1939) server: sans-IO protocol core, session logic, asyncio glue."""
