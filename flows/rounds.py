"""daily-rounds: every morning at 07:00 site time, for every active patient at once."""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows.common import current_clock, deliver_notices, protocol, run_link, trial_engine
from models.crud import trial_instance
from tasks.projection import TREATMENT_EVENT, reconcile, scheduled_runs, wanted_runs
from tasks.records import RoundsReport, daily_rounds as rounds


class RoundsOptions(BaseModel):
    """How far ahead daily rounds check the Prefect projection."""

    reconcile_horizon_days: int = Field(default=2, ge=0, le=120, description="recreate or move runs due within this many days")


@task(name="rounds")
def rounds_task() -> RoundsReport:
    return rounds(trial_engine(), protocol(), clock=current_clock(), link=run_link())


@task(name="pi-reminders")
def pi_reminders_task() -> tuple[int, int]:
    from tasks.safety import pi_reminders

    return pi_reminders(trial_engine(), protocol(), clock=current_clock(), link=run_link())


@task(name="reconcile-projection")
def reconcile_task(horizon_days: int) -> str:
    now = current_clock()()
    horizon = now + dt.timedelta(days=horizon_days)
    with Session(trial_engine()) as s:
        wanted, instance = wanted_runs(s), trial_instance(s)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TREATMENT_EVENT)
        existing = scheduled_runs(client, deployment.id, instance=instance, before=horizon)
        report = reconcile(client, deployment.id, wanted, existing, now=now, horizon=horizon)
    for line in report.details[:50]:
        get_run_logger().info(line)
    return str(report)


def rounds_markdown(r: RoundsReport, projection: str) -> str:
    def items(pairs):
        return ", ".join(f"{sid} {key}" for sid, key in pairs) or "none"

    return "\n".join([
        f"# Daily rounds {r.today}", "",
        f"- active patients: **{r.active_patients}**",
        f"- IL-2 due today ({len(r.il2_due)}): {items(r.il2_due)}",
        f"- IL-2 missed yesterday ({len(r.il2_missed)}): {items(r.il2_missed)}",
        f"- visits whose window closes today, not done ({len(r.visits_closing)}): {items(r.visits_closing)}",
        f"- overdue ({len(r.overdue)}): {items(r.overdue[:50])}",
        f"- notices written: {r.notices}",
        f"- Prefect projection: {projection}",
    ])


@flow(name="daily-rounds", flow_run_name="daily rounds")
def daily_rounds(options: RoundsOptions = RoundsOptions()) -> str:
    """IL-2 due and missed, visits closing, overdue items, the coordinators' digest, and the projection check."""
    report = rounds_task()
    reviews, adjudications = pi_reminders_task()
    deliver_notices()  # also redelivers anything a down channel left in the outbox
    projection = reconcile_task(options.reconcile_horizon_days)
    create_markdown_artifact(key="daily-rounds", markdown=rounds_markdown(report, projection), description=f"Daily rounds {report.today}")
    summary = (f"{report.active_patients} active; IL-2 due {len(report.il2_due)}, missed {len(report.il2_missed)}; "
               f"visits closing {len(report.visits_closing)}; overdue {len(report.overdue)}; "
               f"PI: {reviews} review(s) to sign, {adjudications} DLT(s) to adjudicate; projection {projection}")
    get_run_logger().info(summary)
    return summary
