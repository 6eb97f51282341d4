"""Each run acts only on its own trial.

Every run the system creates carries the tag `trial:<instance>` of the trial database it was made for (the
projection, the cohort review and SAE runs, a rehearsal's runs). A worker serves one trial database: the one
its settings name. `tasks.runtime.trial_engine()`, the one place every flow gets its database, calls
`check_run` first: in a flow run whose trial tag names another instance, the run is refused before it reads
or writes anything else, so no flow can act on a trial that is not its own. A run with no trial tag (started
by hand from a form in the UI) acts on the worker's database, as before.

A refused run ends Cancelled, named "Wrong trial": terminal, never retried (a Failed run of a flow with
retries would be rescheduled, and refused again), and shown apart from the runs that failed. Its message is
one sentence: which instance the run belongs to, which database this worker serves. The coordinators of the
database the worker does serve get a notice through its outbox (delivered at once when a channel is up,
else by the next delivery pass), and the run's log says the same.

The typical case: a rehearsal (`nktrial simulate` on the real server) leaves a cohort review Paused; resumed
later in the real server's UI, the real worker would run it against the real trial database.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import NoReturn

import sqlalchemy as sa
from sqlmodel import Session

from models.queries import trial_instance

TAG = "trial:"
STATE_NAME = "Wrong trial"
ACTOR = "system:trial-guard"
_matched: set[tuple[str, str]] = set()  # (flow run id, database URL) already found to match: one look-up a run


def claimed_instances(tags: Iterable[str] | None) -> set[str]:
    """The trial instances a run's tags name (normally one; none for a run started by hand)."""
    return {t[len(TAG):] for t in tags or () if t.startswith(TAG)}


def database_name(engine: sa.Engine) -> str:
    """The database in words, without a folder or a password: `trial.db`, or `host/name`."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return (url.database or "memory").replace("\\", "/").rsplit("/", 1)[-1]
    return f"{url.host or 'localhost'}/{url.database}"


def refusal_sentence(claimed: set[str], served: str, database: str) -> str:
    """One sentence: which instance the run belongs to and which database this worker serves."""
    which = " and ".join(sorted(claimed))
    return (f"This run belongs to trial instance {which}, but this worker serves the trial database {database} "
            f"of instance {served}: it did nothing here.")


def check_run(engine: sa.Engine) -> None:
    """In a flow run tagged `trial:<instance>`: return if the instance is the one of `engine`'s database, else refuse."""
    context = sys.modules.get("prefect.context")  # a command that never imported Prefect runs no flow
    found = context.FlowRunContext.get() if context is not None else None
    run = found.flow_run if found is not None else None
    if run is None:
        return
    claimed = claimed_instances(run.tags)
    key = (str(run.id), str(engine.url))
    if not claimed or key in _matched:
        return
    with Session(engine) as s:
        served = trial_instance(s)
    if claimed == {served}:
        if len(_matched) > 10_000:  # a long rehearsal runs thousands of runs in one process
            _matched.clear()
        _matched.add(key)
        return
    refuse(engine, found, claimed=claimed, served=served)


def refuse(engine: sa.Engine, context, *, claimed: set[str], served: str) -> NoReturn:
    """End the current flow run Cancelled, named "Wrong trial", tell the coordinators, and stop here (Prefect's Abort,
    carrying the state already set, so the engine neither retries nor overwrites it)."""
    from prefect import get_client
    from prefect.context import TaskRunContext
    from prefect.exceptions import Abort
    from prefect.logging import get_run_logger
    from prefect.states import Cancelled

    run = context.flow_run
    sentence = refusal_sentence(claimed, served, database_name(engine))
    try:
        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - no run logger: the module's
        logger = logging.getLogger(__name__)
    logger.error(sentence)
    try:
        _tell_coordinators(engine, run_id=str(run.id), flow_name=getattr(context.flow, "name", "flow"), claimed=claimed, served=served)
    except Exception as exc:  # noqa: BLE001 - the state and the log still say it
        logger.warning("the coordinators could not be told through the outbox: %s", exc)
    state = Cancelled(name=STATE_NAME, message=sentence)
    with get_client(sync_client=True) as client:
        task = TaskRunContext.get()
        if task is not None and task.task_run is not None:  # refused inside a task: it does not stay Running
            client.set_task_run_state(task.task_run.id, Cancelled(name=STATE_NAME, message=sentence), force=True)
        result = client.set_flow_run_state(run.id, state, force=True)
    stop = Abort(sentence)
    stop.state = result.state or state
    raise stop


def _run_url(run_id: str) -> str | None:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/flow-runs/flow-run/{run_id}" if base else None


def _tell_coordinators(engine: sa.Engine, *, run_id: str, flow_name: str, claimed: set[str], served: str) -> None:
    """A notice to the coordinators of the database this worker serves, once per run; sent now if a channel is up."""
    from models.clock import current_clock
    from models.db import UnitOfWork
    from protocol.roles import Role
    from tasks.notices import Notice, NoticeEvent, enqueue

    clock = current_clock()
    detail = f"{flow_name} run of trial {' and '.join(sorted(claimed))}, this worker serves trial {served}"
    notice = Notice(Role.COORDINATOR, NoticeEvent.WRONG_TRIAL, detail=detail, link=_run_url(run_id))
    with UnitOfWork(engine, actor=ACTOR, reason="a run of another trial database was refused", clock=clock) as u:
        row = enqueue(u.session, notice, dedup=f"wrong-trial:{run_id}", at=u.at)
        u.commit()
    if row is None:  # told already (the run was resumed again)
        return
    from tasks.delivery import deliver_pending, load_channels
    from tasks.settings import get_settings

    try:
        deliver_pending(engine, load_channels(get_settings().apprise_config), clock=clock, ids=[row.id])
    except Exception as exc:  # noqa: BLE001 - the notice waits in the outbox for the next delivery pass
        logging.getLogger(__name__).warning("the wrong-trial notice waits in the outbox: %s", exc)
