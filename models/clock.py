"""The one clock flows and records read "now" from: the wall clock, or a virtual one.

A virtual clock lets a whole trial run in seconds under test or rehearsal. It is injected,
never patched into the standard library.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Clock = Callable[[], dt.datetime]


def wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class VirtualClock:
    """A clock that stands still until set or advanced."""

    def __init__(self, start: dt.datetime):
        self._now = self._utc(start)

    @staticmethod
    def _utc(at: dt.datetime) -> dt.datetime:
        """A plain stdlib UTC datetime, whatever aware datetime type comes in (Prefect's, pendulum's)."""
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("VirtualClock needs an aware instant")
        return dt.datetime.fromtimestamp(at.timestamp(), tz=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self._now

    def set(self, at: dt.datetime) -> None:
        self._now = self._utc(at)

    def advance(self, **delta: float) -> None:
        self._now += dt.timedelta(**delta)


_current: list[Clock] = [wall_clock]


def now() -> dt.datetime:
    """Now, from the clock in use (aware, UTC)."""
    return _current[-1]()


def current_clock() -> Clock:
    return _current[-1]


@contextmanager
def use_clock(clock: Clock) -> Iterator[Clock]:
    _current.append(clock)
    try:
        yield clock
    finally:
        _current.pop()
