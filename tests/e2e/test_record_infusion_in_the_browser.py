"""End to end, in a real browser whose zone is UTC: a nurse types 09:10 in the record-infusion form,
submits it, and 09:10 site time (Asia/Shanghai, 01:10 UTC) is what is stored and what the run says.
A time typed the wrong way is refused by the form before any run is made.

It starts a real `prefect server start` with the UI and drives Debian's chromium with Playwright.
Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import pytest
from prefect import get_client
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect.states import Scheduled
from sqlmodel import Session, select

from flows.enrollment import enroll_patient
from flows.recording import record_infusion
from flows.treatment import patient_treatment, treatment_event
from models.clock import VirtualClock, use_clock
from models.migrate import upgrade
from models.tables import Administration
from nktrial.server import local_server
from tasks.runtime import trial_engine
from tests.flows.test_patient_flows import request as enrollment
from tests.helpers import register_staff

ROOT = Path(__file__).parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
UTC = dt.timezone.utc
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed")
    with local_server(tmp_path_factory.mktemp("prefect-ui-record"), ui=True) as api:
        yield api.removesuffix("/api"), api


def field(page, title: str):
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(title)}( \(Optional\))?$"))
    prop = label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")
    return prop.locator(".p-label__body").first.locator("textarea, input").first


FORM = {"Subject Id": "S-001", "Infusion Number": "1", "Dose Level": "1", "Cells Infused": "100000000", "Product Lot": "LOT-A1",
        "Recorded By": "nurse-7"}
GIVEN_AT = "Given at (site time, Asia/Shanghai)"


def test_a_nurse_types_0910_in_a_utc_browser_and_0910_site_time_is_stored(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    ARTIFACTS.mkdir(exist_ok=True)
    clock = VirtualClock(dt.datetime(2027, 1, 20, 1, tzinfo=UTC))
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), use_clock(clock):
        for f in (treatment_event, patient_treatment):
            f.to_deployment(name=f.name).apply()
        dep_id = record_infusion.to_deployment(name="record-infusion").apply()
        assert enroll_patient(enrollment("S-001"), return_state=True).name == "Enrolled"
        clock.set(dt.datetime(2027, 1, 31, 3, 0, tzinfo=UTC))  # 11:00 in Shanghai, 03:00 in the browser's zone

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_context(timezone_id="UTC", viewport={"width": 1300, "height": 1000}).new_page()
            page.goto(f"{ui}/deployments/deployment/{dep_id}/run")
            page.get_by_text(GIVEN_AT).wait_for()
            for title, value in FORM.items():
                field(page, title).fill(value)
            field(page, GIVEN_AT).fill("2027-01-31 9:10")  # no leading zero: not the documented shape
            page.get_by_role("button", name="Submit").click()
            page.get_by_text(re.compile("does not match|match pattern|pattern", re.I)).first.wait_for(timeout=15_000)
            page.screenshot(path=str(ARTIFACTS / "record-infusion-form-refused.png"))
            with get_client(sync_client=True) as client:
                assert not [r for r in client.read_flow_runs(limit=50) if r.deployment_id == dep_id]  # refused before any run

            field(page, GIVEN_AT).fill("2027-01-31 09:10")
            field(page, GIVEN_AT).scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "record-infusion-form.png"))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"/(runs/flow-run/|deployments/deployment/.*tab=Runs)"))
            with get_client(sync_client=True) as client:
                (submitted,) = [r for r in client.read_flow_runs(limit=50) if r.deployment_id == dep_id]
                assert submitted.parameters["record"]["given_at"] == "2027-01-31 09:10"  # as typed, whatever the browser's zone
                client.set_flow_run_state(submitted.id, Scheduled(), force=True)
                run_flow(record_infusion, flow_run=client.read_flow_run(submitted.id))
                run = client.read_flow_run(submitted.id)
            assert run.state.name == "Recorded", run.state
            assert run.state.message.startswith("S-001: NK infusion 1 recorded at 2027-01-31 09:10 Asia/Shanghai")
            page.goto(f"{ui}/runs/flow-run/{run.id}")
            page.get_by_text("Recorded").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "record-infusion-run-recorded.png"))
            browser.close()

    with Session(engine) as s:
        assert s.exec(select(Administration.given_at)).one() == dt.datetime(2027, 1, 31, 1, 10, tzinfo=UTC)
    for name in ("record-infusion-form-refused", "record-infusion-form", "record-infusion-run-recorded"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name
