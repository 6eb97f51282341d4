"""What the system does when a calendar event falls due: the reminder notices, the close of the
DLT window (evaluable or replaced), and a replacement slot for a patient who will not count.

Plain functions, no Prefect: the treatment-event flow calls `act_on_event`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.queries import calendar_event, given_infusions, require_subject
from models.tables import CalendarEventRow, DoseLevelState, Enrollment, EventStatus, LevelStatus, Subject, SubjectStatus
from protocol.calendar import EventKey, EventKind
from protocol.cohorts import evaluable_at_window_close
from protocol.definition import ProtocolDefinition
from protocol.recording import site_today
from protocol.roles import Role
from tasks.escalation_gate import trial_state
from tasks.notices import Notice, NoticeEvent, enqueue

MOVED_TOLERANCE = dt.timedelta(hours=1)


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


def told_roles(kind: EventKind) -> tuple[Role, ...]:
    """Who a due event's notice goes to (the worklist's "who" for events no one records)."""
    return _ACTIONS[kind][1] if kind in _ACTIONS else ()


def act_on_event(
    engine: sa.Engine, protocol: ProtocolDefinition, *, subject_id: str, event_key: str, clock: Clock, link: str | None = None,
) -> EventAction:
    """Do what a due calendar event asks; if it moved, was done or cancelled, do nothing and say why."""
    with UnitOfWork(engine, actor="system:treatment-event", reason=f"{event_key} due for {subject_id}", clock=clock) as u:
        s = u.session
        subject = require_subject(s, subject_id)
        row = calendar_event(s, subject, event_key)
        idle = _why_not(subject, row, u.at)
        if idle is not None:
            return EventAction(False, idle)
        event, roles = _ACTIONS[row.kind]
        detail, due_on = _detail(protocol, subject, row), _due_on(s, subject, row)
        sent = sum(enqueue(s, Notice(role, event, subject_id, due_on=due_on, detail=detail, link=link),
                           dedup=f"{subject_id}:{row.key}", at=u.at) is not None for role in roles)
        ready = False
        if row.kind is EventKind.DLT_WINDOW_CLOSE:
            close_dlt_window(s, protocol, subject, u.at, link)
            s.flush()
            ready = trial_state(s, protocol).ready
        row.reminder_sent_at = u.at
        s.add(row)
        u.commit()
        return EventAction(True, f"{event.value} sent for {row.label}", sent, ready)


def _why_not(subject: Subject, row: CalendarEventRow, now: dt.datetime) -> str | None:
    """Why this run has nothing to do (off study, done, acted on, moved), or None when it should act."""
    if subject.status is SubjectStatus.OFF_STUDY:
        return f"{subject.subject_id} is off study since {subject.off_study_on}; nothing to do"
    if row.status is not EventStatus.PLANNED:
        return f"{row.label} is already {row.status.value}; nothing to do"
    if row.remind_at is None:
        return f"{row.label} needs no action from this flow"
    if row.reminder_sent_at is not None:
        return f"{row.label} was already acted on at {row.reminder_sent_at:%Y-%m-%d %H:%M} UTC"
    if row.remind_at > now + MOVED_TOLERANCE:
        return f"{row.label} moved: it is now due {row.remind_at:%Y-%m-%d %H:%M} UTC, and a rescheduled run will act then"
    return None


def _detail(protocol: ProtocolDefinition, subject: Subject, row: CalendarEventRow) -> str:
    """The notice's detail line for a due event."""
    if row.kind is EventKind.NK_INFUSION:
        return f"infusion {EventKey.parse(row.key).number}, DL{subject.dose_level}"
    if row.kind is EventKind.PRODUCT_REQUEST:
        return f"{row.label.replace('product request for ', '')}, DL{subject.dose_level}"
    if row.kind in (EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH):
        procedures = next((v.procedures for v in protocol.visits if v.kind == row.kind.value), [])
        return f"{row.label} ({row.window_start_on} to {row.window_end_on}): {', '.join(procedures)}"
    return row.label


def _due_on(session: Session, subject: Subject, row: CalendarEventRow) -> dt.date:
    if row.kind is EventKind.PRODUCT_REQUEST:  # the lab's deadline is the infusion it is for
        return calendar_event(session, subject, EventKey.parse(row.key).for_kind(EventKind.NK_INFUSION)).local_on
    return row.local_on


def open_replacement_slot(s: Session, enrollment: Enrollment, subject_id: str, on: dt.date, at: dt.datetime, link: str | None) -> None:
    """A patient who will not count (not evaluable, no DLT) is replaced: one more slot in the same cohort."""
    level = s.get(DoseLevelState, enrollment.dose_level)
    if level.status in (LevelStatus.OPEN, LevelStatus.FULL):
        level.slots_open += 1
        level.status = LevelStatus.OPEN
        s.add(level)
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.REPLACEMENT_SLOT, subject_id, due_on=on,
                          detail=f"DL{level.level}, cohort {enrollment.cohort}", link=link),
                dedup=f"{subject_id}:replacement", at=at)


def close_dlt_window(session: Session, protocol: ProtocolDefinition, subject: Subject, at: dt.datetime, link: str | None = None) -> None:
    """Evaluable: received every infusion and completed the window, or had a DLT in it. Not evaluable: replaced."""
    enrollment = session.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).one()
    enrollment.evaluable = evaluable_at_window_close(len(given_infusions(session, subject)),
                                                     len(protocol.nk_infusions.infusions), enrollment.evaluable)
    enrollment.dlt_window_closed_at = at
    session.add(enrollment)
    if not enrollment.evaluable:
        open_replacement_slot(session, enrollment, subject.subject_id, site_today(protocol, at), at, link)
    subject.status = SubjectStatus.FOLLOW_UP
    session.add(subject)
