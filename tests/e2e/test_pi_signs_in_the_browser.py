"""End to end, in a real browser: the PI finds the suspended cohort review in the Prefect UI, fills
in the Resume form with the one-time code, submits, and the next dose level opens.

The test harness's server has no UI, so this test starts a real `prefect server start` with the
UI and PREFECT_UI_API_URL pointing at it, and drives Debian's chromium with Playwright.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

import pytest
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import Pause
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect.states import Scheduled
from sqlmodel import Session, select

from flows.safety import cohort_review
from models.clock import VirtualClock, use_clock
from models.migrate import upgrade
from models.tables import DoseLevelState, LevelStatus, Signature
from nktrial.server import local_server
from protocol.eligibility import ScreeningRecord
from tasks import due_events, enrollment, recording
from tasks.runtime import protocol, trial_engine
from tests.helpers import notice_link, register_staff

APPROVAL = protocol().escalation.signature_meanings.value[0]

ROOT = Path(__file__).parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
UTC = dt.timezone.utc
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A Prefect server with its UI (the test harness's has none), on a free port; flushed and stopped after."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed")
    with local_server(tmp_path_factory.mktemp("prefect-ui"), ui=True) as api:
        yield api.removesuffix("/api"), api


def _cohort_of_three_with_closed_windows(engine) -> None:
    example = json.loads((ROOT / "examples" / "screening-S-001.json").read_text())
    enrol_clock = VirtualClock(dt.datetime(2027, 1, 20, 1, tzinfo=UTC))
    for sid in ("S-301", "S-302", "S-303"):
        enrollment.enroll(engine, protocol(), record=ScreeningRecord.model_validate({**example, "subject_id": sid}),
                       planned_day0=dt.datetime(2027, 1, 31, 9), actor="coord-1", clock=enrol_clock)
        for n, day in ((1, 0), (2, 14)):
            recording.record_infusion(engine, protocol(), subject_id=sid, infusion_number=n, dose_level=1, cells_infused=1e8,
                                    given_at=dt.datetime(2027, 1, 31, 9) + dt.timedelta(days=day), product_lot=f"L-{sid}-{n}",
                                    actor="nurse-7", clock=lambda: dt.datetime(2027, 3, 31, tzinfo=UTC))
        due_events.act_on_event(engine, protocol(), subject_id=sid, event_key="dlt_window_close",
                             clock=lambda: dt.datetime(2027, 3, 1, tzinfo=UTC))


def _execute(run_id):
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Scheduled(), force=True)
        try:
            run_flow(cohort_review, flow_run=client.read_flow_run(run_id))
        except Pause:
            pass
        return client.read_flow_run(run_id).state


def _browser(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])


def _open_resume_form(page, ui, run_id):
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Resume").first.click()
    modal = page.locator(".p-modal")
    modal.get_by_text("Decision · 3+3 recommends escalate to DL2").wait_for()
    return modal


def _fill_and_submit(page, modal, code: str, shot: str | None = None) -> None:
    fields = modal.locator("textarea")  # staff ID, printed name, rationale, signing code (decision and meaning are choices)
    fields.nth(0).fill("pi-01")
    fields.nth(1).fill("Principal Investigator")
    for n, option in ((0, "escalate"), (1, APPROVAL)):
        choice = modal.locator(".p-select-button__control").nth(n)
        choice.click()
        choice.press("ArrowDown")
        page.get_by_role("option", name=option, exact=True).click()
    fields.nth(2).fill("0 of 3 at DL1")
    fields.last.fill(code)
    if shot:
        page.screenshot(path=str(ARTIFACTS / shot))
    modal.get_by_role("button", name="Submit").click()
    modal.wait_for(state="hidden")


def _above_the_fold(page, text: str) -> bool:
    box = page.locator(".p-modal").get_by_text(text).first.bounding_box()
    return box is not None and box["y"] + box["height"] <= page.viewport_size["height"]


def test_the_pi_signs_the_cohort_review_in_the_browser_a_wrong_code_first(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)  # pi-01 signs; coord-1 and nurse-7 record
    _cohort_of_three_with_closed_windows(engine)
    ARTIFACTS.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(VirtualClock(dt.datetime(2027, 3, 1, 1, tzinfo=UTC))):
        cohort_review.to_deployment(name="cohort-review").apply()
        run = run_deployment("cohort-review/cohort-review", timeout=0, as_subflow=False, flow_run_name="cohort review · 1NNN")
        assert _execute(run.id).is_paused()
        (code_msg,) = [m.body for m in channels("pi-01") if "signing code" in m.body]  # the PI's own channel, nobody else's
        code = re.search(r"signing code (\d{8})", code_msg).group(1)

        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            modal = _open_resume_form(page, ui, run.id)
            page.screenshot(path=str(ARTIFACTS / "cohort-review-resume-form.png"))
            for text in ("3+3 recommends escalate to DL2", "Tally: DL1 3 patients, 0 DLTs", "You may sign: escalate", "Statement:"):
                assert _above_the_fold(page, text), f"'{text}' is below the fold of the Resume form"
            _fill_and_submit(page, modal, "00000000" if code != "00000000" else "11111111")
            with get_client(sync_client=True) as client:
                assert client.read_flow_run(run.id).state.is_scheduled()  # resumed by the form (the UI's toast says so)...
            refused = _execute(run.id)  # ...and the run, executed, refuses the code and waits again
            assert refused.is_paused() and refused.message.startswith("Signature refused: signing_code is wrong")
            modal = _open_resume_form(page, ui, run.id)
            refusal = modal.get_by_text(re.compile("^SIGNATURE REFUSED:")).first  # the first field's text, at the top of the form
            assert refusal.inner_text().startswith("SIGNATURE REFUSED: signing_code is wrong for decision 1 and signer pi-01")
            assert refusal.bounding_box()["y"] + refusal.bounding_box()["height"] <= 800
            assert refusal.bounding_box()["y"] < modal.get_by_text("Your staff ID").first.bounding_box()["y"]
            page.screenshot(path=str(ARTIFACTS / "cohort-review-signature-refused.png"))
            _fill_and_submit(page, modal, code)
            assert _execute(run.id).is_completed()
            page.goto(f"{ui}/runs/flow-run/{run.id}")
            page.get_by_text("Signed escalate DL2 by pi-01").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "cohort-review-signed.png"))
            browser.close()
    with Session(engine) as s:
        sig = s.exec(select(Signature)).one()
        assert (sig.signer_id, sig.printed_name, sig.meaning) == ("pi-01", "Principal Investigator", APPROVAL)
        assert s.get(DoseLevelState, 2).status is LevelStatus.OPEN and s.get(DoseLevelState, 1).status is LevelStatus.CLOSED
    for shot in ("cohort-review-resume-form.png", "cohort-review-signature-refused.png", "cohort-review-signed.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000


def test_a_candidate_dlt_notice_opens_the_ae_page_and_its_adjudicate_form(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    from flows.safety import adjudicate_dlt, report_adverse_event
    from tasks.adverse_events import AeReport

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    _cohort_of_three_with_closed_windows(engine)
    ARTIFACTS.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(VirtualClock(dt.datetime(2027, 2, 6, 2, tzinfo=UTC))):
        adjudicate_dlt.to_deployment(name="adjudicate-dlt").apply()
        report_adverse_event(recorded_by="inv-2", report=AeReport(subject_id="S-301", term="hepatic failure", category="non_haematological",
                                                                  grade=3, onset_on=dt.date(2027, 2, 5), attribution="probable"))
        (notice,) = [m.body for m in channels("pi") if "candidate DLT" in m.body]
        assert "hepatic" not in notice  # the notice carries the subject, the event and the link; the page shows the AE
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(notice_link(notice))
            page.get_by_text("hepatic failure").first.wait_for()
            link = page.get_by_role("link", name="Adjudicate AE 1 →")
            page.screenshot(path=str(ARTIFACTS / "ae-page.png"))
            page.goto(link.get_attribute("href"))
            page.get_by_text("Your adjudication").first.wait_for()
            assert page.locator("input").nth(1).input_value() == "1"  # the AE is filled in (the first input is the run's name)
            page.screenshot(path=str(ARTIFACTS / "adjudicate-dlt-form.png"), full_page=True)
            browser.close()


def test_daily_rounds_publish_the_swimmer_plot_as_an_image_the_ui_shows(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    from flows.rounds import daily_rounds
    from flows.treatment import treatment_event

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    _cohort_of_three_with_closed_windows(engine)
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(VirtualClock(dt.datetime(2027, 3, 1, 1, tzinfo=UTC))):
        treatment_event.to_deployment(name="treatment-event").apply()  # rounds check the projection against it
        summary = daily_rounds()
        assert "report files written" in summary
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["swimmer-plot"])), limit=1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/artifacts/artifact/{artifact.id}")
            page.get_by_role("heading", name="Swimmer plot").wait_for()
            page.wait_for_function("Array.from(document.images).some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 800)")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "swimmer-plot-artifact.png"))
            browser.close()
    assert (tmp_path / "reports" / "swimmer.png").stat().st_size > 10_000
