"""The `nktrial` command as a person runs it: readable output, JSON for scripts, one-sentence errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "screening-S-001.json"


def nktrial(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("nktrial")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nktrial"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=120)


def test_protocol_show_marks_registry_and_assumption_values():
    out = nktrial("protocol", "show")
    assert out.returncode == 0, out.stderr
    assert "NCT06641648" in out.stdout and "[R]" in out.stdout and "[A]" in out.stdout
    data = json.loads(nktrial("protocol", "show", "--json").stdout)
    assert data["protocol"]["version"] == "1.3.0"
    assert data["site"]["timezone"] == {"value": "Asia/Shanghai", "source": "assumption", "basis": data["site"]["timezone"]["basis"]}


def test_calendar_json_has_the_documented_fields():
    out = nktrial("calendar", "--dose-level", "2", "--day0", "2027-01-31T09:00", "--json")
    assert out.returncode == 0, out.stderr
    events = json.loads(out.stdout)
    assert {"kind", "protocol_day", "local_date", "window_start", "window_end", "at_utc"} <= set(events[0])
    inf2 = next(e for e in events if e["kind"] == "nk_infusion" and e["protocol_day"] == 14)
    assert (inf2["local_date"], inf2["window_end"], inf2["at_utc"]) == ("2027-02-14", "2027-02-17", "2027-02-14T01:00:00Z")


def test_calendar_text_re_anchors_on_an_actual_infusion():
    out = nktrial("calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00", "--actual", "2=2027-02-16T10:00")
    assert out.returncode == 0, out.stderr
    assert "PK sample day 17" in out.stdout and "2027-02-16  10:00  NK infusion 2" in out.stdout


def test_screen_prints_every_criterion_and_the_earliest_day0():
    out = nktrial("screen", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "Earliest permissible day 0: 2027-01-24" in out.stdout and "Verdict: ELIGIBLE" in out.stdout
    res = json.loads(nktrial("screen", str(EXAMPLE), "--day0", "2027-01-22", "--json").stdout)
    assert res["verdict"] == "not_eligible"
    assert {c["id"] for c in res["criteria"] if c["status"] == "met" and c["id"].startswith("E2")} == {"E2.systemic_steroid"}


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ("", {"action": "enroll", "dose_level": 1, "patients": 3, "mtd": None}),
        ("1NNN", {"action": "escalate", "dose_level": 2, "patients": 3, "mtd": None}),
        ("1NTN", {"action": "expand", "dose_level": 1, "patients": 3, "mtd": None}),
        ("1NNN 2NNN 3NNN", {"action": "expand", "dose_level": 3, "patients": 3, "mtd": None}),
        ("1NNN 2TT", {"action": "deescalate", "dose_level": 1, "patients": 3, "mtd": None}),
        ("1TT", {"action": "stop", "dose_level": None, "patients": 0, "mtd": None}),
    ],
)
def test_escalation_next_json(history, expected):
    out = nktrial("escalation", "next", history, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got) == {"action", "dose_level", "patients", "mtd", "reason"}
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ("1NTNNNN", {"action": "escalate", "dose_level": 2, "patients": 3}),
        ("1NNN 2NT", {"action": "enroll", "dose_level": 2, "patients": 1}),
        ("1N", {"action": "enroll", "dose_level": 1, "patients": 2}),
    ],
)
def test_escalation_next_reads_the_r_packages_full_notation(history, expected):
    out = nktrial("escalation", "next", history, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {k: got[k] for k in expected} == expected


def test_escalation_next_in_full_notation_still_refuses_an_impossible_history():
    out = nktrial("escalation", "next", "1NNNN")
    assert out.returncode == 2
    assert "adds patients to level 1, which had 0 DLT in 3" in out.stderr
    assert "Traceback" not in out.stderr


def test_db_upgrade_is_idempotent_and_status_reports_it(tmp_path):
    env = {"NKTRIAL_DATA_DIR": str(tmp_path / "data"), "NKTRIAL_DATABASE_URL": ""}
    first = nktrial("db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    from models.migrate import head_revision

    assert f"upgraded from empty to schema {head_revision()}" in first.stdout
    again = nktrial("db", "upgrade", env=env)
    assert f"already at schema {head_revision()}" in again.stdout
    status = nktrial("db", "status", env=env)
    assert "DL1 open, DL2 pending, DL3 pending" in status.stdout
    assert (tmp_path / "data" / "trial.db").exists()


BAD_INPUT = [
    (["calendar", "--dose-level", "4", "--day0", "2027-01-31T09:00"], "dose level 4 does not exist"),
    (["calendar", "--dose-level", "1", "--day0", "31/01/2027"], "--day0 '31/01/2027' is not a local date and time"),
    (["calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00+08:00"], "has a UTC offset"),
    (["calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00", "--actual", "two"], "--actual 'two' must look like"),
    (["calendar", "--dose-level", "x", "--day0", "2027-01-31T09:00"], "invalid int value"),
    (["screen", "no-such-file.json"], "cannot be read"),
    (["screen", str(EXAMPLE), "--day0", "tomorrow"], "--day0 'tomorrow' is not a date"),
    (["escalation", "next", "1NNN 3NNN"], "skips a level"),
    (["escalation", "next", "1NNQ"], "unknown letter 'Q'"),
    (["--protocol", "missing.yaml", "protocol", "show"], "protocol file missing.yaml: cannot be read"),
]


BAD_ENV = [
    (["db", "status"], {"NKTRIAL_DATABASE_URL": "not a url"}, "NKTRIAL_DATABASE_URL 'not a url' is not a database URL"),
    (["db", "upgrade"], {"NKTRIAL_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"}, "is not reachable"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_sentence_and_a_non_zero_exit(args, message):
    _assert_one_sentence(nktrial(*args), message)


@pytest.mark.parametrize(("args", "env", "message"), BAD_ENV)
def test_a_bad_database_setting_is_one_sentence(args, env, message):
    _assert_one_sentence(nktrial(*args, env=env), message)


def _assert_one_sentence(out, message):
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON (line 1"),
        ('{"subject_id": "S-001", "ecog": 9}', "field 'ecog': Input should be less than or equal to 5"),
        ('{"subject_id": "S-001", "name": "Jane Doe"}', "field 'name': Extra inputs are not permitted"),
        ('{"subject_id": "Jane Doe"}', "must match the pseudonymous pattern"),
        ('{"subject_id": "S-001", "consent_on": "2027-02-30"}', "field 'consent_on'"),
    ],
)
def test_a_bad_screening_file_is_one_sentence(tmp_path, content, message):
    f = tmp_path / "screening.json"
    f.write_text(content, encoding="utf-8")
    out = nktrial("screen", str(f))
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def _staffed_database(tmp_path) -> dict:
    """A trial database made by `nktrial db upgrade`, the test staff on its register, and the environment that writes
    to it as inv-2 (an investigator) with no Prefect server and no channels."""
    from models.db import make_engine
    from tests.helpers import register_staff

    env = {"NKTRIAL_DATA_DIR": str(tmp_path / "data"), "NKTRIAL_DATABASE_URL": "", "PREFECT_API_URL": "", "NKTRIAL_APPRISE_CONFIG": "",
           "NKTRIAL_ACTOR": "inv-2"}
    assert nktrial("db", "upgrade", env=env).returncode == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'trial.db'}")
    register_staff(engine)
    engine.dispose()
    return env


def test_recording_commands_write_once_and_refuse_bad_input_in_one_sentence(tmp_path):
    env = _staffed_database(tmp_path)
    enrolled = nktrial("enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "S-001 enrolled at dose level 1, cohort 1, slot 1" in enrolled.stdout
    again = nktrial("enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env)
    _assert_one_sentence(again, "subject_id S-001 is already enrolled; it cannot be enrolled again")
    wrong_level = nktrial("record", "infusion", "--subject", "S-001", "--number", "1", "--dose-level", "3", "--given-at",
                          "2026-01-31T09:00", "--cells", "1e8", "--lot", "L1", env=env)
    _assert_one_sentence(wrong_level, "dose_level 3 does not match S-001's assigned dose level 1")
    both = nktrial("record", "il2", "--subject", "S-001", "--dose", "1", "--given-at", "2026-02-01T09:00", "--missed", "x", env=env)
    _assert_one_sentence(both, "give exactly one of --given-at")
    unknown = nktrial("off-study", "--subject", "S-404", "--reason", "withdrawal", "--effective-on", "2026-01-01", env=env)
    _assert_one_sentence(unknown, "subject_id S-404 is not in the trial database")
    outbox = nktrial("notify", "list", env=env)
    assert "S-001 · enrolled" in outbox.stdout and "pending" in outbox.stdout


def test_escalation_oc_is_exact_and_paths_are_listed():
    out = nktrial("escalation", "oc", "--p", "0.05,0.15,0.30", "--json")
    assert out.returncode == 0, out.stderr
    oc = json.loads(out.stdout)
    assert abs(sum(oc["p_mtd"].values()) + oc["p_no_tolerable_dose"] - 1) < 1e-9
    paths = json.loads(nktrial("escalation", "paths", "--json").stdout)
    assert len(paths) == oc["paths"] and {"history": "1TT", "mtd": None, "patients": 2} in paths
    bad = nktrial("escalation", "oc", "--p", "0.1,0.2")
    assert bad.returncode == 2 and "one DLT probability per dose level (3), got 2" in bad.stderr


def test_the_safety_commands_screen_adjudicate_and_refuse_a_wrong_signature(tmp_path):
    env = _staffed_database(tmp_path)
    consented = tmp_path / "screening.json"  # consent before the AE's onset: an onset before consent is refused
    consented.write_text(EXAMPLE.read_text(encoding="utf-8").replace('"consent_on": "2027-01-10"', '"consent_on": "2026-01-01"'),
                         encoding="utf-8")
    nktrial("enroll", str(consented), "--day0", "2099-01-31T09:00", env=env)
    future = nktrial("ae", "report", "--subject", "S-001", "--term", "rash", "--category", "non_haematological", "--grade", "3",
                     "--onset-on", "2099-02-03", "--attribution", "possible", env=env)
    _assert_one_sentence(future, "onset_on 2099-02-03 is in the future")
    bad = nktrial("ae", "report", "--subject", "S-001", "--term", "rash", "--category", "non_haematological", "--grade", "7",
                  "--onset-on", "2026-01-03", "--attribution", "possible", env=env)
    _assert_one_sentence(bad, "field 'grade': Input should be less than or equal to 5")
    ok = nktrial("ae", "report", "--subject", "S-001", "--term", "rash", "--category", "non_haematological", "--grade", "3",
                 "--onset-on", "2026-01-03", "--attribution", "possible", env=env)
    assert ok.returncode == 0 and "DLT screen: not_candidate (onset 2026-01-03 is outside the DLT window" in ok.stdout
    nothing = nktrial("ae", "adjudicate", "--ae", "1", "--confirm", "--reason", "x", "--investigator", "inv-2", "--code", "12345678",
                      env=env)
    _assert_one_sentence(nothing, "AE 1 is not a candidate DLT")
    status = nktrial("escalation", "status", env=env)
    assert "history: (none yet)" in status.stdout and "S-001" in status.stdout and "DLT window open" in status.stdout
    refused = nktrial("escalation", "approve", "--decision", "1", "--signer", "pi-01", "--name", "PI", "--action", "escalate",
                      "--code", "12345678", "--meaning", "approval", env=env)
    _assert_one_sentence(refused, "signature refused: decision 1 does not exist")


def test_reports_from_the_command_line_name_patients_by_id_and_parse_back(tmp_path):
    import icalendar

    env = _staffed_database(tmp_path)
    assert nktrial("enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env).returncode == 0
    dash = nktrial("report", "dashboard", env=env)
    assert dash.returncode == 0, dash.stderr
    assert "Enrolled **1** of the target **12**" in dash.stdout and "| DL1 | 1.0e+08 | open | 1 | 0 | 0 | 2 |" in dash.stdout
    assert json.loads(nktrial("report", "outcomes", "--json", env=env).stdout)["levels"][0]["enrolled"] == 1
    everything = nktrial("report", "all", "--out", str(tmp_path / "out"), env=env)
    assert everything.returncode == 0, everything.stderr
    cal = icalendar.Calendar.from_ical((tmp_path / "out" / "ical" / "cell-lab.ics").read_bytes())
    (request,) = [ev for ev in cal.walk("VEVENT") if "infusion 2" in str(ev["summary"])]  # infusion 1's request went at enrollment
    assert str(request["summary"]) == "S-001 · product request for infusion 2"
    assert request.decoded("dtstart").replace(tzinfo=None) == dt.datetime(2099, 1, 31, 9, 0)
    swimmer = nktrial("report", "swimmer", "--out", str(tmp_path / "s.png"), env=env)
    assert swimmer.returncode == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text", ["S-001 · window 2027-03-22 to 2027-03-25; protocol day 14, done \\ noted\nnext line",
                                  "S-001 · " + "é" * 80, "x" * 73 + "\\;yy", "S-001 · " + "ü," * 50])
def test_a_feed_line_is_escaped_and_folded_so_a_calendar_reads_back_the_same_text(text):
    """The feeds' events are written by hand (tasks/exports.py): what a calendar application parses back is the text."""
    import icalendar

    from tasks.exports import _fold, _text

    line = _fold("SUMMARY:" + _text(text))
    assert all(len(piece.encode("utf-8")) <= 75 for piece in line.split("\r\n"))  # RFC 5545 3.1, the leading space counted
    event = icalendar.Event.from_ical(f"BEGIN:VEVENT\r\n{line}\r\nEND:VEVENT\r\n")
    assert str(event["summary"]) == text


def test_staff_commands_bootstrap_the_pi_then_every_write_names_its_actor(tmp_path):
    from sqlmodel import Session, select

    from models.db import make_engine
    from models.tables import AccessRefusal, AuditLog

    env = {"NKTRIAL_DATA_DIR": str(tmp_path / "data"), "NKTRIAL_DATABASE_URL": "", "PREFECT_API_URL": "", "NKTRIAL_APPRISE_CONFIG": "",
           "NKTRIAL_ACTOR": ""}
    assert nktrial("db", "upgrade", env=env).returncode == 0
    assert "the staff register is empty: add the PI first" in nktrial("staff", "list", env=env).stdout
    _assert_one_sentence(nktrial("staff", "add", "--id", "nurse-01", "--name", "Nurse One", "--roles", "nurse", env=env),
                         "the staff register is empty: the first staff member must be a pi")
    first = nktrial("staff", "add", "--id", "pi-01", "--name", "Principal Investigator", "--roles", "pi,investigator",
                    "--channel-tag", "pi", env=env)
    assert first.returncode == 0, first.stderr
    assert "pi-01 (Principal Investigator) added to the staff register as pi, investigator" in first.stdout
    assert "Recorded as bootstrap:site" in first.stdout
    nameless = nktrial("staff", "add", "--id", "nurse-01", "--name", "Nurse One", "--roles", "nurse", env=env)
    _assert_one_sentence(nameless, "say who is writing: give your staff ID before the command, e.g. `nktrial --as nurse-01 record ...`")
    assert nktrial("--as", "pi-01", "staff", "add", "--id", "nurse-01", "--name", "Nurse One", "--roles", "nurse", env=env).returncode == 0
    assert nktrial("staff", "add", "--id", "coord-01", "--name", "Coordinator One", "--roles", "coordinator",
                   env={**env, "NKTRIAL_ACTOR": "pi-01"}).returncode == 0
    _assert_one_sentence(nktrial("--as", "pi-01", "staff", "add", "--id", "coord-01", "--name", "C", "--roles", "coordinator", env=env),
                         "staff ID coord-01 is already on the staff register")
    listed = json.loads(nktrial("staff", "list", "--json", env=env).stdout)
    assert [(r["staff_id"], r["roles"], r["channel_tag"], r["active"]) for r in listed] == [
        ("pi-01", ["pi", "investigator"], "pi", True), ("nurse-01", ["nurse"], "staff:nurse-01", True),
        ("coord-01", ["coordinator"], "staff:coord-01", True)]
    # writes: nobody named, the wrong role, then the right one, then someone deactivated
    _assert_one_sentence(nktrial("enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env), "say who is writing")
    _assert_one_sentence(nktrial("--as", "nurse-01", "enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env),
                         "nurse-01 (nurse) may not screen and enroll a patient: the delegation log gives it to coordinator or investigator")
    _assert_one_sentence(nktrial("--as", "ghost", "enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env),
                         "'ghost' is not a registered staff member")
    assert nktrial("--as", "coord-01", "enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env).returncode == 0
    _assert_one_sentence(nktrial("--as", "coord-01", "off-study", "--subject", "S-001", "--reason", "withdrawal", "--effective-on",
                                 "2026-01-01", env=env),
                         "coord-01 (coordinator) may not put a patient off study: the delegation log gives it to investigator or pi")
    gone = nktrial("--as", "pi-01", "staff", "deactivate", "--id", "coord-01", "--reason", "left the unit", env=env)
    assert gone.returncode == 0 and "coord-01 is no longer active" in gone.stdout
    _assert_one_sentence(nktrial("--as", "coord-01", "enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env),
                         "coord-01 is not active on the staff register at this time")
    assert re.search(r"^coord-01 +Coordinator One +coordinator +staff:coord-01 +no ", nktrial("staff", "list", env=env).stdout, re.M)
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'trial.db'}")
    with Session(engine) as s:
        assert [(r.actor, r.act) for r in s.exec(select(AccessRefusal).order_by(AccessRefusal.id))] == [
            ("nurse-01", "screen and enroll a patient"), ("ghost", "screen and enroll a patient"), ("coord-01", "put a patient off study"),
            ("coord-01", "screen and enroll a patient")]
        staff_audit = {(r.entity_id, r.actor) for r in s.exec(select(AuditLog).where(AuditLog.entity == "staff"))}
    engine.dispose()
    assert staff_audit == {("1", "bootstrap:site"), ("2", "pi-01"), ("3", "pi-01")}


def test_a_malformed_actor_or_a_code_for_a_missing_ae_is_one_sentence(tmp_path):
    env = _staffed_database(tmp_path)
    _assert_one_sentence(nktrial("--as", "Head Nurse", "enroll", str(EXAMPLE), "--day0", "2099-01-31T09:00", env=env),
                         "--as / NKTRIAL_ACTOR: staff ID 'Head Nurse' is not a staff ID")
    _assert_one_sentence(nktrial("--as", "x" * 80, "off-study", "--subject", "S-001", "--reason", "withdrawal", "--effective-on",
                                 "2026-01-01", env=env), "is not a staff ID")
    _assert_one_sentence(nktrial("ae", "code", "--ae", "1", "--signer", "pi-01", env=env), "ae_id 1 does not exist")
