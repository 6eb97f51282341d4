"""The end-to-end tests: every shipped scenario rehearsed through the real deployments on the
session's Prefect server, in virtual time, with notices sent to the real receiver; the final
state checked against the 3+3 rules replayed independently; the reports read back."""

from __future__ import annotations

import csv
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import icalendar
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from sqlmodel import Session, select

from models.db import make_engine
from models.tables import (
    Administration,
    AdministrationKind,
    CalendarEventRow,
    EscalationDecision,
    EventStatus,
    LabKind,
    LabResult,
    Subject,
)
from nktrial.rehearsal import rehearse
from nktrial.scenario import load, shipped
from protocol.cohorts import design_for
from protocol.dates import to_local
from protocol.definition import load_protocol
from protocol.three_plus_three import Action
from tasks.exports import FEEDS

ROOT = Path(__file__).parents[2]
P = load_protocol()


@pytest.fixture(scope="session")
def rehearsed(prefect_server, receiver, tmp_path_factory):
    """Rehearse a shipped scenario once per test process; every message goes to the session receiver (and its privacy
    check). make test runs all the tests of a scenario in one process (rehearsal_group), so each is rehearsed once."""
    cache = {}

    def run(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"rehearsal-{name}")
            res = rehearse(load(name), out_dir=out, protocol=P, receiver=receiver)
            print(f"\nrehearsal {name}: {res.virtual_days} virtual days, {res.runs_executed} runs, {res.wall_seconds} s")
            cache[name] = (res, make_engine(f"sqlite:///{out / 'trial.db'}"), out)
        return cache[name]

    yield run
    for _res, engine, _out in cache.values():
        engine.dispose()


# make test's two processes (pytest-xdist --dist loadgroup): the tests that read a scenario's rehearsal form one group,
# which runs in one process, where the scenario is rehearsed once (conftest.py hands the longest groups out first).
# withdrawal-replacement and missed-il2 share a group: a test compares the two.
GROUPS = [("two-dlts-deescalation",), ("no-dlt",), ("one-of-three-expansion",), ("late-infusion",),
          ("withdrawal-replacement", "missed-il2")]
SCENARIOS = [name for group in GROUPS for name in group]


def rehearsal_group(*names: str) -> pytest.MarkDecorator:
    """The group of the tests that read these scenarios' rehearsals (one group for all of them, or an error)."""
    (group,) = {group for group in GROUPS if set(names) & set(group)}
    assert set(names) <= set(group), f"{names} are rehearsed in different groups"
    return pytest.mark.xdist_group("rehearsal-" + "-".join(group))


def test_every_scenario_file_is_shipped_and_valid():
    names = {p.stem for p in shipped()}
    assert names == set(SCENARIOS)
    for name in names:
        sc = load(name)
        assert sc.expect is not None, f"{name} states what the rules imply"


@pytest.mark.parametrize("name", [pytest.param(name, marks=rehearsal_group(name)) for name in SCENARIOS])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    res, engine, _ = rehearsed(name)
    assert res.problems == []
    # Independently of the flows and of the scenario's own expectation: the rule over each reviewed history, and the final one.
    design = design_for(P)
    design.validate(design.parse(res.history))
    for d in res.decisions:
        rule = design.decide(design.parse(d["history"]))
        assert (d["signed"], d["level"]) == (rule.action.value, rule.dose_level), d  # the rehearsal's PI signs what the rule says
    final_rule = design.decide(design.parse(res.history))
    signed = [d for d in res.decisions if d["signed"]]
    if final_rule.action is Action.STOP:
        assert signed[-1]["signed"] == "stop" and res.mtd == final_rule.mtd and not res.trial_open
    else:
        assert res.mtd is None and res.trial_open and signed[-1]["level"] == final_rule.dose_level
    with Session(engine) as s:
        decisions = s.exec(select(EscalationDecision).order_by(EscalationDecision.id)).all()
        assert all(d.status == "signed" for d in decisions), "every review the rehearsal opened was signed"
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    assert {"rounds", "run", "pi", "staff", "referral"} <= {e["kind"] for e in log}
    mornings = [e["site_time"] for e in log if e["kind"] == "rounds" and "closing" not in e["name"]]
    assert len(mornings) == len(set(mornings)) and all(m.endswith(" 07:00") for m in mornings)  # one rounds each virtual morning


@rehearsal_group("no-dlt")
def test_no_dlt_escalates_twice_expands_the_top_level_and_names_dl3(rehearsed):
    res, engine, out = rehearsed("no-dlt")
    assert res.history == "1NNN 2NNN 3NNN 3NNN" and res.mtd == 3
    assert [(lv["dose_level"], lv["patients"], lv["dlts"]) for lv in res.levels] == [(1, 3, 0), (2, 3, 0), (3, 6, 0)]
    assert all(p["status"] == "completed" and p["evaluable"] for p in res.patients)
    assert res.wall_seconds > 0


@rehearsal_group("one-of-three-expansion")
def test_one_dlt_in_three_expands_the_level_before_escalating(rehearsed):
    res, engine, _ = rehearsed("one-of-three-expansion")
    s102 = next(p for p in res.patients if p["subject_id"] == "S-102")
    assert s102["dlts"] == 1 and s102["cohort"] == 1
    assert [p["cohort"] for p in res.patients if p["subject_id"] in ("S-104", "S-105", "S-106")] == [2, 2, 2]
    assert [(d["history"], d["signed"]) for d in res.decisions] == [("1NTN", "expand"), ("1NTN 1NNN", "escalate")]


@rehearsal_group("two-dlts-deescalation")
def test_two_dlts_stop_the_cohort_early_and_de_escalate(rehearsed):
    res, engine, _ = rehearsed("two-dlts-deescalation")
    assert res.decisions[2]["history"] == "1NNN 2NNN 3TT"  # the review did not wait for S-209's window
    with Session(engine) as s:
        assert s.exec(select(EscalationDecision).where(EscalationDecision.history == "1NNN 2NNN 3TT")).one().early_stop
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    assert any("SAE deadline" in e["name"] for e in log if e["kind"] == "run")  # the serious AE's 24 h clock ran as its own run
    s209 = next(p for p in res.patients if p["subject_id"] == "S-209")
    assert (s209["dose_level"], s209["status"], s209["evaluable"]) == (3, "completed", True)


@rehearsal_group("late-infusion")
def test_a_late_infusion_moves_its_pk_samples_and_a_missed_one_is_replaced(rehearsed):
    res, engine, _ = rehearsed("late-infusion")
    with Session(engine) as s:
        def infusion_2_day(sid):
            subj = s.exec(select(Subject).where(Subject.subject_id == sid)).one()
            a = s.exec(select(Administration).where(Administration.subject_pk == subj.id, Administration.event_key == "nk_infusion-2")).first()
            return subj, a

        subj, a = infusion_2_day("S-301")
        day0 = to_local(P.timezone, subj.planned_day0_at).date()
        assert (to_local(P.timezone, a.given_at).date() - day0).days == 16
        pk = s.exec(select(LabResult).where(LabResult.subject_pk == subj.id, LabResult.event_key == "pk_sample-infusion_2+1")).one()
        assert (pk.sampled_on - day0).days == 17  # infusion 2 + 1 day, not the planned day 15
        _, late = infusion_2_day("S-302")
        assert late.deviation_reason == "donor product released late"
        _, missed = infusion_2_day("S-303")
        assert missed is None
    by = {p["subject_id"]: p for p in res.patients}
    assert by["S-303"]["evaluable"] is False and by["S-304"]["cohort"] == 1 and by["S-304"]["evaluable"] is True


@rehearsal_group("withdrawal-replacement")
def test_a_withdrawal_opens_a_replacement_slot_the_waitlisted_patient_takes(rehearsed):
    res, engine, _ = rehearsed("withdrawal-replacement")
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    referrals = [(e["name"], e["result"]) for e in log if e["kind"] == "referral" and e["name"].startswith("S-404")]
    assert "Waitlisted" in referrals[0][1] and "Enrolled" in referrals[-1][1]
    assert any("coordinator: S-402 · not evaluable: a replacement slot is open" in e["notices"] for e in log)
    by = {p["subject_id"]: p for p in res.patients}
    assert by["S-402"]["evaluable"] is False and (by["S-404"]["cohort"], by["S-404"]["evaluable"]) == (1, True)


@rehearsal_group("missed-il2")
def test_missed_il2_doses_are_flagged_next_morning_and_recorded(rehearsed):
    res, engine, _ = rehearsed("missed-il2")
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    flagged = [e for e in log if e["kind"] == "rounds" and "nurse: S-501 · IL-2 dose missed" in e["notices"]]
    assert len(flagged) == 2 and all("coordinator: S-501 · IL-2 dose missed" in e["notices"] for e in flagged)
    with Session(engine) as s:
        subj = s.exec(select(Subject).where(Subject.subject_id == "S-501")).one()
        missed = s.exec(select(Administration.event_key).where(Administration.subject_pk == subj.id,
                                                               Administration.kind == AdministrationKind.IL2_DOSE,
                                                               Administration.given.is_(False))).all()
    assert sorted(missed) == ["il2_dose-05", "il2_dose-06"]


# -- the reports, from the no-DLT trial ---------------------------------------------------------

@rehearsal_group("no-dlt")
def test_the_reports_hold_what_the_database_holds(rehearsed):
    res, engine, out = rehearsed("no-dlt")
    reports = Path(res.reports)
    png = (reports / "swimmer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    with Session(engine) as s:
        values = s.exec(select(Subject.subject_id, LabResult.value).join(Subject, Subject.id == LabResult.subject_pk)
                        .where(LabResult.kind == LabKind.DONOR_NK_COUNT)).all()
        planned = {role: s.exec(select(CalendarEventRow).where(CalendarEventRow.kind.in_(list(kinds)),
                                                               CalendarEventRow.status != EventStatus.CANCELLED)).all()
                   for role, kinds in FEEDS.items()}
    cmax = {}
    for sid, v in values:
        cmax[sid] = max(cmax.get(sid, 0), v)
    pk_rows = [line.split("|")[1:-1] for line in (reports / "pk.md").read_text().splitlines() if line.startswith("| S-")]
    assert {r[0].strip(): float(r[3]) for r in pk_rows} == cmax
    outcomes = (reports / "outcomes.md").read_text()
    assert "| DL3 | 6 | 6 | 4/6 (67 %) | 6 | 4/6 (67 %) | 4/6 (67 %) |" in outcomes  # S-008 and S-011 MRD-positive, PR and SD
    dashboard = (reports / "dashboard.md").read_text()
    assert "Enrolled **12** of the target **12**" in dashboard and "| 4 | `1NNN 2NNN 3NNN 3NNN` | stop (MTD DL3) | stop | pi-01 |" in dashboard

    for role, rows in planned.items():
        cal = icalendar.Calendar.from_ical((reports / "ical" / f"{role.value}.ics").read_bytes())
        events = cal.walk("VEVENT")
        assert len(events) == len(rows) > 0
        assert [tz["TZID"] for tz in cal.walk("VTIMEZONE")] == [P.timezone]
        for ev in events:
            start = ev.decoded("dtstart")
            assert str(start.tzinfo) == P.timezone and ev["dtstart"].params["TZID"] == P.timezone
            assert re.fullmatch(r"S-\d{3} · .+", str(ev["summary"]))
    nurse = icalendar.Calendar.from_ical((reports / "ical" / "nurse.ics").read_bytes()).walk("VEVENT")
    first_infusion = next(ev for ev in nurse if str(ev["summary"]) == "S-001 · NK infusion 1 (1.0e+08 cells)")
    assert first_infusion.decoded("dtstart").replace(tzinfo=None) == dt.datetime(2027, 3, 8, 9, 0)  # 09:00 site time, not UTC
    assert {str(ev["summary"]).split(" · ")[1].split(" ")[0] for ev in nurse} == {"NK", "IL-2", "PK"}

    expected = {"ex": ["STUDYID", "DOMAIN", "USUBJID", "EXSEQ", "EXTRT", "EXDOSE", "EXDOSU", "EXDOSFRM", "EXDOSFRQ", "EXROUTE", "EXSTDTC",
                       "EXENDTC", "EXSTDY"],
                "sv": ["STUDYID", "DOMAIN", "USUBJID", "VISITNUM", "VISIT", "SVSTDTC", "SVENDTC", "SVSTDY"]}
    for domain, columns in expected.items():
        rows = list(csv.DictReader(open(reports / "sdtm" / f"{domain}.csv", encoding="utf-8")))
        assert list(rows[0]) == columns and len(rows) > 12
        assert all(all(r[c] for c in columns) for r in rows), f"{domain}: every standard variable is filled"
        assert {r["DOMAIN"] for r in rows} == {domain.upper()} and all(r["USUBJID"].startswith("NCT06641648-S-") for r in rows)
    ex = list(csv.DictReader(open(reports / "sdtm" / "ex.csv", encoding="utf-8")))
    assert len([r for r in ex if r["EXTRT"] == "DONOR NK CELLS"]) == 24 and len([r for r in ex if r["EXTRT"] == "INTERLEUKIN-2"]) == 12 * 28
    assert {r["EXSTDY"] for r in ex if r["EXTRT"] == "DONOR NK CELLS"} == {"1", "15"}  # SDTM has no day 0
    with get_client(sync_client=True) as client:  # daily rounds published them as artifacts too
        latest = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trial-dashboard", "swimmer-plot"])))
    assert {a.key for a in latest} == {"trial-dashboard", "swimmer-plot"}
    assert any("data:image/png;base64," in (a.data or "") for a in latest if a.key == "swimmer-plot")


@rehearsal_group("two-dlts-deescalation")
def test_the_sdtm_ae_domain_from_a_trial_with_dlts(rehearsed):
    res, engine, _ = rehearsed("two-dlts-deescalation")
    rows = list(csv.DictReader(open(Path(res.reports) / "sdtm" / "ae.csv", encoding="utf-8")))
    assert [(r["USUBJID"], r["AETOXGR"], r["AESER"], r["AEREL"], r["AESTDY"]) for r in rows] == [
        ("NCT06641648-S-207", "3", "Y", "PROBABLE", "6"), ("NCT06641648-S-208", "3", "N", "DEFINITE", "7")]
    required = ["STUDYID", "DOMAIN", "USUBJID", "AESEQ", "AETERM", "AEDECOD", "AETOXGR", "AESER", "AEREL", "AESTDTC", "AESTDY"]
    assert all(r[c] for r in rows for c in required)


# -- the command line: a temporary server, or a running one -------------------------------------

def _short_scenario(tmp_path: Path, start: dt.date) -> Path:
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump({"name": "short", "title": "One patient, first three weeks", "start": start.isoformat(),
                                    "max_days": 21, "patients": [{"id": "S-901"}]}), encoding="utf-8")
    return path


def test_simulate_on_a_temporary_server_prints_progress_and_the_final_state(tmp_path):
    path = _short_scenario(tmp_path, dt.date(2027, 3, 1))
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", str(path), "--json", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting a temporary Prefect server" in proc.stderr
    assert re.search(r"virtual day +14 \(2027-03-15\) · patients enrolled 1/1 · runs executed \d+", proc.stderr)
    import json

    data = json.loads(proc.stdout)
    assert data["patients"][0]["status"] in ("enrolled", "on_treatment")
    assert data["virtual_days"] == 21 and data["problems"] == []
    assert (tmp_path / "out" / "events.csv").exists() and (tmp_path / "out" / "reports" / "swimmer.png").exists()


def test_simulate_against_a_running_server_refuses_a_past_start_and_runs_a_future_one(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    past = _short_scenario(tmp_path, dt.date.today())
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", str(past), "--api-url", api], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "is not in the future" in proc.stderr and "Traceback" not in proc.stderr
    future = _short_scenario(tmp_path, dt.date.today() + dt.timedelta(days=60))
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", str(future), "--api-url", api, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting a temporary Prefect server" not in proc.stderr and "3+3 check: the final state is what the rules imply" in proc.stdout


def test_a_bad_scenario_gets_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntitle: x\nstart: 2027-03-01\npatients:\n  - {id: P-1}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nktrial: error: scenario bad.yaml: field 'patients.0.id'")
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", "no-such-scenario"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "shipped: " in proc.stderr and "no-dlt" in proc.stderr


@rehearsal_group("withdrawal-replacement", "missed-il2")
def test_the_swimmer_lanes_show_what_happened_to_each_patient(rehearsed):
    from tasks.swimmer import lanes

    _, withdrawal, _ = rehearsed("withdrawal-replacement")
    _, missed, _ = rehearsed("missed-il2")
    with Session(withdrawal) as s:
        by = {lane.subject_id: lane for lane in lanes(s, P, dt.date(2027, 12, 31))}
    assert list(by) == ["S-401", "S-402", "S-403", "S-404"]  # one lane each, by dose level then enrollment
    assert (by["S-402"].infusions, by["S-402"].off_study_day, by["S-402"].end_day) == ([0], 5, 5)
    assert by["S-401"].infusions == [0, 14] and by["S-401"].completed and by["S-401"].visits == [28, 90]
    assert len(by["S-401"].il2_given) == P.il2.duration_days.value
    with Session(missed) as s:
        lane = next(lane for lane in lanes(s, P, dt.date(2027, 12, 31)) if lane.subject_id == "S-501")
    assert lane.il2_missed == [5, 6] and 5 not in lane.il2_given


@pytest.mark.parametrize("history, decisions, problem", [
    ("1NNN 2T", [], None),  # cut short while the newest cohort is in its DLT windows
    ("1NNN 2TT", [], None),  # a second DLT ends a cohort early
    ("1NN 2NNN", [], "a cohort has 3 unless a second DLT"),
    ("1NNN", [{"history": "1NNN", "recommended": "expand", "recommended_level": 1, "signed": "expand", "mtd": None}], "the rule says escalate DL2"),
    ("1NTN", [{"history": "1NTN", "recommended": "expand", "recommended_level": 1, "signed": "escalate", "mtd": None}], "bolder than"),
])
def test_the_3_plus_3_check_flags_what_the_rule_would_not_do(history, decisions, problem):
    from nktrial.rehearsal import Result, check
    from nktrial.scenario import Scenario

    sc = Scenario.model_validate({"name": "x", "title": "x", "start": "2027-03-01", "patients": [{"id": "S-001"}]})
    res = Result("x", "x", history, None, True, [], [], decisions, 0, 0, 0, 0, 0.0, "", "")
    problems = check(res, design_for(P), sc)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems
