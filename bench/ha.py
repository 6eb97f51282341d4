"""Benchmark: enrollments per minute through real workers, one node (`nktrial up`, SQLite) against the scaled-out
stack (`nktrial up --ha`: PostgreSQL, Redis, two API replicas behind HAProxy) with 1 and with 2 workers.

Each configuration starts from nothing (scratch data folder, new PostgreSQL databases, Redis database 14 emptied),
registers the test staff, submits N enroll-patient requests at once through the API, as coordinators would from the
form, and times until every request has ended, with nktrial up's settings (workers look for runs every 5 s;
enroll-patient runs one at a time, a queued request tries again 5 s later). Not a test:
nothing here asserts. Called by `bench/enrollment.py --ha`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDIS_DB = 14
EXAMPLE = json.loads((ROOT / "examples" / "screening-S-001.json").read_text())
DAY0 = dt.datetime(2027, 1, 31, 9, 0)


def _request(sid: str) -> dict:
    from flows.enrollment import EnrollmentRequest
    from protocol.eligibility import ScreeningRecord

    return EnrollmentRequest(subject_id=sid, screening=ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid}),
                             planned_day0=DAY0, recorded_by="coord-1").model_dump(mode="json")


def _admin(sql: str, admin: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    with psycopg.connect(make_url(admin).set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as c:
        c.execute(sql)


def one_config(label: str, *, ha: bool, workers: int, n: int, admin: str, tmp: Path) -> dict:
    import redis
    from prefect import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from sqlalchemy.engine import make_url

    from models.db import make_engine
    from nktrial.ha import UpInBackground
    from nktrial.server import free_port
    from tests.helpers import register_staff

    port, data = free_port(), tmp / label.replace(" ", "-") / "data"
    data.parent.mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NKTRIAL_"))},
           "NKTRIAL_DATA_DIR": str(data), "PREFECT_LOGGING_LEVEL": "WARNING"}
    databases: list[str] = []
    args = ["--port", str(port)]
    if ha:
        suffix = uuid.uuid4().hex[:8]
        databases = [f"nktrial_bench_{suffix}_prefect", f"nktrial_bench_{suffix}_trial"]
        for name in databases:
            _admin(f'CREATE DATABASE "{name}"', admin)
        base = make_url(admin)
        env["NKTRIAL_HA_PREFECT_DATABASE_URL"] = base.set(drivername="postgresql+asyncpg", database=databases[0]).render_as_string(False)
        env["NKTRIAL_DATABASE_URL"] = trial_url = base.set(drivername="postgresql+psycopg", database=databases[1]).render_as_string(False)
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
        args += ["--ha", "--workers", str(workers), "--redis-url", f"redis://127.0.0.1:6379/{REDIS_DB}"]
    else:
        trial_url = f"sqlite:///{data / 'trial.db'}"
    up = UpInBackground(args, env, data.parent / "up.log")
    t0 = time.monotonic()
    try:
        up.start(ready="pids " if ha else "Press Ctrl-C")
        started_s = time.monotonic() - t0
        engine = make_engine(trial_url)
        register_staff(engine)
        engine.dispose()
        api = f"http://127.0.0.1:{port}/api"
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: (data / "prefect-api-auth").read_text().strip()}), \
                get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
            submitted = time.monotonic()
            ids = [client.create_flow_run_from_deployment(dep.id, parameters={"request": _request(f"S-{300 + i:03d}")}).id for i in range(n)]
            ended: dict = {}
            while len(ended) < n:
                if time.monotonic() - submitted > 1800:
                    raise RuntimeError(f"{label}: {n - len(ended)} requests still open after 30 min")
                for rid in ids:
                    if rid not in ended and client.read_flow_run(rid).state.is_final():
                        ended[rid] = time.monotonic() - submitted
                time.sleep(0.5)
        total = max(ended.values())
        return {"label": label, "start_s": started_s, "per_min": n / total * 60, "total_s": total,
                "median_s": statistics.median(ended.values()), "n": n}
    finally:
        up.stop()
        for name in databases:
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin)


def main(n: int, admin: str) -> None:
    print(f"enrollments per minute: {n} enroll-patient requests submitted at once, real workers (nktrial up's settings)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        rows = [one_config("single node", ha=False, workers=1, n=n, admin=admin, tmp=Path(d))]
        for workers in (1, 2):
            rows.append(one_config(f"ha {workers} worker{'s' if workers > 1 else ''}", ha=True, workers=workers, n=n, admin=admin,
                                   tmp=Path(d)))
            base = rows[0]["per_min"]
        for r in rows:
            print(f"  {r['label']:<14} start {r['start_s']:5.1f} s   {r['per_min']:5.2f} enrollments/min   all done {r['total_s']:6.1f} s   "
                  f"median request {r['median_s']:6.1f} s   ratio to single node {r['per_min'] / base:4.2f}", flush=True)
