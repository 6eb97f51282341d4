"""A patient's treatment calendar: a pure function of the protocol, a dose level and the anchors.

Day 0 is the local date and time of NK infusion 1 in the site timezone. Protocol day N is the
local calendar date of day 0 plus N days. Recording an actual infusion re-anchors only what
hangs from it: a late infusion 1 moves everything; a late infusion 2 moves the samples anchored
to infusion 2 and the contraception end date, nothing anchored to day 0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocol.dates import add_months, local_instant, start_of_local_day
from protocol.definition import ProtocolDefinition
from protocol.errors import CalendarError


class EventKind(StrEnum):
    """What a calendar event is. The order breaks ties between events at the same instant."""

    PRODUCT_REQUEST = "product_request"
    PK_SAMPLE = "pk_sample"
    NK_INFUSION = "nk_infusion"
    DLT_WINDOW_OPEN = "dlt_window_open"
    IL2_DOSE = "il2_dose"
    VISIT_1_MONTH = "visit_1_month"
    VISIT_3_MONTH = "visit_3_month"
    DLT_WINDOW_CLOSE = "dlt_window_close"
    CONTRACEPTION_END = "contraception_end"


class Anchor(StrEnum):
    INFUSION_1 = "infusion_1"
    INFUSION_2 = "infusion_2"
    LAST_INFUSION = "last_infusion"


@dataclass(frozen=True)
class EventKey:
    """The stable name of one event in a patient's calendar, as stored: "nk_infusion-2", "il2_dose-07",
    "product_request-1", "pk_sample-infusion_1+7", "visit_1_month". Parse it; never split it by hand."""

    kind: EventKind
    qualifier: str = ""  # the infusion or dose number ("2", "07"), or a PK sample's anchor and offset

    def __str__(self) -> str:
        return f"{self.kind.value}-{self.qualifier}" if self.qualifier else self.kind.value

    @classmethod
    def parse(cls, key: str) -> EventKey:
        kind, _, qualifier = key.partition("-")
        try:
            return cls(EventKind(kind), qualifier)
        except ValueError:
            raise CalendarError(f"event key '{key}' names no calendar event kind") from None

    @classmethod
    def nk_infusion(cls, number: int) -> EventKey:
        return cls(EventKind.NK_INFUSION, str(number))

    @classmethod
    def product_request(cls, number: int) -> EventKey:
        return cls(EventKind.PRODUCT_REQUEST, str(number))

    @classmethod
    def il2_dose(cls, number: int) -> EventKey:
        return cls(EventKind.IL2_DOSE, f"{number:02d}")

    @classmethod
    def pk_sample(cls, anchor: str, offset_days: int) -> EventKey:
        return cls(EventKind.PK_SAMPLE, f"{anchor}+{offset_days}")

    @property
    def number(self) -> int:
        """The infusion number (infusions, product requests) or the dose number (IL-2)."""
        if self.kind not in (EventKind.NK_INFUSION, EventKind.PRODUCT_REQUEST, EventKind.IL2_DOSE):
            raise CalendarError(f"event {self} is not numbered")
        return int(self.qualifier)

    def for_kind(self, kind: EventKind) -> EventKey:
        """The same number for another kind: the infusion a product request is for."""
        return EventKey(kind, self.qualifier)


_RANK = {k: i for i, k in enumerate(EventKind)}
OUT_OF_WINDOW = "out_of_window"


@dataclass(frozen=True)
class CalendarEvent:
    """One dated item of a patient's calendar."""

    key: str  # stable within one patient's calendar, e.g. "nk_infusion-2", "il2_dose-07"
    kind: EventKind
    label: str
    protocol_day: int
    local_date: dt.date
    local_time: dt.time | None  # None: the event is the end of its local day
    at_utc: dt.datetime
    window_start: dt.date
    window_end: dt.date
    anchor: Anchor
    actual: bool = False  # True when the date is a recorded actual, not a plan
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "kind": self.kind.value,
            "label": self.label,
            "protocol_day": self.protocol_day,
            "local_date": self.local_date.isoformat(),
            "local_time": self.local_time.strftime("%H:%M") if self.local_time else "end of day",
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "at_utc": self.at_utc.isoformat().replace("+00:00", "Z"),
            "anchor": self.anchor.value,
            "actual": self.actual,
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class Calendar:
    protocol_version: str
    timezone: str
    dose_level: int
    cells_per_infusion: float
    day0: dt.datetime  # naive local wall-clock time of infusion 1 (actual if recorded)
    events: tuple[CalendarEvent, ...] = field(default_factory=tuple)

    @property
    def anchor_version(self) -> str:
        """Short digest of everything the dates hang from; changes when an actual re-anchors them."""
        parts = [self.protocol_version, self.timezone, str(self.dose_level)]
        parts += [f"{e.key}@{e.at_utc.isoformat()}" for e in self.events if e.kind is EventKind.NK_INFUSION]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]

    def event(self, key: str) -> CalendarEvent:
        for e in self.events:
            if e.key == key:
                return e
        raise KeyError(key)


def compute_calendar(
    protocol: ProtocolDefinition,
    *,
    dose_level: int,
    day0: dt.datetime,
    actual_infusions: Mapping[int, dt.datetime] | None = None,
) -> Calendar:
    """The whole calendar of one patient.

    `day0` is the planned local date and time of infusion 1 (naive, site timezone).
    `actual_infusions` maps infusion number to its recorded local date and time; an actual
    infusion 1 replaces day 0.
    """
    level = protocol.dose_level(dose_level)
    tz = protocol.timezone
    actuals = dict(actual_infusions or {})
    plan = protocol.nk_infusions.infusions
    for number in actuals:
        if not 1 <= number <= len(plan):
            raise CalendarError(f"actual_infusions: infusion {number} does not exist; the protocol has {len(plan)} infusions")
    if day0.tzinfo is not None:
        raise CalendarError("day0: give the local wall-clock time in the site timezone, without an offset")
    anchor0 = actuals.get(1, day0)
    day0_on = anchor0.date()
    default_time = protocol.site.event_time
    events: list[CalendarEvent] = []

    def day_of(on: dt.date) -> int:
        return (on - day0_on).days

    def on_day(n: int) -> dt.date:
        return day0_on + dt.timedelta(days=n)

    def add(key, kind, label, day, at, anchor, *, window=(0, 0), actual=False, refuse_ambiguous=False, flags=()):
        on = on_day(day)
        if at is None:
            at_utc, extra = start_of_local_day(tz, on + dt.timedelta(days=1)), ()
        else:
            at_utc, extra = local_instant(tz, on, at, what=label, refuse_ambiguous=refuse_ambiguous)
        events.append(
            CalendarEvent(
                key=key, kind=kind, label=label, protocol_day=day, local_date=on, local_time=at,
                at_utc=at_utc, window_start=on_day(window[0]), window_end=on_day(window[1]),
                anchor=anchor, actual=actual, flags=tuple(flags) + extra,
            )
        )

    # NK infusions and the product requests that precede them.
    infusion_day: dict[int, int] = {}
    infusion_time: dict[int, dt.time] = {}
    lead = protocol.nk_infusions.product_request_lead_days.value
    for inf in plan:
        n = inf.number
        win = (inf.day - inf.window.minus_days, inf.day + inf.window.plus_days)
        when = anchor0 if n == 1 else actuals.get(n)
        day = day_of(when.date()) if when is not None else inf.day
        at = when.time() if when is not None else anchor0.time()
        if n > 1 and day <= infusion_day[n - 1]:
            raise CalendarError(f"actual_infusions: infusion {n} on day {day} is not after infusion {n - 1} (day {infusion_day[n - 1]})")
        flags = (OUT_OF_WINDOW,) if not win[0] <= day <= win[1] else ()
        infusion_day[n], infusion_time[n] = day, at
        add(str(EventKey.nk_infusion(n)), EventKind.NK_INFUSION, f"NK infusion {n} ({level.cells_per_infusion:.1e} cells)", day, at,
            Anchor.INFUSION_1, window=win, actual=n in actuals,
            refuse_ambiguous=True, flags=flags)
        add(str(EventKey.product_request(n)), EventKind.PRODUCT_REQUEST, f"product request for infusion {n}", inf.day - lead,
            default_time, Anchor.INFUSION_1, window=(inf.day - lead, inf.day - lead))

    # IL-2, once daily.
    il2 = protocol.il2
    for i, d in enumerate(il2.days, start=1):
        add(str(EventKey.il2_dose(i)), EventKind.IL2_DOSE, f"IL-2 {il2.dose_miu.value:g} MIU {il2.route.value} dose {i}",
            d, default_time, Anchor.INFUSION_1, window=(d, d))

    # DLT window: opens at infusion 1, closes at the end of its last day.
    w = protocol.dlt.window
    add("dlt_window_open", EventKind.DLT_WINDOW_OPEN, "DLT window opens", w.open_day,
        infusion_time[1] if w.open_day == 0 else default_time, Anchor.INFUSION_1, window=(w.open_day, w.close_day))
    add("dlt_window_close", EventKind.DLT_WINDOW_CLOSE, f"DLT window closes (end of day {w.close_day})", w.close_day,
        None, Anchor.INFUSION_1, window=(w.close_day, w.close_day))

    # Outcome visits.
    for v in protocol.visits:
        add(v.kind, EventKind(v.kind), v.label, v.day, default_time, Anchor.INFUSION_1,
            window=(v.day - v.window.minus_days, v.day + v.window.plus_days))

    # PK samples: pre-infusion samples share the infusion's time and sort before it.
    for s in protocol.pk_samples.samples:
        n = 1 if s.anchor == "infusion_1" else 2
        day = infusion_day[n] + s.offset_days
        at = infusion_time[n] if s.offset_days == 0 else default_time
        label = f"PK sample day {day}" + (f" ({s.label})" if s.label else "")
        add(str(EventKey.pk_sample(s.anchor, s.offset_days)), EventKind.PK_SAMPLE, label, day, at, Anchor(s.anchor), window=(day, day))

    # Contraception: a single calendar-month addition from the last infusion's date.
    last = max(infusion_day.values())
    months = protocol.contraception.months_after_last_infusion.value
    end_on = add_months(on_day(last), months)
    add("contraception_end", EventKind.CONTRACEPTION_END, f"contraception may end ({months} months after last infusion)",
        day_of(end_on), default_time, Anchor.LAST_INFUSION, window=(day_of(end_on), day_of(end_on)))

    events.sort(key=lambda e: (e.at_utc, _RANK[e.kind], e.key))
    return Calendar(
        protocol_version=protocol.version, timezone=tz, dose_level=dose_level,
        cells_per_infusion=level.cells_per_infusion, day0=anchor0, events=tuple(events),
    )
