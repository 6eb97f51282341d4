"""The coordinator's worklist and each patient's casebook, human run names and subject tags: against a real
Prefect server, real flows and a real trial database."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort

from flows.enrollment import EnrollmentRequest, enroll_patient
from flows.recording import Il2DoseRecord, InfusionRecord, record_il2_dose, record_infusion
from flows.rounds import RoundsOptions, daily_rounds
from protocol.dates import local_instant
from protocol.eligibility import ScreeningRecord
from tasks.projection import scheduled_at
from tasks.runtime import protocol
from tests.flows.conftest import execute_run, subject_runs

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
DAY0 = dt.datetime(2027, 1, 31, 9, 0)  # site-local (Asia/Shanghai); washouts clear from 2027-01-24
UTC = dt.timezone.utc


def enroll(sid: str) -> None:
    state = enroll_patient(EnrollmentRequest(screening=ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid}),
                                             planned_day0=DAY0, recorded_by="coord-1"), return_state=True)
    assert state.name == "Enrolled", state.message


def infusion_1(sid: str, at: dt.datetime) -> None:
    state = record_infusion(InfusionRecord(subject_id=sid, infusion_number=1, dose_level=1, given_at=at, cells_infused=1.0e8,
                                           product_lot="LOT-CB7", recorded_by="nurse-7"), return_state=True)
    assert state.is_completed(), state.message


def latest(key: str):
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC,
                                       limit=1)
    return art


def cells(text: str, contains: str) -> list[str]:
    """The cells of the first markdown table row that contains `contains`."""
    line = next(line for line in text.splitlines() if line.startswith("|") and contains in line)
    return [c.strip() for c in line.strip().strip("|").split("|")]


def runs_tagged(sid: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"subject:{sid}"])), limit=200)


def test_rounds_publish_a_worklist_of_what_is_due_with_who_and_window_overdue_first(trial_db, clock, channels):
    enroll("S-101")
    clock.set(dt.datetime(2027, 2, 2, 1, 0, tzinfo=UTC))  # 2027-02-02 09:00 site time: infusion 1 (day 0) never recorded
    daily_rounds(RoundsOptions(reports=False))
    text = latest("worklist").data
    assert text.startswith("# Worklist 2027-02-02 (Asia/Shanghai)")
    overdue, today, coming = (text.split(f"## {part}")[1] for part in ("Overdue", "Today", "Next 7 days"))
    overdue, today = overdue.split("## Today")[0], today.split("## Next")[0]
    nk = next(line for line in overdue.splitlines() if "NK infusion 1" in line)
    assert "**not recorded**" in nk and "S-101" in nk
    assert "| 2027-01-31 09:00 |" in nk  # when it was due, site time
    assert "| nurse, investigator |" in nk  # the roles the delegation log allows to record it
    assert "IL-2 1 MIU subcutaneous daily, dose 1" in overdue  # yesterday's dose, not recorded
    pk3 = next(line for line in coming.splitlines() if "PK sample day 3" in line)
    assert "| 2027-02-03 09:00 |" in pk3 and "nurse" in pk3
    assert re.search(r"IL-2 1 MIU subcutaneous daily, doses 2–9 \| 02-02 → 02-09 \|", today)  # one line, not 8 rows
    assert "1-month visit" not in text  # its window opens after the 7 days
    assert f"/artifacts/artifact/{latest('casebook-s-101').id})" in nk  # the patient links to the casebook these rounds published
    assert text.index("NK infusion 1") < text.index("PK sample day 3")  # overdue first


def test_the_casebook_exists_after_enrollment_and_shows_planned_against_actual_after_an_infusion(trial_db, clock, channels):
    enroll("S-102")
    before = latest("casebook-s-102")
    text = before.data
    assert "# Casebook S-102" in text and "**Status:** enrolled" in text and "Asia/Shanghai" in text
    assert cells(text, "NK infusion 1") == ["0", "NK infusion 1 (1.0e+08 cells)", "2027-01-31 09:00", "", "", "planned"]
    assert cells(text, "NK infusion 2")[3] == "02-14 → 02-17"  # its window
    assert "none given yet" in text and "**Adherence: 0/28 doses given**" in text
    assert "not open yet" in text
    # The one-click link: the UI's Runs page for this patient's tag, over a range that reaches past the last event.
    link = re.search(r"\]\((http[^)]+/runs\?[^)]+)\)", text).group(1)
    q = parse_qs(urlparse(link).query)
    assert q["tag"] == ["subject:S-102"] and q["type"] == ["range"] and q["flow-runs-sort"] == ["EXPECTED_START_TIME_ASC"]
    assert dt.datetime.fromisoformat(q["endDate"][0].replace("Z", "+00:00")) > dt.datetime(2027, 5, 1, tzinfo=UTC)

    clock.set(dt.datetime(2027, 1, 31, 3, 0, tzinfo=UTC))  # 11:00 site time
    infusion_1("S-102", dt.datetime(2027, 1, 31, 10, 30))
    after = latest("casebook-s-102")
    assert after.id != before.id
    text = after.data
    # planned 09:00, given 10:30: the plan and the actual side by side
    # day | event | planned | window | actual | status
    assert cells(text, "NK infusion 1") == ["0", "NK infusion 1 (1.0e+08 cells)", "2027-01-31 09:00", "", "2027-01-31 10:30", "done"]
    assert "| 1 | 2027-01-31 10:30 | 1.00e+08 | LOT-CB7 | DL1 |" in text
    assert "**Status:** on treatment" in text
    assert "**open** since 2027-01-31 10:30; closes 2027-03-01 00:00 (end of day 28)" in text


def test_treatment_event_runs_keep_their_human_names_before_and_after_they_run(trial_db, clock, channels):
    enroll("S-103")
    runs = {r.name: r for r in subject_runs("S-103")}
    assert {"S-103 · infusion 2 prep", "S-103 · PK sample day 7", "S-103 · DLT window closed"} <= set(runs)
    assert not [n for n in runs if re.search(r"nk_infusion|pk_sample|-infusion_", n)]
    for name in ("S-103 · PK sample day 7", "S-103 · infusion 2 prep"):
        state = execute_run(runs[name], clock)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            done = client.read_flow_run(runs[name].id)
        assert done.state_type is StateType.COMPLETED
        assert done.name == name  # not renamed to the event key when it ran
        assert done.parameters["event"]["event_key"] in ("pk_sample-infusion_1+7", "nk_infusion-2")  # the key stays the identity


def test_enrollment_and_recording_runs_carry_the_patients_subject_tag(trial_db, clock, channels):
    enroll("S-104")
    clock.set(dt.datetime(2027, 2, 1, 3, 0, tzinfo=UTC))
    infusion_1("S-104", DAY0)
    state = record_il2_dose(Il2DoseRecord(subject_id="S-104", dose_number=1, given_at=dt.datetime(2027, 2, 1, 9, 0), recorded_by="nurse-7"),
                            return_state=True)
    assert state.is_completed(), state.message
    names = {r.name for r in runs_tagged("S-104")}
    assert {"S-104 · enrollment", "S-104 · treatment plan", "S-104 · infusion 1 given", "S-104 · IL-2 dose 1"} <= names
    assert "**Adherence: 1/28 doses given**" in latest("casebook-s-104").data  # the IL-2 recording refreshed the casebook


def test_the_dlt_window_closes_at_one_instant_in_the_schedule_the_run_and_the_casebook(trial_db, clock, channels):
    enroll("S-105")
    table = latest("subject-s-105-schedule").data
    rows = json.loads(table) if isinstance(table, str) else table
    (close,) = [r for r in rows if r["event"].startswith("DLT window closes")]
    tz = protocol().timezone
    shown_at, _ = local_instant(tz, dt.date.fromisoformat(close["date"]), dt.time.fromisoformat(close["time"]), what="test")
    (run,) = [r for r in subject_runs("S-105") if r.name == "S-105 · DLT window closed"]
    assert shown_at == scheduled_at(run) == dt.datetime(2027, 2, 28, 16, 0, tzinfo=UTC)
    assert close["event"] == "DLT window closes at the end of day 28 (2027-02-28), that is 2027-03-01 00:00 Asia/Shanghai"
    assert "planned to close 2027-03-01 00:00 (end of day 28)" in latest("casebook-s-105").data
    # The 28 IL-2 doses are one row.
    (il2,) = [r for r in rows if "IL-2" in r["event"]]
    assert il2["event"] == "IL-2 1 MIU subcutaneous daily, doses 1–28" and il2["date"] == "2027-02-01 → 2027-02-28"
    assert len(rows) < 30


def test_after_a_signed_stop_the_worklist_says_trial_stopped_first_and_lists_no_infusion_for_the_undosed(trial_db, clock, channels):
    from flows.safety import report_adverse_event
    from flows.treatment import SubjectRef, patient_treatment
    from tests.flows.test_escalation_gate import _adjudicate, _ae, _code, _resume, _review_runs, _run_review, _treat

    for sid in ("S-611", "S-612"):
        enroll(sid)
        _treat(trial_db, clock, sid)
        patient_treatment(SubjectRef(subject_id=sid))
    clock.set(dt.datetime(2027, 2, 6, 2, 0, tzinfo=UTC))
    for ae_id, sid in ((1, "S-611"), (2, "S-612")):
        report_adverse_event(recorded_by="inv-2", report=_ae(sid, category="crs", grade=3))
        _adjudicate(trial_db, clock, channels, ae_id, True, "CRS grade 3")
    (run,) = _review_runs(trial_db)
    assert _run_review(run.id).is_paused()
    assert _resume(run.id, decision="stop", signing_code=_code(channels)).is_completed()
    daily_rounds(RoundsOptions(reports=False))
    text = latest("worklist").data
    assert text.splitlines()[2].startswith("## TRIAL STOPPED: stop signed by Principal Investigator (pi-01)")
    assert "NK infusion" not in text  # both were dosed; nothing more to give
    casebook = latest("casebook-s-611").data
    assert "| stop | stop | Principal Investigator (pi-01), 2027-02-06" in casebook  # DL1's review: recommended, signed, by whom
    assert "AE" in casebook and "confirmed: CRS grade 3" in casebook  # the adjudication, with its reason


def versions(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC)


def test_rounds_publish_a_casebook_again_only_when_the_record_changed(trial_db, clock, channels):
    from tasks.recording import record_infusion as record_without_a_flow  # as `nktrial record infusion` does: no casebook refresh

    enroll("S-107")
    clock.set(dt.datetime(2027, 1, 31, 0, 0, tzinfo=UTC))
    daily_rounds(RoundsOptions(reports=False))
    before = versions("casebook-s-107")
    clock.set(dt.datetime(2027, 2, 1, 0, 0, tzinfo=UTC))
    daily_rounds(RoundsOptions(reports=False))  # a new day, nothing recorded: the same casebook, no new version
    assert [a.id for a in versions("casebook-s-107")] == [a.id for a in before]
    assert f"/artifacts/artifact/{before[0].id})" in latest("worklist").data  # the worklist links to the version that shows it
    record_without_a_flow(trial_db, protocol(), subject_id="S-107", infusion_number=1, dose_level=1, given_at=DAY0,
                          cells_infused=1.0e8, product_lot="LOT-CB9", actor="nurse-7", clock=clock)
    worklist_before = latest("worklist").id
    summary = daily_rounds(RoundsOptions(reports=False, views=False))  # as a rehearsal's rounds between two weekly refreshes
    assert "worklist and casebooks not refreshed this time" in summary
    assert len(versions("casebook-s-107")) == len(before) and latest("worklist").id == worklist_before
    daily_rounds(RoundsOptions(reports=False))  # the record changed behind the casebook's back: rounds publish it
    after = versions("casebook-s-107")
    assert len(after) == len(before) + 1 and "LOT-CB9" in after[0].data and "LOT-CB9" not in before[0].data


def test_one_casebook_that_cannot_be_drawn_never_stops_the_others_nor_the_worklist(trial_db, clock, channels, monkeypatch):
    import flows.casebook as casebook

    enroll("S-108")
    enroll("S-109")
    clock.set(dt.datetime(2027, 1, 31, 0, 0, tzinfo=UTC))
    drawn = casebook.casebook_markdown

    def broken_for_s108(session, protocol, subject_id, **kw):  # a fault injected into one patient's drawing only
        if subject_id == "S-108":
            raise RuntimeError("casebook drawing failed")
        return drawn(session, protocol, subject_id, **kw) + "\nredrawn by these rounds\n"

    monkeypatch.setattr(casebook, "casebook_markdown", broken_for_s108)
    summary = daily_rounds(RoundsOptions(reports=False))
    assert "worklist not refreshed" not in summary
    s109 = latest("casebook-s-109")
    assert "redrawn by these rounds" in s109.data  # the patient after the broken one was still published
    assert "redrawn by these rounds" not in latest("casebook-s-108").data
    assert f"/artifacts/artifact/{s109.id})" in latest("worklist").data
