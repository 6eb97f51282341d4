"""CRUD on the trial database. Keyword-only arguments, a unit of work's session, no commits here."""

from __future__ import annotations

import hashlib
import uuid

from sqlmodel import Session, select

from models.queries import get_subject
from models.tables import CalendarEventRow, DoseLevelState, LevelStatus, ProtocolVersion, ScreeningRecordRow, Subject
from protocol.calendar import Calendar
from protocol.definition import ProtocolDefinition
from protocol.eligibility import ScreeningResult
from protocol.reminders import reminder_for


def register_protocol(session: Session, *, protocol: ProtocolDefinition, at) -> ProtocolVersion:
    """Record the protocol version in force and seed the dose levels; a repeat call changes nothing.

    The same version with different content is refused: an amendment needs a new version.
    """
    content = protocol.model_dump_json()
    digest = hashlib.sha256(content.encode()).hexdigest()
    row = session.exec(select(ProtocolVersion).where(ProtocolVersion.version == protocol.version)).first()
    if row is not None:
        if row.sha256 != digest:
            raise ValueError(
                f"protocol version {protocol.version} is already recorded with different content; "
                "an amendment must carry a new protocol.version"
            )
        return row
    row = ProtocolVersion(trial_id=protocol.protocol.trial_id, version=protocol.version, sha256=digest, content_json=content, loaded_at=at,
                          instance_id=uuid.uuid4().hex)
    session.add(row)
    for lvl in protocol.dose_levels.levels:
        if session.get(DoseLevelState, lvl.level) is None:
            session.add(DoseLevelState(level=lvl.level, cells_per_infusion=lvl.cells_per_infusion,
                                       status=LevelStatus.OPEN if lvl.level == 1 else LevelStatus.PENDING,
                                       slots_open=protocol.escalation.cohort_size.value if lvl.level == 1 else 0,
                                       opened_at=at if lvl.level == 1 else None))
    return row


def create_subject(session: Session, *, subject_id: str, at) -> Subject:
    if get_subject(session, subject_id=subject_id) is not None:
        raise ValueError(f"subject_id {subject_id} already exists")
    subject = Subject(subject_id=subject_id, created_at=at)
    session.add(subject)
    session.flush()
    return subject


def store_screening(session: Session, *, subject: Subject, result: ScreeningResult, at) -> ScreeningRecordRow:
    row = ScreeningRecordRow(
        subject_pk=subject.id, protocol_version=result.protocol_version, verdict=result.verdict.value,
        earliest_day0_on=result.earliest_day0_on, result_json=result.model_dump_json(), screened_at=at,
    )
    session.add(row)
    return row


def store_calendar(session: Session, *, subject: Subject, calendar: Calendar, protocol: ProtocolDefinition) -> list[CalendarEventRow]:
    """Upsert the computed calendar by event key, with each event's reminder instant.

    Events already done, missed or cancelled keep their status.
    """
    existing = {r.key: r for r in session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id))}
    rows = []
    for e in calendar.events:
        row = existing.get(e.key) or CalendarEventRow(subject_pk=subject.id, key=e.key, kind=e.kind)
        row.label, row.protocol_day, row.local_on, row.due_at = e.label, e.protocol_day, e.local_date, e.at_utc
        row.window_start_on, row.window_end_on, row.anchor_version = e.window_start, e.window_end, calendar.anchor_version
        reminder = reminder_for(protocol, e)
        row.remind_at = reminder.trigger_at if reminder else None
        session.add(row)
        rows.append(row)
    return rows
