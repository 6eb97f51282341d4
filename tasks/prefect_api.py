"""Creating a run from a deployment without the Prefect client's 2-second back-off on a busy SQLite server.

A Prefect server on SQLite (`make up`, the test harness, a rehearsal's temporary server) answers 503
when a request's transaction loses a write race against the server's own writers (the event
persister, the task-run recorder): SQLite refuses to upgrade a read snapshot that another connection
has written past (SQLITE_BUSY_SNAPSHOT), and nothing was written. Prefect's client then waits
2 s, 4 s … before trying again. `POST /deployments/{id}/create_flow_run` is the request that loses
(measured on a rehearsal of missed-il2: 17 of 173 run creations, 34 s of its 85 s). Here that one
request is tried again after 50, 100, 200 … ms instead; any other answer goes through the client's
own method, with its own errors (ObjectNotFound, …) and its own retries.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import httpx

QUICK_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)  # seconds; about 1.5 s in all, then Prefect's own retries


def create_run_from_deployment(
    client, deployment_id, *, parameters: dict[str, Any] | None = None, state=None, name: str | None = None,
    tags: Iterable[str] | None = None, idempotency_key: str | None = None,
):
    """`client.create_flow_run_from_deployment(...)` (a sync Prefect client), with a 503 retried quickly."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Scheduled, to_state_create

    kwargs = {"parameters": parameters or {}, "state": state or Scheduled(), "name": name, "tags": list(tags or []),
              "idempotency_key": idempotency_key}
    payload = DeploymentFlowRunCreate(parameters=kwargs["parameters"], context={}, state=to_state_create(kwargs["state"]),
                                      tags=kwargs["tags"], name=name, idempotency_key=idempotency_key, parent_task_run_id=None,
                                      job_variables=None, labels={})
    http = getattr(client, "_client", None)
    if isinstance(http, httpx.Client):
        body = payload.model_dump(mode="json", exclude_unset=True)
        for pause in QUICK_RETRY_PAUSES:
            request = http.build_request("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
            try:
                response = httpx.Client.send(http, request)  # the plain httpx send: no 2 s back-off on a 503
            except httpx.TransportError:
                break  # a connection that broke: the client's own method, with its own retries
            if response.status_code in (200, 201):
                return FlowRun.model_validate(response.json())
            if response.status_code != 503:
                break  # anything else: the client's own method says what it is
            time.sleep(pause)
    return client.create_flow_run_from_deployment(deployment_id, **kwargs)

