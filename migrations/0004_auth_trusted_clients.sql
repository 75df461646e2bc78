-- Letterbox schema, version 4: the client addresses each account recently logged in from.

-- appliance/auth.py gives each account a budget of password checks per minute from all addresses
-- together (against distributed guessing); an address that logged in to the account over IMAP, POP3
-- or SMTP within the last 30 days keeps a budget of its own, so an attack does not lock the owner
-- out. Kept here so that a restart does not forget them. `account` is the throttle's key
-- ('mailbox:alice@example.org', 'admin:root'); `client` an IPv4 address or an IPv6 /64.
CREATE TABLE auth_trusted_clients (
    account TEXT NOT NULL,
    client TEXT NOT NULL,
    last_success REAL NOT NULL,  -- unix time
    PRIMARY KEY (account, client)
) WITHOUT ROWID;
