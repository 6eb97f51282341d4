"""End to end, in a real browser: a coordinator fills the enroll-patient form section by section
(yes/no selects, numbers, "never" typed for washouts), submits it, and the candidate is enrolled
with the same screening record as examples/screening-S-001.json. A screen failure shows grey,
named "Screen failure"; the screening artifact reads in words.

Like the PI's signing test, it starts a real `prefect server start` with the UI and drives Debian's
chromium with Playwright. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect.states import Scheduled
from sqlmodel import Session, select

from flows.enrollment import SCREEN_FAILURE, EnrollmentRequest, enroll_patient
from flows.screening_form import SECTIONS
from flows.treatment import treatment_event
from models.clock import VirtualClock, use_clock
from models.migrate import upgrade
from models.tables import Subject, SubjectStatus
from nktrial.server import local_server
from tasks.runtime import trial_engine
from tests.flows.test_screening_form import EXAMPLE, S001_FORM, form
from tests.helpers import register_staff

ROOT = Path(__file__).parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
UTC = dt.timezone.utc
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A Prefect server with its UI, on a free port; flushed and stopped after."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed")
    with local_server(tmp_path_factory.mktemp("prefect-ui-enroll"), ui=True) as api:
        yield api.removesuffix("/api"), api


class FormPage:
    """The deployment's Run form, field by field, found by the titles the form shows."""

    def __init__(self, page, schema: dict):
        self.page, self.definitions = page, schema["definitions"]

    def control(self, title: str):
        label = self.page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(title)}( \(Optional\))?$"))
        prop = label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")
        return prop.locator(".p-label__body").first

    def set(self, prop: dict, value) -> None:
        from playwright.sync_api import expect

        body = self.control(prop["title"])
        if "enum" in prop:
            if value == prop.get("default"):
                return
            button = body.locator(".p-select-button__control")
            button.click()
            button.press("ArrowDown")
            self.page.get_by_role("option", name=value, exact=True).click()
            expect(button).to_have_text(value)
        else:
            body.locator("textarea, input").first.fill(str(value))

    def fill(self, data: dict) -> None:
        top = self.definitions["EnrollmentRequest"]["properties"]
        for field in ("subject_id", "planned_day0", "recorded_by"):
            self.set(top[field], data[field])
        for name, cls in SECTIONS.items():
            props = self.definitions[cls.__name__]["properties"]
            for field, value in data.get(name, {}).items():
                self.set(props[field], value)


def _execute(run_id):
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Scheduled(), force=True)
        run_flow(enroll_patient, flow_run=client.read_flow_run(run_id))
        return client.read_flow_run(run_id)


def test_a_coordinator_enrolls_from_the_screening_form_with_never_washouts(ui_server, tmp_path, monkeypatch, channels):
    from playwright.sync_api import sync_playwright

    ui, api = ui_server
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'trial.db'}")
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path))
    engine = trial_engine()
    upgrade(engine)
    register_staff(engine)
    # "never" typed three ways a person might; the example's other values as they are
    typed = form(washouts__last_radiotherapy_on="never", washouts__last_intrathecal_on="Never",
                 washouts__last_modified_cell_therapy_on="never")
    ARTIFACTS.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}), \
            use_clock(VirtualClock(dt.datetime(2027, 1, 20, 1, tzinfo=UTC))):
        dep_id = enroll_patient.to_deployment(name="enroll-patient").apply()
        treatment_event.to_deployment(name="treatment-event").apply()  # the enrolled patient's plan is projected onto it
        with get_client(sync_client=True) as client:
            schema = client.read_deployment(dep_id).parameter_openapi_schema

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(f"{ui}/deployments/deployment/{dep_id}/run")
            page.get_by_text("Subject ID (pseudonymous").wait_for()
            assert page.get_by_role("button", name=re.compile(r"^(string|number|integer|null|boolean)$", re.I)).count() == 0
            FormPage(page, schema).fill(typed)
            page.locator(".schema-form-property__label", has_text="1. Consent and history").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "enroll-form-consent.png"))
            page.locator(".schema-form-property__label", has_text="6. Washouts").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "enroll-form-washouts.png"))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"/(runs/flow-run/|deployments/deployment/.*tab=Runs)"))

            with get_client(sync_client=True) as client:
                (submitted,) = client.read_flow_runs()
            assert EnrollmentRequest.model_validate(submitted.parameters["request"]).record() == EXAMPLE  # the form = the JSON example
            run = _execute(submitted.id)
            assert run.state.is_completed() and run.state.name == "Enrolled", run.state
            page.goto(f"{ui}/runs/flow-run/{run.id}")
            page.get_by_text("Enrolled").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "enroll-run-enrolled.png"))

            failed = enroll_patient(EnrollmentRequest.model_validate(
                {**S001_FORM, "subject_id": "S-002", "consent_and_history": {**S001_FORM["consent_and_history"], "ecog": 3},
                 "organ_function": {**S001_FORM["organ_function"], "lvef_percent": 40}}), return_state=True)
            assert failed.is_cancelled() and failed.name == SCREEN_FAILURE
            page.goto(f"{ui}/runs")
            _shows(page, SCREEN_FAILURE)
            page.screenshot(path=str(ARTIFACTS / "enroll-runs-screen-failure.png"))

            with get_client(sync_client=True) as client:
                (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["screening-s-002"])),
                                                    limit=1)
            page.goto(f"{ui}/artifacts/artifact/{artifact.id}")
            page.get_by_role("heading", name=re.compile("Screening S-002: SCREEN FAILURE")).wait_for()
            shown = page.locator("body").inner_text()
            assert "ECOG performance status 0 to 2 (I3) — NOT MET, keeps the candidate out" in shown
            assert "Washouts before the first infusion: radiotherapy (E2.radiotherapy) — NOT MET, passes" in shown
            page.screenshot(path=str(ARTIFACTS / "enroll-screening-artifact.png"))
            browser.close()

    with Session(engine) as s:
        assert dict(s.exec(select(Subject.subject_id, Subject.status)).all()) == {"S-001": SubjectStatus.ENROLLED,
                                                                                  "S-002": SubjectStatus.SCREEN_FAILED}
    for name in ("enroll-form-consent", "enroll-form-washouts", "enroll-run-enrolled", "enroll-runs-screen-failure",
                 "enroll-screening-artifact"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name


def _shows(page, text: str, tries: int = 3) -> None:
    """Wait for the text on the page, loading the page again up to `tries` times, 30 s each: the UI's runs list once
    took longer than 30 s to appear while both cores ran rehearsals (make test)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        try:
            page.get_by_text(text).first.wait_for(timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
            page.reload()
