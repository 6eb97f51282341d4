"""Signed acts through the real flows on the Prefect test server: the code reaches only the signer's own
channel and never Prefect (parameters, run inputs, logs, artifacts) nor the command line's output; DLT
adjudication is signed by an investigator with their own code; a lockout ends and the right code signs."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.flow_runs import resume_flow_run
from prefect.logging.handlers import APILogHandler
from pydantic import ValidationError
from sqlmodel import Session, select

from flows.safety import WIPED, AdjudicationRequest, adjudicate_dlt, report_adverse_event
from models.tables import AdverseEvent, EscalationDecision, SignatureAttempt
from tests.flows.test_escalation_gate import (
    APPROVAL,
    UTC,
    _ae,
    _close_window,
    _code,
    _cohort,
    _resume,
    _review_runs,
    _run_review,
    _send_code,
)
from tests.helpers import notice_link


def _prefect_text(run_ids) -> str:
    """Everything Prefect keeps about these runs that a person or a log reader could see."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        parts = []
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids)))):
            parts += [str(run.parameters), str(run.state.message), run.name]
            parts += [i.value for i in client.filter_flow_run_input(flow_run_id=run.id, key_prefix="", limit=100, exclude_keys=set())]
        parts += [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(run_ids))))]
        parts += [str(a.data) + str(a.description) for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids))))]
    return "\n".join(parts)


def test_the_code_reaches_only_the_pi_and_never_prefect_nor_the_command_line(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-201", "S-202", "S-203"])
    for sid in ("S-201", "S-202", "S-203"):
        _close_window(trial_db, clock, sid)
    clock.set(dt.datetime(2027, 3, 1, 1, 0, tzinfo=UTC))
    from prefect import flow

    from flows.safety import review_if_ready

    flow(review_if_ready, name="start-review")()
    (run,) = _review_runs(trial_db)
    assert _run_review(run.id).is_paused()
    code = _code(channels, "pi-01")
    assert [m.path for m in channels() if "signing code" in m.body] == ["pi-01"]  # no role channel, nobody else
    assert _resume(run.id, decision="escalate", signing_code="12345678" if code != "12345678" else "87654321").is_paused()
    assert _resume(run.id, decision="escalate", signing_code=code, rationale="0/3").is_completed()
    text = _prefect_text([run.id])
    assert code not in text and WIPED in text  # the spent code's place in the run input holds a marker
    # the command line: a new review's code is sent, and only where it went is printed
    env = {**os.environ, "NKTRIAL_DATABASE_URL": str(trial_db.url), "PREFECT_API_URL": "", "NKTRIAL_ACTOR": "coord-1"}
    nktrial = str(Path(sys.executable).with_name("nktrial"))
    out = subprocess.run([nktrial, "escalation", "code", "--decision", "1", "--signer", "pi-01"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 2 and "decision 1 is not waiting for a signature" in out.stderr  # it is signed
    with Session(trial_db) as s:
        assert s.exec(select(EscalationDecision)).one().status == "signed"


def test_escalation_code_prints_where_the_code_went_never_the_code(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-211", "S-212", "S-213"])
    for sid in ("S-211", "S-212", "S-213"):
        _close_window(trial_db, clock, sid)
    env = {**os.environ, "NKTRIAL_DATABASE_URL": str(trial_db.url), "PREFECT_API_URL": "", "NKTRIAL_ACTOR": "pi-01"}  # a signer asks for their own
    nktrial = str(Path(sys.executable).with_name("nktrial"))
    out = subprocess.run([nktrial, "escalation", "code", "--decision", "1", "--signer", "pi-01"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    code = _code(channels, "pi-01")
    assert "sent to pi-01's channel" in out.stdout and code not in out.stdout + out.stderr
    out = subprocess.run([nktrial, "escalation", "code", "--decision", "1", "--signer", "pi-01"], capture_output=True, text=True, check=False,
                         env={**env, "NKTRIAL_APPRISE_CONFIG": ""})
    assert out.returncode == 2 and "is not configured in the apprise config; no signing code was issued" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
    out = subprocess.run([nktrial, "escalation", "approve", "--decision", "1", "--action", "escalate", "--signer", "pi-01", "--code", code,
                          "--meaning", "approval"],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and "signed: escalate at DL2" in out.stdout, out.stderr


def test_dlt_adjudication_is_signed_by_an_investigator_and_refused_to_a_nurse_or_without_a_code(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-221", "S-222", "S-223"])
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    report = report_adverse_event(recorded_by="nurse-7", report=_ae("S-221"), return_state=True)
    assert report.is_completed()
    sent = {m.path for m in channels() if "signing code" in m.body}
    assert sent == {"inv-2", "pi-01"}  # each eligible signer, their own code, on their own channel
    inv_code = _code(channels, "inv-2")
    _the_notice_links_to_the_ae_page_with_the_adjudicate_form(trial_db, channels)
    with pytest.raises(ValidationError, match="verdict"):  # confirming or rejecting is a choice the investigator makes
        AdjudicationRequest(ae_id=1, reason="grade 3", investigator_id="inv-2", signing_code=inv_code)
    with pytest.raises(ValidationError, match="verdict"):
        AdjudicationRequest(ae_id=1, verdict=True, reason="grade 3", investigator_id="inv-2", signing_code=inv_code)
    schema = AdjudicationRequest.model_json_schema()
    assert "verdict" in schema["required"] and "default" not in schema["properties"]["verdict"]
    assert "confirm" not in schema["properties"]  # no toggle that starts off
    with pytest.raises(ValidationError, match="signing_code"):
        AdjudicationRequest(ae_id=1, verdict="DLT confirmed", reason="grade 3", investigator_id="inv-2")
    with pytest.raises(Exception, match="may not adjudicate a DLT"):
        _send_code(trial_db, clock, channels, signer="nurse-7", ae_id=1)
    nurse = adjudicate_dlt(AdjudicationRequest(ae_id=1, verdict="DLT confirmed", reason="grade 3", investigator_id="nurse-7", signing_code=inv_code),
                           return_state=True)
    assert nurse.is_failed() and "nurse-7 (nurse) may not adjudicate a DLT" in nurse.message
    stolen = adjudicate_dlt(AdjudicationRequest(ae_id=1, verdict="DLT confirmed", reason="grade 3", investigator_id="pi-01", signing_code=inv_code),
                            return_state=True)
    assert stolen.is_failed() and "signing_code is wrong for AE 1 and signer pi-01" in stolen.message
    done = adjudicate_dlt(AdjudicationRequest(ae_id=1, verdict="DLT confirmed", reason="grade 3", investigator_id="inv-2", signing_code=inv_code),
                          return_state=True)
    assert done.is_completed(), done.message
    again = adjudicate_dlt(AdjudicationRequest(ae_id=1, verdict="not a DLT", reason="re-review", investigator_id="inv-2", signing_code=inv_code),
                           return_state=True)
    assert again.is_failed() and "already used" in again.message
    with Session(trial_db) as s:
        ae = s.get(AdverseEvent, 1)
        assert (ae.adjudication, ae.adjudicated_by) == ("confirmed", "inv-2")
        assert [(a.signer_id, a.accepted, a.refusal) for a in s.exec(select(SignatureAttempt).order_by(SignatureAttempt.id))] == [
            ("nurse-7", False, "not_authorized"), ("pi-01", False, "wrong_code"), ("inv-2", True, None), ("inv-2", False, "used_code")]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[nurse.state_details.flow_run_id,
                                                                                              done.state_details.flow_run_id])))
    assert all(r.parameters["request"]["signing_code"] == WIPED for r in runs)
    assert inv_code not in _prefect_text([r.id for r in runs])


def test_a_locked_out_pi_is_refused_the_right_code_and_signs_with_it_after_30_minutes(trial_db, clock, channels):
    from protocol.three_plus_three import Action
    from tasks import escalation_gate, signatures
    from tasks.runtime import protocol

    _cohort(trial_db, clock, ["S-231", "S-232", "S-233"])
    for sid in ("S-231", "S-232", "S-233"):
        _close_window(trial_db, clock, sid)
    clock.set(dt.datetime(2027, 3, 1, 1, 0, tzinfo=UTC))
    d = escalation_gate.open_review(trial_db, protocol(), clock=clock)
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=d.id)

    def sign(c, key):
        return signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name="Principal Investigator",
                                        action=Action.ESCALATE, rationale=None, code=c, meaning="approval", attempt_key=key, clock=clock)

    wrong = "00000000" if code != "00000000" else "11111111"
    for i in range(5):
        assert not sign(wrong, f"w{i}").accepted
    assert "locked out" in sign(code, "right-too-soon").reason
    from prefect import flow

    from flows.common import deliver_notices

    flow(deliver_notices, name="deliver")()
    for role in ("safety", "pi"):
        assert any("signing locked out after repeated wrong codes · pi-01 on decision" in m.body for m in channels(role))
    assert all(code not in m.body for m in channels() if m.path != "pi-01")
    clock.advance(minutes=30)
    assert sign(code, "right").accepted


def _the_notice_links_to_the_ae_page_with_the_adjudicate_form(trial_db, channels):
    """The PI's candidate-DLT notice carries only the subject, the event and a link; the link's page shows the AE and
    opens the adjudicate-dlt form filled in for this AE."""
    import json
    from urllib.parse import parse_qs, unquote, urlparse
    from uuid import UUID

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    (notice,) = [m.body for m in channels("pi") if "candidate DLT" in m.body]
    assert "hepatic" not in notice and "grade" not in notice
    link = notice_link(notice)
    assert "/artifacts/artifact/" in link  # one artifact (the UI's key page shows no content), updated in place
    with get_client(sync_client=True) as client:
        (page,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(link.rsplit("/", 1)[1])])))
        assert page.key.startswith("ae-1-")
        deployment = client.read_deployment_by_name("adjudicate-dlt/adjudicate-dlt")
    assert "hepatic failure" in page.data and "| grade | 3 |" in page.data and "waiting for adjudication" in page.data
    form = re.search(r"\[Adjudicate AE 1 →\]\((\S+)\)", page.data).group(1)
    url = urlparse(form)
    assert url.path.endswith(f"/deployments/deployment/{deployment.id}/run")
    assert json.loads(unquote(parse_qs(url.query)["parameters"][0])) == {"request": {"ae_id": 1}}


def _paused_review(trial_db, clock, sids):
    _cohort(trial_db, clock, sids)
    for sid in sids:
        _close_window(trial_db, clock, sid)
    clock.set(dt.datetime(2027, 3, 1, 1, 0, tzinfo=UTC))
    from prefect import flow

    from flows.safety import review_if_ready

    flow(review_if_ready, name="start-review")()
    (run,) = _review_runs(trial_db)
    assert _run_review(run.id).is_paused()
    return run


def _form_text(run_id, part="description"):
    """What the Resume form shows now (the newest suspension's): its markdown description, or its fields' schema."""
    with get_client(sync_client=True) as client:
        inputs = client.filter_flow_run_input(flow_run_id=run_id, key_prefix="suspended-", limit=100, exclude_keys=set())
    return json.loads(max((i for i in inputs if i.key.endswith(f"-{part}")), key=lambda i: i.created).value)


def _review_artifacts(run_id):
    with get_client(sync_client=True) as client:
        return [a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
                if a.key.startswith("cohort-review-")]


def test_a_refused_signature_keeps_the_review_paused_and_says_so_and_the_signed_decision_shows_everywhere(trial_db, clock, channels):
    run = _paused_review(trial_db, clock, ["S-241", "S-242", "S-243"])
    code = _code(channels, "pi-01")
    first = _form_text(run.id)
    assert first.startswith("**Cohort review DL1 · decision 1**") and "**3+3 recommends: escalate to DL2.**" in first
    assert "DL1 3 patients, 0 DLTs" in first and "`escalate` (close DL1, open 3 slots at DL2)" in first and "**Statement:**" in first
    assert "`deescalate`" not in first  # a choice not allowed here is not offered; the full list is in the artifact
    with pytest.raises(RuntimeError, match="I agree"):  # a meaning not in the protocol file's list is refused by the form itself
        resume_flow_run(run.id, run_input={"signer_id": "pi-01", "printed_name": "Principal Investigator", "decision": "escalate",
                                           "meaning": "I agree", "signing_code": code})
    wrong = _resume(run.id, decision="escalate", signing_code="00000000" if code != "00000000" else "11111111")
    assert wrong.is_paused() and wrong.message.startswith("Signature refused: signing_code is wrong for decision 1")
    assert _form_text(run.id).startswith("**Signature refused:** signing_code is wrong for decision 1 and signer pi-01 (1 of 5")
    fields = _form_text(run.id, "schema")["properties"]  # the UI may squeeze the markdown away; the first field always shows
    assert list(fields)[:2] == ["decision", "meaning"] and fields["decision"]["title"] == "Decision · 3+3 recommends escalate to DL2"
    assert fields["decision"]["description"].startswith("SIGNATURE REFUSED: signing_code is wrong for decision 1")
    assert fields["meaning"]["description"].startswith("Statement: By signing") and "default" not in fields["meaning"]
    clock.advance(hours=73)  # 2027-03-04 10:00 in Shanghai
    expired = _resume(run.id, decision="escalate", signing_code=code)
    assert expired.is_paused() and expired.message.startswith("Signature refused: signing_code has expired")
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=1)
    done = _resume(run.id, decision="escalate", signing_code=code, rationale="0 of 3")
    assert done.is_completed() and done.name == "Signed escalate DL2 by pi-01"
    assert done.message == ("decision 1: signed escalate DL2 by pi-01 (Principal Investigator) on 2027-03-04 10:00 Asia/Shanghai; "
                            f"meaning: {APPROVAL}; rationale: 0 of 3")
    (review,) = _review_artifacts(run.id)  # one artifact per review, updated in place over four executions of the run
    assert review.key.startswith("cohort-review-1-") and review.data.startswith("# Cohort review DL1 · decision 1 · signed escalate DL2")
    assert "by pi-01 (Principal Investigator) on 2027-03-04 10:00 Asia/Shanghai" in review.data and APPROVAL in review.data
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        board = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trial-dashboard"])), limit=1,
                                      sort=ArtifactSort.CREATED_DESC)[0]
    assert "| pi-01 | Principal Investigator | 2027-03-04 10:00 Asia/Shanghai | Approval |" in board.data


def test_a_decision_signed_from_the_command_line_completes_the_paused_review_run(trial_db, clock, channels):
    from prefect.settings import PREFECT_API_URL

    run = _paused_review(trial_db, clock, ["S-251", "S-252", "S-253"])
    code = _code(channels, "pi-01")
    env = {**os.environ, "NKTRIAL_DATABASE_URL": str(trial_db.url), "PREFECT_API_URL": PREFECT_API_URL.value(), "NKTRIAL_ACTOR": "pi-01"}
    nktrial = str(Path(sys.executable).with_name("nktrial"))
    sign = [nktrial, "escalation", "sign", "--decision", "1", "--action", "stop", "--rationale", "sponsor hold", "--code", code]
    out = subprocess.run([*sign, "--meaning", "agreed"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 2 and "meaning 'agreed' is not one of the allowed meanings of a signature (approval, responsibility)" in out.stderr
    out = subprocess.run([*sign, "--meaning", "responsibility"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and "completed in the Prefect UI with the signed decision" in out.stdout, out.stderr
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed() and state.name == "Signed stop by pi-01"
    assert "(Principal Investigator)" in state.message and "meaning: Responsibility:" in state.message
    (review,) = _review_artifacts(run.id)
    assert "**Signed stop** by pi-01 (Principal Investigator)" in review.data
