"""Exact operating characteristics: every path enumerated, checked against closed forms."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.operating import dose_paths, operating_characteristics
from protocol.three_plus_three import Action, Design

THREE = Design(num_levels=3)


def test_every_path_is_a_valid_history_that_ends_in_a_stop():
    paths = dose_paths(THREE)
    assert len({p.history for p in paths}) == len(paths)
    for path in paths:
        assert THREE.next_action(path.history) == path.final  # the history passes the gate-keeper and replays
        assert path.final.action is Action.STOP


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=3, max_size=3))
def test_path_probabilities_sum_to_one(p):
    oc = operating_characteristics(THREE, p)
    assert math.isclose(sum(oc.p_mtd.values()) + oc.p_no_tolerable_dose, 1.0, abs_tol=1e-9)
    assert all(0 <= n <= 6 + 1e-9 for n in oc.expected_patients.values())


@pytest.mark.parametrize("p", [0.0, 0.05, 0.15, 0.3, 0.5, 0.9, 1.0])
def test_escalating_from_one_level_matches_the_closed_form(p):
    """P(escalate | p) = (1−p)³ + 3p(1−p)⁵: 0 of 3, or 1 of 3 then 0 of 3."""
    two = Design(num_levels=2)
    reached = sum(path.probability([p, 0.5]) for path in dose_paths(two) if any(c.dose_level == 2 for c in path.cohorts))
    assert math.isclose(reached, (1 - p) ** 3 + 3 * p * (1 - p) ** 5, abs_tol=1e-12)


def test_a_single_level_declares_itself_mtd_with_the_closed_form_probability():
    p = 0.2
    oc = operating_characteristics(Design(num_levels=1), [p])
    q = 1 - p
    at_most_one_in_next_three = q ** 3 + 3 * p * q ** 2
    assert math.isclose(oc.p_mtd[1], q ** 3 * at_most_one_in_next_three + 3 * p * q ** 2 * q ** 3, abs_tol=1e-12)


def test_no_toxicity_always_reaches_the_top_with_twelve_patients():
    oc = operating_characteristics(THREE, [0, 0, 0])
    assert oc.p_mtd == {1: 0, 2: 0, 3: 1.0}
    assert oc.expected_patients == {1: 3, 2: 3, 3: 6}


def test_certain_toxicity_stops_at_level_one_after_two_patients():
    oc = operating_characteristics(THREE, [1, 1, 1])
    assert oc.p_no_tolerable_dose == 1.0 and oc.expected_patients[1] == 2 and oc.expected_dlts[1] == 2


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="one DLT probability per dose level"):
        operating_characteristics(THREE, [0.1, 0.2])
    with pytest.raises(ValueError, match="between 0 and 1"):
        operating_characteristics(THREE, [0.1, 0.2, 1.5])
