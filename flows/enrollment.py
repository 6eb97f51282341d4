"""enroll-patient: screen, allocate a slot (or waitlist), and start the patient's treatment plan.

The form is the protocol's screening checklist (`flows/screening_form.py`), in sections; a whole
screening record may be pasted as JSON instead. A screen failure ends Cancelled, named
"Screen failure" (grey in the UI, not a green success); enrolled and waitlisted end Completed.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.json_schema import SkipJsonSchema

from flows.casebook import tag_run
from flows.common import current_clock, deliver_notices, protocol, refuses_user_errors, run_link, trial_engine
from flows.forms import site_time
from flows.screening_form import (
    ConsentAndHistory,
    Disease,
    Exclusions,
    GvhdAndDonor,
    Labs,
    OrganFunction,
    Washouts,
    json_record,
    record_from_sections,
    validated,
)
from flows.treatment import SubjectRef, patient_treatment
from protocol.eligibility import ScreeningRecord, Verdict, criterion_in_words
from protocol.errors import UserError
from tasks.enrollment import EnrollmentOutcome, EnrollmentStatus, enroll
from tasks.screening_report import screening_markdown
from tasks.staff import StaffId

SCREEN_FAILURE = "Screen failure"
SCREENING_INCOMPLETE = "Screening incomplete"
SECTION_NAMES = ("consent_and_history", "disease", "gvhd_and_donor", "labs", "organ_function", "washouts", "exclusions")
JSON_SCHEMA = {"type": "string", "title": "Or paste a whole screening record as JSON (then leave sections 1 to 7 as they are)",
               "description": "The same JSON as `nktrial enroll --file`, e.g. examples/screening-S-001.json. Its subject_id, "
                              "if given, must be the subject ID above. Leave empty to use the sections."}


def _titled_sections(schema: dict[str, Any]) -> None:
    """The UI titles a section with its property's title (else the humanised key), which pydantic leaves off a $ref."""
    for name in SECTION_NAMES:
        cls = EnrollmentRequest.model_fields[name].annotation
        schema["properties"][name].update(title=cls.model_json_schema()["title"], description=cls.__doc__)


class EnrollmentRequest(BaseModel):
    """A candidate's screening checklist (sections 1 to 7, the protocol's criteria), the planned NK infusion 1 and who enrolls."""

    # In process or through the API, `screening` may carry a whole ScreeningRecord instead of the
    # sections (the rehearsal and the tests do); the form does not show it.

    model_config = ConfigDict(title="Screen and enroll a candidate", json_schema_extra=_titled_sections)
    subject_id: str = Field(title="Subject ID (pseudonymous, e.g. S-003; never a name)",
                            pattern=protocol().site.subject_id_pattern.value)
    planned_day0: site_time("Planned NK infusion 1 (day 0)", "when NK infusion 1 is planned")
    recorded_by: StaffId = Field(title="Your staff ID (who enrolls)")
    consent_and_history: ConsentAndHistory = Field(default_factory=ConsentAndHistory)
    disease: Disease = Field(default_factory=Disease)
    gvhd_and_donor: GvhdAndDonor = Field(default_factory=GvhdAndDonor)
    labs: Labs = Field(default_factory=Labs)
    organ_function: OrganFunction = Field(default_factory=OrganFunction)
    washouts: Washouts = Field(default_factory=Washouts)
    exclusions: Exclusions = Field(default_factory=Exclusions)
    screening_json: Annotated[str, WithJsonSchema(JSON_SCHEMA)] = Field(
        default="", json_schema_extra=lambda s: s.pop("default", None))
    screening: SkipJsonSchema[ScreeningRecord | None] = None

    @model_validator(mode="before")
    @classmethod
    def _subject_from_record(cls, data: Any) -> Any:
        """A caller that sends a whole record need not repeat its subject ID."""
        if isinstance(data, dict) and data.get("screening") is not None and not data.get("subject_id"):
            record = data["screening"]
            data = {**data, "subject_id": record.subject_id if isinstance(record, ScreeningRecord) else record.get("subject_id")}
        if isinstance(data, dict) and data.get("screening_json") is None:
            data = {**data, "screening_json": ""}
        return data

    def sections(self) -> dict:
        return {name: getattr(self, name) for name in SECTION_NAMES}

    def record(self) -> ScreeningRecord:
        """The screening record this request carries: from the sections, the pasted JSON, or the API's record."""
        filled = [name for name, section in self.sections().items() if not section.is_empty()]
        given = [what for what, present in (("the screening record (JSON)", self.screening_json.strip()),
                                            ("the API's screening record", self.screening is not None)) if present]
        if len(given) > 1 or (given and filled):
            raise UserError(f"give the screening either in the sections or as one screening record, not both "
                            f"({', '.join(given + [f'section {n}' for n in filled])})")
        if self.screening is not None:
            if self.screening.subject_id != self.subject_id:
                raise UserError(f"the screening record's subject_id {self.screening.subject_id} is not the subject ID {self.subject_id}")
            return self.screening
        if self.screening_json.strip():
            return json_record(self.subject_id, self.screening_json)
        return validated(record_from_sections(self.subject_id, self.sections()), what="screening form")


@task(name="screen-and-allocate")
def enroll_task(request: EnrollmentRequest, record: ScreeningRecord) -> EnrollmentOutcome:
    return enroll(trial_engine(), protocol(), record=record, planned_day0=request.planned_day0,
                  actor=request.recorded_by, clock=current_clock(), link=run_link())


def screen_failure_message(outcome: EnrollmentOutcome) -> str:
    """Why the candidate cannot be enrolled, in the protocol's words."""
    res = outcome.screening
    parts = []
    if res.failing:
        parts.append("Not met: " + "; ".join(f"{criterion_in_words(c)}, value {c.value}" for c in res.failing))
    if res.unknown:
        parts.append("Unknown: " + "; ".join(criterion_in_words(c) for c in res.unknown))
    what = "is not eligible" if res.verdict is Verdict.NOT_ELIGIBLE else "cannot be enrolled yet: screening is incomplete"
    return f"{outcome.subject_id} {what}. " + ". ".join(parts)


@flow(name="enroll-patient", flow_run_name="{request.subject_id} · enrollment")
@refuses_user_errors
def enroll_patient(request: EnrollmentRequest):
    """Screen the candidate; if eligible, allocate a slot in the open cohort (or waitlist) and start treatment."""
    tag_run(request.subject_id)
    outcome = enroll_task(request, request.record())
    sid = outcome.subject_id
    create_markdown_artifact(key=f"screening-{sid.lower()}".replace("_", "-"), markdown=screening_markdown(outcome.screening),
                             description=f"{sid} screening")
    if outcome.status is EnrollmentStatus.ENROLLED:
        get_run_logger().info(outcome.message)
        patient_treatment(SubjectRef(subject_id=sid))
    else:
        deliver_notices()
    if outcome.status is EnrollmentStatus.NOT_ELIGIBLE:
        message = screen_failure_message(outcome)
        get_run_logger().info(message)
        name = SCREEN_FAILURE if outcome.screening.verdict is Verdict.NOT_ELIGIBLE else SCREENING_INCOMPLETE
        return Cancelled(name=name, message=message, data=outcome.status.value)
    if outcome.status is EnrollmentStatus.WAITLISTED:
        get_run_logger().info(outcome.message)
    name = {EnrollmentStatus.ENROLLED: "Enrolled", EnrollmentStatus.WAITLISTED: "Waitlisted"}
    return Completed(name=name[outcome.status], message=outcome.message, data=outcome.status.value)
