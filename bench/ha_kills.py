"""The kill table: one `nktrial up --ha` stack (2 API replicas behind HAProxy, the services, 2 workers), and one part
of it killed (SIGKILL) at a time while three referrals are being enrolled. Prints, per kill: what was killed | runs
executed | executed twice | lost | time to recover.

- runs executed: flow runs that entered Running during the round; executed twice: entered Running again without being
  found Crashed between (a crashed run run again is the repair, and is counted apart);
- lost: referrals with no patient in the trial database at the end, and events of enrolled patients without exactly
  one live run;
- time to recover: from the kill until the killed process runs again, every referral of the round is recorded, and
  `nktrial reconcile` (run every 10 s, as daily rounds would at 07:00) has nothing left to create or reschedule.

Flow runs beat every 30 s (Prefect's least), so a run whose process died is marked Crashed ~90 s after its last beat;
the protocol file used here sets `stuck_run_minutes` to 1 (the shipped one: 30) so that a run left Pending is repaired
within the round. Needs PostgreSQL, Redis (database 13 is emptied) and haproxy. Not a test: nothing here asserts.

    .venv/bin/python bench/ha_kills.py [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDIS_DB = 13
ROLES = ["coordinator", "nurse", "investigator", "pi", "cell-lab", "pharmacy", "safety"]


def _busy_worker(up, client) -> str | None:
    from prefect.client.schemas.objects import StateType

    from nktrial.killcheck import all_runs, runs_of

    running = {str(r.id) for r in all_runs(client) if r.state_type is StateType.RUNNING}
    pids = up.pids()
    return next((name for name in ("worker 1", "worker 2") if running & runs_of(pids[name])), None)


KILLS = [  # (what, which processes: from the names nktrial up --ha prints, and the busy worker's whole tree)
    ("API replica 1", ["API replica 1"]),
    ("the worker running an enrollment, with its flow runs (a node lost)", ["busy worker"]),
    ("Prefect's services (scheduler, automations)", ["the services"]),
    ("HAProxy", ["HAProxy"]),
    ("API replica 2 and the worker running an enrollment, at once", ["API replica 2", "busy worker"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postgres-url", default=os.environ.get("NKTRIAL_TEST_POSTGRES_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    import redis
    import yaml
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from sqlalchemy.engine import make_url
    from sqlmodel import Session, select

    from bench.ha import _admin, _request
    from models.db import make_engine
    from models.tables import Subject
    from nktrial.ha import UpInBackground
    from nktrial.killcheck import all_runs, executions, ran_twice
    from nktrial.receiver import Receiver
    from nktrial.server import free_port
    from nktrial.supervisor import tree
    from tasks.projection import existing_runs, wanted_runs
    from tests.helpers import TEST_STAFF, protocol_data_with, register_staff

    suffix = uuid.uuid4().hex[:8]
    databases = [f"nktrial_kills_{suffix}_prefect", f"nktrial_kills_{suffix}_trial"]
    base = make_url(args.postgres_url)
    prefect_db = base.set(drivername="postgresql+asyncpg", database=databases[0]).render_as_string(hide_password=False)
    trial_db = base.set(drivername="postgresql+psycopg", database=databases[1]).render_as_string(hide_password=False)
    receiver = Receiver().start()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        channels, protocol_file, data = tmp / "apprise.yml", tmp / "protocol.yaml", tmp / "data"
        channels.write_text(receiver.apprise_yaml({**{r: [r] for r in ROLES}, **{s[0]: [s[3]] for s in TEST_STAFF}}))
        protocol_file.write_text(yaml.safe_dump(protocol_data_with("notifications.stuck_run_minutes.value", 1)))
        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NKTRIAL_"))},
               "NKTRIAL_DATA_DIR": str(data), "NKTRIAL_DATABASE_URL": trial_db, "NKTRIAL_HA_PREFECT_DATABASE_URL": prefect_db,
               "NKTRIAL_APPRISE_CONFIG": str(channels), "NKTRIAL_PROTOCOL_FILE": str(protocol_file),
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_LOGGING_LEVEL": "WARNING"}
        for name in databases:
            _admin(f'CREATE DATABASE "{name}"', args.postgres_url)
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
        up = UpInBackground(["--ha", "--port", str(port), "--redis-url", f"redis://127.0.0.1:6379/{REDIS_DB}"], env, tmp / "up.log")
        rows = []
        try:
            t0 = time.monotonic()
            up.start(ready="pids ")
            print(f"nktrial up --ha came up in {time.monotonic() - t0:.1f} s", flush=True)
            engine = make_engine(trial_db)
            register_staff(engine)
            env.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_API_AUTH_STRING=(data / "prefect-api-auth").read_text().strip())
            settings = temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]})
            with settings:
                for k, (what, targets) in enumerate(KILLS):
                    round_began = dt.datetime.now(dt.UTC)
                    subjects = [f"S-{500 + 10 * k + i:03d}" for i in range(3)]
                    with get_client(sync_client=True) as client:
                        dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
                        ids = [client.create_flow_run_from_deployment(dep.id, parameters={"request": _request(s)}, tags=[f"subject:{s}"]).id
                               for s in subjects]
                        busy, waited = None, time.monotonic()
                        while busy is None and time.monotonic() - waited < 90:  # a flow run in flight when the kill comes
                            busy = _busy_worker(up, client)
                            time.sleep(0.3)
                    pids = up.pids()
                    victims: set[int] = set()
                    for t in targets:
                        if t == "busy worker":
                            victims |= tree(pids[busy or "worker 1"])
                        else:
                            victims.add(pids[t])
                    restarts_before = up.text().count("started again")
                    killed_at = time.monotonic()
                    for pid in victims:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    recovered, passes = None, 0
                    while time.monotonic() - killed_at < 400:
                        time.sleep(10)
                        rec = subprocess.run([sys.executable, "-m", "nktrial", "reconcile", "--json"], env=env, cwd=ROOT,
                                             capture_output=True, text=True, timeout=300)
                        passes += 1
                        if rec.returncode != 0:
                            continue
                        totals = json.loads(rec.stdout)["totals"]
                        with Session(engine) as s:
                            known = set(s.exec(select(Subject.subject_id)).all())
                        with get_client(sync_client=True) as client:
                            open_requests = [i for i in ids if not client.read_flow_run(i).state.is_final()]
                        back = up.text().count("started again") >= restarts_before + len(targets)
                        if back and known >= set(subjects) and not open_requests and not totals["created"] and not totals["rescheduled"]:
                            recovered = time.monotonic() - killed_at
                            break
                    with get_client(sync_client=True) as client:
                        seen = [executions(client, r) for r in all_runs(client)]
                        with Session(engine) as s:
                            wanted = {(x.subject_id, x.event_key) for specs in wanted_runs(s).values() for x in specs}
                            known = set(s.exec(select(Subject.subject_id)).all())
                            instance = next(iter({x.instance for specs in wanted_runs(s).values() for x in specs}), "trial")
                        live = Counter(key for key, runs in existing_runs(client, instance=instance).items() for r in runs
                                       if r.state_type in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING))
                    executed = [(sp, c) for sp, c in seen if any(a >= round_began for a, _ in sp)]
                    twice = sum(ran_twice(sp, c) for sp, c in executed)
                    again = sum(len(sp) > 1 for sp, _ in executed)
                    lost = len(set(subjects) - known) + len(wanted - set(live)) + sum(n > 1 for n in live.values())
                    row = (what, len(executed), twice, again, lost, f"{recovered:.0f} s ({passes} reconcile passes)" if recovered else "not in 400 s")
                    rows.append(row)
                    print(f"  {row[0]}: executed {row[1]}, twice {row[2]} (again after a crash {row[3]}), lost {row[4]}, "
                          f"recovered {row[5]}", flush=True)
            dupes = sum(n > 1 for n in Counter((m.path, m.body.rsplit(' · notice ', 1)[-1]) for m in receiver.messages
                                               if ' · notice ' in m.body).values())
            print("\n| what was killed | runs executed | executed twice | lost | time to recover |\n|---|---|---|---|---|")
            for what, n, twice, again, lost, rec in rows:
                print(f"| {what} | {n} | {twice}" + (f" ({again} run again after a crash)" if again else "") + f" | {lost} | {rec} |")
            print(f"\nnotices received: {len(receiver.messages)}, received twice by a channel: {dupes}")
        finally:
            took = up.stop()
            print(f"stopped in {took:.1f} s")
            receiver.stop()
            for name in databases:
                _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', args.postgres_url)
            redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


if __name__ == "__main__":
    main()
