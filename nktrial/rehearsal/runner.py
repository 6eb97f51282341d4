"""The Prefect side of a rehearsal: runs are created from the deployments on the server, then
executed in this process as a worker would (a worker on a shared server never sees one due,
because each is Pending or scheduled in virtual time)."""

from __future__ import annotations

import datetime as dt

from models.clock import VirtualClock


class PrefectRunner:
    """Creates and executes this trial database's runs; remembers which reviews wait Paused, and since when."""

    def __init__(self, client, *, instance: str, clock: VirtualClock):
        self.client, self.instance, self.clock = client, instance, clock
        self.tag = f"trial:{instance}"
        self.flows: dict = {}  # deployment id → flow
        self.deployment_ids: dict[str, object] = {}  # flow name → deployment id
        self.paused_since: dict[str, dt.datetime] = {}  # run id → when its review paused
        self.runs_executed = 0
        # The earliest Scheduled run, as last read. Only this runner's runs change which runs are scheduled (a bedside
        # entry writes the trial database alone, and these runs are due in virtual time, so no worker takes one): the loop
        # asks before every step, and the server is read again only after a run was executed or cancelled.
        self._next_due: tuple | None = None
        self._next_known = False

    def ensure_deployments(self) -> None:
        from prefect.exceptions import ObjectNotFound

        from flows.deployments import ALL_FLOWS

        for f in ALL_FLOWS:
            try:
                dep = self.client.read_deployment_by_name(f"{f.name}/{f.name}")
            except ObjectNotFound:  # not deployed on this server yet: deploy it (no work pool; runs execute here)
                f.to_deployment(name=f.name).apply()
                dep = self.client.read_deployment_by_name(f"{f.name}/{f.name}")
            self.flows[dep.id] = f
            self.deployment_ids[f.name] = dep.id

    def execute(self, run_id, created=None) -> str:
        """Execute one run here, as a worker would; a suspended review ends Paused. `created`: a run just created Pending."""
        from prefect.exceptions import Pause
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        self._next_known = False  # this run, and any it schedules, change what is due next
        run = created
        if run is None:  # a Scheduled (or resumed) run: Pending now, so no worker's clock can take it
            self.client.set_flow_run_state(run_id, Pending(), force=True)
            run = self.client.read_flow_run(run_id)
        flow = self.flows[run.deployment_id]
        try:
            state = run_flow(flow, flow_run=run, return_type="state")
        except Pause:
            state = self.client.read_flow_run(run_id).state
        self.runs_executed += 1
        if state.is_paused():
            self.paused_since.setdefault(str(run_id), self.clock())
            return "paused: waiting for the PI's signed decision"
        self.paused_since.pop(str(run_id), None)
        text = state.message or ""
        if not text and state.is_completed():
            try:
                value = state.result(raise_on_failure=False)
                text = value if isinstance(value, str) else ""
            except Exception:  # noqa: BLE001 - a result not kept is not an error
                text = ""
        return f"{state.name}: {text}" if text else state.name

    def run_deployment(self, flow_name: str, parameters: dict) -> str:
        """A new run of the flow's deployment, created Pending and executed now."""
        from prefect.states import Pending

        from tasks.prefect_api import create_run_from_deployment

        run = create_run_from_deployment(self.client, self.deployment_ids[flow_name], parameters=parameters, state=Pending(),
                                         tags=[self.tag])
        return self.execute(run.id, created=run)

    def resume(self, run_id: str, run_input: dict) -> str:
        """Resume a paused review with the PI's input and execute it."""
        from prefect.flow_runs import resume_flow_run

        resume_flow_run(run_id, run_input=run_input)
        return self.execute(run_id)

    def next_scheduled(self):
        """This trial's earliest Scheduled run and when it is due, or None (read again after any run executed here)."""
        if self._next_known:
            return self._next_due
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        from tasks.projection import scheduled_at

        runs = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                                          tags=FlowRunFilterTags(all_=[self.tag])),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=1)
        self._next_due = (scheduled_at(runs[0]) or self.clock(), runs[0]) if runs else None
        self._next_known = True
        return self._next_due

    def cancel_leftovers(self) -> None:
        """Runs still scheduled when nobody is left on study (e.g. a completed patient's later reminders) are cancelled."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled

        self._next_known = False
        runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PAUSED])),
            tags=FlowRunFilterTags(all_=[self.tag])))
        for run in runs:
            self.client.set_flow_run_state(run.id, Cancelled(message="rehearsal ended: nothing left to do"), force=True)
