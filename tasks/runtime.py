"""Wiring done once per process, at run time: the trial engine and the protocol in force.

Nothing here connects at import time; the first caller builds, later callers reuse.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from models.db import make_engine
from protocol.definition import ProtocolDefinition, load_protocol
from tasks.settings import get_settings
from tasks.trial_guard import check_run


@functools.lru_cache(maxsize=8)
def _engine_for(url: str) -> sa.Engine:
    return make_engine(url)


def trial_engine() -> sa.Engine:
    """The trial database named by the settings (SQLite under the data folder by default).

    The one place every flow gets its database: in a flow run tagged `trial:<instance>` of another trial database,
    the run is refused here, before it acts (tasks/trial_guard.py)."""
    engine = _engine_for(get_settings().trial_database_url)
    check_run(engine)
    return engine


@functools.lru_cache(maxsize=8)
def _protocol_for(path: str | None) -> ProtocolDefinition:
    return load_protocol(path)


def protocol() -> ProtocolDefinition:
    path = get_settings().protocol_file
    return _protocol_for(str(path) if path else None)
