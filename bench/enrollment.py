"""Benchmark: enrollment to scheduled runs, against bare run creation; daily rounds at scale.

Runs against a real local Prefect server (the test harness's, SQLite) and a scratch SQLite trial
database. Prints medians and ratios measured in the same run. Not a test: nothing here asserts.

    .venv/bin/python bench/enrollment.py [--patients 1,50] [--rounds 1000,10000] [--repeat 5]
        [--horizon-days N] [--no-views]   (rounds: a partial projection check; the rounds' own work only)
    .venv/bin/python bench/enrollment.py --ha [--ha-requests 6]   (enrollments per minute: one node, scaled out; bench/ha.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from prefect import flow, get_client  # noqa: E402
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402
from prefect.states import Scheduled  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.enrollment import EnrollmentRequest, enroll_patient  # noqa: E402
from flows.rounds import RoundsOptions, daily_rounds  # noqa: E402
from flows.treatment import patient_treatment, treatment_event  # noqa: E402
from models.clock import VirtualClock, use_clock  # noqa: E402
from models.crud import register_protocol  # noqa: E402
from models.db import UnitOfWork  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from models.tables import CalendarEventRow, DoseLevelState, Enrollment, EventStatus, Subject, SubjectStatus  # noqa: E402
from nktrial.inprocess import without_suspension_observer  # noqa: E402
from protocol.calendar import compute_calendar  # noqa: E402
from protocol.eligibility import ScreeningRecord  # noqa: E402
from protocol.reminders import reminder_for  # noqa: E402
from tasks.prefect_api import create_run_from_deployment  # noqa: E402
from tasks.runtime import protocol, trial_engine  # noqa: E402
from tasks.staff import add_staff  # noqa: E402

EXAMPLE = json.loads((ROOT / "examples" / "screening-S-001.json").read_text())
START = dt.datetime(2027, 1, 20, 1, 0, tzinfo=dt.timezone.utc)


@flow(name="noop")
def noop() -> None:
    """The baseline: a deployment whose runs do nothing."""


def fresh_trial_db(tmp: Path, name: str, slots: int) -> sa.Engine:
    os.environ["NKTRIAL_DATABASE_URL"] = f"sqlite:///{tmp / name}"
    os.environ["NKTRIAL_REPORTS_DIR"] = str(tmp / "reports")  # rounds with reports write files: here, never a site's data folder
    engine = trial_engine()
    upgrade(engine)
    with UnitOfWork(engine, actor="bench", reason="benchmark setup: open enough slots", clock=lambda: START) as u:
        register_protocol(u.session, protocol=protocol(), at=u.at)
        level = u.session.get(DoseLevelState, 1)
        while level.slots_open < slots:  # bench only: the 3+3 gate would hold the cohort at 3; the database's gate lets
            level.slots_open += 1        # slots open one at a time (as replacement slots), so they are opened one by one
            u.session.add(level)
            u.session.flush()
        u.commit()
    for staff_id, name, roles in (("bench-pi", "Bench PI", "pi,investigator"), ("bench", "Bench Coordinator", "coordinator")):
        add_staff(engine, protocol(), staff_id=staff_id, printed_name=name, roles=roles, actor="bench-pi", clock=lambda: START,
                  allow_bootstrap=staff_id == "bench-pi")
    return engine


def time_enrollments(n: int, first: int) -> list[float]:
    times = []
    for i in range(n):
        req = EnrollmentRequest(screening=ScreeningRecord.model_validate({**EXAMPLE, "subject_id": f"S-{first + i:03d}"}),
                                planned_day0=dt.datetime(2027, 1, 31, 9, 0), recorded_by="bench")
        t0 = time.perf_counter()
        state = enroll_patient(req, return_state=True)
        times.append(time.perf_counter() - t0)
        assert state.name == "Enrolled", state.message
    return times


def time_bare_runs(n_patients: int, runs_each: int, *, quick_retry: bool = True) -> list[float]:
    """The same number of runs of a no-op deployment, one request each: as the projection creates them (a busy-SQLite 503
    retried in 50 ms, tasks/prefect_api.py), or with the Prefect client's own method (which waits 2 s after a 503)."""
    times = []
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("noop/noop")
        for _ in range(n_patients):
            t0 = time.perf_counter()
            for j in range(runs_each):
                state = Scheduled(scheduled_time=START + dt.timedelta(days=j))
                if quick_retry:
                    create_run_from_deployment(client, dep.id, state=state)
                else:
                    client.create_flow_run_from_deployment(dep.id, state=state)
            times.append(time.perf_counter() - t0)
    return times


def seed_active_patients(engine: sa.Engine, n: int, today: dt.datetime) -> None:
    """n patients spread over the last 100 days of treatment, written straight into the database."""
    p = protocol()
    subjects, enrollments, events = [], [], []
    calendars = {}
    for i in range(n):
        offset = i % 100
        day0 = (today - dt.timedelta(days=offset)).replace(hour=9, minute=0, second=0, microsecond=0, tzinfo=None)
        if offset not in calendars:
            calendars[offset] = compute_calendar(p, dose_level=1, day0=day0)
        subjects.append({"id": i + 1, "subject_id": f"B-{i:05d}", "dose_level": 1,
                         "planned_day0_at": calendars[offset].event("nk_infusion-1").at_utc, "created_at": START})
        enrollments.append({"subject_pk": i + 1, "dose_level": 1, "cohort": 1, "slot": i + 1, "enrolled_at": START})
    for i in range(n):
        cal = calendars[i % 100]
        for e in cal.events:
            r = reminder_for(p, e)
            past = e.at_utc < today.astimezone(dt.timezone.utc) - dt.timedelta(days=1)
            events.append({"actual_at": e.at_utc if past else None,  # done as planned, as a recording would have written it
                           "subject_pk": i + 1, "key": e.key, "kind": e.kind, "label": e.label, "protocol_day": e.protocol_day,
                           "local_on": e.local_date, "due_at": e.at_utc, "window_start_on": e.window_start, "window_end_on": e.window_end,
                           "status": EventStatus.DONE if past else EventStatus.PLANNED, "anchor_version": cal.anchor_version,
                           "remind_at": r.trigger_at if r else None,
                           "reminder_sent_at": START if (r and r.trigger_at < today.astimezone(dt.timezone.utc)) else None})
    with engine.begin() as conn:
        conn.execute(sa.insert(Subject.__table__), [{**s, "status": SubjectStatus.ON_TREATMENT} for s in subjects])
        conn.execute(sa.insert(Enrollment.__table__), enrollments)
        for k in range(0, len(events), 20_000):
            conn.execute(sa.insert(CalendarEventRow.__table__), events[k:k + 20_000])


def time_rounds(n: int, tmp: Path, options: RoundsOptions) -> tuple[float, list[float], str]:
    engine = fresh_trial_db(tmp, f"rounds-{n}.db", slots=n)
    today = dt.datetime(2027, 6, 1, 7, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    seed_active_patients(engine, n, today)
    with use_clock(VirtualClock(today)):
        t0 = time.perf_counter()
        first = daily_rounds(options)
        first_s = time.perf_counter() - t0
        steady = []
        for _ in range(3):
            t0 = time.perf_counter()
            daily_rounds(options)
            steady.append(time.perf_counter() - t0)
    return first_s, steady, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", default="1,50")
    ap.add_argument("--rounds", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=5, help="repeats of the 1-patient case")
    ap.add_argument("--horizon-days", type=int, default=None,
                    help="rounds check only runs due within this many days (default: the whole projection, as rounds do)")
    ap.add_argument("--no-views", action="store_true",
                    help="rounds do their own work only, without the reports, the worklist and the casebooks (default: all, as a site's "
                         "rounds do)")
    ap.add_argument("--ha", action="store_true", help="enrollments per minute through real workers: one node against nktrial up --ha "
                                                      "with 1 and 2 workers (bench/ha.py; needs PostgreSQL, Redis, haproxy)")
    ap.add_argument("--ha-requests", type=int, default=6)
    ap.add_argument("--postgres-url", default=os.environ.get("NKTRIAL_TEST_POSTGRES_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    try:  # checked before minutes of enrollment timing, not after
        options = RoundsOptions(reconcile_horizon_days=args.horizon_days, reports=not args.no_views, views=not args.no_views)
    except ValueError as exc:
        ap.error(f"--horizon-days must be a whole number of days from 0 to 120: {exc.errors()[0]['msg']}")
    if args.ha:
        from bench import ha

        ha.main(args.ha_requests, args.postgres_url)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # Flows run in this process, as in the tests and the rehearsal: no heartbeat thread (its join at the end of every
        # flow run cost ~1 s here) and no suspension observer (nktrial/inprocess.py).
        with prefect_test_harness(server_startup_timeout=90), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
                without_suspension_observer():
            for f in (patient_treatment, treatment_event, noop):
                f.to_deployment(name=f.name).apply()
            cal = compute_calendar(protocol(), dose_level=1, day0=dt.datetime(2027, 1, 31, 9, 0))
            runs_each = sum(1 for e in cal.events if reminder_for(protocol(), e)) - 1  # product request 1 goes out at enrollment
            print("enrollment → all scheduled runs created (median seconds per patient; baseline: the same number of bare runs)")
            first = 1
            for n in [int(x) for x in args.patients.split(",") if x]:
                fresh_trial_db(tmp, f"enroll-{n}.db", slots=args.repeat if n == 1 else n)
                with use_clock(VirtualClock(START)):
                    count = args.repeat if n == 1 else n
                    times = time_enrollments(count, first)
                first += count
                bare = time_bare_runs(count, runs_each)
                plain = time_bare_runs(count, runs_each, quick_retry=False)
                m, b, pb = statistics.median(times), statistics.median(bare), statistics.median(plain)
                print(f"  {n:>3} patient(s), {count:>2} timed: enroll {m:6.3f} s (total {sum(times):6.1f} s)   "
                      f"bare {runs_each} runs {b:6.3f} s (total {sum(bare):6.1f} s)   ratio {m / b:5.2f}   "
                      f"[bare with the client's own 503 back-off {pb:6.3f} s]", flush=True)
        print("daily rounds over active patients seeded in the trial database (seconds; a fresh Prefect server each; "
              f"projection checked {'whole' if args.horizon_days is None else f'{args.horizon_days} days ahead'}; "
              f"reports and views {'not drawn' if args.no_views else 'drawn'})")
        for n in [int(x) for x in args.rounds.split(",") if x]:
            with prefect_test_harness(server_startup_timeout=90), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                for f in (patient_treatment, treatment_event):
                    f.to_deployment(name=f.name).apply()
                first_s, steady, summary = time_rounds(n, tmp, options)
            print(f"  {n:>6} patients: first run {first_s:7.2f} s ({summary.split('projection ')[-1]})   "
                  f"steady state median of 3 {statistics.median(steady):7.2f} s", flush=True)


if __name__ == "__main__":
    main()
