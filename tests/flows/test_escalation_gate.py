"""Safety and the escalation gate: DLTs, the cohort review the PI signs, and the gate on every path."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import Pause
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.states import Scheduled
from sqlmodel import Session, select

from flows.recording import InfusionRecord
from flows.recording import record_infusion as record_infusion_flow
from flows.safety import AdjudicationRequest, adjudicate_dlt, cohort_review, report_adverse_event
from models.tables import (
    AdverseEvent,
    DoseLevelState,
    EscalationDecision,
    LevelStatus,
    Signature,
    SignatureAttempt,
    SigningCode,
    Subject,
)
from protocol.eligibility import ScreeningRecord
from protocol.errors import UserError
from protocol.three_plus_three import Action
from tasks import due_events, enrollment, escalation_gate, recording, signatures
from tasks.adverse_events import AeReport
from tasks.runtime import protocol

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
UTC = dt.timezone.utc
DAY0 = dt.datetime(2027, 1, 31, 9, 0)
APPROVAL = protocol().escalation.signature_meanings.value[0]  # the Resume form's meaning: chosen, never preset


def _enroll(engine, clock, sid, day0=DAY0):
    rec = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid})
    return enrollment.enroll(engine, protocol(), record=rec, planned_day0=day0, actor="coord-1", clock=clock)


def _treat(engine, clock, sid, level=1, day0=DAY0):
    """Both infusions given on time."""
    for n, day in ((1, 0), (2, 14)):
        at = day0 + dt.timedelta(days=day)
        recording.record_infusion(engine, protocol(), subject_id=sid, infusion_number=n, given_at=at, dose_level=level,
                                cells_infused=protocol().dose_level(level).cells_per_infusion, product_lot=f"LOT-{sid}-{n}",
                                actor="nurse-7", clock=lambda: clock().replace(year=2027, month=3, day=31))


def _close_window(engine, clock, sid):
    def at_close():
        return dt.datetime(2027, 3, 1, 0, 0, tzinfo=UTC)

    return due_events.act_on_event(engine, protocol(), subject_id=sid, event_key="dlt_window_close", clock=at_close)


def _cohort(engine, clock, sids, level=1):
    for sid in sids:
        assert _enroll(engine, clock, sid).status is enrollment.EnrollmentStatus.ENROLLED
        _treat(engine, clock, sid, level)


def _ae(sid, category="non_haematological", grade=3, onset=dt.date(2027, 2, 5), **kw) -> AeReport:
    return AeReport(subject_id=sid, term="hepatic failure", category=category, grade=grade, onset_on=onset, attribution="probable", **kw)


def _state(engine):
    with Session(engine) as s:
        return escalation_gate.trial_state(s, protocol())


def _code(channels, signer="pi-01"):
    """The newest signing code in the signer's own channel (the receiver's path for it is the staff ID)."""
    msgs = [m.body for m in channels(signer) if "signing code" in m.body]
    assert msgs, f"no signing code reached {signer}'s own channel"
    return re.search(r"signing code (\d{8})", msgs[-1]).group(1)


def _send_code(engine, clock, channels, *, signer, decision_id=None, ae_id=None):
    """Ask for a code as `nktrial escalation code` / `nktrial ae code` do, and read it from the signer's own channel."""
    from tasks.delivery import load_channels
    from tasks.settings import get_settings
    from tasks.signing import SignedAct, send_signing_code

    act = SignedAct.decision(decision_id) if decision_id is not None else SignedAct.adjudication(ae_id)
    send_signing_code(engine, protocol(), load_channels(get_settings().apprise_config), act=act, signer_id=signer, clock=clock)
    return _code(channels, signer)


def _adjudicate(engine, clock, channels, ae_id, confirm, reason, signer="inv-2", **kw):
    code = _send_code(engine, clock, channels, signer=signer, ae_id=ae_id)
    verdict = "DLT confirmed" if confirm else "not a DLT"
    return adjudicate_dlt(AdjudicationRequest(ae_id=ae_id, verdict=verdict, reason=reason, investigator_id=signer, signing_code=code), **kw)


def _review_runs(engine, states=(StateType.SCHEDULED, StateType.PAUSED)):
    """This trial database's cohort-review runs (the Prefect server is shared by the whole test session)."""
    from models.queries import trial_instance

    with Session(engine) as s:
        tag = f"trial:{trial_instance(s)}"
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
                                          tags=FlowRunFilterTags(all_=[tag])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["cohort-review"])))


def _run_review(run_id):
    """Execute the review run as a worker would: a suspension ends the process, leaving the run Paused."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state.is_scheduled():
            client.set_flow_run_state(run_id, Scheduled(), force=True)
        try:
            return run_flow(cohort_review, flow_run=client.read_flow_run(run_id), return_type="state")
        except Pause:
            return client.read_flow_run(run_id).state


def _resume(run_id, **form):
    resume_flow_run(run_id, run_input={"signer_id": "pi-01", "printed_name": "Principal Investigator", "meaning": APPROVAL, **form})
    return _run_review(run_id)


def test_a_candidate_dlt_reaches_the_pi_at_once_and_adjudication_changes_the_tally(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-101", "S-102", "S-103"])
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    state = report_adverse_event(recorded_by="inv-2", report=_ae("S-101"), return_state=True)
    assert state.is_completed() and "DLT screen candidate" in state.message
    (pi,) = [m.body for m in channels("pi") if "candidate DLT" in m.body]
    assert pi.startswith("S-101 · candidate DLT · AE 1, adjudicate")
    assert "hepatic" not in pi  # the AE term is free text: it stays in the database
    for sid in ("S-101", "S-102", "S-103"):
        _close_window(trial_db, clock, sid)
    assert _state(trial_db).history == "1NNN"  # a candidate is not a DLT until adjudicated
    assert _adjudicate(trial_db, clock, channels, 1, True, "probable, grade 3 hepatic", return_state=True).is_completed()
    after = _state(trial_db)
    assert after.history == "1TNN" and after.recommendation.action is Action.EXPAND
    _adjudicate(trial_db, clock, channels, 1, False, "re-review: pre-existing")
    assert _state(trial_db).history == "1NNN"


def test_two_dlts_stop_the_cohort_without_waiting_for_open_windows(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-111", "S-112", "S-113"])
    clock.set(dt.datetime(2027, 2, 10, 2, 0, tzinfo=UTC))
    for sid in ("S-111", "S-112"):
        report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3))
    assert _state(trial_db).ready is False
    _adjudicate(trial_db, clock, channels, 1, True, "CRS grade 3")
    state = _adjudicate(trial_db, clock, channels, 2, True, "CRS grade 3", return_state=True)
    assert "2 DLTs at the level: cohort review started" in state.message
    st = _state(trial_db)
    assert st.ready and st.early_stop and st.pending == ["S-113"]  # S-113's window is still open
    assert st.recommendation.action is Action.STOP and st.recommendation.mtd is None
    assert len(_review_runs(trial_db)) == 1


def test_the_review_suspends_refuses_bold_wrong_and_reused_codes_and_records_the_signature(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-121", "S-122", "S-123"])
    clock.set(dt.datetime(2027, 3, 1, 0, 0, tzinfo=UTC))
    from flows.treatment import treatment_event
    from tests.flows.conftest import subject_runs

    for sid in ("S-121", "S-122", "S-123"):
        close = next(r for r in subject_runs(sid) if r.parameters["event"]["event_key"] == "dlt_window_close") if subject_runs(sid) else None
        if close is None:  # these patients were enrolled without Prefect: act on the event directly, as the run would
            from flows.treatment import TreatmentEventRef

            treatment_event(TreatmentEventRef(subject_id=sid, event_key="dlt_window_close"))
    (run,) = _review_runs(trial_db)
    state = _run_review(run.id)
    assert state.is_paused()
    code = _code(channels)
    with Session(trial_db) as s:
        (d,) = s.exec(select(EscalationDecision)).all()
        assert (d.history, d.recommended_action, d.recommended_level, d.status) == ("1NNN", "escalate", 2, "waiting")
        assert s.exec(select(SigningCode)).one().code_hash != code  # only the hash is kept
    # 1NTN-style caution is fine, but nothing bolder than the rule: here expand is cautious, so try a wrong code first.
    assert _resume(run.id, decision="escalate", signing_code="00000000").is_paused()
    with Session(trial_db) as s:
        assert s.get(DoseLevelState, 2).status is LevelStatus.PENDING
    done = _resume(run.id, decision="escalate", signing_code=code, rationale="0/3 at DL1")
    assert done.is_completed(), done.message
    with Session(trial_db) as s:
        sig = s.exec(select(Signature)).one()
        assert (sig.signer_id, sig.printed_name) == ("pi-01", "Principal Investigator")
        assert sig.meaning.startswith("Approval") and sig.signed_at == clock()
        assert s.get(DoseLevelState, 1).status is LevelStatus.CLOSED and s.get(DoseLevelState, 2).status is LevelStatus.OPEN
        attempts = s.exec(select(SignatureAttempt).order_by(SignatureAttempt.id)).all()
        assert [(a.accepted, a.reason[:26]) for a in attempts] == [(False, "signing_code is wrong for "), (True, "signed: escalate at DL2")]
        decision_id = s.exec(select(EscalationDecision)).one().id
    reused = signatures.sign_decision(trial_db, protocol(), decision_id=decision_id, signer_id="pi-01", printed_name=None, action=Action.STOP,
                                  rationale=None, code=code, meaning="approval", attempt_key="again", clock=clock)
    assert not reused.accepted and "signing_code was already used" in reused.reason
    assert any("escalation decision signed · escalate: 3 slots open at DL2" in m.body for m in channels("coordinator"))
    # The next patient now enrolls at DL2.
    assert _enroll(trial_db, clock, "S-124", day0=dt.datetime(2027, 3, 10, 9, 0)).dose_level == 2


def test_a_bolder_choice_than_the_rule_is_refused_and_a_cautious_one_is_signed(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-131", "S-132", "S-133"])
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    report_adverse_event(recorded_by="inv-2", report=_ae("S-131"))
    _adjudicate(trial_db, clock, channels, 1, True, "grade 3")
    for sid in ("S-131", "S-132", "S-133"):
        _close_window(trial_db, clock, sid)
    d = escalation_gate.open_review(trial_db, protocol(), clock=clock)
    assert (d.history, d.recommended_action) == ("1TNN", "expand")
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=d.id)
    bold = signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name=None, action=Action.ESCALATE,
                                rationale=None, code=code, meaning="approval", attempt_key="1", clock=clock)
    assert not bold.accepted and "bolder than the 3+3 recommendation 'expand'" in bold.reason
    clock.advance(hours=73)
    expired = signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name=None, action=Action.EXPAND,
                                   rationale=None, code=code, meaning="approval", attempt_key="2", clock=clock)
    assert not expired.accepted and "expired" in expired.reason
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=d.id)
    stop = signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name="Principal Investigator", action=Action.STOP,
                                rationale="sponsor hold", code=code, meaning="approval", attempt_key="3", clock=clock)
    assert stop.accepted
    with Session(trial_db) as s:
        assert {lv.status for lv in s.exec(select(DoseLevelState))} == {LevelStatus.CLOSED}
        assert s.exec(select(EscalationDecision)).one().mtd is None
    from models.tables import NotificationOutbox

    with Session(trial_db) as s:
        told = {n.role for n in s.exec(select(NotificationOutbox)) if n.body.startswith("trial · trial stopped · enrollment closed; stopped by the PI")}
    assert told == {"coordinator", "nurse", "investigator", "pi", "cell-lab", "pharmacy", "safety"}
    with pytest.raises(UserError, match="enrollment of S-134 is refused: the trial was stopped by decision 1"):
        _enroll(trial_db, clock, "S-134", day0=dt.datetime(2027, 6, 1, 9, 0))  # not even waitlisted: stop means stop


def _force_subject_to_level_2(engine, sid):
    with engine.begin() as conn:
        conn.execute(sa.update(Subject.__table__).where(Subject.__table__.c.subject_id == sid).values(dose_level=2))


def test_every_gate_violation_is_refused_on_every_path(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-141", "S-142", "S-143"])
    assert _enroll(trial_db, clock, "S-144").status is enrollment.EnrollmentStatus.WAITLISTED  # DL1 full, DL2 not approved
    with pytest.raises(sa.exc.DatabaseError, match="dose level gate"):
        _force_subject_to_level_2(trial_db, "S-141")  # the database refuses an assignment edited behind the system's back
    with trial_db.begin() as conn:  # someone able to drop the database's guards does it anyway: every path still refuses
        conn.exec_driver_sql("DROP TRIGGER subject_gate_update")
        conn.exec_driver_sql("DROP TRIGGER dose_level_state_gate_update")
    _force_subject_to_level_2(trial_db, "S-141")
    with Session(trial_db) as s:
        subject = s.exec(select(Subject).where(Subject.subject_id == "S-141")).one()
    # direct function calls
    with pytest.raises(UserError, match="dose level 2 is not open — no signed escalation approval opens it yet"):
        recording.record_infusion(trial_db, protocol(), subject_id="S-141", infusion_number=1, given_at=DAY0, dose_level=2,
                                cells_infused=5e8, product_lot="X", actor="nurse-7", clock=clock)
    with pytest.raises(UserError, match="calendar of S-141: dose level 2 is not open"):
        from models.db import UnitOfWork

        with UnitOfWork(trial_db, actor="x", reason="schedule", clock=clock) as u:
            recording.refresh_calendar(u.session, protocol(), u.session.get(Subject, subject.id))
    # the flow
    state = record_infusion_flow(InfusionRecord(subject_id="S-141", infusion_number=1, dose_level=2, given_at=DAY0, cells_infused=5e8,
                                                product_lot="X", recorded_by="nurse-7"), return_state=True)
    assert state.is_failed() and "dose level 2 is not open" in state.message
    # the command line
    env = {"NKTRIAL_DATABASE_URL": str(trial_db.url), "PREFECT_API_URL": "", "NKTRIAL_APPRISE_CONFIG": "", "NKTRIAL_ACTOR": "nurse-7"}
    import os

    out = subprocess.run([str(Path(sys.executable).with_name("nktrial")), "record", "infusion", "--subject", "S-141", "--number", "1",
                          "--dose-level", "2", "--given-at", "2026-01-31T09:00", "--cells", "5e8", "--lot", "X"],
                         capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 2 and "dose level 2 is not open" in out.stderr and "Traceback" not in out.stderr
    # enrollment, even if someone flips DL2 open behind the system's back
    with trial_db.begin() as conn:
        conn.execute(sa.update(DoseLevelState.__table__).where(DoseLevelState.__table__.c.level == 2).values(status="open", slots_open=3))
    with pytest.raises(UserError, match="enrollment of S-145: dose level 2 is not open"):
        _enroll(trial_db, clock, "S-145")
    with trial_db.begin() as conn:
        conn.execute(sa.update(DoseLevelState.__table__).where(DoseLevelState.__table__.c.level == 2).values(status="pending", slots_open=0))
    # and the database itself, whatever writes to it
    for sql in (
        "INSERT INTO enrollment (subject_pk, dose_level, cohort, slot, enrolled_at) VALUES (4, 2, 1, 1, '2027-01-20 01:00:00')",
        "INSERT INTO administration (subject_pk, kind, event_key, given, given_at, dose_level, recorded_at) "
        "VALUES (1, 'nk_infusion', 'nk_infusion-9', 1, '2027-01-31 01:00:00', 2, '2027-01-31 01:00:00')",
        "INSERT INTO calendar_event (subject_pk, key, kind, label, protocol_day, local_on, due_at, window_start_on, window_end_on, "
        "status, anchor_version) VALUES (1, 'x', 'pk_sample', 'x', 1, '2027-02-01', '2027-02-01 01:00:00', '2027-02-01', '2027-02-01', "
        "'planned', 'v')",
    ):
        with pytest.raises(sa.exc.DatabaseError, match="dose level gate"):
            with trial_db.begin() as conn:
                conn.exec_driver_sql(sql)
    with Session(trial_db) as s:
        assert s.get(DoseLevelState, 2).status is LevelStatus.PENDING
    # and the audit check names what was done behind the system's back
    from tasks.audit import verify

    problems = " ".join(p.message for p in verify(str(trial_db.url)).problems)
    assert "subject_gate_update" in problems and "dose_level" in problems


def test_two_levels_never_enroll_at_the_same_time(trial_db, clock):
    _enroll(trial_db, clock, "S-151")
    with pytest.raises(sa.exc.IntegrityError):
        with trial_db.begin() as conn:
            conn.execute(sa.update(DoseLevelState.__table__).where(DoseLevelState.__table__.c.level == 2).values(status="open"))


def test_a_serious_ae_starts_the_reporting_clock(trial_db, clock, channels):
    _cohort(trial_db, clock, ["S-161"])
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    state = report_adverse_event(recorded_by="inv-2", report=_ae("S-161", category="fever", grade=3, serious=True), return_state=True)
    assert state.is_completed() and "not_candidate" in state.message
    assert [m.body.split(" · ")[1] for m in channels("safety")] == ["serious adverse event: reporting clock started"]
    from tests.flows.conftest import this_trial_tag

    with get_client(sync_client=True) as client:  # this trial's: the session's server also holds a rehearsal's SAE clock
        (reminder,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[this_trial_tag()])),
                                            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sae-deadline"])))
    assert reminder.next_scheduled_start_time == dt.datetime(2027, 2, 6, 22, 0, tzinfo=UTC)  # 20 h later: 4 h before the deadline
    from flows.safety import sae_deadline

    clock.set(reminder.next_scheduled_start_time)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(reminder.id, Scheduled(), force=True)
        assert "safety desk reminded" in run_flow(sae_deadline, flow_run=client.read_flow_run(reminder.id))
    assert channels("safety")[-1].body.startswith("S-161 · SAE report not yet recorded · AE 1")
    with Session(trial_db) as s:
        assert s.exec(select(AdverseEvent)).one().adjudication.value == "not_candidate"


def test_daily_rounds_remind_the_pi_of_a_waiting_review_and_a_pending_adjudication(trial_db, clock, channels):
    from flows.rounds import daily_rounds

    _cohort(trial_db, clock, ["S-171", "S-172", "S-173"])
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    report_adverse_event(recorded_by="inv-2", report=_ae("S-171", category="icans", grade=3))  # candidate, not yet adjudicated
    for sid in ("S-171", "S-172", "S-173"):
        _close_window(trial_db, clock, sid)
    clock.set(dt.datetime(2027, 3, 2, 0, 0, tzinfo=UTC))  # 08:00 in Shanghai
    assert "PI: 0 review(s) to sign, 1 DLT(s) to adjudicate" in daily_rounds()
    assert any(m.body.startswith("S-171 · candidate DLT waiting for adjudication · AE 1") for m in channels("pi"))
    _adjudicate(trial_db, clock, channels, 1, False, "not related")
    escalation_gate.open_review(trial_db, protocol(), clock=clock)
    clock.advance(days=3)  # an unsigned review stays valid for days; it is only reminded
    assert "PI: 1 review(s) to sign, 0 DLT(s) to adjudicate" in daily_rounds()
    assert any("cohort review waiting for the PI signature · DL1, recommended escalate" in m.body for m in channels("pi"))
