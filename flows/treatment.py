"""patient-treatment: the patient's calendar, stored and projected as scheduled runs.
treatment-event: one due calendar event, acted on when due."""

from __future__ import annotations

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from flows.common import current_clock, deliver_notices, protocol, run_link, trial_engine
from flows.safety import review_if_ready
from models.queries import get_subject, trial_instance
from models.db import UnitOfWork
from models.tables import CalendarEventRow
from protocol.dates import to_local
from tasks.projection import TREATMENT_EVENT, reconcile, scheduled_runs, wanted_runs
from tasks.records import act_on_event, refresh_calendar


class SubjectRef(BaseModel):
    """One enrolled patient."""

    subject_id: str = Field(description="pseudonymous subject ID, e.g. S-003", pattern=r"^\S+$")


class TreatmentEventRef(BaseModel):
    """One event of one patient's calendar."""

    subject_id: str = Field(description="e.g. S-003")
    event_key: str = Field(description="e.g. nk_infusion-2, visit_1_month, pk_sample-infusion_1+7")


@task(name="store-calendar")
def store_calendar_task(subject_id: str) -> str:
    engine, p = trial_engine(), protocol()
    with UnitOfWork(engine, actor="system:patient-treatment", reason=f"calendar of {subject_id} recomputed", clock=current_clock()) as u:
        subject = get_subject(u.session, subject_id=subject_id)
        if subject is None or subject.dose_level is None or subject.planned_day0_at is None:
            raise ValueError(f"subject_id {subject_id} is not enrolled; nothing to schedule")
        cal = refresh_calendar(u.session, p, subject)
        u.commit()
    return cal.anchor_version


@task(name="project-runs")
def project_runs_task(subject_id: str) -> str:
    engine = trial_engine()
    with Session(engine) as s:
        wanted, instance = wanted_runs(s, [subject_id]), trial_instance(s)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TREATMENT_EVENT)
        existing = scheduled_runs(client, deployment.id, instance=instance, subject_id=subject_id)
        report = reconcile(client, deployment.id, wanted, existing, now=current_clock()())
    logger = get_run_logger()
    for line in report.details:
        logger.info(line)
    return str(report)


def schedule_table(subject_id: str) -> list[dict]:
    """The patient's whole plan, one row per event, in site-local time."""
    p = protocol()
    with Session(trial_engine()) as s:
        subject = get_subject(s, subject_id=subject_id)
        rows = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id).order_by(CalendarEventRow.due_at)).all()
    tz = p.timezone
    return [
        {
            "day": r.protocol_day,
            "date": r.local_on.isoformat(),
            "time": f"{to_local(tz, r.due_at):%H:%M}",
            "event": r.label,
            "window": f"{r.window_start_on} – {r.window_end_on}" if r.window_start_on != r.window_end_on else "",
            "status": r.status.value,
            "reminder": f"{to_local(tz, r.remind_at):%Y-%m-%d %H:%M}" if r.remind_at else "daily rounds" if r.kind.value == "il2_dose" else "",
        }
        for r in rows
    ]


@flow(name="patient-treatment", flow_run_name="{subject.subject_id} · treatment plan", log_prints=False)
def patient_treatment(subject: SubjectRef) -> str:
    """Compute and store the patient's calendar, then reconcile its scheduled runs (safe to re-run)."""
    sid = subject.subject_id
    version = store_calendar_task(sid)
    report = project_runs_task(sid)
    create_table_artifact(
        key=f"subject-{sid.lower()}-schedule".replace("_", "-"), table=schedule_table(sid),
        description=f"**{sid}** treatment calendar (site time, {protocol().timezone}); anchor version {version}",
    )
    deliver_notices()
    get_run_logger().info("%s: calendar %s; runs %s", sid, version, report)
    return report


@flow(name="treatment-event", flow_run_name="{event.subject_id} · {event.event_key}")
def treatment_event(event: TreatmentEventRef) -> str:
    """Act on one calendar event when due: reminders, product request, visit window, DLT window closed."""
    action = act_on_event(trial_engine(), protocol(), subject_id=event.subject_id, event_key=event.event_key,
                          clock=current_clock(), link=run_link())
    get_run_logger().info(action.why)
    if action.notices:
        deliver_notices()
    if action.review_ready:  # the cohort's last DLT window closed: hand over to the escalation gate
        review_if_ready()
    return action.why
