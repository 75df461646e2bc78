"""SMTP (MX, submission), submissions and LMTP: aiosmtpd as the engine, our decisions in its hooks."""
