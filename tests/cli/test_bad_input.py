"""Bad input to every command that takes input: one sentence naming the field and the rule, exit status 2, and nothing
written (the audit trail and the outbox are as they were). Most cases run `nktrial.cli.main` in-process against a copy of
one prepared trial database; a few run the real `nktrial` command to show there is no traceback."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from protocol.errors import UserError
from tests.cli.test_cli import EXAMPLE, nktrial

TODAY = dt.datetime.now(ZoneInfo("Asia/Shanghai")).date()
SOON = (TODAY + dt.timedelta(days=3)).isoformat()
INFUSION_1_AT = f"{TODAY - dt.timedelta(days=2)}T09:00"  # so IL-2 dose 3 falls due tomorrow
EARLY = f"{TODAY - dt.timedelta(days=1)}T09:00"
LOT = "L" * 100
SUBJECT = ["--subject", "S-001"]
INFUSION = ["record", "infusion", *SUBJECT, "--number", "2", "--dose-level", "1", "--deviation-reason", "early", "--cells", "1e8"]
AE = ["ae", "report", *SUBJECT, "--term", "rash", "--category", "non_haematological", "--grade", "2", "--attribution", "possible"]
LAB = ["record", "lab", *SUBJECT, "--kind", "donor_nk_count", "--pk-day", "1"]


def _shifted_screening(folder: Path) -> Path:
    """The example screening record a year earlier, so that consent and washouts are in the past on the wall clock."""
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    for key, value in data.items():
        if isinstance(value, str) and len(value) == 10 and value[:4].isdigit():
            data[key] = str(int(value[:4]) - 1) + value[4:]
    path = folder / "screening.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A trial database with the staff, S-001 enrolled, infusion 1 given two days ago, and one AE reported."""
    from models.db import make_engine
    from nktrial.cli import main
    from tests.helpers import register_staff

    folder = tmp_path_factory.mktemp("prepared")
    env = {"NKTRIAL_DATA_DIR": str(folder / "data"), "NKTRIAL_DATABASE_URL": "", "PREFECT_API_URL": "", "NKTRIAL_APPRISE_CONFIG": "",
           "NKTRIAL_ACTOR": "inv-2", "NKTRIAL_PROTOCOL_FILE": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["db", "upgrade"]) == 0
        engine = make_engine(f"sqlite:///{folder / 'data' / 'trial.db'}")
        register_staff(engine)
        engine.dispose()
        assert main(["enroll", str(_shifted_screening(folder)), "--day0", "2099-01-31T09:00"]) == 0
        assert main([*AE, "--onset-on", TODAY.isoformat()]) == 0
        assert main(["--as", "nurse-7", *INFUSION[:4], "--number", "1", "--dose-level", "1", "--cells", "1e8", "--lot", "L1", "--given-at",
                     INFUSION_1_AT]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return folder


@pytest.fixture
def trial(prepared, tmp_path, monkeypatch):
    """A copy of the prepared database, the environment pointing at it; returns the counts that must not change."""
    shutil.copytree(prepared / "data", tmp_path / "data")
    env = {"NKTRIAL_DATA_DIR": str(tmp_path / "data"), "NKTRIAL_DATABASE_URL": "", "PREFECT_API_URL": "", "NKTRIAL_APPRISE_CONFIG": "",
           "NKTRIAL_ACTOR": "inv-2", "NKTRIAL_PROTOCOL_FILE": ""}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def _written(folder: Path) -> tuple[int, int, int]:
    import sqlite3

    con = sqlite3.connect(folder / "data" / "trial.db")
    try:
        return tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("audit_log", "notification_outbox", "access_refusal"))
    finally:
        con.close()


# (actor, argv, a stable part of the sentence)
CASES = [
    # enroll
    ("coord-1", ["enroll", str(EXAMPLE), "--day0", "9999-12-31T23:00"], "--day0 9999-12-31 is not a plausible date"),
    ("coord-1", ["enroll", str(EXAMPLE), "--day0", "0001-01-01T00:00"], "--day0 0001-01-01 is not a plausible date"),
    ("coord-1", ["enroll", str(EXAMPLE), "--day0", "2099-02-30T09:00"], "--day0 '2099-02-30T09:00' is not a local date and time"),
    ("coord-1", ["enroll", str(EXAMPLE), "--day0", "2099-01-31"], "has no time of day"),
    ("coord-1", ["enroll", "missing.json", "--day0", "2099-01-31T09:00"], "cannot be read"),
    # record infusion
    ("nurse-7", [*INFUSION, "--given-at", EARLY, "--lot", LOT], "administration.product_lot is 100 characters; at most 64"),
    ("nurse-7", [*INFUSION[:-2], "--cells", "inf", "--given-at", EARLY, "--lot", "L1"], "cells_infused inf is not a finite number"),
    ("nurse-7", [*INFUSION[:-2], "--cells", "nan", "--given-at", EARLY, "--lot", "L1"], "cells_infused nan is not a finite number"),
    ("nurse-7", [*INFUSION, "--given-at", "9999-12-31T23:00", "--lot", "L1"], "--given-at 9999-12-31 is not a plausible date"),
    ("nurse-7", [*INFUSION, "--given-at", EARLY, "--lot", " "], "product_lot is required"),
    ("nurse-7", [*INFUSION[:-2], "--cells", "-1", "--given-at", EARLY, "--lot", "L1"], "cells_infused must be greater than 0"),
    # record il2
    ("nurse-7", ["record", "il2", *SUBJECT, "--dose", "3", "--missed", "patient away"], "cannot be recorded as missed before it was due"),
    ("nurse-7", ["record", "il2", *SUBJECT, "--dose", "1", "--missed", "x" * 300], "characters"),
    ("nurse-7", ["record", "il2", *SUBJECT, "--dose", "99", "--missed", "x"], "dose"),
    ("nurse-7", ["record", "il2", *SUBJECT, "--dose", "1", "--given-at", "0001-01-01T00:00"], "--given-at 0001-01-01 is not a plausible date"),
    ("nurse-7", ["record", "il2", *SUBJECT, "--dose", "1"], "give exactly one of --given-at"),
    # record visit
    ("inv-2", ["record", "visit", *SUBJECT, "--visit", "1-month", "--done-on", "9999-12-31"], "--done-on 9999-12-31 is not a plausible date"),
    ("inv-2", ["record", "visit", *SUBJECT, "--visit", "1-month", "--done-on", "1800-01-01"], "--done-on 1800-01-01 is not a plausible date"),
    ("inv-2", ["record", "visit", *SUBJECT, "--visit", "1-month", "--done-on", "31/01/2027"], "is not a date like"),
    ("inv-2", ["record", "visit", *SUBJECT, "--visit", "1-month", "--done-on", SOON], "done_on"),
    ("inv-2", ["record", "visit", "--subject", "S-404", "--visit", "1-month", "--done-on", "2026-01-01"], "S-404"),
    # record lab
    ("inv-2", [*LAB, "--sampled-on", "2026-11-01", "--cells-per-ul", "inf"], "donor_nk_cells_per_ul"),
    ("inv-2", [*LAB, "--sampled-on", "2026-11-01", "--cells-per-ul", "nan"], "donor_nk_cells_per_ul"),
    ("inv-2", [*LAB, "--sampled-on", "2026-11-01", "--cells-per-ul", "1e12"], "donor_nk_cells_per_ul"),
    ("inv-2", [*LAB, "--sampled-on", "2026-11-01", "--cells-per-ul", "-3"], "donor_nk_cells_per_ul"),
    ("inv-2", ["record", "lab", *SUBJECT, "--kind", "mrd_mfc", "--mrd", "positive", "--mrd-percent", "inf", "--sampled-on", "2026-11-01"],
     "mrd_percent"),
    ("inv-2", [*LAB, "--sampled-on", "9999-12-31", "--cells-per-ul", "5"], "sampled_on"),
    # off-study
    ("inv-2", ["off-study", *SUBJECT, "--reason", "withdrawal", "--effective-on", "2000-01-01"],
     "effective_on 2000-01-01 is before the date the patient entered the study"),
    ("inv-2", ["off-study", *SUBJECT, "--reason", "withdrawal", "--effective-on", SOON], f"effective_on {SOON} is in the future"),
    ("inv-2", ["off-study", *SUBJECT, "--reason", "withdrawal", "--effective-on", "1066-10-14"], "is not a plausible date"),
    ("inv-2", ["off-study", *SUBJECT, "--reason", "withdrawal", "--effective-on", "soon"], "--effective-on 'soon' is not a date"),
    ("inv-2", ["off-study", "--subject", "S-404", "--reason", "withdrawal", "--effective-on", TODAY.isoformat()], "S-404"),
    # ae report
    ("inv-2", [*AE, "--onset-on", "1900-01-01"], "onset_on 1900-01-01 is before the patient's informed consent"),
    ("inv-2", [*AE, "--onset-on", "1899-12-31"], "not a plausible date"),
    ("inv-2", [*AE, "--onset-on", SOON], "is in the future"),
    ("inv-2", [*AE, "--onset-on", TODAY.isoformat(), "--resolved-on", "2026-01-01"], "is before onset_on"),
    ("inv-2", [*AE[:5], "x" * 200, *AE[6:], "--onset-on", TODAY.isoformat()], "term"),
    ("inv-2", [*AE, "--onset-on", TODAY.isoformat(), "--duration-days=-1"], "duration_days"),
    ("inv-2", [*AE, "--onset-on", TODAY.isoformat(), "--duration-days", "99999999999999999999"], "duration_days"),
    # ae update
    ("inv-2", ["ae", "update", "--ae", "1", "--resolved-on", "2000-01-01", "--reason", "resolved"], "is before onset_on"),
    ("inv-2", ["ae", "update", "--ae", "1", "--resolved-on", SOON, "--reason", "resolved"], "is in the future"),
    ("inv-2", ["ae", "update", "--ae", "1", "--grade", "9", "--reason", "worse"], "grade"),
    ("inv-2", ["ae", "update", "--ae", "1", "--grade", "3", "--reason", "x" * 300], "reason"),
    ("inv-2", ["ae", "update", "--ae", "404", "--grade", "3", "--reason", "worse"], "ae_id 404 does not exist"),
    # escalation paths / oc (no database)
    ("inv-2", ["escalation", "paths", "--limit", "-5"], "--limit -5 must be between 1 and"),
    ("inv-2", ["escalation", "paths", "--limit", "0"], "--limit 0 must be between 1 and"),
    ("inv-2", ["escalation", "paths", "--p", "2,2,2"], "--p values are probabilities"),
    ("inv-2", ["escalation", "paths", "--p", "nan,0.1,0.2"], "--p values are probabilities"),
    ("inv-2", ["escalation", "paths", "--p", "0.1,0.2"], "one DLT probability per dose level (3), got 2"),
    ("inv-2", ["escalation", "oc", "--p", "inf,0.1,0.2"], "--p values are probabilities"),
    ("inv-2", ["escalation", "oc", "--p", "0.1,0.2"], "one DLT probability per dose level (3), got 2"),
    ("inv-2", ["escalation", "oc", "--p", "a,b,c"], "--p 'a,b,c' must be DLT probabilities"),
    ("inv-2", ["escalation", "oc", "--p", "2,2,2"], "--p values are probabilities"),
    ("inv-2", ["escalation", "oc", "--p=-0.1,0.1,0.2"], "--p values are probabilities"),
    # escalation next
    ("inv-2", ["escalation", "next", "1NNN 3NNN"], "skips a level"),
    ("inv-2", ["escalation", "next", "1NNQ"], "unknown letter 'Q'"),
    ("inv-2", ["escalation", "next", "9NNN"], "9"),
    ("inv-2", ["escalation", "next", "1NNNN"], "adds patients to level 1"),
    ("inv-2", ["escalation", "next", "1" + "N" * 10_000], "history"),
    # escalation code / approve (no review is waiting)
    ("pi-01", ["escalation", "code", "--decision", "1"], "decision 1 is not the review waiting now"),
    ("pi-01", ["escalation", "code", "--decision=-1"], "-1 is not a record id"),
    ("pi-01", ["escalation", "code", "--decision", "99999999999999999999"], "99999999999999999999 is not a record id"),
    ("pi-01", ["escalation", "code", "--decision", "1", "--signer", "Head Nurse"], "decision 1 is not the review waiting now"),
    ("pi-01", ["escalation", "code", "--decision", "0"], "0 is not a record id"),
    ("pi-01", ["escalation", "approve", "--decision", "1", "--action", "escalate", "--code", "12345678", "--meaning", "approval"],
     "signature refused: decision 1 does not exist"),
    ("pi-01", ["escalation", "approve", "--decision", "99999999999999999999", "--action", "escalate", "--code", "1", "--meaning", "approval"],
     "99999999999999999999 is not a record id"),
    ("pi-01", ["escalation", "approve", "--decision", "1", "--action", "escalate", "--code", "1" * 500, "--meaning", "approval"],
     "signature refused"),
    ("pi-01", ["escalation", "approve", "--decision", "1", "--action", "escalate", "--code", "1", "--meaning", "x" * 500],
     "signature refused"),
    ("pi-01", ["escalation", "approve", "--decision", "1", "--action", "escalate", "--code", "1", "--meaning", "approval",
               "--rationale", "x" * 5000], "signature refused"),
    # ae adjudicate / code / sae-reported
    ("inv-2", ["ae", "adjudicate", "--ae", "1", "--confirm", "--reason", "x", "--code", "12345678"], "AE 1 is not a candidate DLT"),
    ("inv-2", ["ae", "adjudicate", "--ae", "404", "--confirm", "--reason", "x", "--code", "12345678"], "404"),
    ("inv-2", ["ae", "adjudicate", "--ae", "1", "--confirm", "--reason", " ", "--code", "12345678"], "reason is required"),
    ("inv-2", ["ae", "adjudicate", "--ae", "1", "--reject", "--reason", "x" * 300, "--code", "12345678"], "at most 200"),
    ("inv-2", ["ae", "adjudicate", "--ae", "99999999999999999999", "--reject", "--reason", "x", "--code", "1"],
     "99999999999999999999 is not a record id"),
    ("pi-01", ["ae", "code", "--ae", "1"], "AE 1 is not a candidate DLT"),
    ("pi-01", ["ae", "code", "--ae", "404"], "ae_id 404 does not exist"),
    ("pi-01", ["ae", "code", "--ae=-1"], "-1 is not a record id"),
    ("pi-01", ["ae", "code", "--ae", "99999999999999999999"], "99999999999999999999 is not a record id"),
    ("pi-01", ["ae", "code", "--ae", "404", "--signer", "ghost"], "ae_id 404 does not exist"),
    ("inv-2", ["ae", "sae-reported", "--ae", "1"], "ae_id 1 is not a serious adverse event"),
    ("inv-2", ["ae", "sae-reported", "--ae", "404"], "ae_id 404"),
    ("inv-2", ["ae", "sae-reported", "--ae", "0"], "0 is not a record id"),
    ("inv-2", ["ae", "sae-reported", "--ae=-7"], "-7 is not a record id"),
    ("inv-2", ["ae", "sae-reported", "--ae", "99999999999999999999"], "99999999999999999999 is not a record id"),
    ("inv-2", ["ae", "sae-reported", "--ae", "one"], "'one' is not a record id"),
    # staff add / deactivate
    ("pi-01", ["staff", "add", "--id", "Nurse Two", "--name", "Nurse Two", "--roles", "nurse"], "staff ID"),
    ("pi-01", ["staff", "add", "--id", "nurse-2", "--name", "x" * 200, "--roles", "nurse"], "printed_name"),
    ("pi-01", ["staff", "add", "--id", "nurse-2", "--name", "Nurse Two", "--roles", "janitor"], "janitor"),
    ("pi-01", ["staff", "add", "--id", "nurse-2", "--name", "Nurse Two", "--roles", "nurse", "--active-from", "9999-12-31T23:00"],
     "not a plausible date"),
    ("pi-01", ["staff", "add", "--id", "nurse-7", "--name", "Nurse Seven", "--roles", "nurse"], "nurse-7 is already on the staff register"),
    ("pi-01", ["staff", "add", "--id", "nurse-2", "--name", "Nurse Two", "--roles", "nurse", "--channel-tag", "t" * 100], "channel"),
    ("pi-01", ["staff", "deactivate", "--id", "ghost", "--reason", "left"], "ghost"),
    ("pi-01", ["staff", "deactivate", "--id", "nurse-7", "--reason", " "], "reason"),
    ("pi-01", ["staff", "deactivate", "--id", "nurse-7", "--reason", "x" * 1000], "--reason is 1000 characters; at most 200"),
    ("pi-01", ["staff", "deactivate", "--id", "x" * 100, "--reason", "left"], "x" * 10),
    ("pi-01", ["staff", "deactivate", "--id", "nurse-1", "--reason", "x" * 201], "--reason is 201 characters; at most 200"),
    # screen
    ("inv-2", ["screen", "/dev/zero"], "screening file /dev/zero: is not a regular file"),
    ("inv-2", ["screen", "{file}"], "is not valid JSON"),
    ("inv-2", ["screen", "missing.json"], "cannot be read"),
    ("inv-2", ["screen", str(EXAMPLE), "--day0", "9999-12-31"], "--day0 9999-12-31 is not a plausible date"),
    ("inv-2", ["screen", str(EXAMPLE), "--day0", "tomorrow"], "--day0 'tomorrow' is not a date"),
    # calendar
    ("inv-2", ["calendar", "--dose-level", "1", "--day0", "9999-12-31T23:00"], "--day0 9999-12-31 is not a plausible date"),
    ("inv-2", ["calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00", "--actual", "2=9999-12-31T23:00"], "not a plausible date"),
    ("inv-2", ["calendar", "--dose-level", "4", "--day0", "2027-01-31T09:00"], "dose level 4 does not exist"),
    ("inv-2", ["calendar", "--dose-level", "1", "--day0", "0001-01-01T00:00"], "not a plausible date"),
    ("inv-2", ["calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00+08:00"], "has a UTC offset"),
    # protocol show
    ("inv-2", ["--protocol", "/dev/zero", "protocol", "show"], "protocol file /dev/zero: is not a regular file"),
    ("inv-2", ["--protocol", "{file}", "protocol", "show"], "protocol file"),
    ("inv-2", ["--protocol", "missing.yaml", "protocol", "show"], "protocol file missing.yaml: cannot be read"),
    ("inv-2", ["--protocol", "/etc", "protocol", "show"], "is not a regular file"),
    ("inv-2", ["--protocol", str(EXAMPLE), "protocol", "show"], "protocol file"),
    # reports and simulate: outputs that cannot be written
    ("inv-2", ["report", "all", "--out", "{file}"], "is a file, not a folder"),
    ("inv-2", ["report", "swimmer", "--out", "{file}/x.png"], "is a file, not a folder"),
    ("inv-2", ["report", "swimmer", "--out", "/proc/nktrial-nowhere/x.png"], "cannot be created"),
    ("inv-2", ["simulate", "no-dlt", "--out", "{file}"], "is a file, not a folder"),
    ("inv-2", ["report", "all", "--out", "/proc/nktrial-nowhere"], "cannot be created"),
    ("inv-2", ["report", "all", "--out", "{file}/sub"], "cannot be created"),
    ("inv-2", ["simulate", "no-dlt", "--reports-every", "0"], "--reports-every 0"),
    ("inv-2", ["simulate", "no-dlt", "--reports-every", "99999999999999999999"], "--reports-every 99999999999999999999"),
    ("inv-2", ["simulate", "no-such-scenario"], "is neither a file nor a shipped scenario"),
    ("inv-2", ["simulate", "{file}"], "scenario"),
    ("inv-2", ["simulate", "no-dlt", "--api-url", "ftp://x"], "--api-url 'ftp://x' is not a Prefect API address"),
]


@pytest.mark.parametrize(("actor", "argv", "sentence"), CASES, ids=[f"{i:02d}-{' '.join(c[1][:2])}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(trial, capsys, actor, argv, sentence):
    from nktrial.cli import main

    a_file = trial / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")
    argv = [x.replace("{file}", str(a_file)) for x in argv]
    before = _written(trial)
    try:
        status = main(["--as", actor, *argv])
    except SystemExit as exit_:  # argparse's own refusal: "nktrial ...: error: argument --x: ..." and the usage line
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and sentence in errors[0], err  # a warning about the outbox may come before it
    assert "Traceback" not in err
    assert _written(trial) == before


# Settings a person can get wrong, and a database not yet made: one sentence, from the real command.
def _env_cases(folder: Path) -> list[tuple[list[str], dict, str]]:
    a_file, junk = folder / "a-file", folder / "junk.db"
    a_file.write_text("x", encoding="utf-8")
    junk.write_bytes(b"this is not a database file" * 100)
    return [
        (["db", "status"], {"NKTRIAL_DATABASE_URL": "mysql://user@127.0.0.1/trial"}, "this database kind is not supported"),
        (["db", "status"], {"NKTRIAL_DATA_DIR": str(a_file)}, "is a file, not a folder"),
        (["db", "status"], {"NKTRIAL_DATABASE_URL": f"sqlite:///{junk}"}, "cannot be read as a database"),
        (["escalation", "status"], {"NKTRIAL_DATA_DIR": str(folder / "empty")}, "run `nktrial db upgrade` first"),
        (["notify", "list", "--limit", "99999999999999999999"], {"NKTRIAL_DATA_DIR": str(folder / "empty2")}, "--limit"),
        (["calendar", "--dose-level", "1", "--day0", "9999-12-31T23:00"], {}, "not a plausible date"),
    ]


def test_bad_settings_from_the_real_command_are_one_sentence_with_no_traceback(tmp_path):
    base = {"NKTRIAL_DATABASE_URL": "", "NKTRIAL_DATA_DIR": str(tmp_path / "data"), "PREFECT_API_URL": "", "NKTRIAL_ACTOR": "inv-2"}
    for argv, env, sentence in _env_cases(tmp_path):
        out = nktrial(*argv, env={**base, **env})
        assert out.returncode == 2, (argv, out.stderr)
        assert sentence in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)


@pytest.mark.parametrize(("column", "length"), [("printed_name", 121), ("printed_name", 500), ("roles", 201), ("channel_tag", 65)])
def test_text_too_long_for_its_column_is_the_same_sentence_on_both_engines_and_nothing_is_written(engine, column, length):
    """PostgreSQL would fail mid-transaction (StringDataRightTruncation) and SQLite would store it whole: both refuse it
    before the database sees it, naming table.column and the limit."""
    import sqlalchemy as sa

    from models.db import UnitOfWork
    from models.tables import AuditLog, Staff

    values = {"staff_id": "nurse-99", "printed_name": "Nurse", "roles": "nurse", "channel_tag": "staff:nurse-99", column: "x" * length}
    limit = {"printed_name": 120, "roles": 200, "channel_tag": 64}[column]
    with pytest.raises(UserError) as refused, UnitOfWork(engine, actor="system:test", reason="a test write") as u:
        u.session.add(Staff(**values, active_from_at=u.at, created_at=u.at))
        u.commit()
    assert str(refused.value) == f"staff.{column} is {length} characters; at most {limit} are allowed"
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Staff)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(AuditLog)).scalar() == 0
