"""Helpers for the flow tests. The session's Prefect server, the apprise receiver, the per-test
trial database and the virtual clock are fixtures of tests/conftest.py, shared with tests/faults/."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType  # noqa: E402
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect.flow_engine import run_flow  # noqa: E402
from prefect.states import Scheduled  # noqa: E402

from flows.deployments import ALL_FLOWS  # noqa: E402,F401 - the deployment tests read it from here
from flows.treatment import treatment_event  # noqa: E402
from models.clock import VirtualClock  # noqa: E402
from tasks.projection import scheduled_at  # noqa: E402
from tests.conftest import ROLES, SCREENING_VALUES  # noqa: E402,F401 - shared by the flow tests

pytest.register_assert_rewrite("tests.flows.rehearsals")  # its shared checks report values as a test file's asserts do
from tests.flows.rehearsals import rehearsed  # noqa: E402,F401 - the scenario rehearsals, for tests/flows/test_rehearsal_*.py


def this_trial_tag() -> str:
    """The `trial:<instance>` tag of this test's trial database: the session's Prefect server also holds the runs of
    other tests and of the scenario rehearsals, some for the same subject IDs."""
    from sqlmodel import Session

    from models.queries import trial_instance
    from tasks.runtime import trial_engine

    with Session(trial_engine()) as s:
        return f"trial:{trial_instance(s)}"


def subject_runs(subject_id: str, states=(StateType.SCHEDULED,), *, every_trial: bool = False):
    """The treatment-event runs of one subject of this test's trial database (or of every trial database on the
    server), in time order."""
    tags = [f"subject:{subject_id}"] + ([] if every_trial else [this_trial_tag()])
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags),
                                          state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states)))),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["treatment-event"])),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=200,
        )


def execute_run(run, clock: VirtualClock):
    """Run one scheduled treatment-event run now, in virtual time set to its scheduled time."""
    clock.set(max(scheduled_at(run), clock()))
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Scheduled(), force=True)
        return run_flow(treatment_event, flow_run=client.read_flow_run(run.id), return_type="state")
