"""`letterbox serve`'s log time stamps, formatted once per second, read as logging's own."""

from __future__ import annotations

import logging

from appliance.cli import _StampFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def test_the_stamp_is_loggings_own() -> None:
    ours, standard = _StampFormatter(FORMAT), logging.Formatter(FORMAT)
    for created in (1764495518.961, 1764495518.999, 1764495519.0, 1764495519.5, 1764495518.001):
        record = logging.LogRecord("letterbox.smtp", logging.INFO, __file__, 1, "delivered %s", ("x",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
    record.created = 1764495518.5
    assert ours.formatTime(record, "%H") == standard.formatTime(record, "%H")
