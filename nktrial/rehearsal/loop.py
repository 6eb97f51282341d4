"""The event loop: of everything that could happen next — the next virtual morning's daily rounds,
the earliest Scheduled run of this trial database, the PI signing a waiting review, a staff member
recording what the calendar asks, a referral — take the earliest, set the virtual clock to its
time, do it, and write it to the event log."""

from __future__ import annotations

import csv
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from sqlmodel import Session, func, select

from models.clock import VirtualClock
from models.queries import count_active, trial_instance
from models.tables import Enrollment
from nktrial.receiver import Receiver
from nktrial.rehearsal.results import Result, read_result, step_times
from nktrial.rehearsal.runner import PrefectRunner
from nktrial.rehearsal.staff import Staff
from nktrial.rehearsal.steps import ROUNDS, RUN, SiteTime, Step
from nktrial.scenario import Scenario
from protocol.definition import ProtocolDefinition

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LogEntry:
    at: str  # site-local time
    kind: str  # rounds | run | pi | staff | referral
    name: str
    result: str
    notices: list[str] = field(default_factory=list)
    wall_ms: int = 0


def rounds_time() -> dt.time:
    """Daily rounds' time of day, from the deployment's schedule in prefect.yaml (one source)."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    dep = next(d for d in spec["deployments"] if d["name"] == "daily-rounds")
    minute, hour = dep["schedules"][0]["cron"].split()[:2]
    return dt.time(int(hour), int(minute))


class Rehearsal:
    def __init__(self, scenario: Scenario, protocol: ProtocolDefinition, engine, *, out_dir: Path, clock: VirtualClock, receiver: Receiver,
                 progress: Callable[[str], None] | None = None, reports_every: int | None = None):
        self.sc, self.p, self.engine, self.out_dir = scenario, protocol, engine, out_dir
        self.progress = progress or (lambda _msg: None)
        self.reports_every = reports_every
        self.site = SiteTime(protocol.timezone, clock)
        self.clock, self.receiver = clock, receiver
        self.rounds_at = rounds_time()
        self.next_rounds_on = scenario.start
        self.log: list[LogEntry] = []

    # -- what could happen next: rounds and due runs (the staff and the PI are in staff.py) ---------

    def step_rounds(self, *, final: bool = False) -> Step:
        at = self.site.local(self.next_rounds_on, self.rounds_at)
        # The reports, the worklist and the casebooks are drawn at the close, and every reports_every virtual days if it is
        # given (a server someone watches): no coordinator reads them each virtual morning. The rounds' own work (IL-2,
        # visits, notices, the projection check, the audit check) is done every morning.
        refresh = final or (bool(self.reports_every) and (self.next_rounds_on - self.sc.start).days % self.reports_every == 0)

        def do():
            self.next_rounds_on += dt.timedelta(days=1)
            return "rounds", self.runner.run_deployment("daily-rounds", {"options": {"reports": refresh, "views": refresh}})

        return Step(at, ROUNDS, "daily rounds", do)

    def step_run(self) -> Step | None:
        due = self.runner.next_scheduled()
        if due is None:
            return None
        at, run = due
        return Step(at, RUN, run.name, lambda: ("run", self.runner.execute(run.id)))

    def live(self, steps: list[Step]) -> bool:
        """Anything left but rounds: patients on study, a review waiting, a referral, a due run."""
        if self.runner.paused_since or any(st.order != ROUNDS for st in steps):
            return True
        with Session(self.engine) as s:
            return count_active(s) > 0

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> Result:
        from nktrial.inprocess import in_process_runs

        started = time.monotonic()
        first_message = len(self.receiver.messages)  # a shared receiver may hold other trials' codes
        with Session(self.engine) as s:
            instance = trial_instance(s)
        with in_process_runs() as client:  # one client for every run and step; no per-run suspension observer (inprocess.py)
            self.runner = PrefectRunner(client, instance=instance, clock=self.clock)
            self.staff = Staff(self.sc, self.p, self.engine, site=self.site, runner=self.runner, receiver=self.receiver,
                               first_message=first_message)
            return self._run(started, first_message)

    def _run(self, started: float, first_message: int) -> Result:
        self.runner.ensure_deployments()
        end = self.site.local(self.sc.start + dt.timedelta(days=self.sc.max_days), dt.time(0, 0))
        last_day = None
        while True:
            steps = [st for st in (self.step_rounds(), self.step_run(), self.staff.step_pi(), self.staff.step_staff(),
                                   self.staff.step_referral()) if st]
            if not self.live(steps):
                break
            step = min(steps, key=lambda st: (st.at, st.order))
            if step.at > end:
                self.log.append(LogEntry(self.site.stamp(end), "stop", "rehearsal", f"max_days {self.sc.max_days} reached"))
                break
            self.clock.set(max(step.at, self.clock()))
            seen, t0 = len(self.receiver.messages), time.monotonic()
            kind, result = step.do()
            notices = [f"{m.path}: {' · '.join(m.body.split(' · ')[:2])}" for m in self.receiver.messages[seen:]]
            wall_ms = round((time.monotonic() - t0) * 1000)
            self.log.append(LogEntry(self.site.stamp(self.clock()), kind, step.name, result, notices, wall_ms))
            if self.site.today() != last_day:
                last_day = self.site.today()
                self.progress(self._progress_line(started))
        final = self.step_rounds(final=True)  # the closing rounds leave the reports as the trial ended
        self.clock.set(max(final.at, self.clock()))
        kind, result = final.do()
        self.log.append(LogEntry(self.site.stamp(self.clock()), kind, "daily rounds (closing)", result))
        self.runner.cancel_leftovers()
        log_path = self.write_log()
        res = read_result(self.engine, self.p, self.sc, stamp=self.site.stamp,
                          virtual_days=(self.site.today() - self.sc.start).days, runs_executed=self.runner.runs_executed,
                          staff_entries=self.staff.entries, notices_sent=len(self.receiver.messages) - first_message,
                          wall_seconds=round(time.monotonic() - started, 1), event_log=str(log_path), reports=str(self.out_dir / "reports"))
        res.wall_by_kind = step_times(self.log)
        return res

    def _progress_line(self, started: float) -> str:
        with Session(self.engine) as s:
            enrolled = s.exec(select(func.count()).select_from(Enrollment)).one()
        day = (self.site.today() - self.sc.start).days
        return (f"virtual day {day:>3} ({self.site.today()}) · patients enrolled {enrolled}/{len(self.sc.patients)} · "
                f"runs executed {self.runner.runs_executed} · staff entries {self.staff.entries} · {time.monotonic() - started:.0f} s")

    def write_log(self) -> Path:
        path = self.out_dir / "events.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["site_time", "kind", "name", "result", "notices_sent", "notices", "wall_ms"])
            for e in self.log:
                w.writerow([e.at, e.kind, e.name, e.result, len(e.notices), "; ".join(e.notices), e.wall_ms])
        return path
