"""The trial database: the system of record. Prefect holds orchestration state, not clinical data.

One table class per entity, each with a one-line comment. Statuses, actions, categories and
roles are enum columns (stored as their values). Instants are UTC (`*_at`), dates are local
calendar dates (`*_on`).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.enums import (
    Adjudication,
    AdministrationKind,
    DecisionStatus,
    EventStatus,
    LabKind,
    LevelStatus,
    OffStudyReason,
    OutboxStatus,
    SigningRefusal,
    SubjectStatus,
)
from models.types import UTCDateTime, enum_type
from protocol.calendar import EventKind
from protocol.dlt import AeCategory, Attribution, DltScreen
from protocol.eligibility import Verdict
from protocol.roles import Role
from protocol.three_plus_three import Action


def _at(**kw):
    return Field(sa_type=UTCDateTime, **kw)


# Protocol version: the exact protocol file each record was made under.
class ProtocolVersion(SQLModel, table=True):
    __tablename__ = "protocol_version"
    id: int | None = Field(default=None, primary_key=True)
    trial_id: str = Field(max_length=32)
    version: str = Field(max_length=32, unique=True)
    sha256: str = Field(max_length=64)
    content_json: str
    loaded_at: dt.datetime = _at()
    instance_id: str = Field(default="", max_length=32, sa_column_kwargs={"server_default": ""})  # names this trial database to Prefect


# Dose level / cohort state: which level is open for enrollment.
class DoseLevelState(SQLModel, table=True):
    __tablename__ = "dose_level_state"
    __table_args__ = (  # two dose levels never enroll at the same time
        sa.Index("uq_one_open_level", "status", unique=True, sqlite_where=sa.text("status = 'open'"),
                 postgresql_where=sa.text("status = 'open'")),
    )
    level: int = Field(primary_key=True)
    cells_per_infusion: float
    status: LevelStatus = Field(sa_type=enum_type(LevelStatus), default=LevelStatus.PENDING)
    slots_open: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # slots authorized now: 3, then 6 on expansion
    opened_at: dt.datetime | None = _at(default=None)
    closed_at: dt.datetime | None = _at(default=None)


# Subject: pseudonymous, a subject ID and never a name.
class Subject(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    subject_id: str = Field(max_length=32, unique=True, index=True)
    status: SubjectStatus = Field(sa_type=enum_type(SubjectStatus), default=SubjectStatus.SCREENING)
    dose_level: int | None = Field(default=None, foreign_key="dose_level_state.level")
    planned_day0_at: dt.datetime | None = _at(default=None)
    off_study_reason: OffStudyReason | None = Field(default=None, sa_type=enum_type(OffStudyReason, length=200))
    off_study_on: dt.date | None = None
    created_at: dt.datetime = _at()


# Screening result: the per-criterion report kept as it was computed.
class ScreeningRecordRow(SQLModel, table=True):
    __tablename__ = "screening_result"
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", index=True)
    protocol_version: str = Field(max_length=32)
    verdict: Verdict = Field(sa_type=enum_type(Verdict, 16))
    earliest_day0_on: dt.date | None = None
    result_json: str
    screened_at: dt.datetime = _at()


# Enrollment and slot: one row per enrolled subject; the unique slot is the real guard against over-filling.
class Enrollment(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("dose_level", "slot", name="uq_enrollment_level_slot"),)
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", unique=True)
    dose_level: int = Field(foreign_key="dose_level_state.level")
    cohort: int = Field(ge=1)
    slot: int = Field(ge=1)
    enrolled_at: dt.datetime = _at()
    evaluable: bool | None = None  # set when the DLT window closes or the patient leaves the study
    dlt_window_closed_at: dt.datetime | None = _at(default=None)


# Waitlist: eligible patients waiting for a slot, first come first served.
class WaitlistEntry(SQLModel, table=True):
    __tablename__ = "waitlist_entry"
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", unique=True)
    added_at: dt.datetime = _at()
    offered_at: dt.datetime | None = _at(default=None)


# Calendar event: the stored calendar, planned and actual; Prefect runs are projected from these rows.
class CalendarEventRow(SQLModel, table=True):
    __tablename__ = "calendar_event"
    __table_args__ = (sa.UniqueConstraint("subject_pk", "key", name="uq_calendar_event_subject_key"),)
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", index=True)
    key: str = Field(max_length=48)
    kind: EventKind = Field(sa_type=enum_type(EventKind))
    label: str = Field(max_length=120)
    protocol_day: int
    local_on: dt.date
    due_at: dt.datetime = _at()
    window_start_on: dt.date
    window_end_on: dt.date
    status: EventStatus = Field(sa_type=enum_type(EventStatus), default=EventStatus.PLANNED)
    actual_at: dt.datetime | None = _at(default=None)
    anchor_version: str = Field(max_length=16)
    flow_run_id: str | None = Field(default=None, max_length=36)
    remind_at: dt.datetime | None = _at(default=None)  # when treatment-event should act; None: nothing to do
    reminder_sent_at: dt.datetime | None = _at(default=None)  # when treatment-event acted on it
    deviation_reason: str | None = Field(default=None, max_length=200)


# Administration: an NK infusion (cells, lot) or an IL-2 dose (given or missed).
class Administration(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("subject_pk", "event_key", name="uq_administration_subject_event"),)
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", index=True)
    kind: AdministrationKind = Field(sa_type=enum_type(AdministrationKind))
    event_key: str = Field(max_length=48)
    given: bool
    given_at: dt.datetime | None = _at(default=None)
    dose_level: int | None = None
    cells_infused: float | None = Field(default=None, gt=0)
    product_lot: str | None = Field(default=None, max_length=64)
    dose_miu: float | None = Field(default=None, gt=0)
    missed_reason: str | None = Field(default=None, max_length=200)
    deviation_reason: str | None = Field(default=None, max_length=200)
    recorded_at: dt.datetime = _at()


# Adverse event: graded, attributed, screened against the DLT rules, adjudicated by the investigator.
class AdverseEvent(SQLModel, table=True):
    __tablename__ = "adverse_event"
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", index=True)
    term: str = Field(max_length=120)
    category: AeCategory = Field(sa_type=enum_type(AeCategory, 32))
    grade: int = Field(ge=1, le=5)
    onset_on: dt.date
    attribution: Attribution = Field(sa_type=enum_type(Attribution, 16))
    serious: bool = False
    resolved_on: dt.date | None = None
    candidate_dlt: bool = False
    adjudication: Adjudication = Field(sa_type=enum_type(Adjudication), default=Adjudication.NOT_CANDIDATE)
    adjudication_reason: str | None = Field(default=None, max_length=200)
    reported_at: dt.datetime = _at()
    dlt_screen: DltScreen | None = Field(default=None, sa_type=enum_type(DltScreen, 24))
    dlt_rule: str | None = Field(default=None, max_length=200)  # the rule the screen applied, in words
    resolved_to_grade_1_within_72h: bool | None = None
    duration_days: int | None = None
    caused_by_leukaemia: bool | None = None
    caused_by_progression: bool | None = None
    sae_reported_at: dt.datetime | None = _at(default=None)  # when the expedited SAE report was filed
    adjudicated_by: str | None = Field(default=None, max_length=64)
    adjudicated_at: dt.datetime | None = _at(default=None)


# Escalation decision: the rule's recommendation and the PI's choice, replayable from `history`.
class EscalationDecision(SQLModel, table=True):
    __tablename__ = "escalation_decision"
    id: int | None = Field(default=None, primary_key=True)
    from_level: int
    history: str = Field(max_length=200)
    recommended_action: Action = Field(sa_type=enum_type(Action, 16))
    recommended_level: int | None = None
    chosen_action: Action | None = Field(default=None, sa_type=enum_type(Action, 16))
    chosen_level: int | None = None
    mtd: int | None = None
    rationale: str | None = Field(default=None, max_length=500)
    created_at: dt.datetime = _at()
    decided_at: dt.datetime | None = _at(default=None)
    status: DecisionStatus = Field(default=DecisionStatus.WAITING, sa_type=enum_type(DecisionStatus, 16),
                                   sa_column_kwargs={"server_default": "waiting"})
    early_stop: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    basis_at: dt.datetime | None = _at(default=None)  # the last counted DLT window closed (or the early stop), UTC
    review_flow_run_id: str | None = Field(default=None, max_length=36)


# Signature: 21 CFR 11.50 manifestation, bound to exactly one decision.
class Signature(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    decision_id: int = Field(foreign_key="escalation_decision.id", unique=True)
    signer_id: str = Field(max_length=64)
    printed_name: str = Field(max_length=120)
    meaning: str = Field(max_length=120)
    decision_digest: str = Field(max_length=64)
    signed_at: dt.datetime = _at()


# Signing code: one-time, expiring, bound to one signer and one signed act (a decision or an AE's
# adjudication); only a salted slow hash is kept.
class SigningCode(SQLModel, table=True):
    __tablename__ = "signing_code"
    __table_args__ = (sa.CheckConstraint("(decision_id IS NULL) <> (ae_id IS NULL)", name="ck_signing_code_one_act"),)
    id: int | None = Field(default=None, primary_key=True)
    decision_id: int | None = Field(default=None, foreign_key="escalation_decision.id", index=True)
    ae_id: int | None = Field(default=None, foreign_key="adverse_event.id", index=True)
    signer_id: str = Field(default="", max_length=32, index=True)
    salt: str = Field(default="", max_length=32)
    code_hash: str = Field(max_length=64)
    issued_at: dt.datetime = _at()
    expires_at: dt.datetime = _at()
    used_at: dt.datetime | None = _at(default=None)


# Signature attempt: every try to sign (a decision or an AE's adjudication), accepted or refused, and why.
class SignatureAttempt(SQLModel, table=True):
    __tablename__ = "signature_attempt"
    __table_args__ = (sa.UniqueConstraint("decision_id", "attempt_key", name="uq_signature_attempt_key"),
                      sa.UniqueConstraint("ae_id", "attempt_key", name="uq_signature_attempt_ae_key"))
    id: int | None = Field(default=None, primary_key=True)
    decision_id: int | None = Field(default=None, foreign_key="escalation_decision.id", index=True)
    ae_id: int | None = Field(default=None, foreign_key="adverse_event.id", index=True)
    attempt_key: str = Field(max_length=64)
    signer_id: str = Field(max_length=64)
    accepted: bool
    refusal: SigningRefusal | None = Field(default=None, sa_type=enum_type(SigningRefusal, 16))
    reason: str = Field(max_length=300)
    at: dt.datetime = _at()


# Signing lockout: a signer barred from one signed act after too many wrong codes, until `until_at`.
class SigningLockout(SQLModel, table=True):
    __tablename__ = "signing_lockout"
    id: int | None = Field(default=None, primary_key=True)
    decision_id: int | None = Field(default=None, foreign_key="escalation_decision.id", index=True)
    ae_id: int | None = Field(default=None, foreign_key="adverse_event.id", index=True)
    signer_id: str = Field(max_length=64)
    after_attempt_id: int  # the wrong-code attempt that locked it; later wrong codes count afresh
    locked_at: dt.datetime = _at()
    until_at: dt.datetime = _at()


# Notification outbox: written with the state change that caused it, delivered later per channel by a pass that claims it.
class NotificationOutbox(SQLModel, table=True):
    __tablename__ = "notification_outbox"
    id: int | None = Field(default=None, primary_key=True)
    dedup_key: str = Field(max_length=160, unique=True)
    role: Role = Field(sa_type=enum_type(Role, 32))
    subject_id: str | None = Field(default=None, max_length=32)
    event: str = Field(max_length=64)
    title: str = Field(max_length=200)
    body: str = Field(max_length=1000)
    link: str | None = Field(default=None, max_length=300)
    status: OutboxStatus = Field(sa_type=enum_type(OutboxStatus), default=OutboxStatus.PENDING)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=300)
    created_at: dt.datetime = _at()
    delivered_at: dt.datetime | None = _at(default=None)
    claimed_by: str | None = Field(default=None, max_length=64)  # the delivery pass sending it now (tasks/delivery.py)
    claim_expires_at: dt.datetime | None = _at(default=None)  # wall time after which another pass may take it over


# Notification delivery: one row per outbox message and channel that got it; a channel never gets it twice.
class NotificationDelivery(SQLModel, table=True):
    __tablename__ = "notification_delivery"
    __table_args__ = (sa.UniqueConstraint("outbox_id", "channel", name="uq_delivery_outbox_channel"),)
    id: int | None = Field(default=None, primary_key=True)
    outbox_id: int = Field(foreign_key="notification_outbox.id", index=True)
    channel: str = Field(max_length=64)  # digest of the apprise URL; the URL (and its secrets) is never stored
    delivered_at: dt.datetime = _at()


# Lab / PK result: donor NK cell count for a PK sample, MRD by MFC, response.
class LabResult(SQLModel, table=True):
    __tablename__ = "lab_result"
    __table_args__ = (sa.UniqueConstraint("subject_pk", "kind", "event_key", name="uq_lab_result_subject_kind_event"),)
    id: int | None = Field(default=None, primary_key=True)
    subject_pk: int = Field(foreign_key="subject.id", index=True)
    kind: LabKind = Field(sa_type=enum_type(LabKind))
    event_key: str = Field(max_length=48)
    sampled_on: dt.date
    value: float | None = None
    unit: str | None = Field(default=None, max_length=32)
    category: str | None = Field(default=None, max_length=32)  # MRD positive/negative; response CR/CRi/PR/SD/PD
    recorded_at: dt.datetime = _at()


# Audit log: append-only (the database refuses UPDATE and DELETE). Who, when, what, old → new, why.
# Hash-chained: row_hash = sha256(content + prev_hash), see models/audit_chain.py; `nktrial audit verify` walks it.
class AuditLog(SQLModel, table=True):
    __tablename__ = "audit_log"
    __table_args__ = (sa.Index("ix_audit_log_entity", "entity", "entity_id"),)  # the dose-level gate looks signatures up
    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = _at(index=True)
    actor: str = Field(max_length=64)
    entity: str = Field(max_length=48)
    entity_id: str = Field(max_length=64)
    field: str = Field(max_length=48)
    old_value: str | None = None
    new_value: str | None = None
    reason: str = Field(max_length=500)
    prev_hash: str | None = Field(default=None, max_length=64)
    row_hash: str | None = Field(default=None, max_length=64)


# Audit checkpoint: how far daily rounds have verified the chain (last row id and its hash), and what they found.
class AuditCheckpoint(SQLModel, table=True):
    __tablename__ = "audit_checkpoint"
    id: int | None = Field(default=None, primary_key=True)
    verified_to_id: int
    verified_to_hash: str = Field(max_length=64)
    intact: bool
    problem: str | None = Field(default=None, max_length=500)
    checked_at: dt.datetime = _at()


# Staff: the delegation log's people. Roles are comma-separated Role values; the channel tag is the
# apprise tag of the member's own channel (signing codes go there and nowhere else).
class Staff(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    staff_id: str = Field(max_length=32, unique=True, index=True)
    printed_name: str = Field(max_length=120)
    roles: str = Field(max_length=200)
    channel_tag: str = Field(max_length=64)
    active_from_at: dt.datetime = _at()
    active_to_at: dt.datetime | None = _at(default=None)
    created_at: dt.datetime = _at()

    @property
    def role_set(self) -> frozenset[Role]:
        return frozenset(Role(r) for r in self.roles.split(",") if r)

    def active_at(self, at: dt.datetime) -> bool:
        return self.active_from_at <= at and (self.active_to_at is None or at < self.active_to_at)


# Access refusal: every write refused because of who asked (unknown, inactive, or without the role).
class AccessRefusal(SQLModel, table=True):
    __tablename__ = "access_refusal"
    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(max_length=64)
    act: str = Field(max_length=64)
    reason: str = Field(max_length=300)
    at: dt.datetime = _at()

