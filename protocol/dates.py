"""Local wall-clock times and calendar arithmetic in the site timezone.

Instants leave this module as stdlib `datetime` in UTC; pendulum never leaks out.
"""

from __future__ import annotations

import calendar as _cal
import datetime as dt
import functools

import pendulum
from pendulum.tz.exceptions import AmbiguousTime, NonExistingTime

from protocol.errors import CalendarError

AMBIGUOUS = "ambiguous_local_time"


def add_months(day: dt.date, months: int) -> dt.date:
    """Calendar-month addition, clamped to the month's last day (Jan 31 + 1 month = Feb 28/29).

    Call it once from the anchor; never chain it (Jan 31 +1 +1 would land on Mar 28).
    """
    idx = day.month - 1 + months
    year, month = day.year + idx // 12, idx % 12 + 1
    return dt.date(year, month, min(day.day, _cal.monthrange(year, month)[1]))


@functools.cache
def _zone(tz: str) -> pendulum.Timezone:
    """The zone of a name, built once per name: pendulum builds a new one each time it is given a name (~15 µs), and a
    rehearsal asked ~200,000 times. An unknown name raises here, every time, as pendulum does."""
    return pendulum.timezone(tz)


def _to_utc(p: pendulum.DateTime) -> dt.datetime:
    return dt.datetime.fromtimestamp(p.timestamp(), tz=dt.timezone.utc)


def local_instant(tz: str, on: dt.date, at: dt.time, *, what: str, refuse_ambiguous: bool = False) -> tuple[dt.datetime, tuple[str, ...]]:
    """The UTC instant of a local wall-clock time, never silently shifted.

    A time in a daylight-saving gap is refused. A repeated (ambiguous) time is refused when
    `refuse_ambiguous`, otherwise flagged and taken at its first occurrence.
    """
    args = (on.year, on.month, on.day, at.hour, at.minute, at.second)
    when = f"{on.isoformat()} {at.strftime('%H:%M')}"
    try:
        return _to_utc(pendulum.datetime(*args, tz=_zone(tz), raise_on_unknown_times=True)), ()
    except NonExistingTime:
        raise CalendarError(f"{what}: {when} does not exist in {tz} (daylight-saving gap); choose another time") from None
    except AmbiguousTime:
        if refuse_ambiguous:
            raise CalendarError(f"{what}: {when} happens twice in {tz} (daylight-saving change); choose another time") from None
        return _to_utc(pendulum.datetime(*args, tz=_zone(tz), fold=0)), (AMBIGUOUS,)


def start_of_local_day(tz: str, on: dt.date) -> dt.datetime:
    """The first instant of a local calendar day, in UTC (a midnight DST gap moves to the day's real start)."""
    return _to_utc(pendulum.datetime(on.year, on.month, on.day, tz=_zone(tz), fold=0))


def to_local(tz: str, at_utc: dt.datetime) -> dt.datetime:
    """An aware UTC instant as naive local wall-clock time in `tz`."""
    p = pendulum.instance(at_utc).in_timezone(_zone(tz))
    return dt.datetime(p.year, p.month, p.day, p.hour, p.minute, p.second)
