"""enroll-patient: screen, allocate a slot (or waitlist), and start the patient's treatment plan."""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed
from pydantic import BaseModel, Field

from flows.common import UserError, current_clock, deliver_notices, protocol, run_link, trial_engine
from flows.treatment import SubjectRef, patient_treatment
from protocol.eligibility import ScreeningRecord, ScreeningResult
from tasks.records import EnrollmentOutcome, EnrollmentStatus, enroll


class EnrollmentRequest(BaseModel):
    """A screened candidate and the planned date and time of NK infusion 1."""

    screening: ScreeningRecord
    planned_day0: dt.datetime = Field(description="planned NK infusion 1, site-local time, e.g. 2027-01-31T09:00")
    recorded_by: str = Field(default="coordinator", description="staff ID of who enrolls (for the audit trail)")


def screening_markdown(res: ScreeningResult) -> str:
    mark = {True: "✅", False: "❌", None: "❔"}
    lines = [f"# Screening {res.subject_id}: **{res.verdict.value.replace('_', ' ')}**", "",
             f"Earliest permissible day 0: **{res.earliest_day0_on or 'unknown'}**"
             + (" (at least; some washout data missing)" if res.earliest_day0_is_lower_bound else ""), "",
             "| | criterion | status | value | limit |", "|---|---|---|---|---|"]
    lines += [f"| {mark[c.allows_enrollment]} | {c.id} | {c.status.value} | {c.value} | {c.limit} |" for c in res.criteria]
    return "\n".join(lines)


@task(name="screen-and-allocate")
def enroll_task(request: EnrollmentRequest) -> EnrollmentOutcome:
    return enroll(trial_engine(), protocol(), record=request.screening, planned_day0=request.planned_day0,
                  actor=request.recorded_by, clock=current_clock(), link=run_link())


@flow(name="enroll-patient", flow_run_name="{request.screening.subject_id} · enrollment")
def enroll_patient(request: EnrollmentRequest):
    """Screen the candidate; if eligible, allocate a slot in the open cohort (or waitlist) and start treatment."""
    logger = get_run_logger()
    try:
        outcome = enroll_task(request)
    except UserError as exc:
        logger.error(str(exc))
        return Failed(message=str(exc))
    sid = outcome.subject_id
    create_markdown_artifact(key=f"screening-{sid.lower()}".replace("_", "-"), markdown=screening_markdown(outcome.screening),
                             description=f"{sid} screening")
    logger.info(outcome.message)
    if outcome.status is EnrollmentStatus.ENROLLED:
        patient_treatment(SubjectRef(subject_id=sid))
    else:
        deliver_notices()
    name = {EnrollmentStatus.ENROLLED: "Enrolled", EnrollmentStatus.WAITLISTED: "Waitlisted", EnrollmentStatus.NOT_ELIGIBLE: "Not eligible"}
    return Completed(name=name[outcome.status], message=outcome.message, data=outcome.status.value)
