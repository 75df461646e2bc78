"""Letterbox: a complete mail server in one box."""

from __future__ import annotations

__version__ = "0.1.0"
