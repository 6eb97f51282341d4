"""The two-dlts-deescalation rehearsal: two DLTs stop a cohort early, the level below is expanded, the SDTM AE domain."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlmodel import Session, select

from models.tables import EscalationDecision
from tests.flows.rehearsals import ends_where_the_3_plus_3_rules_say


@pytest.mark.parametrize("name", ["two-dlts-deescalation"])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    ends_where_the_3_plus_3_rules_say(*rehearsed(name)[:2])


def test_two_dlts_stop_the_cohort_early_and_de_escalate(rehearsed):
    res, engine, _ = rehearsed("two-dlts-deescalation")
    assert res.decisions[2]["history"] == "1NNN 2NNN 3TT"  # the review did not wait for S-209's window
    with Session(engine) as s:
        assert s.exec(select(EscalationDecision).where(EscalationDecision.history == "1NNN 2NNN 3TT")).one().early_stop
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    assert any("SAE deadline" in e["name"] for e in log if e["kind"] == "run")  # the serious AE's 24 h clock ran as its own run
    s209 = next(p for p in res.patients if p["subject_id"] == "S-209")
    assert (s209["dose_level"], s209["status"], s209["evaluable"]) == (3, "completed", True)


def test_the_sdtm_ae_domain_from_a_trial_with_dlts(rehearsed):
    res, engine, _ = rehearsed("two-dlts-deescalation")
    rows = list(csv.DictReader(open(Path(res.reports) / "sdtm" / "ae.csv", encoding="utf-8")))
    assert [(r["USUBJID"], r["AETOXGR"], r["AESER"], r["AEREL"], r["AESTDY"]) for r in rows] == [
        ("NCT06641648-S-207", "3", "Y", "PROBABLE", "6"), ("NCT06641648-S-208", "3", "N", "DEFINITE", "7")]
    required = ["STUDYID", "DOMAIN", "USUBJID", "AESEQ", "AETERM", "AEDECOD", "AETOXGR", "AESER", "AEREL", "AESTDTC", "AESTDY"]
    assert all(r[c] for r in rows for c in required)
