"""Shared fixtures. The database fixtures give a fresh, migrated trial database on each engine:
a SQLite file, and a new PostgreSQL database on the server named by NKTRIAL_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import uuid

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
    # Roles as in production (README): migrations as the owner, every clinical write as the app role.
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
