"""Times typed in the deployment forms are site time: the string a nurse types in the record-infusion or
record-il2-dose form goes through the real server's schema check (enforce_parameter_schema), runs, and is
stored as the UTC instant of that wall time in the protocol's zone. Refusals show in the run's state, as
one sentence and no traceback; a malformed time never becomes a run."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.flow_engine import run_flow
from prefect.logging.handlers import APILogHandler
from sqlmodel import Session, select

from flows.enrollment import enroll_patient
from flows.recording import Il2DoseRecord, InfusionRecord, record_il2_dose, record_infusion
from flows.staff import manage_staff
from models.tables import Administration, AdministrationKind, Staff
from nktrial.cli.shared import local_datetime
from protocol.errors import UserError
from tests.flows.test_patient_flows import request as enrollment
from tests.helpers import protocol_data_with

UTC = dt.timezone.utc


def infusion_form(sid: str, given_at: str, number: int = 1) -> dict:
    """The record-infusion form as the UI sends it: plain JSON, the time as typed."""
    return {"record": {"subject_id": sid, "infusion_number": number, "dose_level": 1, "given_at": given_at, "cells_infused": 1.0e8,
                       "product_lot": "LOT-A1", "recorded_by": "nurse-7"}}


def submit_and_run(deployment: str, flow, parameters: dict):
    """Submit through the server (its schema check applies), then run the created run as a worker would."""
    run = run_deployment(f"{deployment}/{deployment}", parameters=parameters, timeout=0)
    with get_client(sync_client=True) as client:
        state = run_flow(flow, flow_run=client.read_flow_run(run.id), return_type="state")
        stored = client.read_flow_run(run.id)
    return state, stored


def stored_times(engine, kind: AdministrationKind) -> dict[str, dt.datetime]:
    with Session(engine) as s:
        return {a.event_key: a.given_at for a in s.exec(select(Administration).where(Administration.kind == kind))}


def run_logs(run_id) -> list[str]:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


@pytest.mark.parametrize("typed", ["2027-01-31 09:10", "2027-01-31T09:10"])
def test_a_time_typed_in_the_infusion_form_is_stored_as_that_site_time(trial_db, clock, channels, typed):
    enroll_patient(enrollment("S-040"))
    clock.set(dt.datetime(2027, 1, 31, 3, 0, tzinfo=UTC))  # 11:00 in Shanghai
    state, run = submit_and_run("record-infusion", record_infusion, infusion_form("S-040", typed))
    assert stored_times(trial_db, AdministrationKind.NK_INFUSION) == {"nk_infusion-1": dt.datetime(2027, 1, 31, 1, 10, tzinfo=UTC)}
    # what the nurse reads on the run, on the server: the outcome in the state's name and message, in site time with the zone
    assert (run.state.type.value, run.state.name) == ("COMPLETED", "Recorded")
    assert run.state.message.startswith("S-040: NK infusion 1 recorded at 2027-01-31 09:10 Asia/Shanghai")
    assert state.name == "Recorded"


def test_an_il2_dose_form_takes_a_site_time_and_a_missed_dose_leaves_it_empty(trial_db, clock, channels):
    enroll_patient(enrollment("S-041"))
    clock.set(dt.datetime(2027, 2, 4, 3, 0, tzinfo=UTC))
    assert record_infusion(infusion_form("S-041", "2027-01-31 09:10")["record"], return_state=True).is_completed()
    given = {"subject_id": "S-041", "dose_number": 1, "given": True, "given_at": "2027-02-01 08:45", "recorded_by": "nurse-7"}
    _, run = submit_and_run("record-il2-dose", record_il2_dose, {"record": given})
    assert (run.state.name, run.state.message) == ("Recorded", "S-041: IL-2 dose 1 recorded as given at 2027-02-01 08:45 Asia/Shanghai")
    # a missed dose: the time left out, left empty in the form, or sent as null by a script; the server takes each
    for dose, empty in ((2, {}), (3, {"given_at": ""}), (4, {"given_at": None})):
        missed = {"subject_id": "S-041", "dose_number": dose, "given": False, "missed_reason": "patient declined", "recorded_by": "nurse-7"}
        _, run = submit_and_run("record-il2-dose", record_il2_dose, {"record": missed | empty})
        assert (run.state.name, run.state.message) == ("Recorded", f"S-041: IL-2 dose {dose} recorded as missed")
    assert stored_times(trial_db, AdministrationKind.IL2_DOSE) == {"il2_dose-01": dt.datetime(2027, 2, 1, 0, 45, tzinfo=UTC),
                                                                    "il2_dose-02": None, "il2_dose-03": None, "il2_dose-04": None}


DST = [  # (planned day 0 in New York, the time typed, the sentence)
    (dt.datetime(2027, 3, 14, 9, 0), "2027-03-14 02:30",
     "given_at: 2027-03-14 02:30 does not exist in America/New_York (daylight-saving gap); choose another time"),
    (dt.datetime(2027, 11, 7, 9, 0), "2027-11-07T01:30",
     "given_at: 2027-11-07 01:30 happens twice in America/New_York (daylight-saving change); choose another time"),
]


@pytest.mark.parametrize(("day0", "typed", "sentence"), DST)
def test_a_time_that_does_not_exist_or_happens_twice_in_the_site_zone_is_refused_in_the_run(
        trial_db, clock, channels, tmp_path, monkeypatch, day0, typed, sentence):
    zone_file = tmp_path / "protocol-new-york.yaml"
    zone_file.write_text(yaml.safe_dump(protocol_data_with("site.timezone.value", "America/New_York")), encoding="utf-8")
    monkeypatch.setenv("NKTRIAL_PROTOCOL_FILE", str(zone_file))
    assert enroll_patient(enrollment("S-042", day0=day0), return_state=True).name == "Enrolled"
    clock.set(dt.datetime.combine(day0.date(), dt.time(20, 0), tzinfo=UTC))  # the same afternoon in New York
    state, run = submit_and_run("record-infusion", record_infusion, infusion_form("S-042", typed))
    assert (run.state.type.value, run.state.name, run.state.message) == ("FAILED", "Refused", sentence)
    assert state.is_failed() and stored_times(trial_db, AdministrationKind.NK_INFUSION) == {}
    logs = run_logs(run.id)
    assert sentence in logs and not any("Traceback" in m or "Error:" in m for m in logs), logs


@pytest.mark.parametrize("typed", ["31/01/2027 09:10", "2027-01-31", "2027-02-29 09:10", "2027-04-31 09:10", "2027-01-31 24:00", "2027-01-31 9:10"])
def test_a_malformed_time_is_refused_at_submit_naming_the_field_and_no_run_is_made(trial_db, clock, typed):
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["record-infusion"]))))
        with pytest.raises(PrefectHTTPStatusError, match="record.given_at") as refused:
            run_deployment("record-infusion/record-infusion", parameters=infusion_form("S-043", typed), timeout=0)
        after = len(client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["record-infusion"]))))
    assert "Validation failed for field 'record.given_at'" in str(refused.value)
    assert after == before


def test_a_refused_entry_in_the_form_names_its_time_in_site_time(trial_db, clock, channels):
    enroll_patient(enrollment("S-044"))
    clock.set(dt.datetime(2027, 1, 31, 0, 30, tzinfo=UTC))  # 08:30 in Shanghai: 09:10 has not happened yet
    _, run = submit_and_run("record-infusion", record_infusion, infusion_form("S-044", "2027-01-31 09:10"))
    assert (run.state.name, run.state.message) == (
        "Refused", "given_at 2027-01-31 09:10 Asia/Shanghai is in the future (it is now 2027-01-31 08:30 Asia/Shanghai); "
                   "record what was done, when it was done")


def test_a_staff_start_date_from_the_form_starts_at_00_00_site_time_and_the_run_says_so(trial_db, clock, channels):
    form = {"action": "add", "staff_id": "nurse-30", "printed_name": "Nurse Thirty", "roles": ["nurse"], "active_from_on": "2027-02-01",
            "recorded_by": "pi-01"}
    _, run = submit_and_run("manage-staff", manage_staff, {"change": form})
    assert run.state.name == "Added"
    assert run.state.message.startswith("nurse-30 (Nurse Thirty) added to the staff register as nurse, active from 2027-02-01 00:00 "
                                        "Asia/Shanghai;")
    with Session(trial_db) as s:
        assert s.exec(select(Staff).where(Staff.staff_id == "nurse-30")).one().active_from_at == dt.datetime(2027, 1, 31, 16, 0, tzinfo=UTC)
    again = submit_and_run("manage-staff", manage_staff, {"change": form})[1].state
    assert (again.name, again.message.split(" (")[0]) == ("Refused", "staff ID nurse-30 is already on the staff register")

# The README's example times, as a person would copy them into a command or a form.
README_TIMES = sorted(set(re.findall(r"(?:--day0 |--given-at |--active-from |--actual \d=)(\d{4}-\d{2}-\d{2}T\d{2}:\d{2})",
                                     (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8"))))


def test_the_readmes_example_times_work_as_typed_in_the_commands_and_the_forms():
    assert len(README_TIMES) >= 3, README_TIMES
    schema = InfusionRecord.model_json_schema()["properties"]["given_at"]
    for typed in README_TIMES:
        wall = dt.datetime.fromisoformat(typed)
        for spelling in (typed, typed.replace("T", " ")):
            assert local_datetime("--given-at", spelling) == wall
            assert re.search(schema["pattern"], spelling), spelling  # the server's check at submit
            assert InfusionRecord.model_validate(infusion_form("S-001", spelling)["record"]).given_at == wall
            assert Il2DoseRecord(subject_id="S-001", dose_number=1, given_at=spelling, recorded_by="nurse-7").given_at == wall


@pytest.mark.parametrize(("typed", "sentence"), [
    ("2027-01-31", "--given-at '2027-01-31' has no time of day; give the site's local date and time, e.g. 2027-01-31 09:00"),
    ("2027-01-31T09:00+08:00", "--given-at '2027-01-31T09:00+08:00' has a UTC offset; give the site's local wall-clock time without one"),
    ("31/01/2027 09:00", "--given-at '31/01/2027 09:00' is not a local date and time like 2027-01-31T09:00 or 2027-01-31 09:00"),
])
def test_a_command_refuses_a_time_it_would_misread_in_one_sentence(typed, sentence):
    with pytest.raises(UserError) as refused:
        local_datetime("--given-at", typed)
    assert str(refused.value) == sentence
