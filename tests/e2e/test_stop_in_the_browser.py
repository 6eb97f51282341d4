"""End to end, in a real browser: after the PI signs "stop", the Prefect UI shows the runs of the patient
not yet dosed as Cancelled (infusions, their preparation, the product request, the follow-up that hangs
from infusion 1), and the trial dashboard artifact says TRIAL STOPPED at the top.

A real `prefect server start` with its UI (the module fixture of the PI-signs test) and Debian's chromium.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from sqlmodel import Session, select

from flows.deployments import ALL_FLOWS
from flows.enrollment import EnrollmentRequest, enroll_patient
from flows.safety import report_adverse_event
from flows.treatment import SubjectRef, patient_treatment
from models.clock import VirtualClock, use_clock
from models.migrate import upgrade
from models.tables import CalendarEventRow, EventStatus, Subject
from protocol.eligibility import ScreeningRecord
from tasks.runtime import trial_engine
from tests.e2e.test_pi_signs_in_the_browser import ARTIFACTS, CHROMIUM, ui_server  # noqa: F401  (the module's UI server)
from tests.e2e.test_pi_signs_in_the_browser import _execute as _execute_review
from tests.flows.test_escalation_gate import APPROVAL, _adjudicate, _ae, _code, _treat
from tests.helpers import register_staff

ROOT = Path(__file__).parents[2]
UTC = dt.timezone.utc
pytestmark = pytest.mark.browser


def _request(sid: str, day0: dt.datetime) -> EnrollmentRequest:
    example = json.loads((ROOT / "examples" / "screening-S-001.json").read_text())
    return EnrollmentRequest(screening=ScreeningRecord.model_validate({**example, "subject_id": sid}), planned_day0=day0,
                             recorded_by="coord-1")


def _runs(client, sid: str, state: StateType):
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"subject:{sid}"]),
                                                               state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))),
                                 limit=200)


def test_after_a_signed_stop_the_ui_shows_the_undosed_patients_runs_cancelled_and_the_dashboard_says_trial_stopped(
        ui_server, tmp_path, monkeypatch, channels):  # noqa: F811
    from playwright.sync_api import sync_playwright

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    clock = VirtualClock(dt.datetime(2027, 1, 20, 1, tzinfo=UTC))
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(clock):
        for f in ALL_FLOWS:
            f.to_deployment(name=f.name).apply()
        for sid in ("S-701", "S-702"):
            enroll_patient(_request(sid, dt.datetime(2027, 1, 31, 9)))
            _treat(engine, clock, sid)
            patient_treatment(SubjectRef(subject_id=sid))
        enroll_patient(_request("S-703", dt.datetime(2027, 2, 25, 9)))  # not yet dosed when the stop is signed
        with get_client(sync_client=True) as client:
            scheduled = len(_runs(client, "S-703", StateType.SCHEDULED))
        assert scheduled >= 15
        clock.set(dt.datetime(2027, 2, 6, 2, tzinfo=UTC))
        for ae_id, sid in ((1, "S-701"), (2, "S-702")):
            report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3))
            _adjudicate(engine, clock, channels, ae_id, True, "CRS grade 3")
        with get_client(sync_client=True) as client:
            (review,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["cohort-review"])))
        assert _execute_review(review.id).is_paused()
        resume_flow_run(review.id, run_input={"signer_id": "pi-01", "printed_name": "Principal Investigator", "meaning": APPROVAL,
                                              "decision": "stop", "signing_code": _code(channels)})
        assert _execute_review(review.id).is_completed()
        with get_client(sync_client=True) as client:
            assert _runs(client, "S-703", StateType.SCHEDULED) == []
            cancelled = {r.parameters["event"]["event_key"]: r for r in _runs(client, "S-703", StateType.CANCELLED)}
            (board,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trial-dashboard"])), limit=1)
        assert len(cancelled) == scheduled and {"nk_infusion-1", "nk_infusion-2", "product_request-2"} <= set(cancelled)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            ARTIFACTS.mkdir(exist_ok=True)
            # The patient's runs, filtered by their subject tag (the list dates a cancelled run by its cancellation): all Cancelled.
            page.goto(f"{ui}/runs?tag=subject:S-703")
            page.get_by_text("S-703 · infusion 1 prep").first.wait_for()
            listed = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "stop-undosed-patient-runs-cancelled.png"), full_page=True)
            # One of them: the infusion's preparation, Cancelled.
            page.goto(f"{ui}/runs/flow-run/{cancelled['nk_infusion-1'].id}")
            page.get_by_text("Cancelled").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "stop-infusion-prep-run-cancelled.png"))
            # The dashboard artifact, refreshed when the decision was signed.
            page.goto(f"{ui}/artifacts/artifact/{board.id}")
            page.get_by_role("heading", name="TRIAL STOPPED", exact=False).first.wait_for()
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "stop-dashboard-trial-stopped.png"), full_page=True)
            browser.close()
    assert "TRIAL STOPPED: enrollment closed, no tolerable dose" in text and "not dosed: trial stopped" in text
    assert listed.count("Cancelled") >= min(scheduled, 10) and "Scheduled" not in listed  # the list shows the newest first
    with Session(engine) as s:
        subject = s.exec(select(Subject).where(Subject.subject_id == "S-703")).one()
        assert subject.status.value == "off_study" and subject.off_study_reason.value == "trial_stopped"
    for name in ("stop-undosed-patient-runs-cancelled", "stop-infusion-prep-run-cancelled", "stop-dashboard-trial-stopped"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
    with Session(engine) as s:
        assert {e.status for e in s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id))} == {EventStatus.CANCELLED}
