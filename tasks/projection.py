"""Project the trial database's calendar into Prefect as Scheduled runs of treatment-event.

The trial database is the system of record; these runs are a projection that can be rebuilt at
any time. `project` reads both sides and reconciles them. `reconcile` compares what should exist
with what does and makes the difference: create missing runs (idempotency key = subject + event +
anchor version), move runs whose event moved, cancel runs whose event was done, cancelled, or
whose patient left the study.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
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

from models.queries import ACTIVE, trial_instance
from models.tables import CalendarEventRow, EventStatus, Subject
from protocol.calendar import EventKind
from protocol.reminders import ACTION_BY_KIND, reminder_label

TREATMENT_EVENT = "treatment-event/treatment-event"
PAGE = 200
SAME_TIME = dt.timedelta(seconds=60)


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


@dataclass
class ReconcileReport:
    created: int = 0
    moved: int = 0
    cancelled: int = 0
    unchanged: int = 0
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.created} created, {self.moved} moved, {self.cancelled} cancelled, {self.unchanged} unchanged"


def _run_label(row: CalendarEventRow) -> str:
    """The run's name after the subject, the same before and after it runs (treatment-event keeps it): "infusion 2 prep"."""
    if row.kind is EventKind.PK_SAMPLE:  # "PK sample day 7", "PK sample day 14 (pre-infusion 2)"
        return row.label
    return reminder_label(row, ACTION_BY_KIND[row.kind])


def wanted_runs(session: Session, subject_ids: Iterable[str] | None = None) -> dict[str, list[RunSpec]]:
    """Every reminder still to act on, for active subjects (all of them, or those named)."""
    q = (select(Subject.subject_id, Subject.dose_level, CalendarEventRow)
         .join(Subject, Subject.id == CalendarEventRow.subject_pk)
         .where(Subject.status.in_(ACTIVE), CalendarEventRow.status == EventStatus.PLANNED,
                CalendarEventRow.remind_at.is_not(None), CalendarEventRow.reminder_sent_at.is_(None)))
    if subject_ids is not None:
        q = q.where(Subject.subject_id.in_(list(subject_ids)))
    instance = trial_instance(session)
    out: dict[str, list[RunSpec]] = defaultdict(list)
    for sid, level, row in session.exec(q):
        out[sid].append(RunSpec(sid, level, row.key, row.kind.value, _run_label(row), row.remind_at, row.anchor_version, instance))
    return out


def scheduled_runs(
    client, deployment_id, *, instance: str, subject_id: str | None = None, before: dt.datetime | None = None,
) -> dict[tuple[str, str], list[FlowRun]]:
    """This trial database's scheduled treatment-event runs, by (subject, event key); optionally one subject or up to a time."""
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                        tags=FlowRunFilterTags(all_=[f"trial:{instance}"] + ([f"subject:{subject_id}"] if subject_id else [])))
    if before:
        flt.next_scheduled_start_time = FlowRunFilterNextScheduledStartTime(before_=before)
    runs: dict[tuple[str, str], list[FlowRun]] = defaultdict(list)
    offset = 0
    while True:
        page = client.read_flow_runs(flow_run_filter=flt, deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=PAGE, offset=offset)
        for run in page:
            ref = (run.parameters or {}).get("event") or {}
            runs[(ref.get("subject_id"), ref.get("event_key"))].append(run)
        if len(page) < PAGE:
            return runs
        offset += PAGE


def reconcile(
    client, deployment_id, wanted: dict[str, list[RunSpec]], existing: dict[tuple[str, str], list[FlowRun]], *,
    now: dt.datetime, horizon: dt.datetime | None = None,
) -> ReconcileReport:
    """Make Prefect's scheduled runs match `wanted`. With a horizon, only runs due before it are created."""
    report = ReconcileReport()
    want = {(s.subject_id, s.event_key): s for specs in wanted.values() for s in specs}
    for key, runs in existing.items():
        spec = want.get(key)
        keep, extra = (runs[0], runs[1:]) if spec else (None, runs)
        for run in extra:
            why = "duplicate run" if spec else "event done, cancelled, or patient off study"
            client.set_flow_run_state(run.id, Cancelled(message=f"{why}: nothing to do"), force=True)
            report.cancelled += 1
            report.details.append(f"cancelled {run.name} ({why})")
        if keep is None:
            continue
        if _moved(scheduled_at(keep), spec.trigger_at, now):
            client.set_flow_run_state(keep.id, Scheduled(scheduled_time=max(spec.trigger_at, now), message="event moved"), force=True)
            report.moved += 1
            report.details.append(f"moved {keep.name} to {spec.trigger_at:%Y-%m-%d %H:%M} UTC")
        else:
            report.unchanged += 1
    for key, spec in want.items():
        if key in existing or (horizon is not None and spec.trigger_at > horizon):
            continue
        run = _create(client, deployment_id, spec, now, spec.idempotency_key)
        if run.state_type is not StateType.SCHEDULED:
            # The key belongs to a run that already ended: the event needs a fresh run.
            _create(client, deployment_id, spec, now, f"{spec.idempotency_key}:{spec.trigger_at:%Y%m%dT%H%M}")
        elif _moved(scheduled_at(run), spec.trigger_at, now):
            client.set_flow_run_state(run.id, Scheduled(scheduled_time=max(spec.trigger_at, now), message="event moved"), force=True)
        report.created += 1
        report.details.append(f"created {spec.name} at {max(spec.trigger_at, now):%Y-%m-%d %H:%M} UTC")
    return report


def project(
    client, engine, *, now: dt.datetime, subject_id: str | None = None, horizon: dt.datetime | None = None,
) -> ReconcileReport:
    """Read what should be scheduled (one subject, or all), read what is, and reconcile the two.

    With a horizon, only runs due before it are read and created (the daily check); without one,
    the subject's whole projection is rebuilt (after its calendar changed).
    """
    with Session(engine) as s:
        wanted = wanted_runs(s, None if subject_id is None else [subject_id])
        instance = trial_instance(s)
    deployment = client.read_deployment_by_name(TREATMENT_EVENT)
    existing = scheduled_runs(client, deployment.id, instance=instance, subject_id=subject_id, before=horizon)
    return reconcile(client, deployment.id, wanted, existing, now=now, horizon=horizon)


def _create(client, deployment_id, spec: RunSpec, now: dt.datetime, key: str) -> FlowRun:
    return client.create_flow_run_from_deployment(
        deployment_id, parameters={"event": {"subject_id": spec.subject_id, "event_key": spec.event_key, "label": spec.label}},
        state=Scheduled(scheduled_time=max(spec.trigger_at, now)), name=spec.name, tags=spec.tags, idempotency_key=key,
    )


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
