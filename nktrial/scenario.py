"""Rehearsal scenarios: who is referred, what staff do (on time, late, missed), which AEs happen, how
the PI decides, and what the final state must be. Read from YAML; bad input gets one sentence.

Days in a patient's entry are protocol days (day 0 = NK infusion 1), like the calendar's.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.tables import OffStudyReason
from protocol.dlt import AeCategory, Attribution
from protocol.errors import UserError, first_validation_error
from protocol.recording import MrdStatus, Response
from protocol.three_plus_three import Action

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "scenarios"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdverseEventSpec(_Strict):
    day: int = Field(ge=0, le=120, description="protocol day of onset")
    term: str = Field(default="adverse event", min_length=1, max_length=120)
    category: AeCategory
    grade: int = Field(ge=1, le=5)
    attribution: Attribution = Attribution.PROBABLE
    serious: bool = False
    adjudicate: Literal["confirm", "reject", "leave"] = Field(default="confirm", description="the investigator's verdict on a candidate DLT")
    adjudicate_after_days: int = Field(default=1, ge=0, le=30)


class OffStudySpec(_Strict):
    day: int = Field(ge=0, le=120, description="protocol day it takes effect")
    reason: OffStudyReason = OffStudyReason.WITHDRAWAL


class OutcomeSpec(_Strict):
    mrd: MrdStatus = MrdStatus.NEGATIVE
    response: Response = Response.CR


class PatientSpec(_Strict):
    id: str = Field(pattern=r"^S-[0-9]{3}$")
    arrives_on_day: int | None = Field(default=None, ge=0, description="scenario day of referral; default: the morning after a slot opens")
    infusion_2_delay_days: int = Field(default=0, ge=0, le=30, description="infusion 2 given this many days after its planned time")
    infusion_2_missed: bool = False
    deviation_reason: str | None = Field(default=None, max_length=200, description="for an infusion given outside its window")
    il2_missed: list[int] = Field(default_factory=list, description="IL-2 dose numbers not given")
    adverse_events: list[AdverseEventSpec] = Field(default_factory=list)
    off_study: OffStudySpec | None = None
    outcome: OutcomeSpec = OutcomeSpec()
    screening: dict = Field(default_factory=dict, description="fields that differ from the screening template")


class PiSpec(_Strict):
    signer_id: str = "pi-01"
    printed_name: str = "Principal Investigator"
    sign_after_hours: float = Field(default=20, ge=0, le=24 * 14, description="how long after the review opens the PI signs")
    decisions: dict[int, Action] = Field(default_factory=dict, description="decision number → a more cautious action than the rule's")


class Expectation(_Strict):
    history: str
    decisions: list[Action]
    mtd: int | None = None
    statuses: dict[str, str] = Field(default_factory=dict, description="subject → final status")


class Scenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9-]+$")
    title: str
    start: dt.date = Field(description="the first virtual morning (site date)")
    day0_after_days: int = Field(default=7, ge=0, le=60, description="planned day 0 this many days after the referral")
    max_days: int = Field(default=400, ge=1, le=2000, description="stop the rehearsal after this many virtual days whatever happens")
    patients: list[PatientSpec] = Field(min_length=1)
    pi: PiSpec = PiSpec()
    expect: Expectation | None = None

    @model_validator(mode="after")
    def _unique(self):
        seen: set[str] = set()
        for p in self.patients:
            if p.id in seen:
                raise ValueError(f"patient {p.id} is listed twice; each subject ID appears once")
            seen.add(p.id)
        return self

    def patient(self, subject_id: str) -> PatientSpec:
        return next(p for p in self.patients if p.id == subject_id)


def shipped() -> list[Path]:
    return sorted(SHIPPED.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A scenario file: a path, or the name of a shipped scenario."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = SHIPPED / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in shipped())
    raise UserError(f"scenario {name_or_path!r} is neither a file nor a shipped scenario; shipped: {names}")


def load(name_or_path: str) -> Scenario:
    path = resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"scenario {path.name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise UserError(first_validation_error(exc, f"scenario {path.name}")) from None
