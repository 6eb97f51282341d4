"""A real Prefect server for the session (prefect_test_harness), deployments registered from the
flows, a fresh trial database per test, a virtual clock, and a real apprise receiver."""

from __future__ import annotations

import datetime as dt
import os
import re

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402,E501
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
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402
from prefect.states import Scheduled  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.deployments import ALL_FLOWS  # noqa: E402
from flows.treatment import treatment_event  # noqa: E402
from models.clock import VirtualClock, use_clock  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from nktrial.receiver import Receiver  # noqa: E402
from tasks.projection import scheduled_at  # noqa: E402
from tasks.runtime import trial_engine  # noqa: E402
from tests.helpers import TEST_STAFF, register_staff  # noqa: E402

ROLES = ["coordinator", "nurse", "investigator", "pi", "cell-lab", "pharmacy", "safety"]


@pytest.fixture(scope="session")
def prefect_server():
    # Flows run in this process and end in seconds: no crash-detection heartbeat thread, whose join costs up to 1 s a run.
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for f in ALL_FLOWS:
            f.to_deployment(name=f.name).apply()
        yield


@pytest.fixture(scope="session")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()
    _assert_no_patient_data(r)


# Every message sent in the whole suite must read: subject ID · event · [detail] · [due date] · [run link].
_SHAPE = re.compile(
    r"^(S-\d{3}|trial) · [A-Za-z0-9 ,:()\-+.]+( · [A-Za-z0-9_ ,:()\-+.…;]+)?( · due \d{4}-\d{2}-\d{2})?( · https?://\S+)?$"
)
_SCREENING_WORDS = ("ecog", "alt ", "ast ", "bilirubin", "lvef", "creatinine", "mrd_positive", "age_years", "consent", "pregnan", "cns",
                    "hiv", "hbv", "steroid", "half_life", "jane", "doe")
SCREENING_VALUES: set[str] = set()  # distinctive values from test screening records, filled by the tests


def _assert_no_patient_data(r: Receiver) -> None:
    bad = []
    for m in r.messages:
        text = f"{m.title}\n{m.body}".lower()
        if not _SHAPE.match(m.body) or any(w in text for w in _SCREENING_WORDS) or any(v.lower() in text for v in SCREENING_VALUES):
            bad.append(m.body)
    assert not bad, f"messages with more than subject, event, due date and link: {bad[:5]}"


@pytest.fixture
def channels(receiver, tmp_path, monkeypatch):
    """One channel per role on the receiver, configured through the apprise config file setting."""
    receiver.down.clear()
    cfg = tmp_path / "apprise.yml"
    own = {staff_id: [tag] for staff_id, _, _, tag in TEST_STAFF}  # each staff member's own channel: path = staff ID (signing codes)
    cfg.write_text(receiver.apprise_yaml({role: [role] for role in ROLES} | own), encoding="utf-8")
    monkeypatch.setenv("NKTRIAL_APPRISE_CONFIG", str(cfg))
    start = len(receiver.messages)
    yield lambda role=None: [m for m in receiver.messages[start:] if role is None or m.path == role]


@pytest.fixture
def trial_db(prefect_server, tmp_path, monkeypatch):
    """A fresh, migrated SQLite trial database for this test, used by every flow through the settings."""
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))  # reports land here, not in the working copy
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)  # the staff the tests write as: every write is refused to anyone not on the register
    yield engine
    engine.dispose()


@pytest.fixture
def clock():
    """Virtual time: 2027-01-20 09:00 in Shanghai (01:00 UTC)."""
    c = VirtualClock(dt.datetime(2027, 1, 20, 1, 0, tzinfo=dt.timezone.utc))
    with use_clock(c):
        yield c


def subject_runs(subject_id: str, states=(StateType.SCHEDULED,)):
    """The treatment-event runs of one subject, in time order."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"subject:{subject_id}"]),
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
