"""End to end, in a real browser: the coordinator opens the `worklist` artifact daily rounds published,
follows a patient to their casebook, and from the casebook's link to the patient's runs, planned ones
included, oldest first.

A real `prefect server start` with its UI (the module fixture of the PI-signs test) and Debian's chromium.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

from flows.enrollment import EnrollmentRequest, enroll_patient
from flows.rounds import RoundsOptions, daily_rounds
from flows.treatment import treatment_event
from models.clock import VirtualClock, use_clock
from models.migrate import upgrade
from protocol.eligibility import ScreeningRecord
from tasks.runtime import trial_engine
from tests.e2e.test_pi_signs_in_the_browser import ARTIFACTS, CHROMIUM, ui_server  # noqa: F401  (the module's UI server)
from tests.helpers import register_staff

ROOT = Path(__file__).parents[2]
UTC = dt.timezone.utc
pytestmark = pytest.mark.browser


def test_the_coordinator_reads_the_worklist_then_a_casebook_then_the_patients_planned_runs(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    example = json.loads((ROOT / "examples" / "screening-S-001.json").read_text())
    clock = VirtualClock(dt.datetime(2027, 1, 20, 1, tzinfo=UTC))  # 09:00 in Shanghai
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(clock):
        for f in (treatment_event, daily_rounds):
            f.to_deployment(name=f.name).apply()
        for sid, day0 in (("S-201", dt.datetime(2027, 1, 31, 9)), ("S-202", dt.datetime(2027, 2, 3, 10))):
            state = enroll_patient(EnrollmentRequest(screening=ScreeningRecord.model_validate({**example, "subject_id": sid}),
                                                     planned_day0=day0, recorded_by="coord-1"), return_state=True)
            assert state.name == "Enrolled", state.message
        clock.set(dt.datetime(2027, 2, 2, 1, tzinfo=UTC))  # S-201's infusion 1 was never recorded; S-202's is tomorrow
        daily_rounds(RoundsOptions(reports=False))
        with get_client(sync_client=True) as client:
            worklist_id, casebook_id = (client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                              sort=ArtifactSort.CREATED_DESC, limit=1)[0].id
                                        for key in ("worklist", "casebook-s-201"))

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1920, "height": 1200}, timezone_id="UTC")  # a desktop: the tables fit
        # The key's page lists the versions; the newest version's own page shows the text.
        page.goto(f"{ui}/artifacts/key/worklist")
        page.get_by_role("link", name=str(worklist_id)[:8]).first.click()
        page.get_by_text("Worklist 2027-02-02 (Asia/Shanghai)").first.wait_for()
        text = page.inner_text("body")
        assert text.index("Overdue") < text.index("NK infusion 1") < text.index("Today 2027-02-02")  # S-201's, overdue, first
        assert "nurse, investigator" in text and "cell-lab, coordinator (told)" in text  # S-202's product request for infusion 2 is due
        page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

        casebook = page.get_by_role("link", name="S-201").first.get_attribute("href")
        assert casebook == f"{ui}/artifacts/artifact/{casebook_id}"  # the version these rounds published
        page.goto(casebook)
        page.get_by_text("Casebook S-201").first.wait_for()
        text = page.inner_text("body")
        assert "Calendar: planned and actual" in text and "IL-2 1 MIU subcutaneous daily, doses 1–28" in text
        assert "not open yet" in text  # the DLT window
        page.screenshot(path=str(ARTIFACTS / "casebook.png"), full_page=True)

        runs = page.get_by_role("link", name="All of S-201's runs, done and planned, oldest first").get_attribute("href")
        page.goto(runs)
        page.get_by_text("S-201 · infusion 2 prep").first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        assert "S-202" not in text  # one patient's runs only
        assert text.index("S-201 · PK sample day 3") < text.index("S-201 · infusion 2 prep") < text.index("S-201 · DLT window closed")
        page.screenshot(path=str(ARTIFACTS / "patient-runs.png"), full_page=True)
        browser.close()
