"""daily-rounds: every morning at 07:00 site time, for every active patient at once."""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows.casebook import casebook_link, refresh_casebooks_task
from flows.common import current_clock, deliver_notices, protocol, run_link, trial_engine
from models.queries import ACTIVE
from models.tables import Subject
from tasks.projection import project
from tasks.reports import rounds_markdown
from tasks.rounds import RoundsReport
from tasks.rounds import daily_rounds as rounds


class RoundsOptions(BaseModel):
    """How much of the Prefect projection daily rounds check (all of it by default), and whether they refresh the reports
    and the coordinators' views (both by default; a rehearsal draws them at its close, and also weekly on a server whose
    UI someone watches)."""

    reconcile_horizon_days: int | None = Field(
        default=None, ge=0, le=120,
        description="empty: check the whole projection (every future event of every patient on study); a number: only runs due within "
                    "this many days (a quicker, partial check)")
    reports: bool = Field(default=True, description="refresh the reports: artifacts, and files under the data folder's reports/")
    views: bool = Field(default=True, description="publish the worklist, and each casebook whose record changed since its "
                                                  "latest version")


@task(name="rounds")
def rounds_task() -> RoundsReport:
    return rounds(trial_engine(), protocol(), clock=current_clock(), link=run_link())


@task(name="pi-reminders")
def pi_reminders_task() -> tuple[int, int]:
    from tasks.escalation_gate import pi_reminders

    return pi_reminders(trial_engine(), protocol(), clock=current_clock(), link=run_link())


@task(name="audit-check")
def audit_task() -> str:
    """The audit rows added since the last check, the guards and the links; a break alerts the safety desk and the PI."""
    from tasks.audit import rounds_check

    report = rounds_check(trial_engine(), clock=current_clock(), link=run_link())
    if not report.intact:
        get_run_logger().error("audit trail check failed: " + report.problems[0].message)
    return (f"audit trail intact to row {report.verified_to_id or 0}" if report.intact
            else f"AUDIT TRAIL BROKEN ({len(report.problems)} finding(s)), safety desk and PI alerted")


@task(name="reconcile-projection")
def reconcile_task(horizon_days: int | None) -> tuple[str, int]:
    """The projection check: every future event of every patient on study has exactly one live run (repaired if not);
    runs stuck or crashed, and enrollment requests or treatment plans that never finished, flagged to the coordinators."""
    from prefect.settings import PREFECT_UI_URL

    from models.clock import wall_clock
    from tasks.projection import notify_flagged, stuck_requests

    now, wall_now = current_clock()(), wall_clock()
    stuck_after = dt.timedelta(minutes=protocol().notifications.stuck_run_minutes.value)
    horizon = None if horizon_days is None else now + dt.timedelta(days=horizon_days)
    with get_client(sync_client=True) as client:
        report = project(client, trial_engine(), now=now, horizon=horizon, wall_now=wall_now, stuck_after=stuck_after)
        requests = stuck_requests(client, trial_engine(), wall_now=wall_now, stuck_after=stuck_after)
    flagged = report.flagged + requests
    told = notify_flagged(trial_engine(), flagged, clock=current_clock(), ui_url=PREFECT_UI_URL.value())
    logger = get_run_logger()
    for line in report.details[:50]:
        logger.info(line)
    for flag in flagged:
        logger.warning("stuck or crashed: %s", flag.sentence)
    return str(report) + (f"; coordinators told of {told} stuck or crashed run(s)" if told else ""), told


@task(name="worklist")
def worklist_task(casebooks: dict[str, str | None]) -> str:
    """Everything due today and in the next days across active patients, overdue first: the `worklist` artifact. Each
    patient links to the casebook version published by these rounds."""
    from tasks.worklist import worklist

    with Session(trial_engine()) as s:
        wl = worklist(s, protocol(), now=current_clock()())
    create_markdown_artifact(key="worklist", markdown=wl.markdown(lambda sid: casebook_link(sid, casebooks.get(sid))),
                             description=f"Worklist {wl.today}: due today and to {wl.until}, overdue first (site time, {wl.timezone})")
    return f"worklist: {len(wl.overdue)} overdue, {len(wl.due_today)} today, {len(wl.coming)} coming"


def refresh_casebooks() -> dict[str, str | None]:
    """Each active patient's casebook, published again where its record changed (a write the casebook did not follow, a
    failed refresh): subject → artifact id. A casebook that cannot be drawn never stops the rounds' own work."""
    from sqlmodel import select

    with Session(trial_engine()) as s:
        ids = list(s.exec(select(Subject.subject_id).where(Subject.status.in_(ACTIVE)).order_by(Subject.subject_id)).all())
    state = refresh_casebooks_task(ids, return_state=True)
    if state.is_completed():
        return state.result()
    get_run_logger().warning("casebooks not refreshed: %s", state.message)
    return {}


@task(name="refresh-reports")
def reports_task() -> str:
    """Swimmer plot, dashboard, PK, 3-month outcomes as artifacts; those and the exports as files."""
    import base64

    from tasks.reports import build, write_all
    from tasks.settings import get_settings

    folder = get_settings().report_folder  # a folder every node sees, or none: never one worker's own disk
    with Session(trial_engine()) as s:
        rs = write_all(s, protocol(), folder, now=current_clock()()) if folder else build(s, protocol(), now=current_clock()())
    png = base64.b64encode(rs.swimmer_png).decode()
    create_markdown_artifact(key="swimmer-plot", markdown=f"# Swimmer plot\n\n![swimmer plot](data:image/png;base64,{png})",
                             description="Patients by dose level on protocol days (also reports/swimmer.png in the data folder)")
    create_markdown_artifact(key="trial-dashboard", markdown=rs.dashboard, description="Cohort and trial dashboard")
    create_markdown_artifact(key="pk-summary", markdown=rs.pk, description="Donor NK cell Cmax and Tmax")
    create_markdown_artifact(key="outcomes-3-month", markdown=rs.outcomes, description="3-month MRD-negative and CR rates by dose level")
    if folder is None:
        return ("reports published as artifacts; no report files written (the trial database is shared: set NKTRIAL_REPORTS_DIR "
                "to a folder every node sees for the files and exports, or run nktrial report)")
    return f"{len(rs.files)} report files written to {folder}"


@flow(name="daily-rounds", flow_run_name="daily rounds")
def daily_rounds(options: RoundsOptions = RoundsOptions()) -> str:
    """IL-2 due and missed, visits closing, overdue items, the coordinators' digest, and the projection check."""
    report = rounds_task()
    reviews, adjudications = pi_reminders_task()
    audit = audit_task()
    deliver_notices()  # also redelivers anything a down channel left in the outbox
    projection, flags = reconcile_task(options.reconcile_horizon_days)
    if flags:
        deliver_notices()  # the coordinators hear of stuck or crashed runs at once
    reports = "reports not refreshed this time"
    if options.reports:  # a report that cannot be drawn never stops the rounds' own work
        state = reports_task(return_state=True)
        reports = state.result() if state.is_completed() else f"reports not refreshed: {state.message}"
    work = "worklist and casebooks not refreshed this time"
    if options.views:
        casebooks = refresh_casebooks()
        state = worklist_task(casebooks, return_state=True)  # a list that cannot be drawn never stops the rounds' own work
        work = state.result() if state.is_completed() else f"worklist not refreshed: {state.message}"
    create_markdown_artifact(key="daily-rounds", markdown=rounds_markdown(report, projection), description=f"Daily rounds {report.today}")
    summary = (f"{report.active_patients} active; IL-2 due {len(report.il2_due)}, missed {len(report.il2_missed)}; "
               f"visits closing {len(report.visits_closing)}; overdue {len(report.overdue)}; "
               f"PI: {reviews} review(s) to sign, {adjudications} DLT(s) to adjudicate; {audit}; projection {projection}; {work}; "
               f"{reports}")
    get_run_logger().info(summary)
    return summary
