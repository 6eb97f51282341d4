"""enroll-patient: screen, allocate a slot (or waitlist), and start the patient's treatment plan."""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.common import current_clock, deliver_notices, protocol, refuses_user_errors, run_link, trial_engine
from flows.treatment import SubjectRef, patient_treatment
from protocol.eligibility import ScreeningRecord
from tasks.enrollment import EnrollmentOutcome, EnrollmentStatus, enroll
from tasks.reports import screening_markdown
from tasks.staff import StaffId


class EnrollmentRequest(BaseModel):
    """A screened candidate and the planned date and time of NK infusion 1."""

    screening: ScreeningRecord
    planned_day0: dt.datetime = Field(description="planned NK infusion 1, site-local time, e.g. 2027-01-31T09:00")
    recorded_by: StaffId = Field(description="your staff ID: who enrolls (checked against the staff register)")


@task(name="screen-and-allocate")
def enroll_task(request: EnrollmentRequest) -> EnrollmentOutcome:
    return enroll(trial_engine(), protocol(), record=request.screening, planned_day0=request.planned_day0,
                  actor=request.recorded_by, clock=current_clock(), link=run_link())


@flow(name="enroll-patient", flow_run_name="{request.screening.subject_id} · enrollment")
@refuses_user_errors
def enroll_patient(request: EnrollmentRequest):
    """Screen the candidate; if eligible, allocate a slot in the open cohort (or waitlist) and start treatment."""
    outcome = enroll_task(request)
    sid = outcome.subject_id
    create_markdown_artifact(key=f"screening-{sid.lower()}".replace("_", "-"), markdown=screening_markdown(outcome.screening),
                             description=f"{sid} screening")
    get_run_logger().info(outcome.message)
    if outcome.status is EnrollmentStatus.ENROLLED:
        patient_treatment(SubjectRef(subject_id=sid))
    else:
        deliver_notices()
    name = {EnrollmentStatus.ENROLLED: "Enrolled", EnrollmentStatus.WAITLISTED: "Waitlisted", EnrollmentStatus.NOT_ELIGIBLE: "Not eligible"}
    return Completed(name=name[outcome.status], message=outcome.message, data=outcome.status.value)
