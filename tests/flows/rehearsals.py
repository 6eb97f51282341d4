"""What the scenario rehearsal tests share: the session's rehearsals and the check every rehearsal passes.

Each shipped scenario's tests are in a file of their own, tests/flows/test_rehearsal_*.py
(REHEARSAL_FILES; withdrawal-replacement and missed-il2 share one). make test runs a test file whole in one of its two processes (pytest-xdist
--dist loadfile), so a scenario is rehearsed once, in the process that runs its file, and the
rehearsals are shared by both processes; tests/conftest.py hands the longest files out first.
"""

from __future__ import annotations

import csv

import pytest
from sqlmodel import Session, select

from models.db import make_engine
from models.tables import EscalationDecision
from nktrial.rehearsal import rehearse
from nktrial.scenario import load
from protocol.cohorts import design_for
from protocol.definition import load_protocol
from protocol.three_plus_three import Action

P = load_protocol()

# The file that rehearses each scenario. withdrawal-replacement and missed-il2 share one: a test reads both.
REHEARSAL_FILES = {
    "tests/flows/test_rehearsal_two_dlts.py": ("two-dlts-deescalation",),
    "tests/flows/test_rehearsal_no_dlt.py": ("no-dlt",),
    "tests/flows/test_rehearsal_one_of_three.py": ("one-of-three-expansion",),
    "tests/flows/test_rehearsal_late_infusion.py": ("late-infusion",),
    "tests/flows/test_rehearsal_withdrawal_missed_il2.py": ("withdrawal-replacement", "missed-il2"),
}
SCENARIOS = [name for names in REHEARSAL_FILES.values() for name in names]


@pytest.fixture(scope="session")
def rehearsed(prefect_server, receiver, tmp_path_factory):
    """Rehearse a shipped scenario once per test process; every message goes to the session receiver (and its privacy
    check)."""
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


def ends_where_the_3_plus_3_rules_say(res, engine) -> None:
    """The rehearsal's final state, every decision the PI signed and every review it opened, against the 3+3 rules."""
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
