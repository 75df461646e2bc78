"""Every object the cyclic collector tracks, the frozen ones included (appliance/collector.py keeps a
big folder's objects in the permanent generation, which gc.get_objects() leaves out)."""

from __future__ import annotations

import gc


def live_objects() -> list[object]:
    """After a full collection over every object; the survivors are frozen again, as the box leaves them."""
    gc.unfreeze()
    try:
        gc.collect()
        return gc.get_objects()
    finally:
        gc.freeze()
