"""Shared fixtures. The database fixtures give a fresh, migrated trial database on each engine:
a SQLite file, and a new PostgreSQL database on the server named by NKTRIAL_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import make_engine
from models.migrate import upgrade
from models.pg_roles import create_roles, upgrade_as_owner
from protocol.definition import load_protocol
from tests.helpers import register_staff

PG_ENV = "NKTRIAL_TEST_POSTGRES_URL"
PG_OWNER, PG_APP = "nktrial_owner", "nktrial_app"  # cluster-wide; created idempotently by every PostgreSQL test database
OWNER_URLS: dict[str, str] = {}  # app URL -> owner URL of the same PostgreSQL test database


# make test's two processes (pytest-xdist --dist loadfile --no-loadscope-reorder) take test files in the order they are
# collected. These go first, the longest first (as measured in make test), so each process starts on a long one and
# the short files fill in around them; each scenario rehearsal file rehearses its scenarios once, in its process.
LONG_FIRST = ["tests/flows/test_rehearsal_two_dlts.py", "tests/flows/test_rehearsal_no_dlt.py", "tests/ha/test_scaled_out.py",
              "tests/flows/test_rehearsal_one_of_three.py", "tests/flows/test_rehearsal_withdrawal_missed_il2.py",
              "tests/flows/test_rehearsal_late_infusion.py"]


def pytest_collection_modifyitems(items):
    """The files in LONG_FIRST first, in that order; the rest as collected."""
    def long_first(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONG_FIRST.index(path) if path in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=long_first)


@pytest.fixture(scope="session")
def protocol():
    return load_protocol()


def _postgres_admin_url() -> str | None:
    url = os.environ.get(PG_ENV, "").strip()
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set; CI must run the PostgreSQL tests, not skip them")
        return None
    return url


@contextlib.contextmanager
def _cluster_roles_lock():
    """One test process at a time changes the cluster-wide roles (concurrent GRANTs of one membership can collide)."""
    with open(Path(tempfile.gettempdir()) / f"nktrial-test-pg-roles-{os.getuid()}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """URL of a fresh trial database on each engine: an empty SQLite file; on PostgreSQL a new database migrated by the
    owner role, and this URL is the application role's (it may write rows, not change the schema or the triggers)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trial.db'}"
        return
    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip(f"{PG_ENV} is not set (make test sets it)")
    name = f"nktrial_test_{uuid.uuid4().hex[:12]}"
    admin_engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ENV} is not reachable: {exc.orig}")
    url = sa.engine.make_url(admin).set(database=name)
    # Roles as in production (README): migrations as the owner, every clinical write as the app role. The roles are the
    # cluster's: the test processes of one run (pytest-xdist) grant them one at a time.
    with _cluster_roles_lock():
        create_roles(url, database=name, owner=PG_OWNER, app=PG_APP)
    owner_url = url.set(username=PG_OWNER, password=None).render_as_string(hide_password=False)
    upgrade_as_owner(owner_url, app=PG_APP)
    app_url = url.set(username=PG_APP, password=None).render_as_string(hide_password=False)
    OWNER_URLS[app_url] = owner_url
    yield app_url
    with admin_engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin_engine.dispose()


@pytest.fixture
def owner_url(db_url):
    """The URL migrations run with: the SQLite file itself, or the PostgreSQL owner role."""
    return OWNER_URLS.get(db_url, db_url)


@pytest.fixture
def engine(db_url):
    """A migrated trial database on each engine."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def staffed_engine(engine, protocol):
    """A migrated trial database whose staff register holds the staff the tests write as (tests.helpers.TEST_STAFF)."""
    register_staff(engine, protocol)
    return engine


os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import datetime as dt  # noqa: E402
import re  # noqa: E402

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.deployments import ALL_FLOWS  # noqa: E402
from models.clock import VirtualClock, use_clock  # noqa: E402
from nktrial.inprocess import without_suspension_observer  # noqa: E402
from nktrial.receiver import Receiver  # noqa: E402
from nktrial.server import THROWAWAY_SERVER_ENV, temporary_environment  # noqa: E402
from tasks.runtime import trial_engine  # noqa: E402
from tests.helpers import TEST_STAFF  # noqa: E402

# The Prefect server, the apprise receiver and the per-test trial database are shared by every test
# folder (flows, faults, e2e): one prefect_test_harness for the whole session.

ROLES = ["coordinator", "nurse", "investigator", "pi", "cell-lab", "pharmacy", "safety"]


@pytest.fixture(scope="session")
def prefect_server():
    # Flows run in this process and end in seconds: no crash-detection heartbeat thread, whose join costs up to 1 s a run,
    # and no suspension observer thread, whose stop costs ~200 ms a run (nktrial/inprocess.py says why neither is needed).
    # The harness's server is thrown away at the end and has no UI: it keeps no event history (nktrial/server.py).
    # The setting is in the environment only while the harness starts its server (which copies the environment then),
    # so no other process this session starts inherits it.
    with contextlib.ExitStack() as stack:
        with temporary_environment(THROWAWAY_SERVER_ENV):
            stack.enter_context(prefect_test_harness(server_startup_timeout=60))
        stack.enter_context(temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        stack.enter_context(without_suspension_observer())
        for f in ALL_FLOWS:
            f.to_deployment(name=f.name).apply()
        yield


@pytest.fixture(scope="session")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()
    _assert_no_patient_data(r)


# Every message sent in the whole suite must read: subject ID · event · [detail] · [due date] · [run link] · [notice ID].
_SHAPE = re.compile(
    r"^(S-\d{3}|trial) · [A-Za-z0-9 ,:()\-+.]+( · [A-Za-z0-9_ ,:()\-+.…;]+)?( · due \d{4}-\d{2}-\d{2})?( · https?://\S+)?"
    r"( · notice \d+)?$"
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
