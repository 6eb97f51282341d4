"""What a killed process did to the runs: for the scaled-out test and the kill table (bench/ha_kills.py).

Read-only: the flow runs a worker's processes are executing, every run of a Prefect server, and each time a run
entered Running. A run that entered Running twice without being found Crashed between ran twice."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from nktrial.supervisor import tree


def runs_of(worker: int) -> set[str]:
    """The flow runs whose processes a worker started (each has its run's id in its environment; Linux)."""
    ids = set()
    for pid in tree(worker) - {worker}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ids |= {e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PREFECT__FLOW_RUN_ID=")}
    return ids


def all_runs(client) -> list:
    """Every flow run on the server, 200 at a time."""
    from prefect.client.schemas.sorting import FlowRunSort

    runs, offset = [], 0
    while True:
        page = client.read_flow_runs(sort=FlowRunSort.ID_DESC, limit=200, offset=offset)
        runs += page
        if len(page) < 200:
            return runs
        offset += 200


def executions(client, run) -> tuple[list[tuple[dt.datetime, dt.datetime | None]], int]:
    """Each time the run entered Running (not Retrying), until the state that followed it; and how often it crashed."""
    states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    spans = [(st.timestamp, states[i + 1].timestamp if i + 1 < len(states) else None)
             for i, st in enumerate(states) if st.type.value == "RUNNING" and st.name == "Running"]
    return spans, sum(st.type.value == "CRASHED" for st in states)


def ran_twice(spans: list, crashes: int) -> bool:
    """Entered Running more often than once plus once after each crash (a crashed run is run again by design)."""
    return len(spans) > 1 + crashes
