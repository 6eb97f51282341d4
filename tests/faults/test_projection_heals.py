"""A projection that heals itself: the Prefect runs a patient's calendar needs are rebuilt from the trial database,
exactly once, after the treatment-event deployment was deleted (with its runs) and applied again, after a crashed
treatment plan, and when runs are stuck Pending or Late or Crashed (flagged to the coordinators and rescheduled).
Against the session's Prefect server; every run here belongs to S-071..S-079 and this test's trial instance."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed, Late, Pending, Running
from sqlmodel import Session

from flows.enrollment import enroll_patient
from flows.rounds import RoundsOptions, daily_rounds
from flows.treatment import treatment_event
from models.queries import get_subject, trial_instance
from nktrial.cli import main
from protocol.eligibility import ScreeningRecord
from tasks import enrollment
from tasks.projection import TREATMENT_EVENT, ZOMBIE_AUTOMATION, scheduled_at
from tasks.runtime import protocol
from tests.flows.conftest import subject_runs
from tests.flows.test_patient_flows import DAY0, EXAMPLE, request

LIVE = (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING)
STUCK = "a run stuck or crashed"
LONG_AGO = dt.timedelta(hours=3)  # far past the protocol's stuck_run_minutes (30)


def _live_keys(sid: str) -> Counter:
    return Counter(r.parameters["event"]["event_key"] for r in subject_runs(sid, states=LIVE))


def _enroll_without_runs(engine, clock, sid: str) -> None:
    """Enrolled in the trial database (calendar stored), as when the treatment plan that projects it crashed."""
    record = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid})
    outcome = enrollment.enroll(engine, protocol(), record=record, planned_day0=DAY0, actor="coord-1", clock=clock)
    assert outcome.status is enrollment.EnrollmentStatus.ENROLLED


def _instance(engine) -> str:
    with Session(engine) as s:
        return trial_instance(s)


def _wall() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ensure_treatment_event_deployed() -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(TREATMENT_EVENT)
        except ObjectNotFound:
            treatment_event.to_deployment(name=treatment_event.name).apply()


def test_deleting_and_redeploying_treatment_event_then_reconcile_restores_every_run_exactly_once(
        trial_db, clock, channels, monkeypatch, capsys):
    for sid in ("S-071", "S-072"):
        enroll_patient(request(sid))
    assert all(sum(_live_keys(sid).values()) == 17 for sid in ("S-071", "S-072"))
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    try:
        with get_client(sync_client=True) as client:
            client.delete_deployment(client.read_deployment_by_name(TREATMENT_EVENT).id)
        assert subject_runs("S-071", states=list(StateType)) == []  # deleting a deployment deletes its runs
        deployment_id = treatment_event.to_deployment(name=treatment_event.name).apply()
        capsys.readouterr()
        assert main(["reconcile"]) == 0
        out, err = capsys.readouterr()
        assert "2/2 patients" in err
        with get_client(sync_client=True) as client:  # Prefect's zombie-run automation, once however often reconcile runs
            assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1
        assert "2 patient(s): 34 created, 0 moved, 0 cancelled, 0 rescheduled, 0 unchanged" in out
        for sid in ("S-071", "S-072"):
            keys = _live_keys(sid)
            assert len(keys) == 17 and set(keys.values()) == {1}, keys
            assert {r.deployment_id for r in subject_runs(sid)} == {deployment_id}
        # A second pass creates nothing; one subject at a time works too.
        assert main(["reconcile", "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["totals"] == {"created": 0, "moved": 0, "cancelled": 0, "rescheduled": 0, "unchanged": 34}
        assert main(["reconcile", "--subject", "S-071"]) == 0
        assert "1 patient(s): 0 created" in capsys.readouterr().out
        assert sum(_live_keys("S-071").values()) == 17
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1
    finally:
        _ensure_treatment_event_deployed()


def test_reconcile_without_a_prefect_server_says_so_in_one_sentence(trial_db, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["reconcile"]) == 2
    assert capsys.readouterr().err.startswith("nktrial: error: PREFECT_API_URL is not set: reconcile rebuilds the runs")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    assert main(["reconcile", "--subject", "S-079"]) == 2
    assert "--subject S-079: no such subject in the trial database" in capsys.readouterr().err


def _later_pass(engine, clock) -> int:
    """The projection check as daily rounds make it, seen from LONG_AGO later on Prefect's (wall) clock, its notices
    delivered: a Pending state's timestamp is the server's, so only time passing, not a test, can age it."""
    from tasks.delivery import deliver_pending, require_channels
    from tasks.projection import notify_flagged, project, stuck_requests
    from tasks.settings import get_settings

    later, stuck_after = _wall() + LONG_AGO, dt.timedelta(minutes=protocol().notifications.stuck_run_minutes.value)
    with get_client(sync_client=True) as client:
        report = project(client, engine, now=clock(), wall_now=later, stuck_after=stuck_after)
        flagged = report.flagged + stuck_requests(client, engine, wall_now=later, stuck_after=stuck_after)
    told = notify_flagged(engine, flagged, clock=clock)
    deliver_pending(engine, require_channels(get_settings().apprise_config), clock=clock)
    return told


def test_a_crashed_treatment_plan_leaves_no_runs_and_daily_rounds_rebuild_all_17(trial_db, clock, channels):
    _enroll_without_runs(trial_db, clock, "S-073")
    tags = ["subject:S-073", f"trial:{_instance(trial_db)}"]
    with get_client(sync_client=True) as client:
        plan = client.read_deployment_by_name("patient-treatment/patient-treatment")
        run = client.create_flow_run_from_deployment(plan.id, parameters={"subject": {"subject_id": "S-073"}}, tags=tags)
        client.set_flow_run_state(run.id, Running(), force=True)
        client.set_flow_run_state(run.id, Crashed(message="worker died"), force=True)
    assert _live_keys("S-073") == Counter()
    summary = daily_rounds(RoundsOptions(reports=False))
    keys = _live_keys("S-073")
    assert len(keys) == 17 and set(keys.values()) == {1}, keys  # all of them, not the 2-day horizon's 3
    assert "projection 17 created" in summary
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.type is StateType.SCHEDULED  # the crashed plan runs again
    (told,) = [m.body for m in channels("coordinator") if STUCK in m.body]
    assert told.startswith("S-073 · a run stuck or crashed · treatment plan: Crashed; rescheduled")
    daily_rounds(RoundsOptions(reports=False))  # a second pass: nothing new, nobody told twice
    assert _live_keys("S-073") == keys
    assert len([m for m in channels("coordinator") if STUCK in m.body]) == 1


def test_runs_stuck_past_the_threshold_or_crashed_are_flagged_to_the_coordinator_and_rescheduled(trial_db, clock, channels):
    enroll_patient(request("S-074"))
    runs = {r.parameters["event"]["event_key"]: r for r in subject_runs("S-074")}
    when = {key: scheduled_at(r) for key, r in runs.items()}
    crashed, late, pending = runs["visit_1_month"], runs["dlt_window_close"], runs["nk_infusion-2"]
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(crashed.id, Running(), force=True)
        client.set_flow_run_state(crashed.id, Crashed(message="worker died"), force=True)
        client.set_flow_run_state(late.id, Late(scheduled_time=_wall() - LONG_AGO), force=True)
        client.set_flow_run_state(pending.id, Pending(), force=True)
    summary = daily_rounds(RoundsOptions(reports=False))
    assert "2 stuck or crashed rescheduled" in summary

    def told() -> list[str]:
        return sorted(m.body.split(" · ")[2] for m in channels("coordinator") if STUCK in m.body)

    assert told() == ["1-month visit window: Crashed; rescheduled", "DLT window closed: Late for 3 h 0 min; rescheduled"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(pending.id).state.type is StateType.PENDING  # Pending a moment only: left alone
    assert _later_pass(trial_db, clock) == 1  # still Pending hours later: stuck
    assert told()[-1] == "infusion 2 prep: Pending for 3 h 0 min; rescheduled"
    with get_client(sync_client=True) as client:
        for run in (crashed, late, pending):
            now = client.read_flow_run(run.id)
            assert (now.state.name, scheduled_at(now)) == ("Scheduled", when[run.parameters["event"]["event_key"]])
    keys = _live_keys("S-074")
    assert len(keys) == 17 and set(keys.values()) == {1}


def test_an_enrollment_request_that_never_finished_is_reported_and_resubmitted_only_when_safe(trial_db, clock, channels):
    _enroll_without_runs(trial_db, clock, "S-076")  # this one's request crashed after its enrollment was committed
    instance = _instance(trial_db)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
        stuck = {sid: client.create_flow_run_from_deployment(dep.id, parameters={"request": request(sid).model_dump(mode="json")},
                                                             tags=[f"subject:{sid}", f"trial:{instance}"])
                 for sid in ("S-075", "S-076")}
        client.set_flow_run_state(stuck["S-075"].id, Pending(name="Submitting"), force=True)  # a worker killed mid-claim
        client.set_flow_run_state(stuck["S-076"].id, Running(), force=True)
        client.set_flow_run_state(stuck["S-076"].id, Crashed(message="worker died"), force=True)
    daily_rounds(RoundsOptions(reports=False))

    def told() -> dict[str, str]:
        return {m.body.split(" · ")[0]: m.body.split(" · ")[2] for m in channels("coordinator") if STUCK in m.body}

    assert told() == {"S-076": "enrollment: Crashed; not re-submitted: S-076 is enrolled in the trial database, check the request"}
    assert _later_pass(trial_db, clock) == 1  # the claim never finished: hours later it is stuck
    assert told()["S-075"] == "enrollment: Pending (Submitting) for 3 h 0 min; re-submitted"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(stuck["S-076"].id).state.type is StateType.CRASHED  # reported only
        resubmitted = client.read_flow_run(stuck["S-075"].id)
        assert resubmitted.state.type is StateType.SCHEDULED
        state = run_flow(enroll_patient, flow_run=resubmitted, return_type="state")  # as a worker picks it up again
    assert state.name == "Enrolled"
    with Session(trial_db) as s:
        assert get_subject(s, subject_id="S-075").dose_level == 1
    assert sum(_live_keys("S-075").values()) == 17
