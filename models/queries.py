"""The reads that several services share, written once: this trial's instance, a subject, its
calendar events and given infusions, the active patients and the open slot.

Each takes a session and returns rows or plain values; none writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import Session, func, select

from models.tables import (
    Administration,
    AdministrationKind,
    CalendarEventRow,
    DoseLevelState,
    Enrollment,
    EscalationDecision,
    LevelStatus,
    OffStudyReason,
    ProtocolVersion,
    Signature,
    Subject,
    SubjectStatus,
)
from protocol.calendar import EventKey
from protocol.cohorts import not_dosed_words
from protocol.errors import UserError
from protocol.three_plus_three import Action

ACTIVE = (SubjectStatus.ENROLLED, SubjectStatus.ON_TREATMENT, SubjectStatus.FOLLOW_UP)


def trial_instance(session: Session) -> str:
    """A short random name for this trial database, so its Prefect runs never collide with another's."""
    row = session.exec(select(ProtocolVersion).order_by(ProtocolVersion.id)).first()
    return row.instance_id[:8] if row and row.instance_id else "trial"


def get_subject(session: Session, *, subject_id: str) -> Subject | None:
    return session.exec(select(Subject).where(Subject.subject_id == subject_id)).first()


def require_subject(session: Session, subject_id: str) -> Subject:
    """The subject, or one sentence saying it is not in the trial database."""
    subject = get_subject(session, subject_id=subject_id)
    if subject is None:
        raise UserError(f"subject_id {subject_id} is not in the trial database; enroll the patient first")
    return subject


def active_subject_pks():
    """A subquery of the patients on study (enrolled, on treatment or in follow-up)."""
    return select(Subject.id).where(Subject.status.in_(ACTIVE))


def count_active(session: Session) -> int:
    return session.exec(select(func.count()).select_from(Subject).where(Subject.status.in_(ACTIVE))).one()


def calendar_event(session: Session, subject: Subject, key: str | EventKey) -> CalendarEventRow:
    """One stored calendar event of a subject, or one sentence saying it has none by that key."""
    row = session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                      CalendarEventRow.key == str(key))).first()
    if row is None:
        raise UserError(f"{subject.subject_id} has no calendar event {key}")
    return row


def given_infusions(session: Session, subject: Subject) -> dict[int, dt.datetime]:
    """Infusion number → the UTC instant it was given, for the NK infusions recorded as given."""
    rows = session.exec(select(Administration).where(
        Administration.subject_pk == subject.id, Administration.kind == AdministrationKind.NK_INFUSION, Administration.given)).all()
    return {EventKey.parse(r.event_key).number: r.given_at for r in rows}


def enrolled_at_level(session: Session, level: int) -> int:
    return session.exec(select(func.count()).select_from(Enrollment).where(Enrollment.dose_level == level)).one()


@dataclass
class OpenSlot:
    """The level now enrolling, how many it has taken, and how many it may take."""

    level: DoseLevelState
    taken: int

    @property
    def free(self) -> int:
        return max(self.level.slots_open - self.taken, 0)


def open_slot(session: Session) -> OpenSlot | None:
    """The open dose level and its count, or None when no level is open (between reviews, or stopped)."""
    level = session.exec(select(DoseLevelState).where(DoseLevelState.status == LevelStatus.OPEN)).first()
    return None if level is None else OpenSlot(level, enrolled_at_level(session, level.level))


# -- a signed stop or de-escalation: who will not be dosed (tasks.closure) ---------------------------

NOT_DOSED_REASONS = {OffStudyReason.TRIAL_STOPPED: Action.STOP, OffStudyReason.DOSE_LEVEL_CLOSED: Action.DEESCALATE}


def dosed_subject_pks():
    """A subquery of the patients given at least one NK infusion."""
    return select(Administration.subject_pk).where(Administration.kind == AdministrationKind.NK_INFUSION, Administration.given)


def undosed_on_study(session: Session, levels: tuple[int, ...]) -> list[Subject]:
    """Patients on study at these dose levels who have not been given any NK infusion yet."""
    if not levels:
        return []
    return list(session.exec(select(Subject).where(Subject.status.in_(ACTIVE), Subject.dose_level.in_(list(levels)),
                                                   Subject.id.not_in(dosed_subject_pks())).order_by(Subject.subject_id)).all())


def not_dosed(session: Session) -> dict[int, tuple[str, str]]:
    """Subject pk → (subject ID, status in words) for each patient a signed stop or de-escalation left
    undosed, e.g. "not dosed: trial stopped"."""
    rows = session.exec(select(Subject).where(Subject.status == SubjectStatus.OFF_STUDY,
                                              Subject.off_study_reason.in_(list(NOT_DOSED_REASONS)),
                                              Subject.id.not_in(dosed_subject_pks())).order_by(Subject.subject_id)).all()
    return {s.id: (s.subject_id, not_dosed_words(NOT_DOSED_REASONS[s.off_study_reason], dose_level=s.dose_level)) for s in rows}


def signed_stop(session: Session) -> tuple[EscalationDecision, Signature] | None:
    """The signed decision that stopped the trial, with its signature, or None while the trial runs."""
    return session.exec(select(EscalationDecision, Signature).join(Signature, Signature.decision_id == EscalationDecision.id)
                        .where(EscalationDecision.chosen_action == Action.STOP)).first()
