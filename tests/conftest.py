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
from protocol.definition import load_protocol

PG_ENV = "NKTRIAL_TEST_POSTGRES_URL"


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
    """URL of a fresh, empty trial database on each engine."""
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
    yield url.render_as_string(hide_password=False)
    with admin_engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin_engine.dispose()


@pytest.fixture
def engine(db_url):
    """A migrated trial database on each engine."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()
