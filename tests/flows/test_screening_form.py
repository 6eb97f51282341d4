"""The enroll-patient form as the protocol's screening checklist: what a coordinator types becomes the
same ScreeningRecord as the JSON example; the deployed form has no type switches and is titled in
words; a screen failure ends as a grey "Screen failure", not a green success."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.exceptions import PrefectHTTPStatusError
from sqlmodel import Session, select

from flows.enrollment import SCREEN_FAILURE, EnrollmentRequest, enroll_patient
from flows.screening_form import SECTIONS
from models.tables import Subject, SubjectStatus
from protocol.eligibility import Lab, ScreeningRecord
from protocol.errors import UserError
from tasks.runtime import protocol
from tests.flows.conftest import subject_runs

ROOT = Path(__file__).parents[2]
EXAMPLE_TEXT = (ROOT / "examples" / "screening-S-001.json").read_text()
EXAMPLE = ScreeningRecord.model_validate_json(EXAMPLE_TEXT)

# examples/screening-S-001.json as a coordinator fills the form: words for yes/no, "never" typed, labs with their ULN.
S001_FORM = {
    "subject_id": "S-001", "planned_day0": "2027-01-31 09:00", "recorded_by": "coord-1",
    "consent_and_history": {"consent_on": "2027-01-10", "age_years": 46, "expected_survival_months": 6, "ecog": 1,
                            "contraception_commitment": "yes"},
    "disease": {"prior_allo_hsct": "yes", "peripheral_blood_leukaemia_cells": "no", "marrow_blasts_percent": 2.0,
                "extramedullary_infiltration": "no", "mrd_positive_mfc": "yes"},
    "gvhd_and_donor": {"agvhd_max_grade_post_transplant": 1, "donor_available": "yes"},
    "labs": {"alt": 52, "alt_uln": 40, "ast": 38, "ast_uln": 40, "total_bilirubin": 15, "total_bilirubin_uln": 21,
             "inr": 1.1, "inr_uln": 1.2, "aptt": 34, "aptt_uln": 40},
    "organ_function": {"serum_creatinine": 80, "serum_creatinine_uln": 104, "creatinine_clearance_ml_min": 85, "lvef_percent": 58},
    "washouts": {"last_systemic_steroid_on": "2027-01-20", "last_antitumour_therapy_on": "2027-01-12", "antitumour_half_life_days": 1.5,
                 "last_radiotherapy_on": "never", "last_dli_on": "2026-12-01", "last_intrathecal_on": "Never",
                 "last_modified_cell_therapy_on": " never ", "last_iv_anti_infective_on": "2027-01-05"},
    "exclusions": {"cns_involvement": "no", "hypersensitivity_murine_or_biologics": "no", "pregnant_or_lactating": "no",
                   "serious_autoimmune_or_immunodeficiency": "no", "alcohol_or_drug_dependence": "no",
                   "investigator_judges_unsuitable": "no"},
}
BARE = {"subject_id": "S-002", "planned_day0": "2027-01-31 09:00", "recorded_by": "coord-1"}


def form(**changes) -> dict:
    """The S-001 form with `section__field=value` changes; `...` leaves the field out, as the UI does for an empty input."""
    data = copy.deepcopy(S001_FORM)
    for key, value in changes.items():
        section, field = key.split("__")
        if value is ...:
            data[section].pop(field)
        else:
            data[section][field] = value
    return data


def test_the_filled_form_is_the_same_record_as_the_json_example():
    assert EnrollmentRequest.model_validate(S001_FORM).record() == EXAMPLE


def test_a_pasted_json_record_is_the_same_record_and_the_api_record_too():
    assert EnrollmentRequest.model_validate({**BARE, "subject_id": "S-001", "screening_json": EXAMPLE_TEXT}).record() == EXAMPLE
    assert EnrollmentRequest(screening=EXAMPLE, planned_day0=dt.datetime(2027, 1, 31, 9), recorded_by="coord-1").record() == EXAMPLE


@pytest.mark.parametrize(("changes", "field", "expected"), [
    ({"washouts__last_dli_on": "never"}, "last_dli_on", "never"),
    ({"washouts__last_dli_on": "NEVER"}, "last_dli_on", "never"),
    ({"washouts__last_dli_on": ""}, "last_dli_on", None),
    ({"washouts__last_dli_on": None}, "last_dli_on", None),
    ({"washouts__last_dli_on": ...}, "last_dli_on", None),
    ({"washouts__last_dli_on": " 2026-11-30 "}, "last_dli_on", dt.date(2026, 11, 30)),
    ({"consent_and_history__consent_on": ""}, "consent_on", None),
    ({"consent_and_history__ecog": None}, "ecog", None),
    ({"consent_and_history__ecog": ...}, "ecog", None),
    ({"consent_and_history__ecog": 0}, "ecog", 0),
    ({"disease__mrd_positive_mfc": "unknown"}, "mrd_positive_mfc", None),
    ({"disease__mrd_positive_mfc": ...}, "mrd_positive_mfc", None),
    ({"disease__mrd_positive_mfc": "no"}, "mrd_positive_mfc", False),
    ({"exclusions__cns_involvement": "yes"}, "cns_involvement", True),
    ({"consent_and_history__contraception_commitment": "unknown"}, "contraception_commitment", None),
])
def test_never_empty_and_unknown_map_to_the_record(changes, field, expected):
    assert getattr(EnrollmentRequest.model_validate(form(**changes)).record(), field) == expected


@pytest.mark.parametrize(("changes", "lab", "expected"), [
    ({"labs__alt": ..., "labs__alt_uln": ...}, "alt", None),
    ({"labs__inr": None, "labs__inr_uln": None}, "inr", None),
    ({"labs__inr": 1.9, "labs__inr_uln": 1.2}, "inr", Lab(value=1.9, uln=1.2)),
    ({"organ_function__serum_creatinine": ..., "organ_function__serum_creatinine_uln": ...}, "serum_creatinine", None),
])
def test_a_lab_is_its_value_with_its_upper_limit_of_normal_or_unknown(changes, lab, expected):
    assert getattr(EnrollmentRequest.model_validate(form(**changes)).record().labs, lab) == expected


def test_an_empty_form_is_all_unknown():
    rec = EnrollmentRequest.model_validate(BARE).record()
    assert rec == ScreeningRecord(subject_id="S-002")


@pytest.mark.parametrize(("data", "sentence"), [
    (form(washouts__last_dli_on="last week"),
     "6. Washouts: last dose of each therapy · Last donor lymphocyte infusion: YYYY-MM-DD, or never: 'last week' is not a date; "
     "write YYYY-MM-DD or never"),
    (form(consent_and_history__consent_on="never"), "1. Consent and history · Date informed consent was signed (YYYY-MM-DD): "
                                                    "'never' is not a date; write YYYY-MM-DD"),
    (form(labs__alt_uln=...), "4. Labs: liver and coagulation · ALT upper limit of normal (ULN), same unit: "
                              "give the value and its upper limit of normal together, or neither"),
    ({**S001_FORM, "screening_json": EXAMPLE_TEXT}, "give the screening either in the sections or as one screening record, not both"),
    ({**BARE, "screening_json": EXAMPLE_TEXT}, "its subject_id S-001 is not the form's subject ID S-002"),
    ({**BARE, "screening_json": "{not json"}, "screening record (JSON): not valid JSON"),
    ({**BARE, "screening_json": '{"ecog": 9}'}, "screening record (JSON): ecog: Input should be less than or equal to 5"),
])
def test_a_mistake_is_one_sentence_naming_the_field(data, sentence):
    with pytest.raises(UserError) as err:
        EnrollmentRequest.model_validate(data).record()
    assert sentence in str(err.value)


def _walk(schema: dict, path: str = ""):
    for key, value in schema.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{path}.{key}")
        if key == "anyOf":
            yield path


def _deployed_schema() -> dict:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name("enroll-patient/enroll-patient").parameter_openapi_schema


def test_the_deployed_form_has_no_type_switch_and_every_field_is_titled_in_words(prefect_server):
    schema = _deployed_schema()
    definitions = schema["definitions"]
    assert list(_walk(schema)) == [], "an anyOf makes the UI ask for a type first"
    request = definitions["EnrollmentRequest"]
    assert request["required"] == ["subject_id", "planned_day0", "recorded_by"]
    for name, cls in SECTIONS.items():
        assert request["properties"][name]["title"][0].isdigit(), name  # "1. Consent and history", not "Consent And History"
        for field, prop in definitions[cls.__name__]["properties"].items():
            assert prop["title"].lower() != field.replace("_", " ") and len(prop["title"].split()) >= 3, (field, prop["title"])
    props = {f: p for d in definitions.values() for f, p in d.get("properties", {}).items()}
    el = protocol().eligibility
    assert f"must be ≥ {el.criterion('I5_CARDIAC').min_lvef_percent}" in props["lvef_percent"]["title"]
    assert f"must be ≤ {el.criterion('I5_LIVER').alt_max_uln}×ULN" in props["alt"]["title"]
    assert props["cns_involvement"]["enum"] == ["yes", "no", "unknown"] and props["cns_involvement"]["default"] == "unknown"
    for w in el.washouts:
        assert w.label in props[w.field]["title"] and "never" in props[w.field]["title"]


def test_the_server_takes_what_the_ui_sends_and_refuses_a_washout_that_is_neither_date_nor_never(prefect_server):
    """The UI leaves an empty input out; an API caller may send null. Neither needs a type switch."""
    ui_like = {**BARE, "washouts": {"last_dli_on": "never", "last_radiotherapy_on": None}, "consent_and_history": {"ecog": None}}
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
        run = client.create_flow_run_from_deployment(dep.id, parameters={"request": ui_like})
        client.delete_flow_run(run.id)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(dep.id, parameters={"request": {**BARE, "washouts": {"last_dli_on": "someday"}}})
    assert refused.value.response.status_code == httpx.codes.CONFLICT and "last_dli_on" in refused.value.response.text


def test_a_screen_failure_ends_grey_named_screen_failure_with_the_criteria_in_words(trial_db, clock, channels):
    # a subject ID no other test enrolls: the session's server keeps every earlier test's runs
    request = {**form(consent_and_history__ecog=3, washouts__last_dli_on=...), "subject_id": "S-061"}
    state = enroll_patient(EnrollmentRequest.model_validate(request), return_state=True)
    assert state.is_cancelled() and state.name == SCREEN_FAILURE
    assert "Not met: ECOG performance status 0 to 2 (I3), value 3" in state.message
    assert "Unknown: Washouts before the first infusion: donor lymphocyte infusion (E2.dli)" in state.message
    assert subject_runs("S-061") == []
    with Session(trial_db) as s:
        assert s.exec(select(Subject.status)).one() is SubjectStatus.SCREEN_FAILED
    with get_client(sync_client=True) as client:
        # this key's newest version, however many other artifacts the session's server holds by now
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["screening-s-061"])),
                                       sort=ArtifactSort.CREATED_DESC, limit=1)
    assert art.data.startswith("# Screening S-061: SCREEN FAILURE")
    assert "- **ECOG performance status 0 to 2 (I3)** — NOT MET, keeps the candidate out" in art.data
    assert "- **Washouts before the first infusion: radiotherapy (E2.radiotherapy)** — NOT MET, passes" in art.data
    assert "  - value: never" in art.data and "|" not in art.data  # a list, not a table cut off at the page's edge
    assert not any(ord(ch) > 0x2FFF for ch in art.data), "no emoji: chromium without an emoji font shows empty boxes"


def test_an_eligible_candidate_from_the_form_is_enrolled_green(trial_db, clock, channels):
    state = enroll_patient(EnrollmentRequest.model_validate({**S001_FORM, "subject_id": "S-062"}), return_state=True)
    assert state.is_completed() and state.name == "Enrolled"
    assert len(subject_runs("S-062")) > 0  # an ID of its own: the session's server keeps every test's runs
