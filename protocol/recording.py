"""The rules a recorded entry must keep: pure checks over plain values, each one sentence when broken.

Enrollment (day 0, sentinel stagger, cohort with room), NK infusions (number, lot, cells, dose,
order, earliest day 0, window), IL-2 doses, visits and lab results. "Now" and "today" are
parameters: nothing here reads the clock, the database or Prefect. Each check returns nothing
(or the value it settles) and raises UserError with the sentence the user sees.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from enum import StrEnum

from protocol.dates import local_instant, to_local
from protocol.definition import ProtocolDefinition
from protocol.eligibility import ScreeningResult
from protocol.errors import UserError
from protocol.plausible import finite_number


class VisitKind(StrEnum):
    ONE_MONTH = "visit_1_month"
    THREE_MONTH = "visit_3_month"


class Response(StrEnum):
    """Response categories (assumption: ELN 2022 AML response)."""

    CR = "CR"
    CRI = "CRi"
    MLFS = "MLFS"
    PR = "PR"
    SD = "SD"
    PD = "PD"


class MrdStatus(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"


# -- site time ------------------------------------------------------------------------------------

def site_local(protocol: ProtocolDefinition, value: dt.datetime) -> dt.datetime:
    """A naive site-local wall-clock time; an aware value (from a UI form) is converted first."""
    return value if value.tzinfo is None else to_local(protocol.timezone, value)


def site_text(protocol: ProtocolDefinition, value: dt.datetime) -> str:
    """A time as people read it: site-local wall time with the zone named, e.g. '2027-01-31 09:10 Asia/Shanghai'."""
    return f"{site_local(protocol, value):%Y-%m-%d %H:%M} {protocol.timezone}"


def site_today(protocol: ProtocolDefinition, now: dt.datetime) -> dt.date:
    """The site's local date at the instant `now`."""
    return to_local(protocol.timezone, now).date()


def site_instant(protocol: ProtocolDefinition, local: dt.datetime, what: str) -> dt.datetime:
    """The UTC instant of a site-local time; a DST gap or a repeated hour is refused."""
    return local_instant(protocol.timezone, local.date(), local.time(), what=what, refuse_ambiguous=True)[0]


# -- any entry ------------------------------------------------------------------------------------

def no_future(what: str, at_local: dt.datetime | dt.date, today_local: dt.datetime | dt.date) -> None:
    """What was done is recorded when it was done, never ahead of time."""
    if at_local > today_local:
        raise UserError(f"{what} {at_local} is in the future; record what was done, when it was done")


def in_window(what: str, on: dt.date, window_start_on: dt.date, window_end_on: dt.date, deviation_reason: str | None) -> str | None:
    """The deviation reason to store: none needed inside the window, required (and trimmed) outside it."""
    if window_start_on <= on <= window_end_on:
        return deviation_reason
    if not (deviation_reason or "").strip():
        raise UserError(
            f"{what} on {on} is outside its window {window_start_on} to {window_end_on}; "
            "give a deviation_reason to record it anyway"
        )
    return deviation_reason.strip()


# -- enrollment -----------------------------------------------------------------------------------

def check_planned_day0(result: ScreeningResult, day0_on: dt.date, today_on: dt.date) -> None:
    """An eligible patient's day 0 is neither before the washouts allow nor in the past."""
    if result.earliest_day0_on and day0_on < result.earliest_day0_on:
        blocking = [c.id for c in result.criteria if c.id.startswith(("E2.", "E3.")) and str(result.earliest_day0_on) in c.limit]
        raise UserError(
            f"planned_day0 {day0_on} is before the earliest permissible date {result.earliest_day0_on} "
            f"({', '.join(blocking) or 'consent'}); choose {result.earliest_day0_on} or later"
        )
    if day0_on < today_on:
        raise UserError(f"planned_day0 {day0_on} is in the past; plan infusion 1 for today or later")


def check_sentinel_stagger(day0_on: dt.date, *, stagger_days: int, sentinel_id: str | None, sentinel_day0_on: dt.date | None) -> None:
    """With a sentinel stagger, the cohort's next patients start no sooner than N days after its first."""
    if stagger_days <= 0 or sentinel_id is None:
        return  # no stagger, or this patient is the sentinel
    earliest = sentinel_day0_on + dt.timedelta(days=stagger_days)
    if day0_on < earliest:
        raise UserError(f"planned_day0 {day0_on} is too soon after the sentinel {sentinel_id} (day 0 {sentinel_day0_on}): "
                        f"the protocol staggers patients by {stagger_days} days, so choose {earliest} or later")


def cohort_with_room(enrolled: Iterable[tuple[int, bool | None]], size: int) -> int:
    """The first cohort with fewer than `size` patients who count (a replaced one, evaluable False, does not).

    `enrolled` is (cohort, evaluable) for every patient enrolled at the level.
    """
    counts: dict[int, int] = {}
    for cohort, evaluable in enrolled:
        counts[cohort] = counts.get(cohort, 0) + (evaluable is not False)
    return next((c for c in sorted(counts) if counts[c] < size), max(counts, default=0) + 1)


# -- NK infusions ---------------------------------------------------------------------------------

def check_infusion_entry(protocol: ProtocolDefinition, *, infusion_number: int, product_lot: str, cells_infused: float) -> None:
    """The infusion exists in the protocol, names its product lot, and infused some cells."""
    plan = protocol.nk_infusions.infusions
    if not 1 <= infusion_number <= len(plan):
        raise UserError(f"infusion_number {infusion_number} does not exist; the protocol has infusions 1 to {len(plan)}")
    if not product_lot.strip():
        raise UserError("product_lot is required: every infusion records the product lot it came from")
    finite_number("cells_infused", cells_infused)
    if cells_infused <= 0:
        raise UserError("cells_infused must be greater than 0")


def check_assigned_level(subject_id: str, dose_level: int, assigned_level: int | None) -> None:
    if dose_level != assigned_level:
        raise UserError(f"dose_level {dose_level} does not match {subject_id}'s assigned dose level {assigned_level}")


def check_dose(protocol: ProtocolDefinition, *, dose_level: int, cells_infused: float, deviation_reason: str | None) -> None:
    """Cells within the protocol's tolerance of the level's dose, unless a deviation reason says why not."""
    expected = protocol.dose_level(dose_level).cells_per_infusion
    tolerance = protocol.nk_infusions.cells_tolerance_percent.value / 100
    if abs(cells_infused - expected) > tolerance * expected and not (deviation_reason or "").strip():
        raise UserError(f"cells_infused {cells_infused:.2e} differs from dose level {dose_level}'s {expected:.1e} by more "
                        f"than {tolerance:.0%}; give a deviation_reason to record it anyway")


def check_infusion_order(subject_id: str, infusion_number: int, given: Collection[int]) -> None:
    """Infusion n is recorded only after infusion n-1."""
    if infusion_number > 1 and infusion_number - 1 not in given:
        raise UserError(f"NK infusion {infusion_number} for {subject_id} cannot be recorded before infusion {infusion_number - 1}")


def check_not_before_earliest_day0(subject_id: str, given_on: dt.date, earliest_day0_on: dt.date | None) -> None:
    """Infusion 1 is not given before the washouts allow."""
    if earliest_day0_on and given_on < earliest_day0_on:
        raise UserError(f"given_at {given_on} is before {subject_id}'s earliest permissible day 0 {earliest_day0_on} (washouts)")


# -- IL-2 -----------------------------------------------------------------------------------------

def check_il2_entry(protocol: ProtocolDefinition, *, dose_number: int, given: bool, given_at: dt.datetime | None,
                    missed_reason: str | None) -> None:
    """The dose exists; a given dose has its time, a missed one its reason."""
    n = protocol.il2.duration_days.value
    if not 1 <= dose_number <= n:
        raise UserError(f"dose_number {dose_number} does not exist; IL-2 doses are numbered 1 to {n}")
    if given and given_at is None:
        raise UserError("given_at is required when the IL-2 dose was given")
    if not given and not (missed_reason or "").strip():
        raise UserError("missed_reason is required when the IL-2 dose was missed")


def check_il2_after_infusion_1(subject_id: str, dose_number: int, given_infusions: Collection[int]) -> None:
    if 1 not in given_infusions:
        raise UserError(f"IL-2 dose {dose_number} for {subject_id} cannot be recorded before NK infusion 1")


# -- lab results ----------------------------------------------------------------------------------

def check_lab_fields(kind: str, *, pk_day: int | None, donor_nk_cells_per_ul: float | None, mrd: MrdStatus | None,
                     response: Response | None) -> None:
    """Each kind of result carries its own value: a PK day and count, an MRD status, or a response."""
    if kind == "donor_nk_count":
        if pk_day is None or donor_nk_cells_per_ul is None:
            raise UserError("donor_nk_count needs pk_day (the PK sample's protocol day) and donor_nk_cells_per_ul")
    elif kind == "mrd_mfc":
        if mrd is None:
            raise UserError("mrd_mfc needs mrd: positive or negative")
    elif response is None:
        raise UserError(f"response needs response: one of {', '.join(x.value for x in Response)}")


def check_pk_day(subject_id: str, pk_day: int, sample_days: Collection[int]) -> None:
    if pk_day not in sample_days:
        raise UserError(f"pk_day {pk_day} is not a PK sample day for {subject_id}; sample days are {sorted(sample_days)}")
