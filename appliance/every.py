"""Every: when `n` more rows (or events) have been counted since the last time it said so: the "every N
rows written, trim the table" of the bounded logs and the greylist."""

from __future__ import annotations


class Every:
    """Due once `n` more have been counted since it was last due; due at the first count after a start
    (a table written before the restart may already be over its bound)."""

    __slots__ = ("_since", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._since = n

    def due(self, count: int = 1) -> bool:
        """Count `count` more (0: only ask); True, and the count starts again, when `n` are reached."""
        self._since += count
        if self._since < self.n:
            return False
        self._since = 0
        return True
