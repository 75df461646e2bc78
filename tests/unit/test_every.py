"""Every: the "every N rows, trim" counter of the bounded logs and the greylist."""

from __future__ import annotations

from appliance.every import Every


def test_due_at_the_first_count_then_every_n() -> None:
    every = Every(3)
    assert [every.due() for _ in range(7)] == [True, False, False, True, False, False, True]


def test_counts_of_many_rows_and_a_look_without_rows() -> None:
    every = Every(1000)
    assert every.due(0)  # a flush with nothing to write after a start still looks at the table
    assert not every.due(999)
    assert every.due(1)
    assert not every.due(0)
    assert every.due(5000)
