"""Each enrolled patient becomes Prefect runs: against a real Prefect server and real apprise delivery."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort
from sqlmodel import Session, func, select

from flows.enrollment import EnrollmentRequest, enroll_patient
from flows.recording import (
    Il2DoseRecord,
    InfusionRecord,
    OffStudyRequest,
    VisitRecord,
    off_study,
    record_il2_dose,
    record_infusion,
    record_visit,
)
from flows.rounds import daily_rounds
from flows.treatment import SubjectRef, patient_treatment
from models.tables import AuditLog, CalendarEventRow, NotificationDelivery, NotificationOutbox, OutboxStatus, Subject, SubjectStatus
from protocol.eligibility import ScreeningRecord
from tasks.projection import scheduled_at
from tasks.runtime import protocol
from tests.flows.conftest import SCREENING_VALUES, execute_run, subject_runs
from tests.helpers import register_staff

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
# Distinctive values that must never reach a notification.
DISTINCT = {"age_years": 47, "lvef_percent": 57.3, "labs": {**EXAMPLE["labs"], "alt": {"value": 111.1, "uln": 41.1}}}
SCREENING_VALUES.update({"57.3", "111.1", "41.1"})
DAY0 = dt.datetime(2027, 1, 31, 9, 0)  # site-local; washouts clear from 2027-01-24
UTC = dt.timezone.utc


def request(sid: str, day0: dt.datetime = DAY0, **changes) -> EnrollmentRequest:
    return EnrollmentRequest(screening=ScreeningRecord.model_validate({**EXAMPLE, **DISTINCT, "subject_id": sid, **changes}),
                             planned_day0=day0, recorded_by="coord-1")


def count(engine, model, *where) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(model).where(*where)).one()


def infusion(sid, number=1, at=DAY0, **kw) -> InfusionRecord:
    return InfusionRecord(subject_id=sid, infusion_number=number, dose_level=1, given_at=at, cells_infused=1.0e8,
                          product_lot="LOT-A1", recorded_by="nurse-7", **kw)


def test_enrollment_creates_scheduled_runs_at_the_right_instants(trial_db, clock, channels):
    state = enroll_patient(request("S-001"), return_state=True)
    assert state.name == "Enrolled" and "dose level 1, cohort 1, slot 1" in state.message
    runs = subject_runs("S-001")
    with Session(trial_db) as s:
        rows = {r.key: r for r in s.exec(select(CalendarEventRow))}
    wanted = {k: r.remind_at for k, r in rows.items() if r.remind_at and r.reminder_sent_at is None}
    assert len(runs) == len(wanted) == 17  # 1 product request, 2 infusion preps, 11 PK samples, 2 visits, DLT close
    for run in runs:
        key = run.parameters["event"]["event_key"]
        assert scheduled_at(run) == wanted[key]
        assert {"subject:S-001", "dose-level:1"} <= set(run.tags)
        assert run.name.startswith("S-001 · ")
    by_name = {r.name: scheduled_at(r) for r in runs}
    assert by_name["S-001 · infusion 2 prep"] == dt.datetime(2027, 2, 13, 1, 0, tzinfo=UTC)  # day 14 09:00 local, one day ahead
    assert by_name["S-001 · DLT window closed"] == dt.datetime(2027, 2, 28, 16, 0, tzinfo=UTC)  # end of local day 28
    assert by_name["S-001 · 1-month visit window"] == dt.datetime(2027, 2, 25, 1, 0, tzinfo=UTC)  # day 25 09:00 local
    # The coordinator and the cell lab heard at once; the lab's request names the infusion and its date.
    assert [m.body.split(" · ")[1] for m in channels("coordinator")] == ["enrolled"]
    (lab,) = channels("cell-lab")
    assert lab.body.startswith("S-001 · NK product request · infusion 1, DL1") and "due 2027-01-31" in lab.body
    assert "/flow-run/" in lab.body


def _newest_artifact(key: str):
    """This key's newest version, however many other artifacts the session's server holds by now."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC,
                                      limit=1)
    return found[0] if found else None


def test_the_schedule_is_published_as_a_table_artifact(trial_db, clock, channels):
    enroll_patient(request("S-002"))
    art = {key: _newest_artifact(key) for key in ("subject-s-002-schedule", "screening-s-002")}
    assert all(art.values())
    table = art["subject-s-002-schedule"]
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert any(row["event"].startswith("NK infusion 2") and row["date"] == "2027-02-14" for row in data)


def test_rerunning_the_plan_creates_no_duplicates(trial_db, clock, channels):
    enroll_patient(request("S-003"))
    before = {r.id for r in subject_runs("S-003")}
    report = patient_treatment(SubjectRef(subject_id="S-003"))
    assert report.startswith("0 created, 0 moved, 0 cancelled")
    assert {r.id for r in subject_runs("S-003")} == before


def test_a_late_infusion_1_moves_the_runs(trial_db, clock, channels):
    enroll_patient(request("S-004"))
    runs_before = subject_runs("S-004")
    before = {r.parameters["event"]["event_key"]: scheduled_at(r) for r in runs_before}
    clock.set(dt.datetime(2027, 2, 1, 2, 0, tzinfo=UTC))
    state = record_infusion(infusion("S-004", at=DAY0 + dt.timedelta(days=1)), return_state=True)
    assert (state.name, state.message) == ("Recorded", "S-004: NK infusion 1 recorded at 2027-02-01 09:00 Asia/Shanghai; "
                                                       "the calendar is re-anchored")
    runs_after = subject_runs("S-004")
    after = {r.parameters["event"]["event_key"]: scheduled_at(r) for r in runs_after}
    # Every run still to come moved one day, in place; infusion 1's own prep reminder is gone (the infusion is done).
    assert set(after) == set(before) - {"nk_infusion-1"}
    assert {k for k in after if after[k] - before[k] != dt.timedelta(days=1)} == {"product_request-2", "pk_sample-infusion_1+0"}
    assert {r.id for r in runs_after} <= {r.id for r in runs_before}


def test_off_study_cancels_every_future_run_and_keeps_the_record(trial_db, clock, channels):
    enroll_patient(request("S-005"))
    assert subject_runs("S-005")
    clock.set(dt.datetime(2027, 1, 25, 1, 0, tzinfo=UTC))
    state = off_study(OffStudyRequest(subject_id="S-005", reason="withdrawal", effective_on=dt.date(2027, 1, 25), recorded_by="inv-2"),
                      return_state=True)
    assert state.name == "Off study" and state.message.startswith("S-005 is off study from 2027-01-25 (withdrawal): ")
    assert subject_runs("S-005") == []
    assert len(subject_runs("S-005", states=(StateType.CANCELLED,))) == 17
    with Session(trial_db) as s:
        subject = s.exec(select(Subject).where(Subject.subject_id == "S-005")).one()
        assert subject.status is SubjectStatus.OFF_STUDY
        assert s.exec(select(func.count()).select_from(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id)).one() > 40
    assert channels("coordinator")[-1].body.startswith("S-005 · off study")


def test_daily_rounds_remind_il2_and_alert_a_missed_dose(trial_db, clock, channels):
    enroll_patient(request("S-006"))
    clock.set(dt.datetime(2027, 1, 31, 1, 30, tzinfo=UTC))
    assert record_infusion(infusion("S-006"), return_state=True).is_completed()
    clock.set(dt.datetime(2027, 2, 2, 2, 0, tzinfo=UTC))  # day 2, 10:00 local; dose 1 (day 1) was never recorded
    summary = daily_rounds()
    assert "IL-2 due 1, missed 1" in summary
    nurse = [m.body for m in channels("nurse")]
    assert any(b.startswith("S-006 · IL-2 dose due today · IL-2 dose 2 · due 2027-02-02") for b in nurse)
    assert any(b.startswith("S-006 · IL-2 dose missed") and "IL-2 dose 1" in b for b in nurse)
    assert any(b.startswith("S-006 · IL-2 dose missed") for b in (m.body for m in channels("coordinator")))
    digest = [m.body for m in channels("coordinator") if "daily digest" in m.body]
    assert len(digest) == 1 and "1 active" in digest[0]
    daily_rounds()  # a second pass the same day writes nothing new
    assert len([m for m in channels("nurse") if "IL-2 dose due today" in m.body]) == 1


def test_a_channel_down_then_up_delivers_once(trial_db, clock, channels, receiver, tmp_path, monkeypatch):
    cfg = tmp_path / "two-channels.yml"
    cfg.write_text(receiver.apprise_yaml({"desk-a": ["coordinator"], "desk-b": ["coordinator"]}), encoding="utf-8")
    monkeypatch.setenv("NKTRIAL_APPRISE_CONFIG", str(cfg))
    receiver.down.add("desk-b")
    enroll_patient(request("S-007"))
    assert len(receiver.at("desk-a")) == 1 and receiver.at("desk-b") == []
    with Session(trial_db) as s:
        note = s.exec(select(NotificationOutbox).where(NotificationOutbox.role == "coordinator")).one()
        assert note.status is OutboxStatus.PENDING and note.attempts >= 1 and "desk" not in (note.last_error or "")
    receiver.down.clear()
    daily_rounds()  # the next delivery pass, as after a restart
    daily_rounds()
    assert len([m for m in receiver.at("desk-a") if "enrolled" in m.body]) == 1
    assert len([m for m in receiver.at("desk-b") if "enrolled" in m.body]) == 1
    assert count(trial_db, NotificationDelivery) >= 2


def test_no_channel_configured_still_records_every_notice(trial_db, clock, monkeypatch):
    monkeypatch.delenv("NKTRIAL_APPRISE_CONFIG", raising=False)
    enroll_patient(request("S-008"))
    with Session(trial_db) as s:
        notes = s.exec(select(NotificationOutbox)).all()
    assert {(n.role, n.status) for n in notes} == {("coordinator", OutboxStatus.PENDING), ("cell-lab", OutboxStatus.PENDING)}


def test_a_due_event_acts_once_and_a_moved_one_does_nothing(trial_db, clock, channels):
    enroll_patient(request("S-009"))
    runs = {r.parameters["event"]["event_key"]: r for r in subject_runs("S-009")}
    state = execute_run(runs["nk_infusion-1"], clock)  # prep reminder, day -1
    assert state.is_completed()
    assert [m.body.split(" · ")[:3] for m in channels("nurse")] == [["S-009", "NK infusion preparation", "infusion 1, DL1"]]
    # infusion 2's prep run fires early (say, a worker clock skew): the event is not due, so it does nothing.
    clock.set(dt.datetime(2027, 2, 5, 1, 0, tzinfo=UTC))
    with get_client(sync_client=True) as client:
        from prefect.flow_engine import run_flow
        from prefect.states import Scheduled

        from flows.treatment import treatment_event

        client.set_flow_run_state(runs["nk_infusion-2"].id, Scheduled(), force=True)
        result = run_flow(treatment_event, flow_run=client.read_flow_run(runs["nk_infusion-2"].id))
    assert "moved: it is now due 2027-02-13" in result
    assert len(channels("nurse")) == 1


def test_the_dlt_window_closing_records_evaluability(trial_db, clock, channels):
    enroll_patient(request("S-010"))
    clock.set(dt.datetime(2027, 1, 31, 1, 30, tzinfo=UTC))
    record_infusion(infusion("S-010"))
    clock.set(dt.datetime(2027, 2, 14, 1, 30, tzinfo=UTC))
    assert record_infusion(infusion("S-010", number=2, at=dt.datetime(2027, 2, 14, 9, 15)), return_state=True).is_completed()
    close = next(r for r in subject_runs("S-010") if r.parameters["event"]["event_key"] == "dlt_window_close")
    assert execute_run(close, clock).is_completed()
    from models.tables import Enrollment

    with Session(trial_db) as s:
        enrollment = s.exec(select(Enrollment)).one()
        assert enrollment.evaluable is True and enrollment.dlt_window_closed_at is not None
    assert any(m.body.startswith("S-010 · DLT window closed") for m in channels("pi"))


def test_not_eligible_ends_with_the_failing_criteria(trial_db, clock, channels):
    state = enroll_patient(request("S-011", ecog=3, lvef_percent=40), return_state=True)
    assert state.name == "Screen failure" and state.is_cancelled()  # grey in the UI, not a green Completed
    assert "Not met: ECOG performance status 0 to 2 (I3), value 3; LVEF ≥ 45 % (I5_CARDIAC)" in state.message
    assert subject_runs("S-011") == []
    art = _newest_artifact("screening-s-011")
    assert "- **ECOG performance status 0 to 2 (I3)** — NOT MET, keeps the candidate out" in art.data


def test_a_day0_before_the_washouts_end_is_refused_and_nothing_is_written(trial_db, clock, channels):
    audit = count(trial_db, AuditLog)  # the staff register's own rows
    state = enroll_patient(request("S-012", day0=dt.datetime(2027, 1, 22, 9, 0)), return_state=True)
    assert state.is_failed()
    assert "planned_day0 2027-01-22 is before the earliest permissible date 2027-01-24 (E2.systemic_steroid)" in state.message
    assert count(trial_db, Subject) == 0 and count(trial_db, AuditLog) == audit


def test_a_full_cohort_waitlists_and_tells_the_coordinator(trial_db, clock, channels):
    for sid in ("S-013", "S-014", "S-015"):
        assert enroll_patient(request(sid), return_state=True).name == "Enrolled"
    state = enroll_patient(request("S-016"), return_state=True)
    assert state.name == "Waitlisted"
    assert subject_runs("S-016") == []
    assert channels("coordinator")[-1].body.startswith("S-016 · eligible, waitlisted")


REFUSALS = [
    (lambda: infusion("S-099"), "subject_id S-099 is not in the trial database"),
    (lambda: infusion("S-020").model_copy(update={"dose_level": 2}), "dose_level 2 does not match S-020's assigned dose level 1"),
    (lambda: infusion("S-020", number=2, at=dt.datetime(2027, 2, 20, 9, 0)), "NK infusion 2 on 2027-02-20 is outside its window 2027-02-14 to 2027-02-17"),
    (lambda: infusion("S-020"), "NK infusion 1 for S-020 is already recorded (given at 2027-01-31 09:00 Asia/Shanghai)"),
    (lambda: infusion("S-020", number=2, at=dt.datetime(2027, 3, 20, 9, 0)),
     "given_at 2027-03-20 09:00 Asia/Shanghai is in the future (it is now 2027-02-21 09:00 Asia/Shanghai)"),
]


@pytest.mark.parametrize(("make", "message"), REFUSALS)
def test_a_wrong_recording_gets_a_clear_message_and_writes_nothing(trial_db, clock, channels, make, message):
    enroll_patient(request("S-020"))
    clock.set(dt.datetime(2027, 2, 21, 1, 0, tzinfo=UTC))
    assert record_infusion(infusion("S-020"), return_state=True).is_completed()
    audit = count(trial_db, AuditLog)
    state = record_infusion(make(), return_state=True)
    assert state.is_failed() and state.name == "Refused" and message in state.message
    assert count(trial_db, AuditLog) == audit


def test_il2_and_visit_recordings_validate_against_the_calendar(trial_db, clock, channels):
    enroll_patient(request("S-021"))
    clock.set(dt.datetime(2027, 3, 5, 1, 0, tzinfo=UTC))
    record_infusion(infusion("S-021"))
    ok = record_il2_dose(Il2DoseRecord(subject_id="S-021", dose_number=1, given_at=dt.datetime(2027, 2, 1, 9, 5), recorded_by="nurse-7"),
                         return_state=True)
    assert ok.is_completed()
    missed = record_il2_dose(Il2DoseRecord(subject_id="S-021", dose_number=2, given=False, recorded_by="nurse-7"), return_state=True)
    assert missed.is_failed() and "missed_reason is required" in missed.message
    late = record_visit(VisitRecord(subject_id="S-021", visit="visit_1_month", done_on=dt.date(2027, 3, 5), recorded_by="coord-1"),
                        return_state=True)
    assert late.is_failed() and "outside its window 2027-02-25 to 2027-03-03; give a deviation_reason" in late.message
    ok = record_visit(VisitRecord(subject_id="S-021", visit="visit_1_month", done_on=dt.date(2027, 3, 5), deviation_reason="patient unwell",
                                  recorded_by="coord-1"), return_state=True)
    assert ok.is_completed()
    assert protocol().version == "1.3.0"


def test_the_3_month_visit_window_notice_lists_what_is_due(trial_db, clock, channels):
    enroll_patient(request("S-022"))
    run = next(r for r in subject_runs("S-022") if r.parameters["event"]["event_key"] == "visit_3_month")
    assert execute_run(run, clock).is_completed()
    (note,) = [m.body for m in channels("coordinator") if "visit window opens" in m.body]
    assert note.startswith("S-022 · visit window opens · 3-month visit (2027-04-24 to 2027-05-08): bone-marrow aspirate, "
                           "MRD by multiparameter flow cytometry, response assessment (CR) · due 2027-05-01")


def test_two_trial_databases_on_one_server_never_touch_each_others_runs(trial_db, clock, channels, tmp_path, monkeypatch):
    """A rehearsal database beside the real one: same subject IDs, separate projections."""
    from models.migrate import upgrade
    from models.queries import trial_instance
    from tasks.runtime import trial_engine

    enroll_patient(request("S-030"))
    with Session(trial_db) as s:
        first = trial_instance(s)
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'rehearsal.db'}")
    rehearsal = trial_engine()
    upgrade(rehearsal)
    register_staff(rehearsal)
    enroll_patient(request("S-030"))
    daily_rounds()  # reconciles the rehearsal's projection only
    with Session(rehearsal) as s:
        second = trial_instance(s)
    assert first != second
    runs = subject_runs("S-030", every_trial=True)
    assert len(runs) == 34  # 17 each, none cancelled or shared
    assert {t for r in runs for t in r.tags if t.startswith("trial:")} == {f"trial:{first}", f"trial:{second}"}
