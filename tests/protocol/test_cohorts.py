"""The escalation gate's pure rules: evaluability, cohort readiness, and what the PI may sign."""

from __future__ import annotations

import datetime as dt

import pytest

from protocol.cohorts import (
    PatientRecord,
    allowed_choices,
    check_choice,
    cohort_state,
    declared_mtd,
    design_for,
    evaluable_at_window_close,
)
from protocol.definition import load_protocol
from protocol.errors import UserError
from protocol.three_plus_three import Action, Design, too_toxic

DESIGN = Design(num_levels=3)
T0 = dt.datetime(2027, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def _at(day: int) -> dt.datetime:
    return T0 + dt.timedelta(days=day)


def closed(sid, level=1, cohort=1, day=0):
    return PatientRecord(sid, level, cohort, True, _at(day))


def dlt(sid, level=1, cohort=1, day=0):
    return PatientRecord(sid, level, cohort, True, None, had_dlt=True, dlt_adjudicated_at=_at(day))


def open_window(sid, level=1, cohort=1):
    return PatientRecord(sid, level, cohort, None)


def replaced(sid, level=1, cohort=1):
    return PatientRecord(sid, level, cohort, False)


def test_the_design_has_the_protocol_files_levels_and_cohort_size():
    assert design_for(load_protocol()) == Design(num_levels=3, cohort_size=3)


@pytest.mark.parametrize(("given", "planned", "already", "evaluable"), [
    (2, 2, None, True),
    (1, 2, None, False),
    (0, 2, None, False),
    (1, 2, True, True),  # a DLT made the patient evaluable before the window closed
    (2, 2, False, True),
    (1, 2, False, False),
])
def test_a_patient_is_evaluable_with_every_infusion_or_a_dlt(given, planned, already, evaluable):
    assert evaluable_at_window_close(given, planned, already) is evaluable


@pytest.mark.parametrize(("dlts", "toxic"), [(0, False), (1, False), (2, True), (3, True)])
def test_two_dlts_make_a_level_too_toxic(dlts, toxic):
    assert too_toxic(dlts) is toxic


@pytest.mark.parametrize(("record", "letter", "status"), [
    (dlt("S-1"), "T", "DLT (adjudicated)"),
    (closed("S-1"), "N", "DLT window closed, no DLT"),
    (replaced("S-1"), None, "not evaluable (to be replaced)"),
    (open_window("S-1"), None, "DLT window open"),
    (PatientRecord("S-1", 1, 1, None, _at(0)), None, "DLT window open"),  # closed but evaluability not yet set
])
def test_each_patient_counts_by_their_adjudicated_outcome(record, letter, status):
    [patient] = cohort_state(DESIGN, [record]).patients
    assert (patient.letter, patient.status) == (letter, status)


@pytest.mark.parametrize(("records", "history", "ready", "early", "pending", "action", "basis_day"), [
    ([], "", False, False, [], Action.ENROLL, None),
    ([closed("S-1", day=1), closed("S-2", day=3), closed("S-3", day=2)], "1NNN", True, False, [], Action.ESCALATE, 3),
    ([closed("S-1"), closed("S-2"), open_window("S-3")], "1NN", False, False, ["S-3"], None, None),
    ([closed("S-1"), closed("S-2"), replaced("S-3")], "1NN", False, False, [], None, None),
    ([closed("S-1"), closed("S-2"), replaced("S-3"), closed("S-4", day=5)], "1NNN", True, False, [], Action.ESCALATE, 5),
    ([dlt("S-1", day=1), dlt("S-2", day=4), open_window("S-3")], "1TT", True, True, ["S-3"], Action.STOP, 4),
    ([closed("S-1"), dlt("S-2", day=2), closed("S-3", day=1)], "1NTN", True, False, [], Action.EXPAND, 2),
    ([closed("S-1"), closed("S-2"), closed("S-3"), dlt("S-4", 2, 1, day=9), dlt("S-5", 2, 1, day=8)],
     "1NNN 2TT", True, True, [], Action.DEESCALATE, 9),
])
def test_a_cohort_is_ready_when_its_windows_close_or_a_second_dlt_ends_it(records, history, ready, early, pending, action, basis_day):
    state = cohort_state(DESIGN, records)
    assert (state.history, state.ready, state.early_stop, state.pending) == (history, ready, early, pending)
    assert (state.recommendation.action if state.recommendation else None) == action
    assert state.basis_at == (None if basis_day is None else _at(basis_day))


def test_the_level_under_review_is_the_newest_cohorts():
    state = cohort_state(DESIGN, [closed("S-1"), closed("S-2"), closed("S-3"), open_window("S-4", 2, 1)])
    assert (state.level, state.ready, state.history) == (2, False, "1NNN")


BOLDER = "decision '{a}' is bolder than the 3+3 recommendation '{r}'; choose it or a more cautious action"
TOO_TOXIC = "level {lv} is too toxic; it cannot take more patients"
NO_LEVEL_BELOW = "there is no level below 1 to de-escalate to; choose stop"


@pytest.mark.parametrize(("recommended", "from_level", "early_stop", "allowed"), [
    (Action.ESCALATE, 1, False, {Action.ESCALATE, Action.ENROLL, Action.EXPAND, Action.STOP}),
    (Action.ESCALATE, 2, False, set(Action)),
    (Action.EXPAND, 2, False, {Action.ENROLL, Action.EXPAND, Action.DEESCALATE, Action.STOP}),
    (Action.DEESCALATE, 2, True, {Action.DEESCALATE, Action.STOP}),
    (Action.STOP, 1, True, {Action.STOP}),
    (Action.STOP, 3, False, {Action.STOP}),
])
def test_the_pi_may_choose_the_recommendation_or_a_more_cautious_action(recommended, from_level, early_stop, allowed):
    choices = allowed_choices(recommended, from_level, early_stop)
    assert {a for a, refused in choices.items() if refused is None} == allowed


@pytest.mark.parametrize(("recommended", "from_level", "early_stop", "action", "sentence"), [
    (Action.EXPAND, 1, False, Action.ESCALATE, BOLDER.format(a="escalate", r="expand")),
    (Action.DEESCALATE, 2, True, Action.EXPAND, BOLDER.format(a="expand", r="deescalate")),
    (Action.ESCALATE, 1, False, Action.DEESCALATE, NO_LEVEL_BELOW),
    (Action.STOP, 2, True, Action.DEESCALATE, BOLDER.format(a="deescalate", r="stop")),
])
def test_a_refused_choice_says_why_in_one_sentence(recommended, from_level, early_stop, action, sentence):
    assert allowed_choices(recommended, from_level, early_stop)[action] == sentence


def _check(action, rationale="", *, recommended=Action.ESCALATE, from_level=1, early_stop=False, now="1NNN"):
    return check_choice(decision_id=7, recommended=recommended, recommended_level=from_level + 1 if recommended is Action.ESCALATE else
                        from_level - 1 if recommended is Action.DEESCALATE else from_level if recommended is Action.EXPAND else None,
                        from_level=from_level, early_stop=early_stop, prepared_history="1NNN", current_history=now, action=action,
                        rationale=rationale)


@pytest.mark.parametrize(("kwargs", "level"), [
    (dict(action=Action.ESCALATE), 2),
    (dict(action=Action.EXPAND, rationale="keep 3 more at DL1"), 1),
    (dict(action=Action.ENROLL, rationale="keep 3 more at DL1"), 1),
    (dict(action=Action.STOP, rationale="sponsor decision"), None),
    (dict(action=Action.DEESCALATE, rationale="late toxicity", recommended=Action.EXPAND, from_level=2), 1),
    (dict(action=Action.DEESCALATE, recommended=Action.DEESCALATE, from_level=3, early_stop=True), 2),
])
def test_a_signed_choice_opens_its_level(kwargs, level):
    assert _check(**kwargs) == level


@pytest.mark.parametrize(("kwargs", "sentence"), [
    (dict(action=Action.ESCALATE, recommended=Action.EXPAND), BOLDER.format(a="escalate", r="expand")),
    (dict(action=Action.EXPAND), "rationale is required when choosing 'expand' over the recommendation 'escalate'"),
    (dict(action=Action.STOP, rationale="  "), "rationale is required when choosing 'stop' over the recommendation 'escalate'"),
    (dict(action=Action.ESCALATE, now="1NNT"),
     "decision 7 was prepared for history '1NNN', but the outcomes are now '1NNT'; a new review is needed"),
    (dict(action=Action.DEESCALATE, rationale="why"), NO_LEVEL_BELOW),
    (dict(action=Action.STOP, recommended=Action.STOP, early_stop=True, from_level=2), None),
])
def test_a_choice_the_rule_does_not_allow_is_refused_with_its_sentence(kwargs, sentence):
    if sentence is None:
        assert _check(**kwargs) is None
        return
    with pytest.raises(UserError) as exc:
        _check(**kwargs)
    assert str(exc.value) == sentence


def test_the_boldness_check_comes_before_the_history_check():
    with pytest.raises(UserError, match="bolder"):
        _check(Action.ESCALATE, recommended=Action.EXPAND, now="1NTN")


@pytest.mark.parametrize(("recommended", "action", "mtd", "declared"), [
    (Action.STOP, Action.STOP, 2, 2),
    (Action.STOP, Action.STOP, None, None),
    (Action.EXPAND, Action.STOP, None, None),
    (Action.ESCALATE, Action.STOP, 1, None),  # a PI's early stop declares no MTD
    (Action.DEESCALATE, Action.DEESCALATE, 1, None),
])
def test_an_mtd_is_declared_only_when_the_rule_and_the_pi_both_stop(recommended, action, mtd, declared):
    assert declared_mtd(recommended, action, mtd) == declared


def test_an_early_stop_keeps_the_level_too_toxic_for_more_patients():
    assert allowed_choices(Action.ESCALATE, 2, True)[Action.EXPAND] == TOO_TOXIC.format(lv=2)
