"""Safety flows: AE reporting and DLT adjudication, the SAE reporting clock, and the cohort review
the PI signs in the Prefect UI (a suspended run with a typed Resume form)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Literal

from prefect import flow, get_client, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.input import RunInput
from prefect.input.run_input import keyset_from_base_key
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows.casebook import recorded_about, subject_of_ae
from flows.common import current_clock, deliver_notices, protocol, refuses_user_errors, run_link, trial_engine
from flows.prefect_ui import artifact_url, page_artifact, run_form_url, suspend_with_message, upsert_markdown_artifact
from models.queries import trial_instance
from models.tables import EscalationDecision
from protocol.dlt import DltScreen
from protocol.three_plus_three import Action
from tasks import adverse_events, closure, escalation_gate, signatures, signing
from tasks.adverse_events import AeReport, AeUpdate
from tasks.delivery import ChannelConfigError, load_channels
from tasks.review_report import review_form_fields, review_form_markdown, review_markdown
from tasks.settings import get_settings
from tasks.staff import StaffId

WIPED = "(spent: not kept)"  # what a run's parameters or input hold where the signing code was


CONFIRMED, NOT_A_DLT = "DLT confirmed", "not a DLT"


class AdjudicationRequest(BaseModel):
    """The investigator's adjudication of one candidate DLT: an explicit choice, never a default."""

    ae_id: int = Field(title="AE", description="the AE's number (the AE page's link fills it in)")
    verdict: Literal["DLT confirmed", "not a DLT"] = Field(title="Your adjudication", description="choose one: there is no default")
    reason: str = Field(min_length=1, max_length=200, description="why, in a sentence (kept with the adjudication)")
    investigator_id: str = Field(min_length=1, max_length=64, title="Your staff ID")
    signing_code: str = Field(min_length=1, max_length=32, description="the one-time code sent to your own channel for this AE "
                              "(nktrial ae code --ae N --signer YOU); it is wiped from this run's parameters once read")


    @property
    def confirm(self) -> bool:
        return self.verdict == CONFIRMED


class AeRef(BaseModel):
    ae_id: int


MEANINGS = tuple(protocol().escalation.signature_meanings.value)  # the protocol file's allowed meanings of a signature


class PiDecision(RunInput):
    """The PI's signed decision on a cohort. Each review's form (`_decision_form`) retitles the first two fields with the facts."""

    decision: Literal["escalate", "expand", "deescalate", "stop"] = Field(title="Decision",
                                                                          description="the recommendation or a more cautious action")
    meaning: Literal[MEANINGS] = Field(title="Meaning of your signature", description="choose one: there is no default")
    signer_id: str = Field(min_length=1, max_length=64, title="Your staff ID")
    printed_name: str = Field(min_length=1, max_length=120, title="Your printed name", description="as on the staff register")
    rationale: str = Field(default="", max_length=500, title="Rationale",
                           description="why, in a sentence (required when more cautious than the rule)")
    signing_code: str = Field(min_length=1, max_length=32, title="One-time signing code",
                              description="sent to your own channel; wiped from this run once read")


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
                                                  link=run_link(), ae_page=_ae_pages())
    _publish_ae_page(outcome.ae_id)  # before the notice that links to it goes out
    recorded_about(outcome.subject_id)  # the run's subject tag; the patient's casebook
    deliver_notices()
    if outcome.serious:
        _schedule_sae_deadline(report.subject_id, outcome.ae_id)
    _send_adjudication_codes(outcome)
    return Completed(message=f"AE {outcome.ae_id} for {outcome.subject_id}: DLT screen {outcome.screen.value} ({outcome.rule})")


@flow(name="update-adverse-event", flow_run_name="AE {update.ae_id} · update")
@refuses_user_errors
def update_adverse_event(update: AeUpdate, recorded_by: StaffId):
    outcome = adverse_events.update_adverse_event(trial_engine(), protocol(), update=update, actor=recorded_by, clock=current_clock(),
                                                  link=run_link(), ae_page=_ae_pages())
    _publish_ae_page(outcome.ae_id)
    recorded_about(subject_of_ae(update.ae_id))
    deliver_notices()
    _send_adjudication_codes(outcome)
    return Completed(message=f"AE {outcome.ae_id}: DLT screen {outcome.screen.value} ({outcome.rule})")


def _ae_page_key(ae_id: int, instance: str | None = None) -> str:
    return f"ae-{ae_id}-{instance or _trial_instance()}"  # the trial instance: another trial database on this server never shares it


def _ae_pages():
    """AE id -> where a notice about it links: its page, one artifact updated in place (made now if new; its content is
    written after the service commits). The service calls this inside its write transaction: the trial instance is read first."""
    instance = _trial_instance()
    return lambda ae_id: artifact_url(page_artifact(key=_ae_page_key(ae_id, instance), markdown=None, description=_ae_page_title(ae_id)))


def _ae_page_title(ae_id: int) -> str:
    return f"AE {ae_id}: summary, DLT screen, adjudication"


def _publish_ae_page(ae_id: int) -> None:
    """The AE's page: its summary and, for a candidate DLT, the link to the adjudicate-dlt form filled in for this AE."""
    form = run_form_url("adjudicate-dlt/adjudicate-dlt", {"request": {"ae_id": ae_id}})
    page_artifact(key=_ae_page_key(ae_id), markdown=adverse_events.ae_markdown(trial_engine(), protocol(), ae_id, adjudicate_link=form),
                  description=_ae_page_title(ae_id))


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
    _publish_ae_page(request.ae_id)  # the AE's page now shows the adjudication
    recorded_about(subject_of_ae(request.ae_id))
    review_if_ready()  # a second DLT at a level ends the cohort at once
    return Completed(name=request.verdict[0].upper() + request.verdict[1:],
                     message=f"AE {request.ae_id}: {request.verdict}, signed by {request.investigator_id}"
                     + ("; 2 DLTs at the level: cohort review started" if early_stop else ""))


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
    logger = get_run_logger()
    try:
        channels = load_channels(get_settings().apprise_config)
    except ChannelConfigError as exc:  # the review or adjudication stays open; codes can be requested once the config is fixed
        logger.warning("no signing codes sent: %s; request one with: %s", exc, _code_command(act))
        return
    sent, missed = signing.send_codes_to_signers(trial_engine(), protocol(), channels, act=act, clock=current_clock(), link=run_link())
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


def _review_key(d: EscalationDecision) -> str:
    return f"cohort-review-{d.id}-{_trial_instance()}"


def _publish_review(d: EscalationDecision, state, signed=None, *, flow_run_id=None) -> str | None:
    """The review's one artifact (the tally, the rule, each patient, the next cohort; once signed, the signature), on the
    review run, updated in place on every attempt. Returns its address for the form's link."""
    artifact_id = upsert_markdown_artifact(key=_review_key(d), markdown=review_markdown(protocol(), state, d, signed),
                                           description=f"Cohort review DL{d.from_level}, decision {d.id}: "
                                                       + (signed.sentence if signed else "waiting for the PI's signature"),
                                           flow_run_id=flow_run_id)
    return artifact_url(artifact_id)


def _wait_for_signature(d: EscalationDecision, state, details_url: str | None):
    """Suspend for the PI's form until a signature is accepted. A refusal keeps the run suspended: the state's message and
    the top of the next form say why. Each attempt is replayed from its attempt key when the run re-runs from the top."""
    attempt, refused = 0, None
    while True:
        _send_codes(signing.SignedAct.decision(d.id), f"decision {d.id}")
        key = f"decision-{d.id}-{attempt}"
        described = _decision_form(d, state, refused).with_initial_data(
            description=review_form_markdown(protocol(), state, d, refused=refused, details_url=details_url))
        form = suspend_with_message(described, key=key, message=f"Signature refused: {refused}" if refused else None)
        code = form.signing_code
        if code != WIPED:  # spent once read, before anything else can fail
            _wipe_code_from_input(key, form)
        # The attempt key is this run's: a re-run from the top replays its own attempts, never another review run's.
        outcome = signatures.sign_decision(trial_engine(), protocol(), decision_id=d.id, signer_id=form.signer_id,
                                           printed_name=form.printed_name, action=Action(form.decision), rationale=form.rationale,
                                           code=code, meaning=form.meaning, attempt_key=f"ui-{flow_run.id}-{attempt}",
                                           clock=current_clock(), link=run_link())
        if outcome.accepted:
            return outcome
        get_run_logger().warning("signature refused: %s", outcome.reason)
        deliver_notices()  # a lockout tells the safety desk and the PI
        refused, attempt = outcome.reason, attempt + 1


def _decision_form(d: EscalationDecision, state, refused: str | None) -> type[PiDecision]:
    """PiDecision whose first fields carry the refusal, the recommendation, the tally, the allowed choices and the statement."""
    from pydantic import create_model

    text = review_form_fields(protocol(), state, d, refused=refused)
    decision = PiDecision.model_fields["decision"]
    return create_model("PiDecision", __base__=PiDecision,
                        decision=(decision.annotation, Field(title=text["decision_title"], description=text["decision_description"])),
                        meaning=(Literal[MEANINGS], Field(title=text["meaning_title"], description=text["meaning_description"])))


def on_decision_signed(decision_id: int) -> None:
    """The one place a just-signed decision is handled, signed in the Resume form or from the command line (no flow run
    context needed): the review artifact shows the signature; the runs of patients a stop or de-escalation left undosed
    are cancelled; the dashboard artifact is refreshed."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.reports import dashboard

    engine, p = trial_engine(), protocol()
    with Session(engine) as s:
        d = s.get(EscalationDecision, decision_id)
        board = dashboard(s, p).markdown()
    signed = signatures.signed_decision(engine, p, decision_id)
    with get_client(sync_client=True) as client:  # first: a stop or de-escalation cancels the runs of patients it left undosed
        closure.reproject_not_dosed(client, engine, now=current_clock()())
    try:  # what people read; a failure here never undoes or blocks the above
        if d.review_flow_run_id:
            _publish_review(d, escalation_gate.read_trial_state(engine, p), signed, flow_run_id=d.review_flow_run_id)
        create_markdown_artifact(key="trial-dashboard", markdown=board, description="Cohort and trial dashboard")
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("decision %d is signed; its review artifact or the dashboard was not refreshed: %s",
                                            decision_id, exc)


def complete_signed_review(decision_id: int) -> str | None:
    """A decision signed from the command line: handle it (on_decision_signed), then complete its paused review run with
    the signed decision as the state's name and message. Returns the run's id, or None when no run holds the review."""
    from prefect.states import Completed as done

    engine = trial_engine()
    signed = signatures.signed_decision(engine, protocol(), decision_id)
    with Session(engine) as s:
        run_id = s.get(EscalationDecision, decision_id).review_flow_run_id
    on_decision_signed(decision_id)
    if not run_id or signed is None:
        return None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state is None or not run.state.is_final():
            client.set_flow_run_state(run.id, done(name=signed.state_name, message=signed.sentence), force=True)
    return run_id


def _signed_state(signed: signatures.SignedDecision) -> State:
    return Completed(name=signed.state_name, message=signed.sentence)


@flow(name="cohort-review", flow_run_name="cohort review")
def cohort_review():
    """Compute the 3+3 recommendation from adjudicated outcomes and wait, suspended, for the PI's signed decision."""
    engine = trial_engine()
    d = escalation_gate.review_held_by(engine, str(flow_run.id)) or open_review_task()
    if d is None:
        return "no cohort is ready for review"
    signed = signatures.signed_decision(engine, protocol(), d.id)
    if signed is not None:  # signed elsewhere (the command line) before this run resumed, or this run stopped after signing
        on_decision_signed(d.id)  # idempotent: whatever did not happen after the signature happens now
        return _signed_state(signed)
    state = escalation_gate.read_trial_state(engine, protocol())
    escalation_gate.record_review_run(engine, decision_id=d.id, flow_run_id=str(flow_run.id), clock=current_clock())
    details = _publish_review(d, state)
    escalation_gate.announce_review(engine, d, clock=current_clock(), link=run_link())
    deliver_notices()
    outcome = _wait_for_signature(d, state, details)
    on_decision_signed(d.id)
    deliver_notices()
    get_run_logger().info("decision %d %s", d.id, outcome.reason)
    return _signed_state(signatures.signed_decision(engine, protocol(), d.id))
