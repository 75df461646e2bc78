"""The full-text indexer writes in small transactions, so the box's own writes never wait long for it."""

from __future__ import annotations

from appliance.imap import fts


def row(n: int, body: str = "x") -> tuple[int, str, str, int, int]:
    return n, "h", body, 1, n


def test_rows_are_written_in_small_batches_and_the_last_carries_the_mark() -> None:
    batches = list(fts._write_batches([row(n) for n in range(70)]))
    assert [len(b) for b in batches] == [32, 32, 6]
    assert [r[0] for b in batches for r in b] == list(range(70))


def test_big_texts_close_a_batch_early_and_an_empty_list_still_moves_the_mark() -> None:
    big = "y" * (fts.WRITE_BATCH_OCTETS // 2)
    assert [len(b) for b in fts._write_batches([row(n, big) for n in range(5)])] == [2, 2, 1]
    assert list(fts._write_batches([])) == [[]]
    assert [len(b) for b in fts._write_batches([row(n) for n in range(32)])] == [32, 0]
