"""Errors of the accounts layer, in their own module so the pure parsers (address, passwords) can raise
them without importing the database code. appliance.accounts re-exports every name."""

from __future__ import annotations


class AccountError(Exception):
    """Bad input or state, with a message fit for one line (CLI) or next to a form field (web)."""


class InvalidAddress(AccountError): ...


class NotFound(AccountError): ...


class AlreadyExists(AccountError): ...


class WeakPassword(AccountError): ...


class InUse(AccountError):
    """Refused because other records still depend on this one (a domain with mailboxes)."""
