"""`nktrial simulate`: a whole trial in virtual time, through the real deployments on a real Prefect server.

The loop: of everything that could happen next — the next virtual morning's daily rounds, the
earliest Scheduled run of this trial database, the PI signing a waiting review, a staff member
recording what the calendar asks (or what the scenario says instead), a referral — take the
earliest, set the virtual clock to its time, do it, and write it to the event log.

Runs go through their deployments: a run is created from the deployment on the server, then
executed in this process as a worker would (a worker on a shared server never sees one due,
because each is Pending or scheduled in virtual time). The nurse's bedside entries (IL-2 doses,
PK samples) are written as `nktrial record` writes them. Signing codes are read from the
notifications the PI's channel received, on a real local apprise receiver.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from sqlmodel import Session, func, select

from models.crud import register_protocol
from models.queries import get_subject, trial_instance
from models.db import UnitOfWork
from models.migrate import upgrade
from models.tables import (
    AdverseEvent, Adjudication, CalendarEventRow, DoseLevelState, Enrollment, EscalationDecision, EventStatus, LevelStatus, Signature,
    Subject, SubjectStatus,
)
from models.clock import VirtualClock, use_clock
from nktrial.receiver import Receiver
from nktrial.scenario import PatientSpec, Scenario
from protocol.calendar import EventKind
from protocol.dates import local_instant, to_local
from protocol.definition import ProtocolDefinition
from protocol.three_plus_three import BOLDNESS, Action
from protocol.roles import Role
from models.queries import ACTIVE

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "screening-S-001.json"
TEMPLATE_DAY0 = dt.date(2027, 1, 31)  # the template's own planned day 0: its dates keep their distance from it
STAFF_KINDS = (EventKind.NK_INFUSION, EventKind.IL2_DOSE, EventKind.PK_SAMPLE, EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH)
# Ties at one instant: rounds, then due runs, then the PI, then staff, then referrals.
ROUNDS, RUN, PI, STAFF, REFERRAL = range(5)
# Synthetic donor NK counts for rehearsal PK (cells/µL at the peak, three days after an infusion) — not clinical values.
PK_PEAK_PER_1E8_CELLS = 4.0


@dataclass
class LogEntry:
    at: str  # site-local time
    kind: str  # rounds | run | pi | staff | referral
    name: str
    result: str
    notices: list[str] = field(default_factory=list)
    wall_ms: int = 0


@dataclass
class Step:
    at: dt.datetime
    order: int
    name: str
    do: Callable[[], tuple[str, str]]  # → (kind, result)


@dataclass
class Result:
    scenario: str
    title: str
    history: str
    mtd: int | None
    trial_open: bool
    patients: list[dict]
    levels: list[dict]
    decisions: list[dict]
    virtual_days: int
    runs_executed: int
    staff_entries: int
    notices_sent: int
    wall_seconds: float
    event_log: str
    reports: str
    wall_by_kind: dict[str, dict] = field(default_factory=dict)  # kind → steps, seconds, median ms
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def rounds_time() -> dt.time:
    """Daily rounds' time of day, from the deployment's schedule in prefect.yaml (one source)."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    dep = next(d for d in spec["deployments"] if d["name"] == "daily-rounds")
    minute, hour = dep["schedules"][0]["cron"].split()[:2]
    return dt.time(int(hour), int(minute))


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def screening_for(p: PatientSpec, day0: dt.date) -> dict:
    """The template record with its dates moved so they keep their distance from the planned day 0."""
    record = json.loads(_template())
    shift = day0 - TEMPLATE_DAY0
    for key, value in record.items():
        if key.endswith("_on") and isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            record[key] = (dt.date.fromisoformat(value) + shift).isoformat()
    return {**record, **p.screening, "subject_id": p.id}


def pk_value(subject_id: str, cells_per_infusion: float, infusions: list[dt.datetime], sampled_at: dt.datetime) -> float:
    """A synthetic donor NK count: each infusion adds a curve peaking three days after it (rehearsal data only)."""
    peak = PK_PEAK_PER_1E8_CELLS * cells_per_infusion / 1e8 * (0.8 + 0.1 * (int(subject_id[2:]) % 5))
    total = 0.0
    for given in infusions:
        days = (sampled_at - given).total_seconds() / 86400
        if days > 0.01:
            total += peak * days / 3 * math.exp(1 - days / 3)
    return round(total + 0.5, 2)


class Rehearsal:
    def __init__(self, scenario: Scenario, protocol: ProtocolDefinition, engine, *, out_dir: Path, clock: VirtualClock, receiver: Receiver,
                 progress: Callable[[str], None] | None = None, reports_every: int = 7):
        self.sc, self.p, self.engine, self.out_dir = scenario, protocol, engine, out_dir
        self.progress = progress or (lambda _msg: None)
        self.reports_every = reports_every
        self.tz = protocol.timezone
        self.clock, self.receiver = clock, receiver
        self.rounds_at = rounds_time()
        self.next_rounds_on = scenario.start
        self.log: list[LogEntry] = []
        self.done: set[tuple] = set()
        self.arrived: dict[str, dt.datetime] = {}
        self.paused_since: dict[str, dt.datetime] = {}
        self.waitlisted: set[str] = set()
        self.ae_ids: dict[tuple[str, int], int] = {}  # (subject, index in the scenario) → the AE's id in the trial database
        self.runs_executed = self.staff_entries = 0
        self.deployments: dict = {}  # deployment id → flow
        self.deployment_ids: dict[str, object] = {}  # flow name → deployment id

    # -- time -------------------------------------------------------------------------------------

    def local(self, on: dt.date, at: dt.time) -> dt.datetime:
        return local_instant(self.tz, on, at, what="scenario time")[0]

    def today(self) -> dt.date:
        return to_local(self.tz, self.clock()).date()

    def next_morning(self, at: dt.time) -> dt.datetime:
        """The next `at` o'clock, site time, at or after now."""
        today = self.today()
        candidate = self.local(today, at)
        return candidate if candidate >= self.clock() else self.local(today + dt.timedelta(days=1), at)

    # -- the deployments --------------------------------------------------------------------------

    def ensure_deployments(self, client) -> None:
        from prefect.exceptions import ObjectNotFound

        from flows.deployments import ALL_FLOWS

        for f in ALL_FLOWS:
            try:
                dep = client.read_deployment_by_name(f"{f.name}/{f.name}")
            except ObjectNotFound:  # not deployed on this server yet: deploy it (no work pool; runs execute here)
                f.to_deployment(name=f.name).apply()
                dep = client.read_deployment_by_name(f"{f.name}/{f.name}")
            self.deployments[dep.id] = f
            self.deployment_ids[f.name] = dep.id

    def execute(self, run_id, created=None) -> str:
        """Execute one run here, as a worker would; a suspended review ends Paused. `created`: a run just created Pending."""
        from prefect.exceptions import Pause
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        client = self.client
        run = created
        if run is None:  # a Scheduled (or resumed) run: Pending now, so no worker's clock can take it
            client.set_flow_run_state(run_id, Pending(), force=True)
            run = client.read_flow_run(run_id)
        flow = self.deployments[run.deployment_id]
        try:
            state = run_flow(flow, flow_run=run, return_type="state")
        except Pause:
            state = client.read_flow_run(run_id).state
        self.runs_executed += 1
        if state.is_paused():
            self.paused_since.setdefault(str(run_id), self.clock())
            return "paused: waiting for the PI's signed decision"
        self.paused_since.pop(str(run_id), None)
        text = state.message or ""
        if not text and state.is_completed():
            try:
                value = state.result(raise_on_failure=False)
                text = value if isinstance(value, str) else ""
            except Exception:  # noqa: BLE001 - a result not kept is not an error
                text = ""
        return f"{state.name}: {text}" if text else state.name

    def run_deployment(self, flow_name: str, parameters: dict) -> str:
        from prefect.states import Pending

        run = self.client.create_flow_run_from_deployment(self.deployment_ids[flow_name], parameters=parameters, state=Pending(),
                                                          tags=[f"trial:{self.instance}"])
        return self.execute(run.id, created=run)

    # -- what could happen next ---------------------------------------------------------------------

    def step_rounds(self, *, final: bool = False) -> Step:
        at = self.local(self.next_rounds_on, self.rounds_at)
        reports = final or (self.next_rounds_on - self.sc.start).days % self.reports_every == 0

        def do():
            self.next_rounds_on += dt.timedelta(days=1)
            return "rounds", self.run_deployment("daily-rounds", {"options": {"reports": reports}})

        return Step(at, ROUNDS, "daily rounds", do)

    def step_run(self) -> Step | None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        from tasks.projection import scheduled_at

        runs = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                                          tags=FlowRunFilterTags(all_=[f"trial:{self.instance}"])),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=1)
        if not runs:
            return None
        run = runs[0]
        return Step(scheduled_at(run) or self.clock(), RUN, run.name, lambda: ("run", self.execute(run.id)))

    def step_pi(self) -> Step | None:
        if not self.paused_since:
            return None
        run_id, since = min(self.paused_since.items(), key=lambda kv: kv[1])
        return Step(since + dt.timedelta(hours=self.sc.pi.sign_after_hours), PI, "PI signs the cohort review", lambda: ("pi", self.sign(run_id)))

    def sign(self, run_id: str) -> str:
        from prefect.flow_runs import resume_flow_run

        with Session(self.engine) as s:
            d = s.exec(select(EscalationDecision).where(EscalationDecision.review_flow_run_id == run_id)).first()
            number = s.exec(select(func.count()).select_from(EscalationDecision).where(EscalationDecision.id <= d.id)).one()
        codes = [re.search(r"signing code (\d{8})", m.body) for m in self.receiver.messages[self.first_message:]
                 if m.path == "pi" and f"decision {d.id} " in m.body]
        codes = [c.group(1) for c in codes if c]
        if not codes:
            self.paused_since.pop(run_id, None)
            return f"no signing code for decision {d.id} reached the PI channel; the review stays open"
        action = self.sc.pi.decisions.get(number, Action(d.recommended_action))
        resume_flow_run(run_id, run_input={
            "signer_id": self.sc.pi.signer_id, "printed_name": self.sc.pi.printed_name, "decision": action.value,
            "signing_code": codes[-1], "rationale": "" if action.value == d.recommended_action else "rehearsal: the PI chose a more cautious action",
        })
        return f"resumed with {action.value}, code from the PI channel → " + self.execute(run_id)

    def step_referral(self) -> Step | None:
        if all(p.id in self.arrived for p in self.sc.patients) and not self.waitlisted:
            return None  # everyone referred, nobody waiting: nothing to look up
        with Session(self.engine) as s:
            level = s.exec(select(DoseLevelState).where(DoseLevelState.status == LevelStatus.OPEN)).first()
            free = 0
            if level is not None:
                taken = s.exec(select(func.count()).select_from(Enrollment).where(Enrollment.dose_level == level.level)).one()
                free = level.slots_open - taken
            waitlisted = list(s.exec(select(Subject.subject_id).where(Subject.status == SubjectStatus.WAITLISTED).order_by(Subject.id)).all())
        self.waitlisted = set(waitlisted)
        fixed = [(self.local(self.sc.start + dt.timedelta(days=p.arrives_on_day), self.p.site.event_time), p)
                 for p in self.sc.patients if p.id not in self.arrived and p.arrives_on_day is not None]
        queue = [p for p in self.sc.patients if p.id in waitlisted] + \
                [p for p in self.sc.patients if p.id not in self.arrived and p.arrives_on_day is None]
        options = [(at, p) for at, p in fixed]
        if free > 0 and queue:
            options.append((self.next_morning(self.p.site.event_time), queue[0]))
        if not options:
            return None
        at, patient = min(options, key=lambda o: o[0])
        return Step(at, REFERRAL, f"{patient.id} referred", lambda: ("referral", self.refer(patient)))

    def refer(self, p: PatientSpec) -> str:
        self.arrived[p.id] = self.clock()
        self.waitlisted.add(p.id)  # until the next look-up says otherwise
        day0 = self.today() + dt.timedelta(days=self.sc.day0_after_days)
        request = {"screening": screening_for(p, day0), "planned_day0": dt.datetime.combine(day0, self.p.site.event_time).isoformat(),
                   "recorded_by": "coord-1"}
        return self.run_deployment("enroll-patient", {"request": request})

    def step_staff(self) -> Step | None:
        """The earliest thing a staff member does: what the calendar asks, changed by the scenario."""
        best: Step | None = None
        with Session(self.engine) as s:
            # In due order: the scenario only ever delays an action, so the first rows hold the earliest one.
            rows = s.exec(select(Subject, CalendarEventRow).join(CalendarEventRow, CalendarEventRow.subject_pk == Subject.id)
                          .where(Subject.status.in_(ACTIVE), CalendarEventRow.status == EventStatus.PLANNED,
                                 CalendarEventRow.kind.in_(STAFF_KINDS)).order_by(CalendarEventRow.due_at).limit(200)).all()
            inf2_done = set(s.exec(select(CalendarEventRow.subject_pk).where(
                CalendarEventRow.key == "nk_infusion-2", CalendarEventRow.status == EventStatus.DONE)).all())
            day0s = s.exec(select(Subject.subject_id, Subject.planned_day0_at).where(Subject.status.in_(ACTIVE))).all()
        for subject, row in rows:
            if best is not None and row.due_at > best.at:
                break
            spec = self.sc.patient(subject.subject_id)
            step = self._staff_step(spec, subject, row, subject.id in inf2_done)
            if step and (best is None or (step.at, step.order) < (best.at, best.order)):
                best = step
        for sid, day0_at in day0s:
            spec = self.sc.patient(sid)
            day0 = to_local(self.tz, day0_at).date()
            extra = []
            for i, ae in enumerate(spec.adverse_events):
                onset = day0 + dt.timedelta(days=ae.day)
                if ("ae", sid, i) not in self.done:
                    extra.append(Step(self.local(onset, dt.time(10, 0)), STAFF, f"{sid} AE reported",
                                      lambda sid=sid, i=i, ae=ae, onset=onset: ("staff", self.report_ae(sid, i, ae, onset))))
                elif ae.adjudicate != "leave" and ("adj", sid, i) not in self.done and (sid, i) in self.ae_ids:
                    extra.append(Step(self.local(onset + dt.timedelta(days=ae.adjudicate_after_days), dt.time(11, 0)), STAFF,
                                      f"{sid} DLT adjudication", lambda sid=sid, i=i, ae=ae: ("staff", self.adjudicate(sid, i, ae))))
            if spec.off_study and ("off", sid) not in self.done:
                on = day0 + dt.timedelta(days=spec.off_study.day)
                extra.append(Step(self.local(on, dt.time(10, 0)), STAFF, f"{sid} off study",
                                  lambda sid=sid, spec=spec, on=on: ("staff", self.take_off(sid, spec, on))))
            for step in extra:
                if best is None or (step.at, step.order) < (best.at, best.order):
                    best = step
        return best

    def _staff_step(self, spec: PatientSpec, subject: Subject, row: CalendarEventRow, inf2_done: bool) -> Step | None:
        sid, due = subject.subject_id, row.due_at
        delay = dt.timedelta(days=spec.infusion_2_delay_days)
        if row.kind is EventKind.NK_INFUSION:
            n = int(row.key.rsplit("-", 1)[1])
            if n == 2 and spec.infusion_2_missed:
                return None
            at = due + (delay if n == 2 else dt.timedelta(0))
            return Step(at, STAFF, f"{sid} NK infusion {n}", lambda: ("staff", self.infuse(sid, subject.dose_level, n)))
        if row.kind is EventKind.PK_SAMPLE:
            if "infusion_2" in row.key and not inf2_done:
                if spec.infusion_2_missed:
                    return None
                due = due + delay
            return Step(due, STAFF, f"{sid} {row.label}", lambda: ("staff", self.pk_sample(sid, row.protocol_day, subject.dose_level)))
        if row.kind is EventKind.IL2_DOSE:
            n = int(row.key.rsplit("-", 1)[1])
            if n in spec.il2_missed:  # written up the next morning, after rounds flagged it
                return Step(due + dt.timedelta(hours=25), STAFF, f"{sid} IL-2 dose {n} missed", lambda: ("staff", self.il2(sid, n, None)))
            return Step(due, STAFF, f"{sid} IL-2 dose {n}", lambda: ("staff", self.il2(sid, n, due)))
        visit = row.kind.value
        return Step(due, STAFF, f"{sid} {row.label}", lambda: ("staff", self.visit(sid, visit, to_local(self.tz, due).date(), spec)))

    # -- what staff do ------------------------------------------------------------------------------

    def infuse(self, sid: str, level: int, n: int) -> str:
        spec = self.sc.patient(sid)
        record = {"subject_id": sid, "infusion_number": n, "dose_level": level, "given_at": to_local(self.tz, self.clock()).isoformat(),
                  "cells_infused": self.p.dose_level(level).cells_per_infusion, "product_lot": f"LOT-{sid}-{n}",
                  "deviation_reason": spec.deviation_reason if n == 2 and spec.infusion_2_delay_days else None, "recorded_by": "nurse-1"}
        return self.run_deployment("record-infusion", {"record": record})

    def _staff_write(self, what: str, fn: Callable[[], None]) -> str:
        from protocol.errors import UserError

        self.staff_entries += 1
        try:
            fn()
        except UserError as exc:
            return f"refused: {exc}"
        return what

    def il2(self, sid: str, n: int, given_at: dt.datetime | None) -> str:
        from tasks import records

        return self._staff_write(
            f"IL-2 dose {n} {'given' if given_at else 'recorded as missed'} (nktrial record il2)",
            lambda: records.record_il2_dose(self.engine, self.p, subject_id=sid, dose_number=n, given=given_at is not None,
                                            given_at=to_local(self.tz, given_at) if given_at else None,
                                            missed_reason=None if given_at else "rehearsal: dose not given", actor="nurse-1",
                                            clock=self.clock))

    def pk_sample(self, sid: str, day: int, level: int) -> str:
        from tasks import records
        from tasks.records import LabResultInput

        with Session(self.engine) as s:
            given = sorted(records.actual_infusions(s, self.p, get_subject(s, subject_id=sid)).values())
        value = pk_value(sid, self.p.dose_level(level).cells_per_infusion, [self.local(g.date(), g.time()) for g in given], self.clock())
        result = LabResultInput(subject_id=sid, kind="donor_nk_count", sampled_on=self.today(), pk_day=day, donor_nk_cells_per_ul=value)
        return self._staff_write(f"PK day {day}: {value} donor NK cells/µL (nktrial record lab)",
                                 lambda: records.record_lab_result(self.engine, self.p, result=result, actor="nurse-1", clock=self.clock))

    def visit(self, sid: str, visit: str, on: dt.date, spec: PatientSpec) -> str:
        done = []
        if visit == EventKind.VISIT_3_MONTH.value:
            for kind, extra in (("mrd_mfc", {"mrd": spec.outcome.mrd.value}), ("response", {"response": spec.outcome.response.value})):
                result = {"subject_id": sid, "kind": kind, "sampled_on": on.isoformat(), "visit": visit, **extra}
                done.append(self.run_deployment("record-lab-result", {"record": {"result": result, "recorded_by": "coord-1"}}))
        done.append(self.run_deployment("record-visit", {"record": {"subject_id": sid, "visit": visit, "done_on": on.isoformat(),
                                                                    "recorded_by": "coord-1"}}))
        return "; ".join(done)

    def report_ae(self, sid: str, i: int, ae, onset: dt.date) -> str:
        self.done.add(("ae", sid, i))
        report = {"subject_id": sid, "term": ae.term, "category": ae.category.value, "grade": ae.grade, "onset_on": onset.isoformat(),
                  "attribution": ae.attribution.value, "serious": ae.serious}
        result = self.run_deployment("report-adverse-event", {"report": report})
        with Session(self.engine) as s:
            row = s.exec(select(AdverseEvent).join(Subject, Subject.id == AdverseEvent.subject_pk)
                         .where(Subject.subject_id == sid).order_by(AdverseEvent.id.desc())).first()
        if row is not None:
            self.ae_ids[(sid, i)] = row.id
        return result

    def adjudicate(self, sid: str, i: int, ae) -> str:
        self.done.add(("adj", sid, i))
        request = {"ae_id": self.ae_ids[(sid, i)], "confirm": ae.adjudicate == "confirm",
                   "reason": f"rehearsal: {ae.category.value} grade {ae.grade}, {ae.attribution.value}", "investigator_id": "inv-01"}
        return self.run_deployment("adjudicate-dlt", {"request": request})

    def take_off(self, sid: str, spec: PatientSpec, on: dt.date) -> str:
        self.done.add(("off", sid))
        return self.run_deployment("off-study", {"request": {"subject_id": sid, "reason": spec.off_study.reason.value,
                                                             "effective_on": on.isoformat(), "recorded_by": "coord-1"}})

    # -- the loop -----------------------------------------------------------------------------------

    def live(self, steps: list[Step]) -> bool:
        """Anything left but rounds: patients on study, a review waiting, a referral, a due run."""
        if self.paused_since or any(st.order != ROUNDS for st in steps):
            return True
        with Session(self.engine) as s:
            return s.exec(select(func.count()).select_from(Subject).where(Subject.status.in_(ACTIVE))).one() > 0

    def run(self) -> Result:
        from prefect import get_client

        started = time.monotonic()
        self.first_message = len(self.receiver.messages)  # a shared receiver may hold other trials' codes
        with Session(self.engine) as s:
            self.instance = trial_instance(s)
        with get_client(sync_client=True) as self.client:  # one client for the whole rehearsal: building one costs ~20 ms
            return self._run(started)

    def _run(self, started: float) -> Result:
        self.ensure_deployments(self.client)
        end = self.local(self.sc.start + dt.timedelta(days=self.sc.max_days), dt.time(0, 0))
        last_day = None
        while True:
            steps = [st for st in (self.step_rounds(), self.step_run(), self.step_pi(), self.step_staff(), self.step_referral()) if st]
            if not self.live(steps):
                break
            step = min(steps, key=lambda st: (st.at, st.order))
            if step.at > end:
                self.log.append(LogEntry(self._stamp(end), "stop", "rehearsal", f"max_days {self.sc.max_days} reached"))
                break
            self.clock.set(max(step.at, self.clock()))
            seen, t0 = len(self.receiver.messages), time.monotonic()
            kind, result = step.do()
            notices = [f"{m.path}: {' · '.join(m.body.split(' · ')[:2])}" for m in self.receiver.messages[seen:]]
            self.log.append(LogEntry(self._stamp(self.clock()), kind, step.name, result, notices, round((time.monotonic() - t0) * 1000)))
            if self.today() != last_day:
                last_day = self.today()
                self.progress(self._progress_line(started))
        final = self.step_rounds(final=True)  # the closing rounds leave the reports as the trial ended
        self.clock.set(max(final.at, self.clock()))
        kind, result = final.do()
        self.log.append(LogEntry(self._stamp(self.clock()), kind, "daily rounds (closing)", result))
        self._cancel_leftovers()
        log_path = self.write_log()
        return self.result(time.monotonic() - started, log_path)

    def _stamp(self, at: dt.datetime) -> str:
        return f"{to_local(self.tz, at):%Y-%m-%d %H:%M}"

    def _progress_line(self, started: float) -> str:
        with Session(self.engine) as s:
            enrolled = s.exec(select(func.count()).select_from(Enrollment)).one()
        day = (self.today() - self.sc.start).days
        return (f"virtual day {day:>3} ({self.today()}) · patients enrolled {enrolled}/{len(self.sc.patients)} · "
                f"runs executed {self.runs_executed} · staff entries {self.staff_entries} · {time.monotonic() - started:.0f} s")

    def _cancel_leftovers(self) -> None:
        """Runs still scheduled when nobody is left on study (e.g. a completed patient's later reminders) are cancelled."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PAUSED])),
                tags=FlowRunFilterTags(all_=[f"trial:{self.instance}"])))
            for run in runs:
                client.set_flow_run_state(run.id, Cancelled(message="rehearsal ended: nothing left to do"), force=True)

    def write_log(self) -> Path:
        path = self.out_dir / "events.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["site_time", "kind", "name", "result", "notices_sent", "notices", "wall_ms"])
            for e in self.log:
                w.writerow([e.at, e.kind, e.name, e.result, len(e.notices), "; ".join(e.notices), e.wall_ms])
        return path

    # -- the final state --------------------------------------------------------------------------

    def result(self, wall: float, log_path: Path) -> Result:
        from tasks.safety import design_for, trial_state

        design = design_for(self.p)
        with Session(self.engine) as s:
            state = trial_state(s, self.p)
            outcome = {o.subject_id: o for o in state.patients}
            dlts = dict(s.exec(select(Subject.subject_id, func.count()).join(AdverseEvent, AdverseEvent.subject_pk == Subject.id)
                               .where(AdverseEvent.adjudication == Adjudication.CONFIRMED).group_by(Subject.subject_id)).all())
            enrollments = {sid: e for e, sid in s.exec(select(Enrollment, Subject.subject_id).join(Subject, Subject.id == Enrollment.subject_pk))}
            patients = []
            for spec in self.sc.patients:
                subj = get_subject(s, subject_id=spec.id)
                e = enrollments.get(spec.id)
                patients.append({
                    "subject_id": spec.id,
                    "status": subj.status.value if subj else "not referred",
                    "dose_level": subj.dose_level if subj else None,
                    "cohort": e.cohort if e else None,
                    "evaluable": None if e is None else e.evaluable,
                    "dlts": dlts.get(spec.id, 0),
                    "outcome": outcome[spec.id].status if spec.id in outcome else "",
                })
            tallies = design.tallies(state.cohorts)
            levels = [{"dose_level": lv.level, "status": lv.status.value, "patients": tallies[lv.level].n, "dlts": tallies[lv.level].dlts}
                      for lv in s.exec(select(DoseLevelState).order_by(DoseLevelState.level))]
            decisions = []
            for d in s.exec(select(EscalationDecision).order_by(EscalationDecision.id)):
                sig = s.exec(select(Signature).where(Signature.decision_id == d.id)).first()
                decisions.append({"history": d.history, "recommended": d.recommended_action, "recommended_level": d.recommended_level,
                                  "signed": d.chosen_action, "level": d.chosen_level, "mtd": d.mtd,
                                  "signed_at": self._stamp(sig.signed_at) if sig else None, "signer": sig.signer_id if sig else None})
            trial_open = s.exec(select(func.count()).select_from(DoseLevelState)
                                .where(DoseLevelState.status.in_([LevelStatus.OPEN, LevelStatus.FULL]))).one() > 0
        final = decisions[-1] if decisions else None
        mtd = final["mtd"] if final and final["signed"] == Action.STOP.value else None
        res = Result(self.sc.name, self.sc.title, state.history, mtd, trial_open, patients, levels, decisions,
                     (self.today() - self.sc.start).days, self.runs_executed, self.staff_entries, len(self.receiver.messages) - self.first_message,
                     round(wall, 1), str(log_path), str(self.out_dir / "reports"))
        res.problems = check(res, design, self.sc)
        for kind in sorted({e.kind for e in self.log}):
            ms = sorted(e.wall_ms for e in self.log if e.kind == kind)
            res.wall_by_kind[kind] = {"steps": len(ms), "seconds": round(sum(ms) / 1000, 1), "median_ms": ms[len(ms) // 2]}
        return res


def check(res: Result, design, sc: Scenario) -> list[str]:
    """What the 3+3 rules imply, replayed independently of the flows, against what the rehearsal did."""
    problems = []
    try:
        cohorts = design.parse(res.history)
        if cohorts and cohorts[-1].n < design.cohort_size and design.tallies(cohorts)[cohorts[-1].dose_level].dlts < 2:
            cohorts = cohorts[:-1]  # the newest cohort is still in its DLT windows (a rehearsal cut short by max_days)
        design.validate(cohorts)
    except ValueError as exc:
        problems.append(f"the final history is not one 3+3 can produce: {exc}")
    for i, d in enumerate(res.decisions, start=1):
        rule = design.decide(design.parse(d["history"]))
        if (d["recommended"], d["recommended_level"]) != (rule.action.value, rule.dose_level):
            problems.append(f"decision {i} at {d['history']!r} recommended {d['recommended']} DL{d['recommended_level']}; "
                            f"the rule says {rule.action.value} DL{rule.dose_level}")
        if d["signed"] is None:
            continue
        if BOLDNESS[Action(d["signed"])] > BOLDNESS[rule.action]:
            problems.append(f"decision {i} signed {d['signed']}, bolder than the rule's {rule.action.value}")
        if d["signed"] == Action.STOP.value and d["mtd"] != rule.mtd:
            problems.append(f"decision {i} stopped with MTD {d['mtd']}; the rule's MTD is {rule.mtd}")
    if res.decisions and res.decisions[-1]["signed"] == Action.STOP.value and res.trial_open:
        problems.append("the trial stopped but a dose level is still open")
    if sc.expect:
        x = sc.expect
        got = [Action(d["signed"]) for d in res.decisions if d["signed"]]
        if res.history != x.history:
            problems.append(f"history is {res.history!r}; the scenario expects {x.history!r}")
        if got != x.decisions:
            problems.append(f"decisions are {[a.value for a in got]}; the scenario expects {[a.value for a in x.decisions]}")
        if res.mtd != x.mtd:
            problems.append(f"MTD is {res.mtd}; the scenario expects {x.mtd}")
        status = {p["subject_id"]: p["status"] for p in res.patients}
        for sid, want in x.statuses.items():
            if status.get(sid) != want:
                problems.append(f"{sid} is {status.get(sid)}; the scenario expects {want}")
    return problems


@contextmanager
def _environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rehearse(scenario: Scenario, *, out_dir: Path, protocol: ProtocolDefinition, api_url: str | None = None, temporary_server: bool = False,
             progress: Callable[[str], None] | None = None, reports_every: int = 7, receiver: Receiver | None = None) -> Result:
    """Run a scenario into a fresh trial database under out_dir, on the Prefect server in use, a given one, or a temporary one.

    Notices go to a local receiver (its own, or the one given), one path per role.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from models.db import make_engine
    from nktrial.server import local_server

    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / "trial.db"
    if db.exists():
        from protocol.errors import UserError

        raise UserError(f"--out {out_dir.name}: it already holds a rehearsal's trial database; choose a new folder")
    own_receiver = receiver is None
    receiver = receiver or Receiver().start()
    apprise = out_dir / "apprise.yml"
    apprise.write_text(receiver.apprise_yaml({role.value: [role.value] for role in Role}), encoding="utf-8")
    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine)
        clock = VirtualClock(local_instant(protocol.timezone, scenario.start, dt.time(0, 0), what="start")[0])
        with UnitOfWork(engine, actor="system:rehearsal", reason=f"rehearsal {scenario.name}", clock=clock) as u:
            register_protocol(u.session, protocol=protocol, at=u.at)
            u.commit()
        with ExitStack() as stack:
            stack.enter_context(_environment({"NKTRIAL_DATABASE_URL": f"sqlite:///{db}", "NKTRIAL_APPRISE_CONFIG": str(apprise),
                                              "NKTRIAL_DATA_DIR": str(out_dir)}))
            if temporary_server:
                progress and progress("starting a temporary Prefect server…")
                api_url = stack.enter_context(local_server(out_dir / "prefect"))
            # Runs execute here and last a second: no heartbeat thread (its join costs up to 1 s a run); a temporary
            # server is thrown away, so its logs stay on the console.
            rehearsal_settings = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            if api_url:
                rehearsal_settings |= {PREFECT_API_URL: api_url, PREFECT_LOGGING_TO_API_ENABLED: not temporary_server}
            stack.enter_context(temporary_settings(rehearsal_settings))
            rehearsal = Rehearsal(scenario, protocol, engine, out_dir=out_dir, clock=clock, receiver=receiver, progress=progress,
                                  reports_every=reports_every)
            with use_clock(clock):
                return rehearsal.run()
    finally:
        if own_receiver:
            receiver.stop()
        engine.dispose()
