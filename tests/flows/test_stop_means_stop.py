"""Stop means stop: a signed stop (or de-escalation) ends dosing for the patients not yet dosed at the
levels it closes, on the real Prefect test server with real apprise delivery; patients already dosed
keep their follow-up, the dashboard says so first, rounds count them apart, and enrollment is refused."""

from __future__ import annotations

import datetime as dt

import pytest
from prefect.client.schemas.objects import StateType
from sqlmodel import Session, select

from flows.enrollment import enroll_patient
from flows.safety import report_adverse_event
from flows.treatment import SubjectRef, patient_treatment
from models.tables import AuditLog, CalendarEventRow, EventStatus, OffStudyReason, Subject, SubjectStatus
from protocol.cohorts import levels_closed_to_undosed
from protocol.errors import UserError
from protocol.three_plus_three import Action
from tasks import enrollment, escalation_gate, recording, signatures
from tasks.reports import dashboard
from tasks.rounds import daily_rounds
from tasks.runtime import protocol
from tests.flows.conftest import subject_runs
from tests.flows.test_escalation_gate import (
    UTC,
    _adjudicate,
    _ae,
    _close_window,
    _code,
    _enroll,
    _resume,
    _review_runs,
    _run_review,
    _send_code,
    _state,
    _treat,
)
from tests.flows.test_patient_flows import request

DAY0 = dt.datetime(2027, 1, 31, 9, 0)
LATER = dt.datetime(2027, 2, 25, 9, 0)  # the third patient's planned day 0: not dosed when the stop is signed
INFUSION_KEYS = {"product_request-2", "nk_infusion-1", "nk_infusion-2"}  # infusion 1's product is requested at enrollment


@pytest.mark.parametrize(("action", "from_level", "closed"), [
    (Action.STOP, 2, (1, 2, 3)), (Action.DEESCALATE, 3, (3,)), (Action.ESCALATE, 1, ()), (Action.EXPAND, 2, ())])
def test_which_levels_a_signed_action_closes_to_patients_not_yet_dosed(action, from_level, closed):
    assert levels_closed_to_undosed(action, from_level=from_level, num_levels=3) == closed


def _events(engine, sid):
    with Session(engine) as s:
        subject = s.exec(select(Subject).where(Subject.subject_id == sid)).one()
        return subject, s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id)).all()


def _keys(runs):
    return {r.parameters["event"]["event_key"] for r in runs}


def test_a_signed_stop_cancels_the_undosed_patients_infusions_and_keeps_the_dosed_ones_follow_up(trial_db, clock, channels):
    for sid in ("S-601", "S-602"):
        assert enroll_patient(request(sid, DAY0), return_state=True).is_completed()
        _treat(trial_db, clock, sid)
        patient_treatment(SubjectRef(subject_id=sid))  # infusions done: their runs go, the follow-up stays
    assert enroll_patient(request("S-603", LATER), return_state=True).is_completed()
    before = _keys(subject_runs("S-603"))
    assert INFUSION_KEYS <= before  # enrolled, not yet dosed: infusions, their product requests and preparation are scheduled
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    for ae_id, sid in ((1, "S-601"), (2, "S-602")):
        report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3))
        _adjudicate(trial_db, clock, channels, ae_id, True, "CRS grade 3")
    (run,) = _review_runs(trial_db)  # 2 DLTs at DL1: the rule says stop, with no tolerable dose
    assert _run_review(run.id).is_paused()
    assert _resume(run.id, decision="stop", signing_code=_code(channels)).is_completed()

    # The undosed patient: every run cancelled in Prefect, every event cancelled in the trial database by the signer.
    assert subject_runs("S-603") == []
    assert _keys(subject_runs("S-603", states=(StateType.CANCELLED,))) == before
    subject, events = _events(trial_db, "S-603")
    assert {e.status for e in events} == {EventStatus.CANCELLED}
    assert (subject.status, subject.off_study_reason) == (SubjectStatus.OFF_STUDY, OffStudyReason.TRIAL_STOPPED)
    with Session(trial_db) as s:
        audited = s.exec(select(AuditLog).where(AuditLog.entity == "calendar_event", AuditLog.field == "status",
                                                AuditLog.new_value == "cancelled",
                                                AuditLog.entity_id.in_([str(e.id) for e in events]))).all()
    assert len(audited) == len(events) and {a.actor for a in audited} == {"pi-01"}
    # The dosed patients keep their follow-up: DLT window, visits, PK.
    for sid in ("S-601", "S-602"):
        kept = _keys(subject_runs(sid))
        assert {"dlt_window_close", "visit_1_month", "visit_3_month", "pk_sample-infusion_1+90"} <= kept, kept
        assert _events(trial_db, sid)[0].status is SubjectStatus.ON_TREATMENT
    # Coordinator, cell lab and nurse are told, at the real receiver.
    for role in ("coordinator", "cell-lab", "nurse"):
        told = [m.body for m in channels(role) if m.body.startswith("S-603 · will not be dosed")]
        assert len(told) == 1 and "trial stopped" in told[0], [m.body for m in channels(role)]
    assert not [m for m in channels() if m.body.startswith(("S-601 · will not be dosed", "S-602 · will not be dosed"))]
    # The dashboard says it first, in words; the cohort table names the patient's status.
    with Session(trial_db) as s:
        board = dashboard(s, protocol()).markdown()
    assert board.split("\n")[2].startswith("## TRIAL STOPPED: enrollment closed, no tolerable dose; decision 1 signed by pi-01")
    assert "| S-603 | DL1 | not dosed: trial stopped |" in board and "the rule now says" not in board
    assert {p.subject_id: p.status for p in _state(trial_db).patients}["S-603"] == "not dosed: trial stopped"
    # Rounds: active means on study; the undosed patient is counted apart and on no worklist.
    report = daily_rounds(trial_db, protocol(), clock=clock)
    assert (report.active_patients, report.not_dosed) == (2, ["S-603"])
    assert report.digest.startswith("2 active (1 not dosed after a signed stop or de-escalation, off study);")
    assert "S-603" not in str(report.il2_due + report.il2_missed + report.visits_closing + report.overdue)
    # Nothing more is enrolled, and the undosed patient cannot be dosed after all.
    refused = enroll_patient(request("S-604", dt.datetime(2027, 3, 1, 9, 0)), return_state=True)
    assert refused.is_failed()
    assert refused.message.startswith("enrollment of S-604 is refused: the trial was stopped by decision 1, signed by pi-01 on 2027-02-")
    with pytest.raises(UserError, match="subject_id S-603 is off study since 2027-02-"):
        recording.record_infusion(trial_db, protocol(), subject_id="S-603", infusion_number=1, given_at=LATER, dose_level=1,
                                  cells_infused=1e8, product_lot="L-603", actor="nurse-7", clock=lambda: dt.datetime(2027, 3, 1, tzinfo=UTC))


def test_a_patient_whose_infusion_1_was_due_before_the_stop_is_asked_about_not_taken_off_study(trial_db, clock, channels):
    """Infused at 09:00, recorded at 10:30, the stop signed at 10:00: the infusion must still be recordable and the
    patient keep their follow-up. Nothing irreversible is done; the unit is told not to infuse and to confirm."""
    for sid in ("S-621", "S-622"):
        assert enroll_patient(request(sid, DAY0), return_state=True).is_completed()
        _treat(trial_db, clock, sid)
    due_this_morning = dt.datetime(2027, 2, 6, 9, 0)
    assert enroll_patient(request("S-623", due_this_morning), return_state=True).is_completed()
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))  # 10:00 in Shanghai, infusion 1 was due at 09:00
    for ae_id, sid in ((1, "S-621"), (2, "S-622")):
        report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3))
        _adjudicate(trial_db, clock, channels, ae_id, True, "CRS grade 3")
    (run,) = _review_runs(trial_db)
    assert _run_review(run.id).is_paused()
    assert _resume(run.id, decision="stop", signing_code=_code(channels)).is_completed()

    subject, events = _events(trial_db, "S-623")
    assert subject.status is not SubjectStatus.OFF_STUDY and EventStatus.PLANNED in {e.status for e in events}
    for role in ("coordinator", "nurse", "pi"):
        asked = [m.body for m in channels(role) if m.body.startswith("S-623 · trial stopped or level closed: do not infuse")]
        assert len(asked) == 1, [m.body for m in channels(role)]
    assert not [m for m in channels() if m.body.startswith("S-623 · will not be dosed")]
    # The nurse records the infusion given before the signature: accepted, the patient keeps their follow-up.
    recording.record_infusion(trial_db, protocol(), subject_id="S-623", infusion_number=1, given_at=dt.datetime(2027, 2, 6, 9, 5),
                              dose_level=1, cells_infused=1e8, product_lot="L-623", actor="nurse-7",
                              clock=lambda: dt.datetime(2027, 2, 6, 2, 30, tzinfo=UTC))
    assert _events(trial_db, "S-623")[0].status is SubjectStatus.ON_TREATMENT


def test_a_signed_de_escalation_closes_only_the_level_it_leaves(trial_db, clock, channels):
    for sid in ("S-611", "S-612", "S-613"):
        _enroll(trial_db, clock, sid)
        _treat(trial_db, clock, sid)
        _close_window(trial_db, clock, sid)
    clock.set(dt.datetime(2027, 3, 1, 1, 0, tzinfo=UTC))
    d = escalation_gate.open_review(trial_db, protocol(), clock=clock)
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=d.id)
    assert signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name=None, action=Action.ESCALATE,
                                    rationale=None, code=code, meaning="approval", attempt_key="1", clock=clock).accepted
    dl2_day0 = dt.datetime(2027, 3, 10, 9, 0)
    for sid in ("S-614", "S-615"):
        assert _enroll(trial_db, clock, sid, day0=dl2_day0).dose_level == 2
        _treat(trial_db, clock, sid, level=2, day0=dl2_day0)
    assert _enroll(trial_db, clock, "S-616", day0=dt.datetime(2027, 4, 10, 9, 0)).dose_level == 2
    clock.set(dt.datetime(2027, 3, 14, 2, 0, tzinfo=UTC))
    for ae_id, sid in ((1, "S-614"), (2, "S-615")):
        report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3, onset=dt.date(2027, 3, 12)))
        _adjudicate(trial_db, clock, channels, ae_id, True, "CRS grade 3")
    d = escalation_gate.open_review(trial_db, protocol(), clock=clock)
    assert (d.recommended_action, d.recommended_level) == ("deescalate", 1)
    code = _send_code(trial_db, clock, channels, signer="pi-01", decision_id=d.id)
    assert signatures.sign_decision(trial_db, protocol(), decision_id=d.id, signer_id="pi-01", printed_name=None, action=Action.DEESCALATE,
                                    rationale=None, code=code, meaning="approval", attempt_key="2", clock=clock).accepted

    subject, events = _events(trial_db, "S-616")
    assert (subject.status, subject.off_study_reason) == (SubjectStatus.OFF_STUDY, OffStudyReason.DOSE_LEVEL_CLOSED)
    assert {e.status for e in events} == {EventStatus.CANCELLED}
    for sid in ("S-614", "S-615"):  # dosed at DL2: still followed
        subject, events = _events(trial_db, sid)
        assert subject.status is SubjectStatus.ON_TREATMENT and EventStatus.PLANNED in {e.status for e in events}
    with Session(trial_db) as s:
        board = dashboard(s, protocol()).markdown()
    assert "## DL2 closed after de-escalation to DL1; decision 2 signed by pi-01" in board and "TRIAL STOPPED" not in board
    assert "| S-616 | DL2 | not dosed: DL2 closed after de-escalation |" in board
    from tasks.delivery import deliver_pending, load_channels
    from tasks.settings import get_settings

    deliver_pending(trial_db, load_channels(get_settings().apprise_config), clock=clock)  # as the command line does after signing
    assert any(m.body.startswith("S-616 · will not be dosed") and "DL2 closed after de-escalation" in m.body for m in channels("cell-lab"))
    # Enrollment goes on, at the level below.
    assert _enroll(trial_db, clock, "S-617", day0=dt.datetime(2027, 4, 1, 9, 0)).status is enrollment.EnrollmentStatus.ENROLLED
