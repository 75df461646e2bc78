"""A backup's progress that runs a piece of the test once, in the middle of the backup."""

from __future__ import annotations

from collections.abc import Callable

from appliance import backup


class AtFirstFile(backup.Progress):
    """Runs `act` once, in the backup's own thread, when the first file has gone in: after the
    database's snapshot and with the backup's file open, before the walk of the Maildirs."""

    def __init__(self, act: Callable[[], object]) -> None:
        self.act: Callable[[], object] | None = act
        super().__init__()

    @property  # the dataclass field made a property: the writer's `progress.done += n` is the hook
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, value: int) -> None:
        self._done = value
        if value and self.act is not None:
            act, self.act = self.act, None
            act()



class EachFileOfSize(backup.Progress):
    """Runs `act` in the backup's own thread just after each file of exactly `size` octets has gone in
    (the writer counts each file's octets in one step): a point inside the Maildir walk."""

    def __init__(self, size: int, act: Callable[[], object]) -> None:
        self.size = size
        self.act = act
        super().__init__()

    @property
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, value: int) -> None:
        step, self._done = value - getattr(self, "_done", 0), value
        if step == self.size:
            self.act()


class AtFileOfSize(EachFileOfSize):
    """EachFileOfSize's `act` run once, at the first such file."""

    def __init__(self, size: int, act: Callable[[], object]) -> None:
        ran: list[bool] = []

        def once() -> None:
            if not ran:
                ran.append(True)
                act()

        super().__init__(size, once)
