"""Plausibility rules for what people type: dates in the order the trial allows, numbers that are finite and in
range, text that fits its column. Pure functions, no clock and no database: callers pass "today" and the stored
dates. Each refusal is one UserError sentence naming the field and the rule."""

from __future__ import annotations

import datetime as dt
import math

from protocol.errors import UserError

# The calendar's earliest and latest plausible local dates: a date outside them is a typing error, and keeping away from
# datetime's own limits (year 1 and 9999) means adding a protocol's days or a UTC offset can never overflow.
EARLIEST_DATE = dt.date(1900, 1, 1)
LATEST_DATE = dt.date(2999, 12, 31)


def plausible_date(field: str, value: dt.date) -> dt.date:
    """A date a person may have meant: within EARLIEST_DATE..LATEST_DATE."""
    day = value.date() if isinstance(value, dt.datetime) else value
    if not EARLIEST_DATE <= day <= LATEST_DATE:
        raise UserError(f"{field} {day} is not a plausible date: give one between {EARLIEST_DATE} and {LATEST_DATE}")
    return value


def not_before(field: str, value: dt.date, bound: dt.date | None, what: str) -> None:
    """`value` is on or after `bound` (skipped when the bound is unknown)."""
    if bound is not None and value < bound:
        raise UserError(f"{field} {value} is before {what} ({bound}); it cannot be earlier")


def not_after(field: str, value: dt.date, bound: dt.date, what: str) -> None:
    if value > bound:
        raise UserError(f"{field} {value} is after {what} ({bound}); it cannot be later")


def missed_not_before_due(label: str, due_on: dt.date, today: dt.date) -> None:
    """A dose or visit can be recorded as missed only once its day has come."""
    if today < due_on:
        raise UserError(f"{label} is due on {due_on}; it cannot be recorded as missed before it was due (today is {today})")


def off_study_date(effective_on: dt.date, *, entered_on: dt.date, today: dt.date) -> None:
    """Off study from the day the patient entered the study (enrollment, or screening if never enrolled) up to today."""
    plausible_date("effective_on", effective_on)
    not_before("effective_on", effective_on, entered_on, "the date the patient entered the study")
    if effective_on > today:
        raise UserError(f"effective_on {effective_on} is in the future (today is {today}); a patient goes off study on a past or present date")


def ae_dates(onset_on: dt.date, resolved_on: dt.date | None, *, consent_on: dt.date | None, today: dt.date) -> None:
    """An adverse event starts after consent (before it is medical history) and not in the future; it resolves after onset."""
    plausible_date("onset_on", onset_on)
    if onset_on > today:
        raise UserError(f"onset_on {onset_on} is in the future")
    not_before("onset_on", onset_on, consent_on, "the patient's informed consent")
    if resolved_on is not None:
        plausible_date("resolved_on", resolved_on)
        if resolved_on < onset_on:
            raise UserError(f"resolved_on {resolved_on} is before onset_on {onset_on}")
        if resolved_on > today:
            raise UserError(f"resolved_on {resolved_on} is in the future")


def finite_number(field: str, value: float | None, *, low: float | None = None, high: float | None = None) -> float | None:
    """A number that is finite (not nan or inf) and within [low, high] where given."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{field} {value} is not a finite number")
    if low is not None and value < low:
        raise UserError(f"{field} {value} must be at least {low:g}")
    if high is not None and value > high:
        raise UserError(f"{field} {value} must be at most {high:g}")
    return value


def probabilities(field: str, values: list[float], count: int) -> list[float]:
    """One DLT probability per dose level, each a finite number from 0 to 1."""
    if len(values) != count:
        raise UserError(f"{field} needs one DLT probability per dose level ({count}), got {len(values)}")
    for v in values:
        if not (math.isfinite(v) and 0 <= v <= 1):
            raise UserError(f"{field} values are probabilities: each must be between 0 and 1, got {v}")
    return values


def text_fits(field: str, value: str | None, limit: int) -> None:
    """Text no longer than its column: the same rule on SQLite (which would store it) and PostgreSQL (which would fail)."""
    if value is not None and len(value) > limit:
        raise UserError(f"{field} is {len(value)} characters; at most {limit} are allowed")


def count_in_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise UserError(f"{field} {value} must be between {low} and {high}")
    return value
