"""Benchmark: a whole shipped scenario rehearsed on a temporary Prefect server, against bare runs.

Prints the scenario's wall time (server start excluded), how many runs it executed, the median
wall time of each kind of step, and — measured in the same run, on the same server — the median
time to create and execute one run of a no-op deployment in this process, which is the floor any
rehearsal step that is a run pays. Not a test: nothing here asserts.

    .venv/bin/python bench/rehearsal.py [--scenario no-dlt] [--baseline-runs 30]
"""

from __future__ import annotations

import argparse
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

from prefect import flow  # noqa: E402
from prefect.flow_engine import run_flow  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings  # noqa: E402
from prefect.states import Pending  # noqa: E402

from nktrial.inprocess import in_process_runs  # noqa: E402
from nktrial.rehearsal import rehearse  # noqa: E402
from nktrial.scenario import load  # noqa: E402
from nktrial.server import local_server  # noqa: E402
from protocol.definition import load_protocol  # noqa: E402
from tasks.prefect_api import create_run_from_deployment  # noqa: E402


@flow(name="noop")
def noop() -> None:
    """The baseline: a deployment whose runs do nothing."""


def baseline(n: int) -> list[float]:
    """The cost of a no-op run, created and executed as the rehearsal creates and executes its runs
    (tasks/prefect_api.py, nktrial/inprocess.py)."""
    deployment = noop.to_deployment(name="noop").apply()
    times = []
    with in_process_runs() as client:
        for _ in range(n):
            t = time.perf_counter()
            run = create_run_from_deployment(client, deployment, state=Pending())
            run_flow(noop, flow_run=run, return_type="state")
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="no-dlt")
    ap.add_argument("--baseline-runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        with local_server(tmp / "prefect") as api:
            started = time.perf_counter() - t
            with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                base = baseline(args.baseline_runs)
                res = rehearse(load(args.scenario), out_dir=tmp / "rehearsal", protocol=load_protocol(), api_url=api)
    run_kinds = {k: v for k, v in res.wall_by_kind.items() if k in ("rounds", "run", "referral", "pi")}
    per_run = sum(v["seconds"] for v in run_kinds.values()) / max(res.runs_executed, 1)
    print(f"scenario {res.scenario}: {res.virtual_days} virtual days, {len(res.patients)} patients, history {res.history}, "
          f"problems {len(res.problems)}")
    print(f"temporary server start: {started:.1f} s")
    print(f"rehearsal wall time: {res.wall_seconds:.1f} s for {res.runs_executed} runs and {res.staff_entries} bedside entries")
    for kind, v in sorted(res.wall_by_kind.items()):
        print(f"  {kind:<9} {v['steps']:>4} steps  {v['seconds']:>7.1f} s  median {v['median_ms']} ms")
    b = statistics.median(base)
    print(f"baseline: no-op deployment run created and executed here, median of {len(base)}: {b * 1000:.0f} ms")
    print(f"rehearsal mean per run {per_run * 1000:.0f} ms = {per_run / b:.1f} × the no-op run; "
          f"runs alone at the no-op floor would take {res.runs_executed * b:.0f} s of the {res.wall_seconds:.0f} s")


if __name__ == "__main__":
    main()
