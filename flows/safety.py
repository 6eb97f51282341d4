"""Safety flows: AE reporting and DLT adjudication, the SAE reporting clock, and the cohort review
the PI signs in the Prefect UI (a suspended run with a typed Resume form)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Literal

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.input.run_input import keyset_from_base_key
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows.common import current_clock, deliver_notices, protocol, refuses_user_errors, run_link, trial_engine
from models.queries import trial_instance
from models.tables import DecisionStatus, EscalationDecision
from protocol.dlt import DltScreen
from protocol.three_plus_three import Action
from tasks import adverse_events, escalation_gate, signatures, signing
from tasks.adverse_events import AeReport, AeUpdate
from tasks.delivery import load_channels
from tasks.reports import cohort_status_table, next_cohort_table, review_markdown
from tasks.settings import get_settings
from tasks.staff import StaffId

WIPED = "(spent: not kept)"  # what a run's parameters or input hold where the signing code was


class AdjudicationRequest(BaseModel):
    """The investigator's adjudication of one candidate DLT."""

    ae_id: int
    confirm: bool = Field(description="true: it is a DLT; false: it is not")
    reason: str = Field(min_length=1, max_length=200)
    investigator_id: str = Field(min_length=1, max_length=64)
    signing_code: str = Field(min_length=1, max_length=32, description="the one-time code sent to your own channel for this AE "
                              "(nktrial ae code --ae N --signer YOU); it is wiped from this run's parameters once read")


class AeRef(BaseModel):
    ae_id: int


class PiDecision(RunInput):
    """The PI's signed decision on a cohort."""

    signer_id: str = Field(min_length=1, max_length=64, description="your staff ID")
    printed_name: str = Field(min_length=1, max_length=120, description="your printed name; it must match the staff register's")
    decision: Literal["escalate", "expand", "deescalate", "stop"] = Field(description="the recommendation or a more cautious action")
    meaning: str = Field(default="Approval: I reviewed this cohort's DLT data and approve this dose-escalation decision", max_length=120)
    rationale: str = Field(default="", max_length=500, description="why, in a sentence (required when more cautious than the rule)")
    signing_code: str = Field(min_length=1, max_length=32, description="the one-time code sent to your own channel; wiped from "
                              "this run once read")


def _trial_instance() -> str:
    with Session(trial_engine()) as s:
        return trial_instance(s)


def start_cohort_review(history: str) -> None:
    """Start the review once per outcome history (idempotency key), as its own run the PI can find."""
    instance = _trial_instance()
    # Scheduled at the trial clock's now (the wall clock in production): a rehearsal's review is never due for a worker's wall clock.
    run = run_deployment("cohort-review/cohort-review", timeout=0, as_subflow=False, idempotency_key=f"{instance}:cohort-review:{history}",
                         scheduled_time=current_clock()(),
                         flow_run_name=f"cohort review · {history}", tags=["cohort-review", f"trial:{instance}"])
    get_run_logger().info("cohort review %s started for history %s", run.id, history)


def review_if_ready() -> None:
    """Start the cohort review if the newest cohort is ready (its windows closed, or a second DLT)."""
    state = escalation_gate.read_trial_state(trial_engine(), protocol())
    if state.ready:
        start_cohort_review(state.history)


def _schedule_sae_deadline(subject_id: str, ae_id: int) -> None:
    """The SAE reminder run, due before the reporting deadline."""
    p = protocol().notifications
    remind_at = current_clock()() + dt.timedelta(hours=p.sae_report_deadline_hours - p.sae_reminder_before_deadline_hours)
    instance = _trial_instance()
    run_deployment("sae-deadline/sae-deadline", parameters={"ae": {"ae_id": ae_id}}, scheduled_time=remind_at, timeout=0,
                   as_subflow=False, idempotency_key=f"{instance}:sae-deadline:{ae_id}",
                   flow_run_name=f"{subject_id} · SAE deadline", tags=[f"subject:{subject_id}", f"trial:{instance}"])


@flow(name="report-adverse-event", flow_run_name="{report.subject_id} · adverse event")
@refuses_user_errors
def report_adverse_event(report: AeReport, recorded_by: StaffId):
    """Record an AE and screen it against the DLT rules; a candidate DLT reaches the PI at once."""
    outcome = adverse_events.report_adverse_event(trial_engine(), protocol(), report=report, actor=recorded_by, clock=current_clock(),
                                                  link=run_link())
    deliver_notices()
    if outcome.serious:
        _schedule_sae_deadline(report.subject_id, outcome.ae_id)
    _send_adjudication_codes(outcome)
    return Completed(message=f"AE {outcome.ae_id} for {outcome.subject_id}: DLT screen {outcome.screen.value} ({outcome.rule})")


@flow(name="update-adverse-event", flow_run_name="AE {update.ae_id} · update")
@refuses_user_errors
def update_adverse_event(update: AeUpdate, recorded_by: StaffId):
    outcome = adverse_events.update_adverse_event(trial_engine(), protocol(), update=update, actor=recorded_by, clock=current_clock(),
                                                  link=run_link())
    deliver_notices()
    _send_adjudication_codes(outcome)
    return Completed(message=f"AE {outcome.ae_id}: DLT screen {outcome.screen.value} ({outcome.rule})")


def _send_adjudication_codes(outcome) -> None:
    """A candidate DLT: each investigator and PI on the register gets their own code to sign its adjudication."""
    if outcome.screen is DltScreen.CANDIDATE:
        _send_codes(signing.SignedAct.adjudication(outcome.ae_id), f"AE {outcome.ae_id}")


@flow(name="adjudicate-dlt", flow_run_name="AE {request.ae_id} · DLT adjudication")
@refuses_user_errors
def adjudicate_dlt(request: AdjudicationRequest):
    code = request.signing_code
    _wipe_code_from_parameters()
    early_stop = adverse_events.adjudicate_dlt(trial_engine(), protocol(), ae_id=request.ae_id, confirm=request.confirm,
                                               reason=request.reason, investigator_id=request.investigator_id, code=code,
                                               clock=current_clock(), link=run_link(), attempt_key=f"run-{flow_run.id}")
    deliver_notices()  # a lockout tells the safety desk and the PI
    review_if_ready()  # a second DLT at a level ends the cohort at once
    verdict = "confirmed" if request.confirm else "rejected"
    return Completed(message=f"AE {request.ae_id}: DLT {verdict}" + ("; 2 DLTs at the level: cohort review started" if early_stop else ""))


@flow(name="sae-deadline", flow_run_name="AE {ae.ae_id} · SAE deadline")
def sae_deadline(ae: AeRef) -> str:
    why = adverse_events.sae_deadline_check(trial_engine(), protocol(), ae_id=ae.ae_id, clock=current_clock(), link=run_link())
    deliver_notices()
    return why


@task(name="open-review")
def open_review_task() -> EscalationDecision | None:
    return escalation_gate.open_review(trial_engine(), protocol(), clock=current_clock())


def _send_codes(act: signing.SignedAct, what: str) -> None:
    """Each active staff member who may sign `act` and holds no live code gets their own, on their own channel.
    The log says who got one, never the code."""
    sent, missed = signing.send_codes_to_signers(trial_engine(), protocol(), load_channels(get_settings().apprise_config), act=act,
                                                 clock=current_clock(), link=run_link())
    logger = get_run_logger()
    if sent:
        logger.info("one-time signing codes for %s went to the own channels of: %s", what, ", ".join(sent))
    for sentence in missed:
        logger.warning("%s; request one with: %s", sentence, _code_command(act))


def _code_command(act: signing.SignedAct) -> str:
    if act.decision_id is not None:
        return f"nktrial escalation code --decision {act.decision_id} --signer STAFF_ID"
    return f"nktrial ae code --ae {act.ae_id} --signer STAFF_ID"


def _wipe_code_from_parameters() -> None:
    """The adjudication form's code is spent once read: keep only a marker in this run's parameters."""
    params = dict(flow_run.parameters or {})
    request = params.get("request")
    if isinstance(request, BaseModel):  # a flow called in-process holds the model; one from a deployment, its JSON
        request = request.model_dump(mode="json")
    if isinstance(request, dict) and "signing_code" in request:
        params["request"] = {**request, "signing_code": WIPED}
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, parameters=params)


def _wipe_code_from_input(key: str, form: PiDecision) -> None:
    """The Resume form's run input is kept by Prefect: after use, its code is replaced by a marker."""
    response = keyset_from_base_key(f"suspended-{key}")["response"]
    value = {**form.model_dump(mode="json"), "signing_code": WIPED}
    with get_client(sync_client=True) as client:
        client.delete_flow_run_input(flow_run.id, response)
        client.create_flow_run_input(flow_run.id, response, json.dumps(value))


def _publish_review(d: EscalationDecision, state) -> None:
    """The cohort status table and the review text as artifacts of this run."""
    create_table_artifact(key=f"cohort-status-dl{d.from_level}", table=cohort_status_table(state),
                          description=f"Cohort status at DL{d.from_level}: `{d.history}`")
    md, table = review_markdown(protocol(), state, d), next_cohort_table(protocol(), state)
    create_markdown_artifact(key=f"cohort-review-dl{d.from_level}", markdown=md + ("\n\n" + table if table else ""),
                             description=f"Cohort review DL{d.from_level}")


def _wait_for_signature(d: EscalationDecision, state):
    """Suspend for the PI's form until a signature is accepted; each refusal is shown on the next form."""
    attempt, refused = 0, None
    while True:
        _send_codes(signing.SignedAct.decision(d.id), f"decision {d.id}")
        key = f"decision-{d.id}-{attempt}"
        form = suspend_flow_run(wait_for_input=PiDecision.with_initial_data(description=review_markdown(protocol(), state, d, refused)),
                                key=key, timeout=None)
        outcome = signatures.sign_decision(trial_engine(), protocol(), decision_id=d.id, signer_id=form.signer_id,
                                           printed_name=form.printed_name, action=Action(form.decision), rationale=form.rationale,
                                           code=form.signing_code, meaning=form.meaning, attempt_key=f"ui-{attempt}",
                                           clock=current_clock(), link=run_link())
        if form.signing_code != WIPED:
            _wipe_code_from_input(key, form)
        if outcome.accepted:
            return outcome
        get_run_logger().warning("signature refused: %s", outcome.reason)
        deliver_notices()  # a lockout tells the safety desk and the PI
        refused, attempt = outcome.reason, attempt + 1


@flow(name="cohort-review", flow_run_name="cohort review")
def cohort_review() -> str:
    """Compute the 3+3 recommendation from adjudicated outcomes and wait, suspended, for the PI's signed decision."""
    d = open_review_task()
    if d is None:
        return "no cohort is ready for review"
    if d.status == DecisionStatus.SIGNED:
        return f"decision {d.id} is already signed"
    engine = trial_engine()
    state = escalation_gate.read_trial_state(engine, protocol())
    escalation_gate.record_review_run(engine, decision_id=d.id, flow_run_id=str(flow_run.id), clock=current_clock())
    _publish_review(d, state)
    escalation_gate.announce_review(engine, d, clock=current_clock(), link=run_link())
    deliver_notices()
    outcome = _wait_for_signature(d, state)
    deliver_notices()
    get_run_logger().info("decision %d %s", d.id, outcome.reason)
    return outcome.reason
