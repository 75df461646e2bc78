"""Spam and abuse defence (issue 16): every layer that decides whether mail is spam, and its log.

Connection and envelope time, on the MX (port 25), before any message data is read:
- `dnsbl.py`      DNS blocklists for the client's IP address and the sender's domain;
- `greeting.py`   early talkers and the greeting delay for clients without forward-confirmed rDNS;
- `greylist.py`   greylisting of (client network, sender, recipient) triplets.
Outbound (submission): `outbound.py`, per-user hourly limits and the suspension after a burst of refused
recipients.
Content, at DATA: the rspamd client and Junk delivery (the content side of issue 16).

Every layer reports what it decided to `decisions.DecisionLog` (`Services.spam_decisions`): one line per
decision for the console's Spam page, written in batches. The knobs of all layers are one typed value,
`appliance.settings.SpamSettings` (`(await services.settings.fresh()).spam`), read live.
"""
