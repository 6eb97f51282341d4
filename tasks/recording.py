"""What staff record about a patient: NK infusions, IL-2 doses, visits, lab results, off study;
and the patient's calendar, recomputed and stored.

Plain functions, no Prefect: flows wrap them, and the CLI calls them directly. Each public
function is one unit of work: load, decide (the rules are in `protocol.recording`), store, notify,
all in one transaction or nothing. Bad input raises UserError with one sentence.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select

from models.clock import Clock
from models.crud import store_calendar
from models.db import UnitOfWork
from models.queries import ACTIVE, calendar_event, get_subject, given_infusions, require_subject
from models.tables import (
    Administration,
    AdministrationKind,
    CalendarEventRow,
    Enrollment,
    EventStatus,
    LabKind,
    LabResult,
    OffStudyReason,
    ScreeningRecordRow,
    Subject,
    SubjectStatus,
    WaitlistEntry,
)
from protocol import plausible
from protocol import recording as rules
from protocol.calendar import Calendar, EventKey, EventKind, compute_calendar
from protocol.dates import local_instant, to_local
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.recording import MrdStatus, Response, VisitKind, site_instant, site_local, site_text, site_today
from protocol.roles import Act, Role
from tasks.due_events import open_replacement_slot
from tasks.escalation_gate import assert_level_approved
from tasks.notices import Notice, NoticeEvent, cancel_pending, enqueue
from tasks.staff import authorize, recorded_as

# -- the calendar ---------------------------------------------------------------------------------

def actual_infusions(session: Session, protocol: ProtocolDefinition, subject: Subject) -> dict[int, dt.datetime]:
    """Infusion number → site-local time it was given."""
    return {n: to_local(protocol.timezone, at) for n, at in given_infusions(session, subject).items()}


def refresh_calendar(session: Session, protocol: ProtocolDefinition, subject: Subject) -> Calendar:
    """Recompute the subject's calendar from the plan and the actual infusions, and store it."""
    assert_level_approved(session, subject.dose_level, f"calendar of {subject.subject_id}")
    cal = compute_calendar(
        protocol, dose_level=subject.dose_level, day0=to_local(protocol.timezone, subject.planned_day0_at),
        actual_infusions=actual_infusions(session, protocol, subject),
    )
    store_calendar(session, subject=subject, calendar=cal, protocol=protocol)
    return cal


def store_patient_calendar(engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, clock: Clock) -> str:
    """Recompute and store an enrolled patient's calendar; returns its anchor version."""
    with UnitOfWork(engine, actor="system:patient-treatment", reason=f"calendar of {subject_id} recomputed", clock=clock) as u:
        subject = get_subject(u.session, subject_id=subject_id)
        if subject is None or subject.dose_level is None or subject.planned_day0_at is None:
            raise ValueError(f"subject_id {subject_id} is not enrolled; nothing to schedule")
        cal = refresh_calendar(u.session, protocol, subject)
        u.commit()
    return cal.anchor_version


def _on_study(session: Session, subject_id: str) -> Subject:
    """The subject, if entries can be recorded for them now."""
    subject = require_subject(session, subject_id)
    if subject.status is SubjectStatus.OFF_STUDY:
        raise UserError(f"subject_id {subject.subject_id} is off study since {subject.off_study_on}; nothing more can be recorded")
    if subject.status not in ACTIVE:
        raise UserError(f"subject_id {subject.subject_id} is {subject.status.value.replace('_', ' ')}, not enrolled; "
                        "nothing can be recorded yet")
    return subject


def _administration(session: Session, subject: Subject, key: EventKey) -> Administration | None:
    return session.exec(select(Administration).where(Administration.subject_pk == subject.id,
                                                     Administration.event_key == str(key))).first()


def _earliest_day0(session: Session, subject: Subject) -> dt.date | None:
    row = session.exec(select(ScreeningRecordRow).where(ScreeningRecordRow.subject_pk == subject.id)
                       .order_by(ScreeningRecordRow.id.desc())).first()
    return row.earliest_day0_on if row else None


# -- NK infusion ----------------------------------------------------------------------------------

def record_infusion(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, infusion_number: int, given_at: dt.datetime,
    dose_level: int, cells_infused: float, product_lot: str, deviation_reason: str | None = None, actor: str, clock: Clock,
    link: str | None = None,
) -> Calendar:
    """Record an NK infusion given; re-anchors the calendar (a late infusion 1 moves everything)."""
    given_local = site_local(protocol, given_at)
    rules.check_infusion_entry(protocol, infusion_number=infusion_number, product_lot=product_lot, cells_infused=cells_infused)
    key = EventKey.nk_infusion(infusion_number)
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"NK infusion {infusion_number} given to {subject_id}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.RECORD_INFUSION, at=u.at)
        subject = _on_study(s, subject_id)
        reason = _check_infusion(s, protocol, subject, key, given_local, dose_level, cells_infused, deviation_reason, u.at)
        given_utc = site_instant(protocol, given_local, "given_at")
        s.add(Administration(subject_pk=subject.id, kind=AdministrationKind.NK_INFUSION, event_key=str(key), given=True,
                             given_at=given_utc, dose_level=dose_level, cells_infused=cells_infused, product_lot=product_lot.strip(),
                             deviation_reason=reason, recorded_at=u.at))
        s.flush()
        cal = refresh_calendar(s, protocol, subject)
        _mark(s, calendar_event(s, subject, key), EventStatus.DONE, given_utc, reason)
        subject.status = SubjectStatus.ON_TREATMENT
        s.add(subject)
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.INFUSION_RECORDED, subject_id, due_on=given_local.date(),
                          detail=f"infusion {infusion_number}", link=link), dedup=f"{subject_id}:{key}:recorded", at=u.at)
        u.commit()
        return cal


def _check_infusion(s: Session, protocol: ProtocolDefinition, subject: Subject, key: EventKey, given_local: dt.datetime,
                    dose_level: int, cells_infused: float, deviation_reason: str | None, now: dt.datetime) -> str | None:
    """Every rule an NK infusion keeps, in the order the user meets them; returns the deviation reason to store."""
    sid, n = subject.subject_id, key.number
    rules.check_assigned_level(sid, dose_level, subject.dose_level)
    assert_level_approved(s, dose_level, f"NK infusion for {sid}")
    _not_future(protocol, "given_at", given_local, now)
    existing = _administration(s, subject, key)
    if existing is not None:
        raise UserError(f"NK infusion {n} for {sid} is already recorded (given at {site_text(protocol, existing.given_at)}); "
                        "it cannot be entered twice")
    rules.check_infusion_order(sid, n, given_infusions(s, subject))
    rules.check_dose(protocol, dose_level=subject.dose_level, cells_infused=cells_infused, deviation_reason=deviation_reason)
    if n == 1:
        rules.check_not_before_earliest_day0(sid, given_local.date(), _earliest_day0(s, subject))
        return deviation_reason
    row = calendar_event(s, subject, key)  # its window was re-anchored to the actual infusion 1 when that was recorded
    return rules.in_window(f"NK infusion {n}", given_local.date(), row.window_start_on, row.window_end_on, deviation_reason)


def _not_future(protocol: ProtocolDefinition, what: str, local: dt.datetime, now: dt.datetime) -> None:
    """A time given is not after now; the refusal names both in site time, with the zone."""
    if local > to_local(protocol.timezone, now):
        raise UserError(f"{what} {site_text(protocol, local)} is in the future (it is now {site_text(protocol, now)}); "
                        "record what was done, when it was done")


def _mark(s: Session, row: CalendarEventRow, status: EventStatus, at: dt.datetime | None, reason: str | None) -> None:
    row.status, row.actual_at, row.deviation_reason = status, at, reason
    s.add(row)


# -- IL-2 -----------------------------------------------------------------------------------------

def record_il2_dose(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, dose_number: int, given: bool,
    given_at: dt.datetime | None = None, missed_reason: str | None = None, deviation_reason: str | None = None,
    actor: str, clock: Clock,
) -> None:
    """Record one IL-2 dose as given (with its time) or missed (with a reason)."""
    rules.check_il2_entry(protocol, dose_number=dose_number, given=given, given_at=given_at, missed_reason=missed_reason)
    key = EventKey.il2_dose(dose_number)
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"IL-2 dose {dose_number} {'given to' if given else 'missed by'} {subject_id}",
                    clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.RECORD_IL2, at=u.at)
        subject = _on_study(s, subject_id)
        rules.check_il2_after_infusion_1(subject_id, dose_number, given_infusions(s, subject))
        row = calendar_event(s, subject, key)
        if _administration(s, subject, key):
            raise UserError(f"IL-2 dose {dose_number} for {subject_id} is already recorded; it cannot be entered twice")
        given_utc, reason = None, deviation_reason
        if not given:
            plausible.missed_not_before_due(f"IL-2 dose {dose_number} for {subject_id}", row.local_on, site_today(protocol, u.at))
        if given:
            local = site_local(protocol, given_at)
            _not_future(protocol, "given_at", local, u.at)
            reason = rules.in_window(f"IL-2 dose {dose_number}", local.date(), row.window_start_on, row.window_end_on, deviation_reason)
            given_utc = site_instant(protocol, local, "given_at")
        s.add(Administration(subject_pk=subject.id, kind=AdministrationKind.IL2_DOSE, event_key=str(key), given=given,
                             given_at=given_utc, dose_miu=protocol.il2.dose_miu.value if given else None,
                             missed_reason=None if given else missed_reason.strip(), deviation_reason=reason, recorded_at=u.at))
        _mark(s, row, EventStatus.DONE if given else EventStatus.MISSED, given_utc, reason)
        u.commit()


# -- visits ---------------------------------------------------------------------------------------

def record_visit(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, visit: VisitKind, done_on: dt.date,
    deviation_reason: str | None = None, actor: str, clock: Clock,
) -> None:
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"{visit.value} done for {subject_id}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.RECORD_VISIT_OR_LAB, at=u.at)
        subject = _on_study(s, subject_id)
        rules.no_future("done_on", done_on, site_today(protocol, u.at))
        row = calendar_event(s, subject, visit.value)
        if row.status is EventStatus.DONE:
            raise UserError(f"{row.label} for {subject_id} is already recorded on {to_local(protocol.timezone, row.actual_at).date()}")
        reason = rules.in_window(row.label, done_on, row.window_start_on, row.window_end_on, deviation_reason)
        _mark(s, row, EventStatus.DONE, local_instant(protocol.timezone, done_on, protocol.site.event_time, what="done_on")[0], reason)
        if visit is VisitKind.THREE_MONTH:
            subject.status = SubjectStatus.COMPLETED
            s.add(subject)
        u.commit()


# -- lab results ----------------------------------------------------------------------------------

class LabResultInput(BaseModel):
    """A lab or PK result. Donor NK counts name their PK sample day; MRD and response name their visit."""

    model_config = ConfigDict(extra="forbid")
    subject_id: str = Field(description="e.g. S-003")
    kind: LabKind
    sampled_on: dt.date
    pk_day: int | None = Field(default=None, description="donor_nk_count: the protocol day of the PK sample, e.g. 7")
    visit: VisitKind = Field(default=VisitKind.THREE_MONTH, description="mrd_mfc and response: the visit it belongs to")
    donor_nk_cells_per_ul: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False,
                                                description="donor_nk_count: donor NK cells per µL (at most 10^6: "
                                                            "more than whole blood's leukocytes, a typing error)")
    mrd: MrdStatus | None = None
    mrd_percent: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    response: Response | None = None

    def stored_value(self) -> tuple[float | None, str | None, str | None]:
        """(value, unit, category) as stored in LabResult."""
        if self.kind is LabKind.DONOR_NK_COUNT:
            return self.donor_nk_cells_per_ul, "cells/uL", None
        if self.kind is LabKind.MRD_MFC:
            return self.mrd_percent, "%" if self.mrd_percent is not None else None, self.mrd.value
        return None, None, self.response.value


def record_lab_result(engine: sa.Engine, protocol: ProtocolDefinition, *, result: LabResultInput, actor: str, clock: Clock) -> None:
    r = result
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"{r.kind.value} result for {r.subject_id}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.RECORD_VISIT_OR_LAB, at=u.at)
        subject = _on_study(s, r.subject_id)
        rules.no_future("sampled_on", r.sampled_on, site_today(protocol, u.at))
        rules.check_lab_fields(r.kind.value, pk_day=r.pk_day, donor_nk_cells_per_ul=r.donor_nk_cells_per_ul, mrd=r.mrd,
                               response=r.response)
        event = _pk_sample(s, subject, r.pk_day) if r.kind is LabKind.DONOR_NK_COUNT else calendar_event(s, subject, r.visit.value)
        if s.exec(select(LabResult).where(LabResult.subject_pk == subject.id, LabResult.kind == r.kind,
                                          LabResult.event_key == event.key)).first():
            raise UserError(f"{r.kind.value} for {r.subject_id} at {event.label} is already recorded; it cannot be entered twice")
        value, unit, category = r.stored_value()
        s.add(LabResult(subject_pk=subject.id, kind=r.kind, event_key=event.key, sampled_on=r.sampled_on, value=value, unit=unit,
                        category=category, recorded_at=u.at))
        if event.kind is EventKind.PK_SAMPLE and event.status is EventStatus.PLANNED:
            sampled_at = local_instant(protocol.timezone, r.sampled_on, protocol.site.event_time, what="sampled_on")[0]
            _mark(s, event, EventStatus.DONE, sampled_at, event.deviation_reason)
        u.commit()


def _pk_sample(s: Session, subject: Subject, pk_day: int) -> CalendarEventRow:
    samples = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                    CalendarEventRow.kind == EventKind.PK_SAMPLE)).all()
    rules.check_pk_day(subject.subject_id, pk_day, [x.protocol_day for x in samples])
    return next(x for x in samples if x.protocol_day == pk_day)


# -- off study ------------------------------------------------------------------------------------

def take_off_study(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, reason: OffStudyReason, effective_on: dt.date,
    actor: str, clock: Clock, link: str | None = None,
) -> int:
    """Take a subject off study: cancel every planned event and pending notice, keep every record.

    Returns how many calendar events were cancelled.
    """
    if reason.set_by_a_signed_decision:
        raise UserError(f"reason {reason.value} is set only by a signed stop or de-escalation; choose the reason the patient leaves")
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"{subject_id} off study: {reason.value}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.OFF_STUDY, at=u.at)
        subject = require_subject(s, subject_id)
        if subject.status is SubjectStatus.OFF_STUDY:
            raise UserError(f"subject_id {subject_id} is already off study since {subject.off_study_on}")
        plausible.off_study_date(effective_on, entered_on=_entered_on(s, protocol, subject), today=site_today(protocol, u.at))
        cancelled = _end_participation(s, subject, effective_on, u.at, link)
        subject.status, subject.off_study_reason, subject.off_study_on = SubjectStatus.OFF_STUDY, reason, effective_on
        s.add(subject)
        s.flush()
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.OFF_STUDY, subject_id, due_on=effective_on, link=link),
                dedup=f"{subject_id}:off_study", at=u.at)
        u.commit()
        return cancelled


def _entered_on(s: Session, protocol: ProtocolDefinition, subject: Subject) -> dt.date:
    """The site-local date the patient entered the study: enrollment, or screening for one never enrolled."""
    enrollment = s.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).first()
    return to_local(protocol.timezone, enrollment.enrolled_at if enrollment else subject.created_at).date()


def _end_participation(s: Session, subject: Subject, effective_on: dt.date, at: dt.datetime, link: str | None) -> int:
    """Cancel the planned events and pending notices, replace a patient who will not count, leave the waitlist."""
    planned = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                    CalendarEventRow.status == EventStatus.PLANNED)).all()
    for row in planned:
        row.status = EventStatus.CANCELLED
        s.add(row)
    cancel_pending(s, subject_id=subject.subject_id)
    enrollment = s.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).first()
    if enrollment is not None and enrollment.dlt_window_closed_at is None and not enrollment.evaluable:
        enrollment.evaluable = False  # left before the DLT window closed without a DLT: replaced
        s.add(enrollment)
        open_replacement_slot(s, enrollment, subject.subject_id, effective_on, at, link)
    waiting = s.exec(select(WaitlistEntry).where(WaitlistEntry.subject_pk == subject.id)).first()
    if waiting is not None:
        s.delete(waiting)
    return len(planned)
