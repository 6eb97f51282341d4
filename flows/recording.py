"""Recording flows: what staff did. Each validates against the calendar and writes all or nothing."""

from __future__ import annotations

import datetime as dt

from prefect import flow
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.common import current_clock, protocol, refuses_user_errors, run_link, trial_engine
from flows.treatment import SubjectRef, patient_treatment
from models.tables import OffStudyReason
from protocol.recording import VisitKind
from tasks import recording
from tasks.recording import LabResultInput
from tasks.staff import StaffId


class _Recorded(BaseModel):
    recorded_by: StaffId = Field(description="your staff ID: who records this (checked against the staff register)")


class InfusionRecord(_Recorded):
    """An NK infusion given."""

    subject_id: str = Field(description="e.g. S-003")
    infusion_number: int = Field(ge=1, le=2)
    dose_level: int = Field(ge=1, description="the subject's assigned dose level, as a check")
    given_at: dt.datetime = Field(description="site-local date and time the infusion started")
    cells_infused: float = Field(gt=0, description="cells infused, e.g. 1.0e8")
    product_lot: str = Field(min_length=1, max_length=64)
    deviation_reason: str | None = Field(default=None, max_length=200, description="required if outside the window or dose")


class Il2DoseRecord(_Recorded):
    """One IL-2 dose, given or missed."""

    subject_id: str
    dose_number: int = Field(ge=1, description="1 to 28")
    given: bool = True
    given_at: dt.datetime | None = Field(default=None, description="site-local time given (when given)")
    missed_reason: str | None = Field(default=None, max_length=200, description="required when missed")
    deviation_reason: str | None = Field(default=None, max_length=200)


class VisitRecord(_Recorded):
    subject_id: str
    visit: VisitKind
    done_on: dt.date
    deviation_reason: str | None = Field(default=None, max_length=200)


class LabRecord(_Recorded):
    result: LabResultInput


class OffStudyRequest(_Recorded):
    """Take a patient off study: every future run and notice is cancelled; the record is kept."""

    subject_id: str
    reason: OffStudyReason
    effective_on: dt.date


@flow(name="record-infusion", flow_run_name="{record.subject_id} · infusion {record.infusion_number} given")
@refuses_user_errors
def record_infusion(record: InfusionRecord):
    recording.record_infusion(trial_engine(), protocol(), subject_id=record.subject_id, infusion_number=record.infusion_number,
                              given_at=record.given_at, dose_level=record.dose_level, cells_infused=record.cells_infused,
                              product_lot=record.product_lot, deviation_reason=record.deviation_reason,
                              actor=record.recorded_by, clock=current_clock(), link=run_link())
    patient_treatment(SubjectRef(subject_id=record.subject_id))  # re-anchored: move the runs
    return Completed(message=f"{record.subject_id}: NK infusion {record.infusion_number} recorded")


@flow(name="record-il2-dose", flow_run_name="{record.subject_id} · IL-2 dose {record.dose_number}")
@refuses_user_errors
def record_il2_dose(record: Il2DoseRecord):
    recording.record_il2_dose(trial_engine(), protocol(), subject_id=record.subject_id, dose_number=record.dose_number,
                              given=record.given, given_at=record.given_at, missed_reason=record.missed_reason,
                              deviation_reason=record.deviation_reason, actor=record.recorded_by, clock=current_clock())
    return Completed(message=f"{record.subject_id}: IL-2 dose {record.dose_number} recorded as {'given' if record.given else 'missed'}")


@flow(name="record-visit", flow_run_name="{record.subject_id} · {record.visit.value} done")
@refuses_user_errors
def record_visit(record: VisitRecord):
    recording.record_visit(trial_engine(), protocol(), subject_id=record.subject_id, visit=record.visit, done_on=record.done_on,
                           deviation_reason=record.deviation_reason, actor=record.recorded_by, clock=current_clock())
    return Completed(message=f"{record.subject_id}: {record.visit.value} recorded")


@flow(name="record-lab-result", flow_run_name="{record.result.subject_id} · {record.result.kind.value}")
@refuses_user_errors
def record_lab_result(record: LabRecord):
    recording.record_lab_result(trial_engine(), protocol(), result=record.result, actor=record.recorded_by, clock=current_clock())
    return Completed(message=f"{record.result.subject_id}: {record.result.kind.value} recorded")


@flow(name="off-study", flow_run_name="{request.subject_id} · off study")
@refuses_user_errors
def off_study(request: OffStudyRequest):
    n = recording.take_off_study(trial_engine(), protocol(), subject_id=request.subject_id, reason=request.reason,
                                 effective_on=request.effective_on, actor=request.recorded_by, clock=current_clock(), link=run_link())
    patient_treatment(SubjectRef(subject_id=request.subject_id))  # cancels the scheduled runs
    return Completed(message=f"{request.subject_id} off study ({request.reason.value}): {n} planned events cancelled")
