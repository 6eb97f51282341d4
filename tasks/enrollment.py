"""Enrolling a screened patient: screen, then take the open cohort's next slot, or the waitlist.

Plain functions, no Prefect: the enroll-patient flow wraps `enroll`, and the CLI calls it
directly. One unit of work per attempt: load, decide (`protocol.eligibility`,
`protocol.recording`), store, notify; a concurrent enrollment that took the slot first makes the
attempt roll back and run again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Session, select

from models.clock import Clock
from models.crud import register_protocol, store_screening
from models.db import UnitOfWork
from models.queries import OpenSlot, calendar_event, get_subject, open_slot
from models.tables import Enrollment, LevelStatus, Subject, SubjectStatus, WaitlistEntry
from protocol import recording as rules
from protocol.calendar import EventKey, compute_calendar
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.eligibility import ScreeningRecord, ScreeningResult, Verdict, screen
from protocol.errors import UserError
from protocol.recording import site_instant, site_local, site_today
from protocol.roles import Act, Role
from tasks.closure import refuse_enrollment_after_stop
from tasks.escalation_gate import assert_level_approved
from tasks.notices import Notice, NoticeEvent, enqueue
from tasks.recording import actual_infusions, refresh_calendar
from tasks.staff import authorize, recorded_as

ENROLL_RETRIES = 5


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
    if result.verdict is Verdict.ELIGIBLE:
        rules.check_planned_day0(result, day0.date(), site_today(protocol, now))
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
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"enrollment of {sid}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.ENROLL, at=u.at)
        refuse_enrollment_after_stop(s, protocol, sid)
        register_protocol(s, protocol=protocol, at=u.at)
        subject = _screened_subject(s, sid, u.at)
        store_screening(s, subject=subject, result=result, at=u.at)
        if result.verdict is not Verdict.ELIGIBLE:
            outcome = _screen_failed(s, subject, result, u.at, link)
        elif (slot := open_slot(s)) is None or slot.free == 0:
            outcome = _waitlist(s, protocol, subject, result, day0, u.at, link)
        else:
            outcome = _allocate(s, protocol, subject, result, slot, day0, u.at, link)
        u.commit()
        return outcome


def _screened_subject(s: Session, sid: str, at: dt.datetime) -> Subject:
    """The subject row to screen: new, or one who failed screening or waits for a slot."""
    subject = get_subject(s, subject_id=sid)
    if subject is not None and subject.status not in (SubjectStatus.SCREEN_FAILED, SubjectStatus.WAITLISTED):
        raise UserError(f"subject_id {sid} is already {subject.status.value.replace('_', ' ')}; it cannot be enrolled again")
    if subject is None:
        subject = Subject(subject_id=sid, created_at=at)
        s.add(subject)
        s.flush()
    return subject


def _screen_failed(s: Session, subject: Subject, result: ScreeningResult, at: dt.datetime, link: str | None) -> EnrollmentOutcome:
    sid = subject.subject_id
    subject.status = SubjectStatus.SCREEN_FAILED
    s.add(subject)
    enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.NOT_ELIGIBLE, sid, link=link), dedup=f"{sid}:screen:{at.isoformat()}", at=at)
    return EnrollmentOutcome(EnrollmentStatus.NOT_ELIGIBLE, sid, result)


def _waitlist(s: Session, protocol: ProtocolDefinition, subject: Subject, result: ScreeningResult, day0: dt.datetime,
              at: dt.datetime, link: str | None) -> EnrollmentOutcome:
    sid = subject.subject_id
    subject.status = SubjectStatus.WAITLISTED
    subject.planned_day0_at = site_instant(protocol, day0, "planned_day0")
    s.add(subject)
    if s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)).first() is None:
        s.add(WaitlistEntry(subject_pk=subject.id, added_at=at))
    enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.WAITLISTED, sid, link=link), dedup=f"{sid}:waitlisted", at=at)
    return EnrollmentOutcome(EnrollmentStatus.WAITLISTED, sid, result)


def _allocate(s: Session, protocol: ProtocolDefinition, subject: Subject, result: ScreeningResult, open_: OpenSlot,
              day0: dt.datetime, at: dt.datetime, link: str | None) -> EnrollmentOutcome:
    """Take the open level's next slot, in its first cohort with room; start the calendar and ask for product."""
    sid, level = subject.subject_id, open_.level
    assert_level_approved(s, level.level, f"enrollment of {sid}")
    slot = open_.taken + 1
    counted = s.exec(select(Enrollment.cohort, Enrollment.evaluable).where(Enrollment.dose_level == level.level)).all()
    cohort = rules.cohort_with_room(counted, protocol.escalation.cohort_size.value)
    _check_sentinel_stagger(s, protocol, level.level, cohort, day0)
    s.add(Enrollment(subject_pk=subject.id, dose_level=level.level, cohort=cohort, slot=slot, enrolled_at=at))
    for waiting in s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)):
        s.delete(waiting)  # a waitlisted patient re-screened into a slot leaves the waitlist
    if slot >= level.slots_open:
        level.status = LevelStatus.FULL
        s.add(level)
    subject.status, subject.dose_level = SubjectStatus.ENROLLED, level.level
    subject.planned_day0_at = site_instant(protocol, day0, "planned_day0")
    s.add(subject)
    s.flush()
    cal = refresh_calendar(s, protocol, subject)
    _announce(s, subject, cal, cohort, day0.date(), at, link)
    return EnrollmentOutcome(EnrollmentStatus.ENROLLED, sid, result, level.level, cohort, slot)


def _announce(s: Session, subject: Subject, cal, cohort: int, day0_on: dt.date, at: dt.datetime, link: str | None) -> None:
    """Tell the coordinator, and ask the cell lab for infusion 1's product now (its request is due at enrollment)."""
    sid, level = subject.subject_id, subject.dose_level
    enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.ENROLLED, sid, due_on=day0_on,
                      detail=f"DL{level}, cohort {cohort}, day 0", link=link), dedup=f"{sid}:enrolled", at=at)
    request = cal.event(str(EventKey.product_request(1)))
    enqueue(s, Notice(Role.CELL_LAB, NoticeEvent.PRODUCT_REQUEST, sid, due_on=day0_on,
                      detail=f"infusion 1, DL{level} ({cal.cells_per_infusion:.1e} cells)", link=link),
            dedup=f"{sid}:product_request-1", at=at)
    row = calendar_event(s, subject, request.key)
    row.reminder_sent_at = at
    s.add(row)


def _check_sentinel_stagger(s: Session, protocol: ProtocolDefinition, level: int, cohort: int, day0: dt.datetime) -> None:
    """Load the cohort's sentinel (its first patient) and its day 0, and apply the stagger rule."""
    days = protocol.escalation.sentinel_stagger_days.value
    if days <= 0:
        return
    first = s.exec(select(Subject).join(Enrollment, Enrollment.subject_pk == Subject.id)
                   .where(Enrollment.dose_level == level, Enrollment.cohort == cohort).order_by(Enrollment.id)).first()
    sentinel_day0 = None if first is None else (
        actual_infusions(s, protocol, first).get(1) or to_local(protocol.timezone, first.planned_day0_at)).date()
    rules.check_sentinel_stagger(day0.date(), stagger_days=days, sentinel_id=first and first.subject_id, sentinel_day0_on=sentinel_day0)
