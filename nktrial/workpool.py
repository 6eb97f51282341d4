"""The `nktrial` work pool, whose base job template carries the trial's configuration to every flow run.

A flow run gets its trial database, notification channels and UI address from the work pool, not from whatever
the worker that picked it up happened to have in its environment: a worker started on another node without them
would otherwise write to a SQLite file of its own and split the system of record (tasks/runtime.py refuses that).
`nktrial up` and `nktrial up --ha` run this once per start, with the variables below set in its environment:

    python -m nktrial.workpool nktrial

The values are stored in Prefect's database and shown to anyone who can read the work pool (the API's auth string):
give NKTRIAL_DATABASE_URL a role and a password file (.pgpass), not a password in the URL, on a shared server.
"""

from __future__ import annotations

import os
import sys

# what a flow run needs to act on the right trial, wherever it runs (the API settings come from the worker itself)
CARRIED = ("NKTRIAL_DATABASE_URL", "NKTRIAL_DATA_DIR", "NKTRIAL_REPORTS_DIR", "NKTRIAL_APPRISE_CONFIG",
           "NKTRIAL_PROTOCOL_FILE", "NKTRIAL_DELIVERY_LEASE_SECONDS", "PREFECT_UI_URL", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")


def carried_env(environ=os.environ) -> dict[str, str]:
    return {name: environ[name] for name in CARRIED if environ.get(name)}


def job_template(env: dict[str, str]) -> dict:
    """Prefect's default process-pool template with `env` as the default environment of every flow run."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = env
    return template


def ensure_pool(name: str, env: dict[str, str]) -> str:
    """Create the process pool, or set its template's environment; 'created' or 'updated'."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = job_template(env)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return "created"
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return "updated"


def main(argv: list[str]) -> int:
    env = carried_env()
    done = ensure_pool(argv[0], env)
    print(f"work pool '{argv[0]}' {done}; every flow run gets {', '.join(sorted(env)) or 'no trial settings'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
