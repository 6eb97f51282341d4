"""Recording flows: what staff did. Each validates against the calendar and writes all or nothing."""

from __future__ import annotations

import datetime as dt

from prefect import flow
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.casebook import publish_casebook, tag_run
from flows.common import current_clock, protocol, refuses_user_errors, run_link, trial_engine
from flows.forms import optional_site_time, optional_text, site_time
from flows.treatment import SubjectRef, patient_treatment
from models.tables import OffStudyReason
from protocol.recording import VisitKind, site_text
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
    given_at: site_time("Given at", "when the infusion started")
    cells_infused: float = Field(gt=0, description="cells infused, e.g. 1.0e8")
    product_lot: str = Field(min_length=1, max_length=64)
    deviation_reason: optional_text(200, "required if outside the window or dose")


class Il2DoseRecord(_Recorded):
    """One IL-2 dose, given or missed."""

    subject_id: str
    dose_number: int = Field(ge=1, description="1 to 28")
    given: bool = True
    given_at: optional_site_time("Given at", "when the dose was given (leave empty when missed)")
    missed_reason: optional_text(200, "required when missed")
    deviation_reason: optional_text(200, "required if outside the window")


class VisitRecord(_Recorded):
    subject_id: str
    visit: VisitKind
    done_on: dt.date
    deviation_reason: optional_text(200, "required if outside the window")


class LabRecord(_Recorded):
    result: LabResultInput


class OffStudyRequest(_Recorded):
    """Take a patient off study: every future run and notice is cancelled; the record is kept."""

    subject_id: str
    reason: OffStudyReason
    effective_on: dt.date


_VISIT_WORDS = {VisitKind.ONE_MONTH: "the 1-month visit", VisitKind.THREE_MONTH: "the 3-month visit"}


@flow(name="record-infusion", flow_run_name="{record.subject_id} · infusion {record.infusion_number} given")
@refuses_user_errors
def record_infusion(record: InfusionRecord):
    tag_run(record.subject_id)
    recording.record_infusion(trial_engine(), protocol(), subject_id=record.subject_id, infusion_number=record.infusion_number,
                              given_at=record.given_at, dose_level=record.dose_level, cells_infused=record.cells_infused,
                              product_lot=record.product_lot, deviation_reason=record.deviation_reason,
                              actor=record.recorded_by, clock=current_clock(), link=run_link())
    patient_treatment(SubjectRef(subject_id=record.subject_id))  # re-anchored: move the runs
    return Completed(name="Recorded", message=f"{record.subject_id}: NK infusion {record.infusion_number} recorded at "
                                              f"{site_text(protocol(), record.given_at)}; the calendar is re-anchored")


@flow(name="record-il2-dose", flow_run_name="{record.subject_id} · IL-2 dose {record.dose_number}")
@refuses_user_errors
def record_il2_dose(record: Il2DoseRecord):
    tag_run(record.subject_id)
    recording.record_il2_dose(trial_engine(), protocol(), subject_id=record.subject_id, dose_number=record.dose_number,
                              given=record.given, given_at=record.given_at, missed_reason=record.missed_reason,
                              deviation_reason=record.deviation_reason, actor=record.recorded_by, clock=current_clock())
    publish_casebook(record.subject_id)
    how = f"given at {site_text(protocol(), record.given_at)}" if record.given else "missed"
    return Completed(name="Recorded", message=f"{record.subject_id}: IL-2 dose {record.dose_number} recorded as {how}")


@flow(name="record-visit", flow_run_name="{record.subject_id} · {record.visit.value} done")
@refuses_user_errors
def record_visit(record: VisitRecord):
    tag_run(record.subject_id)
    recording.record_visit(trial_engine(), protocol(), subject_id=record.subject_id, visit=record.visit, done_on=record.done_on,
                           deviation_reason=record.deviation_reason, actor=record.recorded_by, clock=current_clock())
    publish_casebook(record.subject_id)
    return Completed(name="Recorded", message=f"{record.subject_id}: {_VISIT_WORDS[record.visit]} recorded as done on {record.done_on}")


@flow(name="record-lab-result", flow_run_name="{record.result.subject_id} · {record.result.kind.value}")
@refuses_user_errors
def record_lab_result(record: LabRecord):
    tag_run(record.result.subject_id)
    recording.record_lab_result(trial_engine(), protocol(), result=record.result, actor=record.recorded_by, clock=current_clock())
    publish_casebook(record.result.subject_id)
    r = record.result
    return Completed(name="Recorded", message=f"{r.subject_id}: {r.kind.value} result sampled on {r.sampled_on} recorded")


@flow(name="off-study", flow_run_name="{request.subject_id} · off study")
@refuses_user_errors
def off_study(request: OffStudyRequest):
    tag_run(request.subject_id)
    n = recording.take_off_study(trial_engine(), protocol(), subject_id=request.subject_id, reason=request.reason,
                                 effective_on=request.effective_on, actor=request.recorded_by, clock=current_clock(), link=run_link())
    patient_treatment(SubjectRef(subject_id=request.subject_id))  # cancels the scheduled runs
    return Completed(name="Off study", message=f"{request.subject_id} is off study from {request.effective_on} ({request.reason.value}): "
                                               f"{n} planned events cancelled, the record is kept")
