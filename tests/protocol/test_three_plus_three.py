"""The 3+3 decision table, and the refusal of histories that break it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import HistoryError
from protocol.three_plus_three import Action, Design

DESIGN = Design(num_levels=3)


@pytest.mark.parametrize(
    ("history", "action", "level", "patients", "mtd"),
    [
        ("", Action.ENROLL, 1, 3, None),
        ("1NNN", Action.ESCALATE, 2, 3, None),
        ("1NTN", Action.EXPAND, 1, 3, None),
        ("1NNN 2NNN 3NNN", Action.EXPAND, 3, 3, None),
        ("1NNN 2TT", Action.DEESCALATE, 1, 3, None),
        ("1TT", Action.STOP, None, 0, None),
        ("1TNT", Action.STOP, None, 0, None),
        ("1TTN", Action.STOP, None, 0, None),
        ("1NTN 1NNN", Action.ESCALATE, 2, 3, None),
        ("1NTN 1NTN", Action.STOP, None, 0, None),
        ("1NTN 1NTT", Action.STOP, None, 0, None),
        ("1NNN 2NTN 2NNN", Action.ESCALATE, 3, 3, None),
        ("1NNN 2NNN 3NNN 3NNN", Action.STOP, None, 0, 3),
        ("1NNN 2NNN 3NNN 3NTN", Action.STOP, None, 0, 3),
        ("1NNN 2NNN 3NNN 3TT", Action.DEESCALATE, 2, 3, None),
        ("1NNN 2NNN 3NNN 3TT 2NNN", Action.STOP, None, 0, 2),
        ("1NNN 2NNN 3NTT", Action.DEESCALATE, 2, 3, None),
        ("1NNN 2NNN 3NTT 2NTN", Action.STOP, None, 0, 2),
        ("1NNN 2NNN 3NTT 2TNT", Action.DEESCALATE, 1, 3, None),
        ("1NNN 2NNN 3NTT 2TNT 1NNN", Action.STOP, None, 0, 1),
        ("1NTN 1NNN 2NTN 2NNN 3TT", Action.STOP, None, 0, 2),
        ("1NTN 1NNN 2TT", Action.STOP, None, 0, 1),
        ("1NNN 2TT 1NTT", Action.STOP, None, 0, None),
    ],
)
def test_the_decision_table(history, action, level, patients, mtd):
    d = DESIGN.next_action(history)
    assert (d.action, d.dose_level, d.patients, d.mtd) == (action, level, patients, mtd)
    assert d.reason


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ("1NNN 3NNN", "skips a level"),
        ("2NNN", "skips a level"),
        ("1NNN 1NNN", "adds patients to level 1, which had 0 DLT in 3"),
        ("1NNN 2TT 1NNN 2NNN", "after 3+3 stopped"),
        ("1NNN 2NTT 1NNN 2N", "after 3+3 stopped"),
        ("1NNN 2TT 1NTN 2NNN", "after 3+3 stopped"),
        ("1NNN 2NNN 3NTT 2NNN 3NNN", "after 3+3 stopped"),
        ("1NNN 2NNN 3NTT 2TNT 3NNN", "returns to level 3, already declared too toxic"),
        ("1NNX", "unknown letter 'X'"),
        ("1nnn", "unknown letter 'n'"),
        ("1NN", "has 2 patients"),
        ("1NNNN", "has 4 patients"),
        ("1TTN 1NNN", "after 3+3 stopped"),
        ("1TT N", "not in outcome notation"),
        ("4NNN", "level 4, which does not exist"),
        ("0NNN", "level 0, which does not exist"),
        ("NNN", "not in outcome notation"),
        ("1TNN 2NNN", "is at level 2, but 3+3 said expand at level 1"),
    ],
)
def test_histories_that_break_3_plus_3_are_refused_in_one_sentence(history, message):
    with pytest.raises(HistoryError, match=re.escape(message)) as err:
        DESIGN.next_action(history)
    assert "\n" not in str(err.value)


@st.composite
def trial_paths(draw):
    """Play a whole trial: each cohort's outcomes are drawn, its level is what 3+3 says."""
    cohorts = []
    while True:
        d = DESIGN.next_action(" ".join(cohorts))
        if d.action is Action.STOP:
            return cohorts, d
        letters = ""
        tally = sum(c[1:].count("T") for c in cohorts if int(c[0]) == d.dose_level)
        for _ in range(d.patients):
            letters += draw(st.sampled_from("NT"))
            if tally + letters.count("T") >= 2:
                break  # a second DLT at a level ends the cohort at once
        cohorts.append(f"{d.dose_level}{letters}")


@settings(max_examples=500, deadline=None)
@given(trial_paths())
def test_every_path_ends_within_the_design_bounds(path):
    cohorts, final = path
    per_level: dict[int, int] = {}
    for c in cohorts:
        per_level[int(c[0])] = per_level.get(int(c[0]), 0) + len(c) - 1
    assert all(n <= 6 for n in per_level.values())
    assert sum(per_level.values()) <= 18
    if final.mtd is not None:
        dlts = sum(c[1:].count("T") for c in cohorts if int(c[0]) == final.mtd)
        assert per_level[final.mtd] == 6 and dlts <= 1
        assert final.mtd == 3 or sum(c[1:].count("T") for c in cohorts if int(c[0]) == final.mtd + 1) >= 2


@settings(max_examples=300, deadline=None)
@given(trial_paths())
def test_the_same_history_gives_the_same_decision_when_replayed(path):
    cohorts, final = path
    assert DESIGN.next_action(" ".join(cohorts)) == final
    assert DESIGN.next_action("  " + "   ".join(cohorts) + " ") == final


@pytest.mark.parametrize(
    ("history", "action", "level", "patients", "mtd"),
    [
        ("", Action.ENROLL, 1, 3, None),
        ("1N", Action.ENROLL, 1, 2, None),
        ("1NTNNNN", Action.ESCALATE, 2, 3, None),
        ("1NNN 2NT", Action.ENROLL, 2, 1, None),
        ("1NNN 2NTNNNN", Action.ESCALATE, 3, 3, None),
        ("1NNN 2NTNNN", Action.ENROLL, 2, 1, None),
        ("1NNN 2NNN 3NNNNNN", Action.STOP, None, 0, 3),
        ("1NNN 2NNN 3NNNNT", Action.ENROLL, 3, 1, None),
        ("1NNN 2TT", Action.DEESCALATE, 1, 3, None),
        ("1NTNT", Action.STOP, None, 0, None),
        ("1NNN 2NNN 3TT 2NN", Action.ENROLL, 2, 1, None),
    ],
)
def test_the_full_notation_reads_a_level_as_one_group_and_a_cohort_still_filling(history, action, level, patients, mtd):
    d = DESIGN.next_action_in_full_notation(history)
    assert (d.action, d.dose_level, d.patients, d.mtd) == (action, level, patients, mtd)
    assert d.reason


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ("1NNN 3N", "skips a level"),
        ("1NNNN", "adds patients to level 1, which had 0 DLT in 3"),
        ("1TT 1N", "after 3+3 stopped"),
        ("1NTTN", "after 3+3 stopped"),
        ("1NNN 2NNN 3NTT 3N", "goes on after the second DLT ended it"),
        ("1NNX", "unknown letter 'X'"),
        ("1TNN 2N", "is at level 2, but 3+3 said expand at level 1"),
    ],
)
def test_the_full_notation_still_refuses_impossible_histories_in_one_sentence(history, message):
    with pytest.raises(HistoryError, match=re.escape(message)) as err:
        DESIGN.next_action_in_full_notation(history)
    assert "\n" not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(trial_paths())
def test_writing_a_levels_cohorts_as_one_group_changes_no_decision(path):
    cohorts, final = path
    grouped: list[str] = []
    for c in cohorts:
        if grouped and grouped[-1][0] == c[0]:
            grouped[-1] += c[1:]
        else:
            grouped.append(c)
    assert DESIGN.next_action_in_full_notation(" ".join(cohorts)) == final
    assert DESIGN.next_action_in_full_notation(" ".join(grouped)) == final
