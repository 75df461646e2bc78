"""Outbound mail: the spool (written by SMTP) and its delivery to other domains."""
