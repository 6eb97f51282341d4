"""Wiring done once per process, at run time: the trial engine and the protocol in force.

Nothing here connects at import time; the first caller builds, later callers reuse.
"""

from __future__ import annotations

import functools
import sys
from urllib.parse import urlsplit

import sqlalchemy as sa

from models.db import make_engine
from protocol.definition import ProtocolDefinition, load_protocol
from protocol.errors import UserError
from tasks.settings import LOOPBACK, get_settings
from tasks.trial_guard import check_run


@functools.lru_cache(maxsize=8)
def _engine_for(url: str) -> sa.Engine:
    return make_engine(url)


def trial_engine() -> sa.Engine:
    """The trial database named by the settings (SQLite under the data folder by default).

    The one place every flow gets its database: in a flow run tagged `trial:<instance>` of another trial database,
    the run is refused here, before it acts (tasks/trial_guard.py)."""
    settings = get_settings()
    if settings.embedded_database:
        check_embedded_here()
    engine = _engine_for(settings.trial_database_url)
    check_run(engine)
    return engine


@functools.lru_cache(maxsize=16)
def this_machine(host: str) -> bool:
    """The host names this machine: a loopback name, or a name or address this machine can listen on
    (`nktrial up --host 10.0.0.5` gives its worker that address)."""
    import socket

    if host.lower() in LOOPBACK:
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, 0))
                return True
        except OSError:
            continue
    return False


class SplitRecordRefused(UserError):
    """A flow run would write to a SQLite file on its worker while its Prefect server is on another machine."""


def check_embedded_here() -> None:
    """In a flow run whose Prefect API is not on this machine: refuse a SQLite trial database (a file of this worker's).

    The worker would write the clinical record to a file of its own, apart from every other node's: the system of
    record split, silently. The work pool's job template carries NKTRIAL_DATABASE_URL (nktrial/workpool.py), so this
    happens only on a worker whose pool was set up by hand, or a run started with job variables that drop it."""
    context = sys.modules.get("prefect.context")  # a command that never imported Prefect runs no flow
    if context is None or context.FlowRunContext.get() is None:
        return
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or ""
    host = urlsplit(api).hostname
    if host is None or this_machine(host):
        return
    raise SplitRecordRefused(
        f"This flow run's trial database is a SQLite file on this worker (NKTRIAL_DATABASE_URL unset or sqlite) and its "
        f"Prefect API ({host}) is on another machine: it would split the trial's record, so it did nothing; set "
        "NKTRIAL_DATABASE_URL to the shared database in the work pool's job template (nktrial up does) or the worker's environment.")


@functools.lru_cache(maxsize=8)
def _protocol_for(path: str | None) -> ProtocolDefinition:
    return load_protocol(path)


def protocol() -> ProtocolDefinition:
    path = get_settings().protocol_file
    return _protocol_for(str(path) if path else None)
