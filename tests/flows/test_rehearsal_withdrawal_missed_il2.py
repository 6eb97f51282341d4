"""The withdrawal-replacement and missed-il2 rehearsals, and the swimmer lanes of both."""

from __future__ import annotations

import csv
import datetime as dt

import pytest
from sqlmodel import Session, select

from models.tables import Administration, AdministrationKind, Subject
from tests.flows.rehearsals import P, ends_where_the_3_plus_3_rules_say


@pytest.mark.parametrize("name", ["withdrawal-replacement", "missed-il2"])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    ends_where_the_3_plus_3_rules_say(*rehearsed(name)[:2])


def test_a_withdrawal_opens_a_replacement_slot_the_waitlisted_patient_takes(rehearsed):
    res, engine, _ = rehearsed("withdrawal-replacement")
    log = list(csv.DictReader(open(res.event_log, encoding="utf-8")))
    referrals = [(e["name"], e["result"]) for e in log if e["kind"] == "referral" and e["name"].startswith("S-404")]
    assert "Waitlisted" in referrals[0][1] and "Enrolled" in referrals[-1][1]
    assert any("coordinator: S-402 · not evaluable: a replacement slot is open" in e["notices"] for e in log)
    by = {p["subject_id"]: p for p in res.patients}
    assert by["S-402"]["evaluable"] is False and (by["S-404"]["cohort"], by["S-404"]["evaluable"]) == (1, True)


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
