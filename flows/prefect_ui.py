"""What the Prefect UI shows people about a safety action: links into it, artifacts updated in place,
and a suspension whose state carries a message.

Checked on prefect 3.9.1 (UI bundle and chromium): a deployment's run form is
`/deployments/deployment/<id>/run?parameters=<JSON>` and opens with those parameters filled in;
`/artifacts/artifact/<id>` shows one artifact's content; `/artifacts/key/<key>` only the key's timeline (no content).
"""

from __future__ import annotations

import json
from urllib.parse import quote
from uuid import UUID

from prefect import get_client
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import ObjectNotFound, Pause
from prefect.flow_runs import suspend_flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.states import Suspended


def ui_base() -> str | None:
    base = PREFECT_UI_URL.value()
    return base.rstrip("/") if base else None


def artifact_key_url(key: str) -> str | None:
    base = ui_base()
    return f"{base}/artifacts/key/{key}" if base else None


def artifact_url(artifact_id) -> str | None:
    base = ui_base()
    return f"{base}/artifacts/artifact/{artifact_id}" if base else None


def run_form_url(deployment: str, parameters: dict) -> str | None:
    """The deployment's custom run form, opened with `parameters` filled in (the UI decodes the value twice)."""
    base = ui_base()
    if not base:
        return None
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        return None
    return f"{base}/deployments/deployment/{dep.id}/run?parameters={quote(quote(json.dumps(parameters), safe=''), safe='')}"


def upsert_markdown_artifact(*, key: str, markdown: str, description: str, flow_run_id: UUID | str | None) -> UUID:
    """One artifact per (key, run), updated in place: a run that re-runs from the top (a resumed suspension) adds no version.
    `flow_run_id` None: the current run's."""
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    run_id = flow_run_id or flow_run.id
    with get_client(sync_client=True) as client:
        mine = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(run_id))]))
        found = client.read_artifacts(artifact_filter=mine, limit=1)
        if found:
            client.update_artifact(found[0].id, ArtifactUpdate(data=markdown, description=description))
            return found[0].id
    if flow_run_id is not None and str(flow_run_id) != str(flow_run.id):
        raise LookupError(f"run {flow_run_id} has no artifact {key}")
    return create_markdown_artifact(key=key, markdown=markdown, description=description)


def _newest_of_key(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


def page_artifact(*, key: str, markdown: str | None, description: str) -> UUID:
    """A page kept as ONE artifact of `key` for its whole life, updated in place, so that every link to it (by id: the UI's
    key page shows no content) shows the page as it is now. `markdown` None: make sure it exists (a placeholder), change nothing."""
    from prefect.client.schemas.actions import ArtifactUpdate

    with get_client(sync_client=True) as client:
        page = _newest_of_key(client, key)
        if page is not None:
            if markdown is not None:
                client.update_artifact(page.id, ArtifactUpdate(data=markdown, description=description))
            return page.id
    return create_markdown_artifact(key=key, markdown=markdown or "The page is being written.", description=description)


def suspend_with_message(wait_for_input, *, key: str, message: str | None):
    """`suspend_flow_run(wait_for_input=..., key=key)`; with a message, the Suspended state carries it (the run page and the
    runs list show it). The state keeps the name "Suspended", which Prefect's engine looks for."""
    try:
        return suspend_flow_run(wait_for_input=wait_for_input, key=key, timeout=None)
    except Pause as paused:
        if not message or paused.state is None:
            raise
        details = paused.state.state_details
        told = Suspended(pause_key=details.pause_key, message=message[:500],
                         state_details={"run_input_keyset": details.run_input_keyset})
        from prefect.runtime import flow_run

        with get_client(sync_client=True) as client:
            result = client.set_flow_run_state(flow_run.id, told, force=True)
        raise Pause(state=result.state or told) from None
