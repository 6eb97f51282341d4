"""The rehearsal around the scenarios: every shipped scenario file is rehearsed by a test file, `nktrial simulate`
on a temporary server and on a running one, a bad scenario, and the 3+3 check itself.

The scenarios themselves are rehearsed through the real deployments on the session's Prefect
server, in virtual time, with notices sent to the real receiver, in tests/flows/test_rehearsal_*.py
(one file per scenario, or two that a test reads together; tests/flows/rehearsals.py): the final state is checked against the 3+3 rules
replayed independently, and the reports are read back."""

from __future__ import annotations

import csv
import datetime as dt
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nktrial.scenario import load, shipped
from protocol.cohorts import design_for
from tests.conftest import LONG_FIRST
from tests.flows.rehearsals import REHEARSAL_FILES, SCENARIOS, P

ROOT = Path(__file__).parents[2]


def test_every_scenario_file_is_shipped_valid_and_rehearsed_by_a_test_file():
    names = {p.stem for p in shipped()}
    assert names == set(SCENARIOS) and len(SCENARIOS) == len(names)
    for name in names:
        sc = load(name)
        assert sc.expect is not None, f"{name} states what the rules imply"
    for path, group in REHEARSAL_FILES.items():  # and each is rehearsed, and checked against the rules, by its file's test
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        (mark,) = module.test_the_rehearsal_ends_where_the_3_plus_3_rules_say.pytestmark
        assert mark.args == ("name", list(group)), path
    assert set(REHEARSAL_FILES) <= set(LONG_FIRST), "make test hands every rehearsal file out first (tests/conftest.py)"


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
    # a temporary server is thrown away at the end: its rounds draw the reports and views once, at the close
    assert _refreshed_on(tmp_path / "out" / "events.csv") == ["closing"]


def _refreshed_on(event_log: Path) -> list[str]:
    """The rounds of the event log that refreshed the reports and the views: their site dates, "closing" for the last."""
    rows = [r for r in csv.DictReader(event_log.read_text(encoding="utf-8").splitlines()) if r["kind"] == "rounds"]
    for r in rows:  # each rounds says whether it drew them
        drew = "report files written" in r["result"] and "worklist:" in r["result"]
        skipped = "reports not refreshed this time" in r["result"] and "worklist and casebooks not refreshed" in r["result"]
        assert drew != skipped, r["result"]
    return [("closing" if "closing" in r["name"] else r["site_time"][:10]) for r in rows if "report files written" in r["result"]]


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
    # a running server's UI shows them as the rehearsal goes: every 7th virtual day and at the close
    start = dt.date.fromisoformat(str(yaml.safe_load(future.read_text(encoding="utf-8"))["start"]))
    week = [(start + dt.timedelta(days=d)).isoformat() for d in (0, 7, 14)]
    assert _refreshed_on(tmp_path / "o" / "events.csv") == [*week, "closing"]


def test_a_bad_scenario_gets_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntitle: x\nstart: 2027-03-01\npatients:\n  - {id: P-1}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nktrial: error: scenario bad.yaml: field 'patients.0.id'")
    proc = subprocess.run([sys.executable, "-m", "nktrial", "simulate", "no-such-scenario"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "shipped: " in proc.stderr and "no-dlt" in proc.stderr


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
