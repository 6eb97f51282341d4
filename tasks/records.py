"""Clinical writes on the trial database: enrollment, recording, off study, reminders, rounds.

Plain functions, no Prefect: flows wrap them as tasks, and the CLI calls them directly. Each
public function is one unit of work: it validates first, then writes everything (rows, audit,
outbox notices) in one transaction, or nothing. Bad input raises UserError with one sentence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, func, select

from models.crud import register_protocol, store_calendar, store_screening
from models.queries import get_subject
from models.clock import Clock
from models.db import UnitOfWork
from models.tables import (
    Administration, AdministrationKind, CalendarEventRow, DoseLevelState, Enrollment, EventStatus, LabKind, LabResult,
    LevelStatus, OffStudyReason, ScreeningRecordRow, Subject, SubjectStatus, WaitlistEntry,
)
from protocol.calendar import Calendar, EventKind, compute_calendar
from protocol.dates import local_instant, to_local
from protocol.definition import ProtocolDefinition
from protocol.eligibility import ScreeningRecord, ScreeningResult, Verdict, screen
from protocol.errors import UserError
from protocol.roles import Role
from tasks.notices import Notice, NoticeEvent, cancel_pending, enqueue, enqueue_many
from tasks.safety import assert_level_approved, trial_state

ACTIVE = (SubjectStatus.ENROLLED, SubjectStatus.ON_TREATMENT, SubjectStatus.FOLLOW_UP)
MOVED_TOLERANCE = dt.timedelta(hours=1)
ENROLL_RETRIES = 5


# -- helpers --------------------------------------------------------------------------------------

def site_local(protocol: ProtocolDefinition, value: dt.datetime) -> dt.datetime:
    """A naive site-local wall-clock time; an aware value (from a UI form) is converted first."""
    return value if value.tzinfo is None else to_local(protocol.timezone, value)


def _utc(protocol: ProtocolDefinition, local: dt.datetime, what: str) -> dt.datetime:
    return local_instant(protocol.timezone, local.date(), local.time(), what=what, refuse_ambiguous=True)[0]


def _today(protocol: ProtocolDefinition, now: dt.datetime) -> dt.date:
    return to_local(protocol.timezone, now).date()


def _subject(session: Session, subject_id: str) -> Subject:
    subject = get_subject(session, subject_id=subject_id)
    if subject is None:
        raise UserError(f"subject_id {subject_id} is not in the trial database; enroll the patient first")
    return subject


def _on_study(subject: Subject) -> None:
    if subject.status is SubjectStatus.OFF_STUDY:
        raise UserError(f"subject_id {subject.subject_id} is off study since {subject.off_study_on}; nothing more can be recorded")
    if subject.status not in ACTIVE:
        raise UserError(f"subject_id {subject.subject_id} is {subject.status.value.replace('_', ' ')}, not enrolled; nothing can be recorded yet")


def _event(session: Session, subject: Subject, key: str) -> CalendarEventRow:
    row = session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id, CalendarEventRow.key == key)).first()
    if row is None:
        raise UserError(f"{subject.subject_id} has no calendar event {key}")
    return row


def _no_future(what: str, at_local: dt.datetime | dt.date, today_local: dt.datetime | dt.date) -> None:
    if at_local > today_local:
        raise UserError(f"{what} {at_local} is in the future; record what was done, when it was done")


def _window(what: str, on: dt.date, row: CalendarEventRow, deviation_reason: str | None) -> str | None:
    if row.window_start_on <= on <= row.window_end_on:
        return deviation_reason
    if not (deviation_reason or "").strip():
        raise UserError(
            f"{what} on {on} is outside its window {row.window_start_on} to {row.window_end_on}; "
            "give a deviation_reason to record it anyway"
        )
    return deviation_reason.strip()


def actual_infusions(session: Session, protocol: ProtocolDefinition, subject: Subject) -> dict[int, dt.datetime]:
    rows = session.exec(select(Administration).where(
        Administration.subject_pk == subject.id, Administration.kind == AdministrationKind.NK_INFUSION, Administration.given)).all()
    return {int(r.event_key.rsplit("-", 1)[1]): to_local(protocol.timezone, r.given_at) for r in rows}


def refresh_calendar(session: Session, protocol: ProtocolDefinition, subject: Subject) -> Calendar:
    """Recompute the subject's calendar from the plan and the actual infusions, and store it."""
    assert_level_approved(session, subject.dose_level, f"calendar of {subject.subject_id}")
    cal = compute_calendar(
        protocol, dose_level=subject.dose_level, day0=to_local(protocol.timezone, subject.planned_day0_at),
        actual_infusions=actual_infusions(session, protocol, subject),
    )
    store_calendar(session, subject=subject, calendar=cal, protocol=protocol)
    return cal


# -- enrollment -----------------------------------------------------------------------------------

class EnrollmentStatus(StrEnum):
    ENROLLED = "enrolled"
    WAITLISTED = "waitlisted"
    NOT_ELIGIBLE = "not_eligible"


@dataclass
class EnrollmentOutcome:
    status: EnrollmentStatus
    subject_id: str
    screening: ScreeningResult
    dose_level: int | None = None
    cohort: int | None = None
    slot: int | None = None

    @property
    def message(self) -> str:
        if self.status is EnrollmentStatus.ENROLLED:
            return f"{self.subject_id} enrolled at dose level {self.dose_level}, cohort {self.cohort}, slot {self.slot}"
        if self.status is EnrollmentStatus.WAITLISTED:
            return f"{self.subject_id} is eligible and waitlisted: no slot is open at the moment"
        failing = ", ".join(c.id for c in self.screening.failing) or "none"
        unknown = ", ".join(c.id for c in self.screening.unknown) or "none"
        return f"{self.subject_id} is not eligible: failing {failing}; unknown {unknown}"


def enroll(
    engine: sa.Engine, protocol: ProtocolDefinition, *, record: ScreeningRecord, planned_day0: dt.datetime,
    actor: str, clock: Clock, link: str | None = None,
) -> EnrollmentOutcome:
    """Screen, then enroll into the open cohort's next slot, or waitlist; a failed screen is kept too."""
    now = clock()
    day0 = site_local(protocol, planned_day0)
    result = screen(protocol, record)
    eligible = result.verdict is Verdict.ELIGIBLE
    if eligible:
        if result.earliest_day0_on and day0.date() < result.earliest_day0_on:
            blocking = [c.id for c in result.criteria if c.id.startswith(("E2.", "E3.")) and str(result.earliest_day0_on) in c.limit]
            raise UserError(
                f"planned_day0 {day0.date()} is before the earliest permissible date {result.earliest_day0_on} "
                f"({', '.join(blocking) or 'consent'}); choose {result.earliest_day0_on} or later"
            )
        if day0.date() < _today(protocol, now):
            raise UserError(f"planned_day0 {day0.date()} is in the past; plan infusion 1 for today or later")
        compute_calendar(protocol, dose_level=1, day0=day0)  # refuses a DST gap before anything is written
    for attempt in range(ENROLL_RETRIES):
        try:
            return _enroll_once(engine, protocol, record=record, result=result, day0=day0, actor=actor, clock=clock, link=link)
        except sa.exc.IntegrityError:
            if attempt == ENROLL_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _enroll_once(engine, protocol, *, record, result, day0, actor, clock, link) -> EnrollmentOutcome:
    sid = record.subject_id
    with UnitOfWork(engine, actor=actor, reason=f"enrollment of {sid}", clock=clock) as u:
        s = u.session
        register_protocol(s, protocol=protocol, at=u.at)
        subject = get_subject(s, subject_id=sid)
        if subject is not None and subject.status not in (SubjectStatus.SCREEN_FAILED, SubjectStatus.WAITLISTED):
            raise UserError(f"subject_id {sid} is already {subject.status.value.replace('_', ' ')}; it cannot be enrolled again")
        if subject is None:
            subject = Subject(subject_id=sid, created_at=u.at)
            s.add(subject)
            s.flush()
        store_screening(s, subject=subject, result=result, at=u.at)
        if result.verdict is not Verdict.ELIGIBLE:
            subject.status = SubjectStatus.SCREEN_FAILED
            s.add(subject)
            enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.NOT_ELIGIBLE, sid, link=link), dedup=f"{sid}:screen:{u.at.isoformat()}", at=u.at)
            u.commit()
            return EnrollmentOutcome(EnrollmentStatus.NOT_ELIGIBLE, sid, result)
        level = s.exec(select(DoseLevelState).where(DoseLevelState.status == LevelStatus.OPEN)).first()
        taken = s.exec(select(func.count()).select_from(Enrollment).where(Enrollment.dose_level == level.level)).one() if level else 0
        if level is None or taken >= level.slots_open:
            subject.status = SubjectStatus.WAITLISTED
            subject.planned_day0_at = _utc(protocol, day0, "planned_day0")
            s.add(subject)
            if s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)).first() is None:
                s.add(WaitlistEntry(subject_pk=subject.id, added_at=u.at))
            enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.WAITLISTED, sid, link=link), dedup=f"{sid}:waitlisted", at=u.at)
            u.commit()
            return EnrollmentOutcome(EnrollmentStatus.WAITLISTED, sid, result)
        assert_level_approved(s, level.level, f"enrollment of {sid}")
        slot = taken + 1
        cohort = _cohort_with_room(s, level.level, protocol.escalation.cohort_size.value)
        _check_sentinel_stagger(s, protocol, level.level, cohort, day0)
        s.add(Enrollment(subject_pk=subject.id, dose_level=level.level, cohort=cohort, slot=slot, enrolled_at=u.at))
        for waiting in s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)):
            s.delete(waiting)  # a waitlisted patient re-screened into a slot leaves the waitlist
        if slot >= level.slots_open:
            level.status = LevelStatus.FULL
            s.add(level)
        subject.status, subject.dose_level = SubjectStatus.ENROLLED, level.level
        subject.planned_day0_at = _utc(protocol, day0, "planned_day0")
        s.add(subject)
        s.flush()
        cal = refresh_calendar(s, protocol, subject)
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.ENROLLED, sid, due_on=day0.date(),
                          detail=f"DL{level.level}, cohort {cohort}, day 0", link=link), dedup=f"{sid}:enrolled", at=u.at)
        request = cal.event("product_request-1")
        enqueue(s, Notice(Role.CELL_LAB, NoticeEvent.PRODUCT_REQUEST, sid, due_on=day0.date(),
                          detail=f"infusion 1, DL{level.level} ({cal.cells_per_infusion:.1e} cells)", link=link),
                dedup=f"{sid}:product_request-1", at=u.at)
        row = _event(s, subject, request.key)
        row.reminder_sent_at = u.at
        s.add(row)
        u.commit()
        return EnrollmentOutcome(EnrollmentStatus.ENROLLED, sid, result, level.level, cohort, slot)


def _check_sentinel_stagger(session: Session, protocol: ProtocolDefinition, level: int, cohort: int, day0: dt.datetime) -> None:
    """With a sentinel stagger, the cohort's next patients start no sooner than N days after its first."""
    days = protocol.escalation.sentinel_stagger_days.value
    if days <= 0:
        return
    first = session.exec(select(Subject).join(Enrollment, Enrollment.subject_pk == Subject.id)
                         .where(Enrollment.dose_level == level, Enrollment.cohort == cohort).order_by(Enrollment.id)).first()
    if first is None:
        return  # this patient is the sentinel
    sentinel_day0 = actual_infusions(session, protocol, first).get(1) or to_local(protocol.timezone, first.planned_day0_at)
    earliest = sentinel_day0.date() + dt.timedelta(days=days)
    if day0.date() < earliest:
        raise UserError(f"planned_day0 {day0.date()} is too soon after the sentinel {first.subject_id} (day 0 {sentinel_day0.date()}): "
                        f"the protocol staggers patients by {days} days, so choose {earliest} or later")


def _cohort_with_room(session: Session, level: int, size: int) -> int:
    """The first cohort at the level with fewer than `size` patients who count (a replaced patient does not)."""
    counts: dict[int, int] = {}
    for cohort, evaluable in session.exec(select(Enrollment.cohort, Enrollment.evaluable).where(Enrollment.dose_level == level)):
        counts[cohort] = counts.get(cohort, 0) + (evaluable is not False)
    return next((c for c in sorted(counts) if counts[c] < size), max(counts, default=0) + 1)


# -- recording ------------------------------------------------------------------------------------

def record_infusion(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, infusion_number: int, given_at: dt.datetime,
    dose_level: int, cells_infused: float, product_lot: str, deviation_reason: str | None = None, actor: str, clock: Clock,
    link: str | None = None,
) -> Calendar:
    """Record an NK infusion given; re-anchors the calendar (a late infusion 1 moves everything)."""
    given_local = site_local(protocol, given_at)
    plan = protocol.nk_infusions.infusions
    if not 1 <= infusion_number <= len(plan):
        raise UserError(f"infusion_number {infusion_number} does not exist; the protocol has infusions 1 to {len(plan)}")
    if not product_lot.strip():
        raise UserError("product_lot is required: every infusion records the product lot it came from")
    if cells_infused <= 0:
        raise UserError("cells_infused must be greater than 0")
    with UnitOfWork(engine, actor=actor, reason=f"NK infusion {infusion_number} given to {subject_id}", clock=clock) as u:
        s = u.session
        subject = _subject(s, subject_id)
        _on_study(subject)
        if dose_level != subject.dose_level:
            raise UserError(f"dose_level {dose_level} does not match {subject_id}'s assigned dose level {subject.dose_level}")
        assert_level_approved(s, dose_level, f"NK infusion for {subject_id}")
        _no_future("given_at", given_local, to_local(protocol.timezone, u.at))
        key = f"nk_infusion-{infusion_number}"
        existing = s.exec(select(Administration).where(Administration.subject_pk == subject.id, Administration.event_key == key)).first()
        if existing is not None:
            raise UserError(f"NK infusion {infusion_number} for {subject_id} is already recorded "
                            f"({to_local(protocol.timezone, existing.given_at):%Y-%m-%d %H:%M}); it cannot be entered twice")
        actuals = actual_infusions(s, protocol, subject)
        if infusion_number > 1 and infusion_number - 1 not in actuals:
            raise UserError(f"NK infusion {infusion_number} for {subject_id} cannot be recorded before infusion {infusion_number - 1}")
        expected = protocol.dose_level(subject.dose_level).cells_per_infusion
        tolerance = protocol.nk_infusions.cells_tolerance_percent.value / 100
        reason = deviation_reason
        if abs(cells_infused - expected) > tolerance * expected and not (reason or "").strip():
            raise UserError(f"cells_infused {cells_infused:.2e} differs from dose level {subject.dose_level}'s {expected:.1e} by more "
                            f"than {tolerance:.0%}; give a deviation_reason to record it anyway")
        if infusion_number == 1:
            earliest = _earliest_day0(s, subject)
            if earliest and given_local.date() < earliest:
                raise UserError(f"given_at {given_local.date()} is before {subject_id}'s earliest permissible day 0 {earliest} (washouts)")
        else:
            row = _event(s, subject, key)  # its window was re-anchored to the actual infusion 1 when that was recorded
            reason = _window(f"NK infusion {infusion_number}", given_local.date(), row, reason)
        given_utc = _utc(protocol, given_local, "given_at")
        s.add(Administration(subject_pk=subject.id, kind=AdministrationKind.NK_INFUSION, event_key=key, given=True, given_at=given_utc,
                             dose_level=dose_level, cells_infused=cells_infused, product_lot=product_lot.strip(),
                             deviation_reason=reason, recorded_at=u.at))
        s.flush()
        cal = refresh_calendar(s, protocol, subject)
        row = _event(s, subject, key)
        row.status, row.actual_at, row.deviation_reason = EventStatus.DONE, given_utc, reason
        s.add(row)
        subject.status = SubjectStatus.ON_TREATMENT
        s.add(subject)
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.INFUSION_RECORDED, subject_id, due_on=given_local.date(),
                          detail=f"infusion {infusion_number}", link=link), dedup=f"{subject_id}:{key}:recorded", at=u.at)
        u.commit()
        return cal


def _earliest_day0(session: Session, subject: Subject) -> dt.date | None:
    row = session.exec(select(ScreeningRecordRow).where(ScreeningRecordRow.subject_pk == subject.id)
                       .order_by(ScreeningRecordRow.id.desc())).first()
    return row.earliest_day0_on if row else None


def record_il2_dose(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, dose_number: int, given: bool,
    given_at: dt.datetime | None = None, missed_reason: str | None = None, deviation_reason: str | None = None,
    actor: str, clock: Clock,
) -> None:
    """Record one IL-2 dose as given (with its time) or missed (with a reason)."""
    n = protocol.il2.duration_days.value
    if not 1 <= dose_number <= n:
        raise UserError(f"dose_number {dose_number} does not exist; IL-2 doses are numbered 1 to {n}")
    if given and given_at is None:
        raise UserError("given_at is required when the IL-2 dose was given")
    if not given and not (missed_reason or "").strip():
        raise UserError("missed_reason is required when the IL-2 dose was missed")
    key = f"il2_dose-{dose_number:02d}"
    with UnitOfWork(engine, actor=actor, reason=f"IL-2 dose {dose_number} {'given to' if given else 'missed by'} {subject_id}", clock=clock) as u:
        s = u.session
        subject = _subject(s, subject_id)
        _on_study(subject)
        if 1 not in actual_infusions(s, protocol, subject):
            raise UserError(f"IL-2 dose {dose_number} for {subject_id} cannot be recorded before NK infusion 1")
        row = _event(s, subject, key)
        if s.exec(select(Administration).where(Administration.subject_pk == subject.id, Administration.event_key == key)).first():
            raise UserError(f"IL-2 dose {dose_number} for {subject_id} is already recorded; it cannot be entered twice")
        given_utc, reason = None, deviation_reason
        if given:
            local = site_local(protocol, given_at)
            _no_future("given_at", local, to_local(protocol.timezone, u.at))
            reason = _window(f"IL-2 dose {dose_number}", local.date(), row, deviation_reason)
            given_utc = _utc(protocol, local, "given_at")
        s.add(Administration(subject_pk=subject.id, kind=AdministrationKind.IL2_DOSE, event_key=key, given=given, given_at=given_utc,
                             dose_miu=protocol.il2.dose_miu.value if given else None, missed_reason=None if given else missed_reason.strip(),
                             deviation_reason=reason, recorded_at=u.at))
        row.status, row.actual_at, row.deviation_reason = (EventStatus.DONE if given else EventStatus.MISSED), given_utc, reason
        s.add(row)
        u.commit()


class VisitKind(StrEnum):
    ONE_MONTH = "visit_1_month"
    THREE_MONTH = "visit_3_month"


def record_visit(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, visit: VisitKind, done_on: dt.date,
    deviation_reason: str | None = None, actor: str, clock: Clock,
) -> None:
    with UnitOfWork(engine, actor=actor, reason=f"{visit.value} done for {subject_id}", clock=clock) as u:
        s = u.session
        subject = _subject(s, subject_id)
        _on_study(subject)
        _no_future("done_on", done_on, _today(protocol, u.at))
        row = _event(s, subject, visit.value)
        if row.status is EventStatus.DONE:
            raise UserError(f"{row.label} for {subject_id} is already recorded on {to_local(protocol.timezone, row.actual_at).date()}")
        reason = _window(row.label, done_on, row, deviation_reason)
        row.status, row.deviation_reason = EventStatus.DONE, reason
        row.actual_at = local_instant(protocol.timezone, done_on, protocol.site.event_time, what="done_on")[0]
        s.add(row)
        if visit is VisitKind.THREE_MONTH:
            subject.status = SubjectStatus.COMPLETED
            s.add(subject)
        u.commit()


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


class LabResultInput(BaseModel):
    """A lab or PK result. Donor NK counts name their PK sample day; MRD and response name their visit."""

    model_config = ConfigDict(extra="forbid")
    subject_id: str = Field(description="e.g. S-003")
    kind: LabKind
    sampled_on: dt.date
    pk_day: int | None = Field(default=None, description="donor_nk_count: the protocol day of the PK sample, e.g. 7")
    visit: VisitKind = Field(default=VisitKind.THREE_MONTH, description="mrd_mfc and response: the visit it belongs to")
    donor_nk_cells_per_ul: float | None = Field(default=None, ge=0, description="donor_nk_count: donor NK cells per µL")
    mrd: MrdStatus | None = None
    mrd_percent: float | None = Field(default=None, ge=0, le=100)
    response: Response | None = None


def record_lab_result(engine: sa.Engine, protocol: ProtocolDefinition, *, result: LabResultInput, actor: str, clock: Clock) -> None:
    r = result
    with UnitOfWork(engine, actor=actor, reason=f"{r.kind.value} result for {r.subject_id}", clock=clock) as u:
        s = u.session
        subject = _subject(s, r.subject_id)
        _on_study(subject)
        _no_future("sampled_on", r.sampled_on, _today(protocol, u.at))
        value = unit = category = None
        if r.kind is LabKind.DONOR_NK_COUNT:
            if r.pk_day is None or r.donor_nk_cells_per_ul is None:
                raise UserError("donor_nk_count needs pk_day (the PK sample's protocol day) and donor_nk_cells_per_ul")
            rows = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                         CalendarEventRow.kind == EventKind.PK_SAMPLE,
                                                         CalendarEventRow.protocol_day == r.pk_day)).all()
            if not rows:
                days = sorted(x.protocol_day for x in s.exec(select(CalendarEventRow).where(
                    CalendarEventRow.subject_pk == subject.id, CalendarEventRow.kind == EventKind.PK_SAMPLE)))
                raise UserError(f"pk_day {r.pk_day} is not a PK sample day for {r.subject_id}; sample days are {days}")
            event = rows[0]
            value, unit = r.donor_nk_cells_per_ul, "cells/uL"
        else:
            event = _event(s, subject, r.visit.value)
            if r.kind is LabKind.MRD_MFC:
                if r.mrd is None:
                    raise UserError("mrd_mfc needs mrd: positive or negative")
                value, unit, category = r.mrd_percent, "%" if r.mrd_percent is not None else None, r.mrd.value
            else:
                if r.response is None:
                    raise UserError(f"response needs response: one of {', '.join(x.value for x in Response)}")
                category = r.response.value
        if s.exec(select(LabResult).where(LabResult.subject_pk == subject.id, LabResult.kind == r.kind,
                                          LabResult.event_key == event.key)).first():
            raise UserError(f"{r.kind.value} for {r.subject_id} at {event.label} is already recorded; it cannot be entered twice")
        s.add(LabResult(subject_pk=subject.id, kind=r.kind, event_key=event.key, sampled_on=r.sampled_on, value=value, unit=unit,
                        category=category, recorded_at=u.at))
        if event.kind is EventKind.PK_SAMPLE and event.status is EventStatus.PLANNED:
            event.status = EventStatus.DONE
            event.actual_at = local_instant(protocol.timezone, r.sampled_on, protocol.site.event_time, what="sampled_on")[0]
            s.add(event)
        u.commit()


def take_off_study(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, reason: OffStudyReason, effective_on: dt.date,
    actor: str, clock: Clock, link: str | None = None,
) -> int:
    """Take a subject off study: cancel every planned event and pending notice, keep every record.

    Returns how many calendar events were cancelled.
    """
    with UnitOfWork(engine, actor=actor, reason=f"{subject_id} off study: {reason.value}", clock=clock) as u:
        s = u.session
        subject = _subject(s, subject_id)
        if subject.status is SubjectStatus.OFF_STUDY:
            raise UserError(f"subject_id {subject_id} is already off study since {subject.off_study_on}")
        _no_future("effective_on", effective_on, _today(protocol, u.at))
        planned = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                        CalendarEventRow.status == EventStatus.PLANNED)).all()
        for row in planned:
            row.status = EventStatus.CANCELLED
            s.add(row)
        cancel_pending(s, subject_id=subject_id)
        enrollment = s.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).first()
        if enrollment is not None and enrollment.dlt_window_closed_at is None and not enrollment.evaluable:
            enrollment.evaluable = False  # left before the DLT window closed without a DLT: replaced
            s.add(enrollment)
            _open_replacement_slot(s, enrollment, subject_id, effective_on, u.at, link)
        waiting = s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)).first()
        if waiting is not None:
            s.delete(waiting)
        subject.status, subject.off_study_reason, subject.off_study_on = SubjectStatus.OFF_STUDY, reason, effective_on
        s.add(subject)
        s.flush()
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.OFF_STUDY, subject_id, due_on=effective_on, link=link),
                dedup=f"{subject_id}:off_study", at=u.at)
        u.commit()
        return len(planned)


# -- acting on a due event ------------------------------------------------------------------------

@dataclass
class EventAction:
    acted: bool
    why: str
    notices: int = 0
    review_ready: bool = False  # the DLT window that closed was the cohort's last


_ACTIONS = {
    EventKind.PRODUCT_REQUEST: (NoticeEvent.PRODUCT_REQUEST, (Role.CELL_LAB, Role.COORDINATOR)),
    EventKind.NK_INFUSION: (NoticeEvent.INFUSION_PREP, (Role.NURSE, Role.COORDINATOR)),
    EventKind.VISIT_1_MONTH: (NoticeEvent.VISIT_WINDOW_OPEN, (Role.COORDINATOR, Role.NURSE)),
    EventKind.VISIT_3_MONTH: (NoticeEvent.VISIT_WINDOW_OPEN, (Role.COORDINATOR, Role.NURSE)),
    EventKind.PK_SAMPLE: (NoticeEvent.PK_SAMPLE_DUE, (Role.NURSE,)),
    EventKind.DLT_WINDOW_CLOSE: (NoticeEvent.DLT_WINDOW_CLOSED, (Role.COORDINATOR, Role.PI)),
}


def act_on_event(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, event_key: str, clock: Clock, link: str | None = None,
) -> EventAction:
    """Do what a due calendar event asks; if it moved, was done or cancelled, do nothing and say why."""
    with UnitOfWork(engine, actor="system:treatment-event", reason=f"{event_key} due for {subject_id}", clock=clock) as u:
        s = u.session
        subject = _subject(s, subject_id)
        row = _event(s, subject, event_key)
        if subject.status is SubjectStatus.OFF_STUDY:
            return EventAction(False, f"{subject_id} is off study since {subject.off_study_on}; nothing to do")
        if row.status is not EventStatus.PLANNED:
            return EventAction(False, f"{row.label} is already {row.status.value}; nothing to do")
        if row.remind_at is None:
            return EventAction(False, f"{row.label} needs no action from this flow")
        if row.reminder_sent_at is not None:
            return EventAction(False, f"{row.label} was already acted on at {row.reminder_sent_at:%Y-%m-%d %H:%M} UTC")
        if row.remind_at > u.at + MOVED_TOLERANCE:
            return EventAction(False, f"{row.label} moved: it is now due {row.remind_at:%Y-%m-%d %H:%M} UTC, and a rescheduled run will act then")
        event, roles = _ACTIONS[row.kind]
        detail = row.label if row.kind is not EventKind.NK_INFUSION else f"infusion {row.key.rsplit('-', 1)[1]}, DL{subject.dose_level}"
        if row.kind is EventKind.PRODUCT_REQUEST:
            detail = f"{row.label.replace('product request for ', '')}, DL{subject.dose_level}"
        elif row.kind in (EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH):
            procedures = next((v.procedures for v in protocol.visits if v.kind == row.kind.value), [])
            detail = f"{row.label} ({row.window_start_on} to {row.window_end_on}): {', '.join(procedures)}"
        sent = 0
        for role in roles:
            sent += enqueue(s, Notice(role, event, subject_id, due_on=_due_on(s, subject, row), detail=detail, link=link),
                            dedup=f"{subject_id}:{row.key}", at=u.at) is not None
        ready = False
        if row.kind is EventKind.DLT_WINDOW_CLOSE:
            _close_dlt_window(s, protocol, subject, u.at, link)
            s.flush()
            ready = trial_state(s, protocol).ready
        row.reminder_sent_at = u.at
        s.add(row)
        u.commit()
        return EventAction(True, f"{event.value} sent for {row.label}", sent, ready)


def _due_on(session: Session, subject: Subject, row: CalendarEventRow) -> dt.date:
    if row.kind is EventKind.PRODUCT_REQUEST:  # the lab's deadline is the infusion it is for
        return _event(session, subject, row.key.replace("product_request", "nk_infusion")).local_on
    return row.local_on


def _open_replacement_slot(s: Session, enrollment: Enrollment, subject_id: str, on: dt.date, at: dt.datetime, link: str | None) -> None:
    """A patient who will not count (not evaluable, no DLT) is replaced: one more slot in the same cohort."""
    level = s.get(DoseLevelState, enrollment.dose_level)
    if level.status in (LevelStatus.OPEN, LevelStatus.FULL):
        level.slots_open += 1
        level.status = LevelStatus.OPEN
        s.add(level)
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.REPLACEMENT_SLOT, subject_id, due_on=on,
                          detail=f"DL{level.level}, cohort {enrollment.cohort}", link=link),
                dedup=f"{subject_id}:replacement", at=at)


def _close_dlt_window(session: Session, protocol: ProtocolDefinition, subject: Subject, at: dt.datetime, link: str | None = None) -> None:
    """Evaluable: received every infusion and completed the window, or had a DLT in it. Not evaluable: replaced."""
    enrollment = session.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).one()
    given = len(actual_infusions(session, protocol, subject))
    enrollment.evaluable = given == len(protocol.nk_infusions.infusions) or bool(enrollment.evaluable)
    enrollment.dlt_window_closed_at = at
    session.add(enrollment)
    if not enrollment.evaluable:
        _open_replacement_slot(session, enrollment, subject.subject_id, _today(protocol, at), at, link)
    subject.status = SubjectStatus.FOLLOW_UP
    session.add(subject)


# -- daily rounds ---------------------------------------------------------------------------------

@dataclass
class RoundsReport:
    today: dt.date
    active_patients: int = 0
    il2_due: list[tuple[str, str]] = field(default_factory=list)
    il2_missed: list[tuple[str, str]] = field(default_factory=list)
    visits_closing: list[tuple[str, str]] = field(default_factory=list)
    overdue: list[tuple[str, str]] = field(default_factory=list)
    notices: int = 0


def daily_rounds(engine: sa.Engine, protocol: ProtocolDefinition, *, clock: Clock, link: str | None = None) -> RoundsReport:
    """IL-2 due today and missed yesterday, visits closing undone, overdue items, and the digest.

    A handful of set-based queries, whatever the number of patients; each notice is written once
    a day however often rounds run.
    """
    now = clock()
    today = _today(protocol, now)
    yesterday = today - dt.timedelta(days=1)
    report = RoundsReport(today=today)
    with UnitOfWork(engine, actor="system:daily-rounds", reason=f"daily rounds {today}", clock=clock) as u:
        s = u.session
        active = select(Subject.id).where(Subject.status.in_(ACTIVE))
        report.active_patients = s.exec(select(func.count()).select_from(Subject).where(Subject.status.in_(ACTIVE))).one()
        base = (select(Subject.subject_id, CalendarEventRow.key, CalendarEventRow.label, CalendarEventRow.local_on)
                .join(Subject, Subject.id == CalendarEventRow.subject_pk)
                .where(CalendarEventRow.subject_pk.in_(active), CalendarEventRow.status == EventStatus.PLANNED))
        il2 = s.exec(base.where(CalendarEventRow.kind == EventKind.IL2_DOSE, CalendarEventRow.local_on.in_([today, yesterday]))).all()
        report.il2_due = [(sid, key) for sid, key, _, on in il2 if on == today]
        report.il2_missed = [(sid, key) for sid, key, _, on in il2 if on == yesterday]
        visits = [EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH]
        report.visits_closing = [(sid, key) for sid, key, _, _ in s.exec(
            base.where(CalendarEventRow.kind.in_(visits), CalendarEventRow.window_end_on == today)).all()]
        report.overdue = [(sid, key) for sid, key, _, _ in s.exec(
            base.where(CalendarEventRow.kind.in_([EventKind.NK_INFUSION, EventKind.PK_SAMPLE, *visits]),
                       CalendarEventRow.window_end_on < today).order_by(Subject.subject_id, CalendarEventRow.key)).all()]
        notices: list[tuple[Notice, str]] = []
        for sid, key in report.il2_due:
            notices.append((Notice(Role.NURSE, NoticeEvent.IL2_DUE, sid, due_on=today, detail=_il2(key), link=link), f"{sid}:{key}:due"))
        for sid, key in report.il2_missed:
            for role in (Role.NURSE, Role.COORDINATOR):
                notices.append((Notice(role, NoticeEvent.IL2_MISSED, sid, due_on=yesterday, detail=_il2(key), link=link), f"{sid}:{key}:missed"))
        for sid, key in report.visits_closing:
            notices.append((Notice(Role.COORDINATOR, NoticeEvent.VISIT_OUT_OF_WINDOW, sid, due_on=today, detail=key.replace("_", " "),
                                   link=link), f"{sid}:{key}:closing"))
        digest = (f"{report.active_patients} active; IL-2 due {len(report.il2_due)}, missed yesterday {len(report.il2_missed)}; "
                  f"visits closing undone {len(report.visits_closing)}; overdue {len(report.overdue)}")
        if report.overdue:
            digest += ": " + ", ".join(f"{sid} {key}" for sid, key in report.overdue[:20]) + (" …" if len(report.overdue) > 20 else "")
        notices.append((Notice(Role.COORDINATOR, NoticeEvent.DAILY_DIGEST, due_on=today, detail=digest, link=link), f"digest:{today}"))
        report.notices = enqueue_many(s, notices, at=u.at)
        u.commit()
    return report


def _il2(key: str) -> str:
    return f"IL-2 dose {int(key.rsplit('-', 1)[1])}"
