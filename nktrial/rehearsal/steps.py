"""What the event loop and the actors share: a step that could happen next, and the site's time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from models.clock import VirtualClock
from protocol.dates import local_instant, to_local

# Ties at one instant: rounds, then due runs, then the PI, then staff, then referrals.
ROUNDS, RUN, PI, STAFF, REFERRAL = range(5)


@dataclass
class Step:
    at: dt.datetime
    order: int
    name: str
    do: Callable[[], tuple[str, str]]  # → (kind, result)

    def before(self, other: Step | None) -> bool:
        return other is None or (self.at, self.order) < (other.at, other.order)


@dataclass
class SiteTime:
    """The virtual clock read as the site's wall clock."""

    tz: str
    clock: VirtualClock

    def local(self, on: dt.date, at: dt.time) -> dt.datetime:
        return local_instant(self.tz, on, at, what="scenario time")[0]

    def today(self) -> dt.date:
        return to_local(self.tz, self.clock()).date()

    def next_morning(self, at: dt.time) -> dt.datetime:
        """The next `at` o'clock, site time, at or after now."""
        today = self.today()
        candidate = self.local(today, at)
        return candidate if candidate >= self.clock() else self.local(today + dt.timedelta(days=1), at)

    def stamp(self, at: dt.datetime) -> str:
        return f"{to_local(self.tz, at):%Y-%m-%d %H:%M}"
