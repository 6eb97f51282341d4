"""Project the trial database's calendar into Prefect as Scheduled runs of treatment-event, and heal it.

The trial database is the system of record; these runs are a projection that can be rebuilt at
any time (`nktrial reconcile`, daily rounds, each patient-treatment run). `project` reads both sides
and reconciles them: every planned event of every on-study patient has exactly one live run
(Scheduled, Late, Pending or Running), matched by its idempotency key (subject + event + anchor
version). It creates missing runs, moves runs whose event moved, cancels duplicates and runs whose
event was done or cancelled or whose patient left the study, and sets back to Scheduled a run stuck
Pending or Late for longer than the protocol's `stuck_run_minutes`, or Crashed; each of those is
flagged to the coordinators (`notify_flagged`). `stuck_requests` does the same for the runs that
start a patient's projection: an enrollment request (enroll-patient) or a treatment plan
(patient-treatment) that never finished.

After a deployment is deleted (which deletes its runs, and their idempotency keys with them) and
applied again, the next reconcile creates every run again, under the new deployment.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterNextScheduledStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Cancelled, Scheduled
from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.queries import ACTIVE, get_subject, trial_instance
from models.tables import CalendarEventRow, EventStatus, Subject
from protocol.calendar import EventKind
from protocol.reminders import ACTION_BY_KIND, reminder_label
from protocol.roles import Role
from tasks.notices import Notice, NoticeEvent, enqueue_many
from tasks.prefect_api import create_run_from_deployment

TREATMENT_EVENT = "treatment-event/treatment-event"
ENROLL_PATIENT = "enroll-patient"
PATIENT_TREATMENT = "patient-treatment"
PAGE = 200
SAME_TIME = dt.timedelta(seconds=60)
LIVE = (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING)  # Late is a Scheduled state
WATCHED = (*LIVE, StateType.CRASHED)
ACTOR = "system:projection-check"


@dataclass(frozen=True)
class RunSpec:
    subject_id: str
    dose_level: int
    event_key: str
    kind: str
    label: str
    trigger_at: dt.datetime
    anchor_version: str
    instance: str = "trial"  # which trial database: one Prefect server can serve a rehearsal beside the real trial

    @property
    def name(self) -> str:
        return f"{self.subject_id} · {self.label}"

    @property
    def idempotency_key(self) -> str:
        return f"{self.instance}:{self.subject_id}:{self.event_key}:{self.anchor_version}"

    @property
    def tags(self) -> list[str]:
        return [f"subject:{self.subject_id}", f"dose-level:{self.dose_level}", f"event:{self.kind}", f"trial:{self.instance}"]


@dataclass(frozen=True)
class StuckRun:
    """A run found stuck (Pending or Late too long) or Crashed, and what was done about it."""

    run_id: str
    subject_id: str | None
    what: str  # the run's name after the subject: "infusion 2 prep", "enrollment"
    state: str  # Pending, Late, Crashed
    since_at: dt.datetime | None  # the state's timestamp (Prefect's wall clock)
    waited: dt.timedelta | None
    action: str  # "rescheduled", "re-submitted", or why not: "not re-submitted: S-071 is enrolled in the trial database"

    @classmethod
    def of(cls, run: FlowRun, subject_id: str | None, what: str, wall_now: dt.datetime, *, action: str) -> StuckRun:
        state = run.state
        kind = state.type.value.title()
        words = state.name if state.name in ("Late", kind) else f"{kind} ({state.name})"  # Pending (Submitting)
        return cls(str(run.id), subject_id, what, words, state.timestamp, stuck_for(run, wall_now), action)

    @property
    def detail(self) -> str:
        """For the notice: protocol wording only (the run's label, its state, how long, what was done)."""
        waited = f" for {_minutes(self.waited)}" if self.waited is not None else ""
        return f"{self.what}: {self.state}{waited}; {self.action}"

    @property
    def sentence(self) -> str:
        return f"{self.subject_id or 'trial'} · {self.detail} (run {self.run_id})"


def _minutes(span: dt.timedelta) -> str:
    minutes = max(0, int(span.total_seconds() // 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


@dataclass
class ReconcileReport:
    created: int = 0
    moved: int = 0
    cancelled: int = 0
    unchanged: int = 0
    rescheduled: int = 0
    patients: int = 0  # patients whose wanted runs were checked
    details: list[str] = field(default_factory=list)
    flagged: list[StuckRun] = field(default_factory=list)  # stuck or crashed runs, for the coordinators
    by_subject: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def count(self, subject_id: str, what: str, detail: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        self.by_subject[subject_id][what] += 1
        self.details.append(detail)

    def __str__(self) -> str:
        text = f"{self.created} created, {self.moved} moved, {self.cancelled} cancelled, {self.unchanged} unchanged"
        return text + (f", {self.rescheduled} stuck or crashed rescheduled" if self.rescheduled else "")


def _run_label(row) -> str:
    """The run's name after the subject, the same before and after it runs (treatment-event keeps it): "infusion 2 prep".
    `row`: a calendar row, or its key, kind, label and protocol_day columns."""
    if row.kind is EventKind.PK_SAMPLE:  # "PK sample day 7", "PK sample day 14 (pre-infusion 2)"
        return row.label
    return reminder_label(row, ACTION_BY_KIND[row.kind])


def wanted_runs(session: Session, subject_ids: Iterable[str] | None = None) -> dict[str, list[RunSpec]]:
    """Every reminder still to act on, for active subjects (all of them, or those named). Only the columns a run needs
    are read (not whole rows): a whole projection of 10,000 patients in treatment is some 42,000 every morning."""
    c = CalendarEventRow
    q = (select(Subject.subject_id, Subject.dose_level, c.key, c.kind, c.label, c.protocol_day, c.remind_at, c.anchor_version)
         .join(Subject, Subject.id == c.subject_pk)
         .where(Subject.status.in_(ACTIVE), c.status == EventStatus.PLANNED, c.remind_at.is_not(None), c.reminder_sent_at.is_(None)))
    if subject_ids is not None:
        q = q.where(Subject.subject_id.in_(list(subject_ids)))
    instance = trial_instance(session)
    out: dict[str, list[RunSpec]] = defaultdict(list)
    for row in session.exec(q):
        out[row.subject_id].append(RunSpec(row.subject_id, row.dose_level, row.key, row.kind.value, _run_label(row), row.remind_at,
                                           row.anchor_version, instance))
    return out


def existing_runs(
    client, *, instance: str, subject_id: str | None = None, before: dt.datetime | None = None,
) -> dict[tuple[str, str], list[FlowRun]]:
    """This trial database's live (Scheduled, Late, Pending, Running) and Crashed treatment-event runs, by (subject,
    event key): read in pages by the tag `trial:<instance>` (one subject's tag too, if given), not patient by patient,
    and by the deployment's name (its id is read only when a run must be created: `DeploymentRef`)."""
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(WATCHED))),
                        tags=FlowRunFilterTags(all_=[f"trial:{instance}"] + ([f"subject:{subject_id}"] if subject_id else [])))
    if before:
        flt.next_scheduled_start_time = FlowRunFilterNextScheduledStartTime(before_=before)
    runs: dict[tuple[str, str], list[FlowRun]] = defaultdict(list)
    flow_name, deployment_name = TREATMENT_EVENT.split("/")
    for run in read_pages(client, flt, DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
                          FlowFilter(name=FlowFilterName(any_=[flow_name]))):
        ref = (run.parameters or {}).get("event") or {}
        runs[(ref.get("subject_id"), ref.get("event_key"))].append(run)
    return runs


scheduled_runs = existing_runs  # the name it had when it read Scheduled runs only


def read_pages(client, flow_run_filter: FlowRunFilter, deployment_filter: DeploymentFilter,
               flow_filter: FlowFilter | None = None) -> list[FlowRun]:
    """Every run the filters match, PAGE at a time (sorted by id, so that a page boundary never skips or repeats one)."""
    out: list[FlowRun] = []
    offset = 0
    while True:
        page = client.read_flow_runs(flow_run_filter=flow_run_filter, deployment_filter=deployment_filter, flow_filter=flow_filter,
                                     sort=FlowRunSort.ID_DESC, limit=PAGE, offset=offset)
        out.extend(page)
        if len(page) < PAGE:
            return out
        offset += PAGE


def stuck_for(run: FlowRun, wall_now: dt.datetime) -> dt.timedelta | None:
    """How long a run has been stuck: Pending since its state began, Late since its scheduled time; else None (a
    Crashed run is flagged at once). Measured in Prefect's own time (the wall clock): its states carry wall-clock
    timestamps, set by the server."""
    state = run.state
    if state is None:
        return None
    if state.type is StateType.PENDING:
        return wall_now - state.timestamp if state.timestamp else None
    if state.type is StateType.SCHEDULED and state.name == "Late":
        at = scheduled_at(run)
        return wall_now - at if at else None
    return None


def _live_rank(run: FlowRun) -> int:
    return {StateType.RUNNING: 0, StateType.PENDING: 1}.get(run.state_type, 2)


def reconcile(
    client, deployment: DeploymentRef, wanted: dict[str, list[RunSpec]], existing: dict[tuple[str, str], list[FlowRun]], *,
    now: dt.datetime, horizon: dt.datetime | None = None, wall_now: dt.datetime | None = None,
    stuck_after: dt.timedelta | None = None,
) -> ReconcileReport:
    """Make the live runs match `wanted`: exactly one live run per wanted event, none for anything else.

    Missing runs are created (with a horizon, only those due before it); a moved event moves its run; extra live runs
    (duplicates, or runs of events done, cancelled or of patients off study) are cancelled, never a Running one. A run
    Pending or Late for longer than `stuck_after`, or Crashed with no live run beside it, is flagged and set back to
    Scheduled. Safe to repeat: a second pass changes nothing.
    """
    report = ReconcileReport()
    wall_now = wall_now or now
    want = {(s.subject_id, s.event_key): s for specs in wanted.values() for s in specs}
    for key, runs in existing.items():
        spec = want.get(key)
        live = sorted((r for r in runs if r.state_type in LIVE), key=_live_rank)
        crashed = sorted((r for r in runs if r.state_type is StateType.CRASHED), key=lambda r: r.state.timestamp, reverse=True)
        if spec is None:
            for run in live:
                if run.state_type is not StateType.RUNNING:
                    _cancel(client, run, "event done, cancelled, or patient off study", report, key[0])
            continue
        if not live:
            if crashed:
                _reschedule(client, crashed[0], spec, now, wall_now, report)
            continue
        keep, extra = live[0], live[1:]
        for run in extra:
            if run.state_type is not StateType.RUNNING:
                _cancel(client, run, "duplicate run", report, spec.subject_id)
        waited = stuck_for(keep, wall_now)
        if stuck_after is not None and waited is not None and waited > stuck_after:
            _reschedule(client, keep, spec, now, wall_now, report)
        elif keep.state_type is StateType.SCHEDULED and _moved(scheduled_at(keep), spec.trigger_at, now):
            client.set_flow_run_state(keep.id, Scheduled(scheduled_time=max(spec.trigger_at, now), message="event moved"), force=True)
            report.count(spec.subject_id, "moved", f"moved {keep.name} to {spec.trigger_at:%Y-%m-%d %H:%M} UTC")
        else:
            report.unchanged += 1
    # One request a run. Prefect's bulk endpoint (100 a request) was tried: on a SQLite server it reports runs FAILED with
    # "database is locked" whenever the server's own writers overlap its transaction, and a plan then fails and retries.
    for key, spec in want.items():
        if key in existing or (horizon is not None and spec.trigger_at > horizon):
            continue
        run = _create(client, deployment, spec, now, spec.idempotency_key)
        if run.state_type not in LIVE:
            # The key belongs to a run that already ended: the event needs a fresh run.
            _create(client, deployment, spec, now, f"{spec.idempotency_key}:{spec.trigger_at:%Y%m%dT%H%M}")
        elif run.state_type is StateType.SCHEDULED and _moved(scheduled_at(run), spec.trigger_at, now):
            client.set_flow_run_state(run.id, Scheduled(scheduled_time=max(spec.trigger_at, now), message="event moved"), force=True)
        report.count(spec.subject_id, "created", f"created {spec.name} at {max(spec.trigger_at, now):%Y-%m-%d %H:%M} UTC")
    return report


def _cancel(client, run: FlowRun, why: str, report: ReconcileReport, subject_id: str) -> None:
    client.set_flow_run_state(run.id, Cancelled(message=f"{why}: nothing to do"), force=True)
    report.count(subject_id, "cancelled", f"cancelled {run.name} ({why})")


def _reschedule(client, run: FlowRun, spec: RunSpec, now: dt.datetime, wall_now: dt.datetime, report: ReconcileReport) -> None:
    """Flag a stuck or crashed run and set it back to Scheduled (its event is still to act on; acting is idempotent)."""
    state = run.state
    flag = StuckRun.of(run, spec.subject_id, spec.label, wall_now, action="rescheduled")
    client.set_flow_run_state(run.id, Scheduled(scheduled_time=max(spec.trigger_at, now),
                                                message=f"rescheduled by the projection check: was {state.name}"), force=True)
    report.flagged.append(flag)
    report.count(spec.subject_id, "rescheduled", f"rescheduled {run.name} (was {state.name})")


def project(
    client, engine, *, now: dt.datetime, subject_id: str | None = None, horizon: dt.datetime | None = None,
    wall_now: dt.datetime | None = None, stuck_after: dt.timedelta | None = None,
) -> ReconcileReport:
    """Read what should be scheduled (one subject, or all), read what is, and reconcile the two.

    Without a horizon (the default) the whole projection is checked: every wanted event, however far ahead. With
    one, only runs due before it are read and created (a quicker, partial check).
    """
    with Session(engine) as s:
        wanted = wanted_runs(s, None if subject_id is None else [subject_id])
        instance = trial_instance(s)
    existing = existing_runs(client, instance=instance, subject_id=subject_id, before=horizon)
    report = reconcile(client, DeploymentRef(client), wanted, existing, now=now, horizon=horizon, wall_now=wall_now,
                       stuck_after=stuck_after)
    report.patients = len(wanted) if subject_id is None else 1
    return report


def project_each(
    client, engine, *, now: dt.datetime, wall_now: dt.datetime, stuck_after: dt.timedelta | None, subject_id: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, ReconcileReport]:
    """`project`, reported patient by patient: the runs are read in bulk once, then each patient's wanted and existing
    runs are reconciled in turn (`progress(done, total, subject_id)` after each). Patients with runs but nothing wanted
    (off study, not dosed) are included: their runs are cancelled."""
    with Session(engine) as s:
        wanted = wanted_runs(s, None if subject_id is None else [subject_id])
        instance = trial_instance(s)
    deployment = DeploymentRef(client)
    deployment.id  # noqa: B018 - read now: a missing deployment is said before any patient is checked
    existing = existing_runs(client, instance=instance, subject_id=subject_id)
    by_subject: dict[str, dict] = defaultdict(dict)
    for key, runs in existing.items():
        by_subject[key[0] or "?"][key] = runs
    subjects = sorted(set(wanted) | set(by_subject))
    reports: dict[str, ReconcileReport] = {}
    for i, sid in enumerate(subjects, 1):
        reports[sid] = reconcile(client, deployment, {sid: wanted.get(sid, [])}, by_subject.get(sid, {}), now=now,
                                 wall_now=wall_now, stuck_after=stuck_after)
        if progress:
            progress(i, len(subjects), sid)
    return reports


class DeploymentRef:
    """The treatment-event deployment's id, read from the server the first time a run must be created (a daily check that
    creates nothing never asks)."""

    def __init__(self, client):
        self.client, self._id = client, None

    @property
    def id(self):
        if self._id is None:
            self._id = self.client.read_deployment_by_name(TREATMENT_EVENT).id
        return self._id


def _create(client, deployment: DeploymentRef, spec: RunSpec, now: dt.datetime, key: str) -> FlowRun:
    event = {"subject_id": spec.subject_id, "event_key": spec.event_key, "label": spec.label}
    return create_run_from_deployment(client, deployment.id, parameters={"event": event},
                                      state=Scheduled(scheduled_time=max(spec.trigger_at, now)), name=spec.name, tags=spec.tags,
                                      idempotency_key=key)


def scheduled_at(run: FlowRun) -> dt.datetime | None:
    """When a Scheduled run will start: its state's time (a moved run keeps its first expected_start_time)."""
    details = run.state.state_details if run.state else None
    return (details.scheduled_time if details else None) or run.next_scheduled_start_time or run.expected_start_time


def _moved(scheduled: dt.datetime | None, trigger: dt.datetime, now: dt.datetime) -> bool:
    if scheduled is None:
        return True
    if trigger <= now and scheduled <= now + SAME_TIME:
        return False  # due already, and the run is due already: leave it to run
    return abs(scheduled - trigger) > SAME_TIME


def stuck_requests(client, engine, *, wall_now: dt.datetime, stuck_after: dt.timedelta) -> list[StuckRun]:
    """Enrollment requests (enroll-patient) and treatment plans (patient-treatment) of this trial database that never
    finished: Pending or Late for longer than `stuck_after`, or Crashed. A run started by hand from a form
    carries no trial tag and counts as this database's (it would act on the worker's database).

    A treatment plan is set back to Scheduled: it only stores the calendar and reconciles, so a re-run is safe. An
    enrollment request is re-submitted when that is safe: it never started (Pending, Late), or it crashed and the trial
    database holds no trace of the subject (the enrollment commits as one unit of work, so nothing was written); else
    it is only reported, with what the trial database shows.
    """
    with Session(engine) as s:
        instance = trial_instance(s)
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.SCHEDULED,
                                                                                    StateType.CRASHED])))
    found: list[StuckRun] = []
    names: dict = {}  # deployment id → name, read only for a run that is stuck
    # Both deployments' runs in one read (daily rounds pay it every morning); a stuck one's deployment is read to tell them apart.
    for run in read_pages(client, flt, DeploymentFilter(name=DeploymentFilterName(any_=[ENROLL_PATIENT, PATIENT_TREATMENT]))):
        claimed = {t.removeprefix("trial:") for t in run.tags or () if t.startswith("trial:")}
        waited = stuck_for(run, wall_now)
        crashed = run.state_type is StateType.CRASHED
        if (claimed and claimed != {instance}) or not (crashed or (waited is not None and waited > stuck_after)):
            continue
        if run.deployment_id not in names:
            names[run.deployment_id] = client.read_deployment(run.deployment_id).name
        name = names[run.deployment_id]
        params = run.parameters or {}
        ref = params.get("request") if name == ENROLL_PATIENT else params.get("subject")
        sid = _subject_of(ref)
        what = "enrollment" if name == ENROLL_PATIENT else "treatment plan"
        action = "rescheduled" if name == PATIENT_TREATMENT else _resubmit_or_why(engine, run, sid)
        flag = StuckRun.of(run, sid, what, wall_now, action=action)
        if action in ("rescheduled", "re-submitted"):
            client.set_flow_run_state(run.id, Scheduled(message=f"{action} by the projection check: was {run.state.name}"),
                                      force=True)
        found.append(flag)
    return found


def _subject_of(ref) -> str | None:
    if not isinstance(ref, dict):
        return None
    screening = ref.get("screening")
    return ref.get("subject_id") or (screening.get("subject_id") if isinstance(screening, dict) else None)


def _resubmit_or_why(engine, run: FlowRun, subject_id: str | None) -> str:
    if run.state_type is not StateType.CRASHED:
        return "re-submitted"  # claimed by a worker that never started it: nothing of it ran
    if subject_id is None:
        return "not re-submitted: the request names no subject"
    with Session(engine) as s:
        subject = get_subject(s, subject_id=subject_id)
    if subject is None:
        return "re-submitted"  # the enrollment commits as one unit of work: nothing of it was written
    return f"not re-submitted: {subject_id} is {subject.status.value.replace('_', ' ')} in the trial database, check the request"


def notify_flagged(engine, flagged: list[StuckRun], *, clock: Clock, ui_url: str | None = None) -> int:
    """One notice to the coordinators per stuck or crashed run and state (a run stuck again later is told again)."""
    if not flagged:
        return 0
    base = (ui_url or "").rstrip("/")
    notices = [(Notice(Role.COORDINATOR, NoticeEvent.RUN_STUCK, f.subject_id, detail=f.detail,
                       link=f"{base}/flow-runs/flow-run/{f.run_id}" if base else None),
                f"stuck:{f.run_id}:{f.since_at.isoformat() if f.since_at else ''}") for f in flagged]
    with UnitOfWork(engine, actor=ACTOR, reason="runs stuck or crashed, flagged to the coordinators", clock=clock) as u:
        n = enqueue_many(u.session, notices, at=u.at)
        u.commit()
    return n


# -- zombie runs: Prefect's own heartbeat and automation --------------------------------------------------------------
# A flow run whose process dies without a word (kill -9, a machine lost) stays Running for ever. With
# PREFECT_FLOWS_HEARTBEAT_FREQUENCY set for the worker (its flow runs inherit it), each run sends a heartbeat event; the
# automation below, as Prefect's documentation gives it ("detect zombie flows"), marks a run Crashed when its heartbeats
# stop, or when none came after it started running (a process killed in its first moments, before its first beat
# reached the server: the Running event is the server's own, so it is never lost with the process). The projection
# check then sets a crashed treatment-event or treatment plan back to Scheduled and tells the coordinators, and
# re-submits or reports a crashed enrollment request.
HEARTBEAT_SECONDS = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY `nktrial up` gives its workers unless set otherwise


def zombie_after() -> dt.timedelta | None:
    """Three heartbeats missed, at the heartbeat frequency set here (PREFECT_FLOWS_HEARTBEAT_FREQUENCY; `nktrial up`
    sets it for its workers and its reconcile); None where it is not set (a coordinator's shell): then an automation
    already made is kept as it is, never remade for another frequency (a remade one forgets runs already silent)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    seconds = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    return dt.timedelta(seconds=3 * seconds) if seconds else None


ZOMBIE_AUTOMATION = "nktrial: crash zombie flow runs"


def ensure_zombie_automation() -> bool:
    """Create the automation that marks a flow run Crashed when its heartbeats stop or never start, once (by name); True
    if created.
    Needs the Prefect API in the settings (PREFECT_API_URL)."""
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    # A run waiting for a person (Paused, Suspended: the PI's signature) or for its time (Scheduled) has no process and
    # so no heartbeats: those states are expected, or a cohort review would be marked Crashed 3 minutes after it suspends.
    # A run waiting to be retried (AwaitingRetry) is alive too. Counting starts at a heartbeat or when the run starts
    # running (again): a run that runs without heartbeats (a worker started without PREFECT_FLOWS_HEARTBEAT_FREQUENCY)
    # is marked Crashed once it has run that long without a word.
    expect = {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
              "prefect.flow-run.Crashed", "prefect.flow-run.Paused", "prefect.flow-run.Suspended", "prefect.flow-run.Scheduled",
              "prefect.flow-run.Cancelling", "prefect.flow-run.AwaitingRetry"}
    after = {"prefect.flow-run.heartbeat", "prefect.flow-run.Running", "prefect.flow-run.Retrying"}
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # no automation of that name
        existing = None
    # the frequency set here, else the existing automation's own (a coordinator's shell never changes it), else the default
    within = zombie_after() or (existing.trigger.within if existing is not None else dt.timedelta(seconds=3 * HEARTBEAT_SECONDS))
    if existing is not None:
        if expect <= set(existing.trigger.expect) and after <= set(existing.trigger.after) and existing.trigger.within == within:
            return False
        # an earlier version's (one crashed suspended reviews; one never heard of a run killed before its first
        # heartbeat), or another heartbeat frequency's: replaced
        existing.delete()
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run whose heartbeats stopped, or never came after it started running (its process died), is "
                    "marked Crashed; daily rounds then reschedule it.",
        trigger=EventTrigger(
            after=after,
            expect=expect,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=within,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"marked Crashed: no heartbeat for {within.total_seconds():.0f} s "
                                                                     "while running (zombie run: its process died)")],
    ).create()
    return True
