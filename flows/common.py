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
from tasks.delivery import ChannelConfigError, deliver_pending, require_channels
from tasks.runtime import protocol, trial_engine
from tasks.settings import get_settings

__all__ = ["UserError", "current_clock", "deliver_notices", "protocol", "refuses_user_errors", "run_link", "trial_engine"]


def run_link() -> str | None:
    """The Prefect UI address of the current flow run, for notices."""
    return flow_run.ui_url


@task(name="deliver-notices", retries=2, retry_delay_seconds=[1, 5])
def _deliver(ids: list[int] | None = None) -> str:
    report = deliver_pending(trial_engine(), require_channels(get_settings().apprise_config), clock=current_clock(), ids=ids)
    if report.pending:  # a channel that did not answer may answer a retry; a role with no channel will not
        raise RuntimeError(f"{report.summary}: {'; '.join(report.errors[:3])}")
    return report.summary


def deliver_notices(ids: list[int] | None = None) -> None:
    """Deliver pending notices. A channel still down after retries, a role with no channel or an apprise config that
    cannot be read leaves them in the outbox, not lost: the next pass (daily rounds, `nktrial notify deliver`) sends them."""
    logger = get_run_logger()
    try:
        require_channels(get_settings().apprise_config)  # checked first: retrying cannot mend a config
    except ChannelConfigError as exc:
        logger.warning("notices wait in the outbox: %s", exc)
        return
    state = _deliver(ids, return_state=True)
    if state.is_completed():
        summary = state.result()
        (logger.warning if "no channel serves" in summary else logger.info)("notices: %s", summary)
    else:
        logger.warning("notices kept in the outbox for the next delivery pass (daily rounds): %s", state.message)


def refuses_user_errors(fn: Callable) -> Callable:
    """A flow body whose UserError ends the run Failed, named "Refused", with the sentence as its message: no traceback.

    Put it under @flow, so that Prefect still reads the body's parameters for the form. The body's
    annotations are resolved in its own module, so a flow module may use postponed annotations.
    A run of another trial database ends "Wrong trial" before the body starts (trial_engine checks it; a flow
    without this wrapper is refused at its first trial_engine call, still before it acts).
    """

    @functools.wraps(fn)
    def body(*args, **kwargs):
        try:
            trial_engine()  # a run of another trial ends here, before the body
            return fn(*args, **kwargs)
        except UserError as exc:
            get_run_logger().error(str(exc))
            return Failed(name="Refused", message=str(exc))

    body.__annotations__ = typing.get_type_hints(fn)
    body.__signature__ = inspect.signature(fn, eval_str=True)
    return body
