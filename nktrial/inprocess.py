"""Executing deployment runs inside this process, as a worker would, without a worker's per-run costs.

The rehearsal (and the tests) create runs from the real deployments on a real Prefect server and
execute them here with Prefect's own `run_flow`. Two of the engine's per-run costs serve only a run
whose process lives as long as the run (a worker's subprocess), and are left out here:

- The suspension observer. For every run of a deployment, Prefect 3.9's engine starts a thread with
  its own event loop and websocket that waits for someone *else* to suspend the run; stopping that
  thread at the end of the run costs about 200 ms (measured: a no-op run 271 ms with it, 63 ms
  without, bench/rehearsal.py). A run executed here that suspends itself (the cohort review waiting
  for the PI's signature) does so through `suspend_flow_run`, which raises Pause in the run itself
  and needs no observer; nothing else can suspend a run that lives for a second in this process.
- A new API client per run (each builds its TLS context, ~16 ms): one client serves every run.

Heartbeats are already off for these runs (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset) for the same
reason. A worker's runs keep all three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def _no_observer(*_args, **_kwargs) -> Iterator[None]:
    yield


@contextlib.contextmanager
def without_suspension_observer() -> Iterator[None]:
    """Runs executed here while this is open start no suspension observer thread (see the module's text)."""
    import prefect.flow_engine as engine

    if not hasattr(engine, "observe_flow_run_suspension"):  # a Prefect that renamed it: say so, rather than lose the speed quietly
        raise RuntimeError("prefect.flow_engine.observe_flow_run_suspension is gone: update nktrial/inprocess.py for this Prefect")
    original = engine.observe_flow_run_suspension
    engine.observe_flow_run_suspension = _no_observer
    try:
        yield
    finally:
        engine.observe_flow_run_suspension = original


@contextlib.contextmanager
def in_process_runs() -> Iterator[object]:
    """No suspension observer, and one sync API client for every run executed here (yielded)."""
    from prefect.context import SyncClientContext

    with without_suspension_observer(), SyncClientContext.get_or_create() as ctx:
        yield ctx.client
