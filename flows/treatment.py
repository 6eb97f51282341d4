"""patient-treatment: the patient's calendar, stored and projected as scheduled runs.
treatment-event: one due calendar event, acted on when due."""

from __future__ import annotations

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows.casebook import publish_casebook, tag_run
from flows.common import current_clock, deliver_notices, protocol, run_link, trial_engine
from flows.safety import review_if_ready
from tasks.due_events import act_on_event
from tasks.projection import notify_flagged, project
from tasks.recording import store_patient_calendar
from tasks.reports import schedule_table

PLAN_RETRIES = 2  # a failure part-way (the Prefect API or the database busy a moment) is retried: the projection is idempotent
PLAN_RETRY_DELAY_SECONDS = 10


class SubjectRef(BaseModel):
    """One enrolled patient."""

    subject_id: str = Field(description="pseudonymous subject ID, e.g. S-003", pattern=r"^\S+$")


class TreatmentEventRef(BaseModel):
    """One event of one patient's calendar."""

    subject_id: str = Field(description="e.g. S-003")
    event_key: str = Field(description="e.g. nk_infusion-2, visit_1_month, pk_sample-infusion_1+7")
    label: str = Field(default="", max_length=120, description="the event in words, e.g. infusion 2 prep: the run's name")


def _event_run_name() -> str:
    """`S-001 · infusion 2 prep`: the name the projection gave the run, kept when it runs (never the event key)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    event = (ctx.parameters or {}).get("event") if ctx else None
    ref = event if isinstance(event, TreatmentEventRef) else \
        TreatmentEventRef.model_validate(event or {"subject_id": "?", "event_key": "?"})
    current = ctx.flow_run.name if ctx and ctx.flow_run else ""
    if ref.label:
        return f"{ref.subject_id} · {ref.label}"
    return current if current.startswith(f"{ref.subject_id} · ") else f"{ref.subject_id} · {ref.event_key}"


@task(name="store-calendar")
def store_calendar_task(subject_id: str) -> str:
    return store_patient_calendar(trial_engine(), protocol(), subject_id=subject_id, clock=current_clock())


@task(name="project-runs")
def project_runs_task(subject_id: str) -> str:
    with get_client(sync_client=True) as client:
        report = project(client, trial_engine(), now=current_clock()(), subject_id=subject_id)
    if report.flagged:  # a crashed run of this patient's was set back to Scheduled: the coordinators hear of it
        notify_flagged(trial_engine(), report.flagged, clock=current_clock(), ui_url=PREFECT_UI_URL.value())
    logger = get_run_logger()
    for line in report.details:
        logger.info(line)
    return str(report)


@flow(name="patient-treatment", flow_run_name="{subject.subject_id} · treatment plan", log_prints=False,
      retries=PLAN_RETRIES, retry_delay_seconds=PLAN_RETRY_DELAY_SECONDS)
def patient_treatment(subject: SubjectRef) -> str:
    """Compute and store the patient's calendar, then reconcile its scheduled runs (safe to re-run: a retry after a
    failure part-way finds the runs already made by their idempotency keys and makes only the rest). A run that
    crashed (its process died) is not retried by Prefect: daily rounds and `nktrial reconcile` rebuild its runs from
    the trial database, and set the crashed run back to Scheduled."""
    sid = subject.subject_id
    tag_run(sid)
    version = store_calendar_task(sid)
    report = project_runs_task(sid)
    with Session(trial_engine()) as s:
        table = schedule_table(s, protocol(), sid)
    create_table_artifact(
        key=f"subject-{sid.lower()}-schedule".replace("_", "-"), table=table,
        description=f"**{sid}** treatment calendar; dates and times are site time, **{protocol().timezone}**; anchor version {version}",
    )
    publish_casebook(sid)
    deliver_notices()
    get_run_logger().info("%s: calendar %s; runs %s", sid, version, report)
    return report


@flow(name="treatment-event", flow_run_name=_event_run_name)
def treatment_event(event: TreatmentEventRef) -> str:
    """Act on one calendar event when due: reminders, product request, visit window, DLT window closed."""
    action = act_on_event(trial_engine(), protocol(), subject_id=event.subject_id, event_key=event.event_key,
                          clock=current_clock(), link=run_link())
    get_run_logger().info(action.why)
    if action.acted:
        publish_casebook(event.subject_id)
    if action.notices:
        deliver_notices()
    if action.review_ready:  # the cohort's last DLT window closed: hand over to the escalation gate
        review_if_ready()
    return action.why
