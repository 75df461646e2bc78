-- Letterbox schema, version 5: what the outbound queue needs to report failures once and only to
-- senders it can trust (issue 11 items 3 and 12).

-- The inbound authentication verdict of mail the MX accepted and an alias forwards: 1 = the envelope
-- sender passed SPF (or DMARC aligned with it), 0 = it did not, so a failure of the forward is never
-- reported (that report would be backscatter to a forged address). NULL: not checked here
-- (submission by our own users, our own reports), reported as usual.
ALTER TABLE queue_messages ADD COLUMN sender_verified INTEGER;

-- A failure report being handed to a local mailbox: its Message-ID, set (committed) before the copy
-- is written, so a restart after a crash finds the copy already there instead of writing a second.
ALTER TABLE queue_recipients ADD COLUMN report_id TEXT;
ALTER TABLE queue_recipients ADD COLUMN report_started INTEGER NOT NULL DEFAULT 0;
