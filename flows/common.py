"""Pieces every flow uses: the clock, the trial database, the protocol, links and delivery."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import Failed

from models.clock import current_clock
from protocol.errors import UserError
from tasks.delivery import deliver_pending, load_channels
from tasks.runtime import protocol, trial_engine
from tasks.settings import get_settings

__all__ = ["UserError", "current_clock", "deliver_notices", "protocol", "refuses_user_errors", "run_link", "trial_engine"]


def run_link() -> str | None:
    """The Prefect UI address of the current flow run, for notices."""
    return flow_run.ui_url


@task(name="deliver-notices", retries=2, retry_delay_seconds=[1, 5])
def _deliver(ids: list[int] | None = None) -> str:
    report = deliver_pending(trial_engine(), load_channels(get_settings().apprise_config), clock=current_clock(), ids=ids)
    summary = f"{report.delivered} delivered, {report.no_channel} with no channel configured, {report.pending} waiting for a channel"
    if report.pending:
        raise RuntimeError(f"{summary}: {'; '.join(report.errors[:3])}")
    return summary


def deliver_notices(ids: list[int] | None = None) -> None:
    """Deliver pending notices; a channel still down after retries leaves them in the outbox, not lost."""
    state = _deliver(ids, return_state=True)
    logger = get_run_logger()
    if state.is_completed():
        logger.info("notices: %s", state.result())
    else:
        logger.warning("notices kept in the outbox for the next delivery pass (daily rounds): %s", state.message)


def refuses_user_errors(fn: Callable) -> Callable:
    """A flow body whose UserError ends the run Failed, named "Refused", with the sentence as its message: no traceback.

    Put it under @flow, so that Prefect still reads the body's parameters for the form. The body's
    annotations are resolved in its own module, so a flow module may use postponed annotations.
    """

    @functools.wraps(fn)
    def body(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            get_run_logger().error(str(exc))
            return Failed(name="Refused", message=str(exc))

    body.__annotations__ = typing.get_type_hints(fn)
    body.__signature__ = inspect.signature(fn, eval_str=True)
    return body
