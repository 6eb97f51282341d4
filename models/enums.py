"""The statuses, kinds and reasons the trial tables store, as enums (stored as their values)."""

from __future__ import annotations

from enum import StrEnum


class DecisionStatus(StrEnum):
    WAITING = "waiting"  # for the PI's signature
    SIGNED = "signed"


class LevelStatus(StrEnum):
    PENDING = "pending"
    OPEN = "open"
    FULL = "full"
    CLOSED = "closed"
    TOO_TOXIC = "too_toxic"


class SubjectStatus(StrEnum):
    SCREENING = "screening"
    SCREEN_FAILED = "screen_failed"
    WAITLISTED = "waitlisted"
    ENROLLED = "enrolled"
    ON_TREATMENT = "on_treatment"
    FOLLOW_UP = "follow_up"
    COMPLETED = "completed"
    OFF_STUDY = "off_study"


class EventStatus(StrEnum):
    PLANNED = "planned"
    DONE = "done"
    MISSED = "missed"
    CANCELLED = "cancelled"


class AdministrationKind(StrEnum):
    NK_INFUSION = "nk_infusion"
    IL2_DOSE = "il2_dose"


class Adjudication(StrEnum):
    NOT_CANDIDATE = "not_candidate"
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    NO_CHANNEL = "no_channel"
    CANCELLED = "cancelled"


class OffStudyReason(StrEnum):
    WITHDRAWAL = "withdrawal"
    DEATH = "death"
    PROGRESSION = "progression"
    LOST_TO_FOLLOW_UP = "lost_to_follow_up"
    INVESTIGATOR_DECISION = "investigator_decision"
    TRIAL_STOPPED = "trial_stopped"  # set by a signed stop for a patient not yet dosed (tasks.closure)
    DOSE_LEVEL_CLOSED = "dose_level_closed"  # set by a signed de-escalation for a patient not yet dosed at that level

    @property
    def set_by_a_signed_decision(self) -> bool:
        """Only a signed stop or de-escalation takes a patient off study for this reason, never a person's entry."""
        return self in (OffStudyReason.TRIAL_STOPPED, OffStudyReason.DOSE_LEVEL_CLOSED)


class LabKind(StrEnum):
    DONOR_NK_COUNT = "donor_nk_count"
    MRD_MFC = "mrd_mfc"
    RESPONSE = "response"


class SigningRefusal(StrEnum):
    """Why a signing attempt was refused; wrong codes count towards the lockout."""

    BLANK_SIGNER = "blank_signer"
    NOT_AUTHORIZED = "not_authorized"  # unknown, inactive, or a role that may not sign this act
    WRONG_NAME = "wrong_name"
    LOCKED_OUT = "locked_out"
    WRONG_CODE = "wrong_code"
    USED_CODE = "used_code"
    EXPIRED_CODE = "expired_code"
    OTHER = "other"  # the act itself refused (a bolder choice, nothing to adjudicate)
