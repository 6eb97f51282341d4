"""The rules a recorded entry keeps: one row per case, each broken rule one sentence."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from protocol import recording as rules
from protocol.eligibility import CriterionResult, ScreeningResult, Status, Verdict
from protocol.errors import UserError
from protocol.recording import MrdStatus, Response

D = dt.date
OK = None  # the row's rule holds: no error


def _outcome(call):
    """None when the rule holds, else the sentence it raised."""
    try:
        call()
    except UserError as exc:
        return str(exc)
    return None


def _check(call, expected):
    got = _outcome(call)
    if expected is None:
        assert got is None
    else:
        assert got is not None and re.search(expected, got), got


# -- any entry ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("at", "today", "expected"), [
    (D(2027, 2, 1), D(2027, 2, 1), OK),
    (D(2027, 1, 31), D(2027, 2, 1), OK),
    (D(2027, 2, 2), D(2027, 2, 1), r"^done_on 2027-02-02 is in the future; record what was done, when it was done$"),
    (dt.datetime(2027, 2, 1, 9, 1), dt.datetime(2027, 2, 1, 9, 0), r"^done_on 2027-02-01 09:01:00 is in the future"),
])
def test_nothing_is_recorded_ahead_of_time(at, today, expected):
    _check(lambda: rules.no_future("done_on", at, today), expected)


WINDOW = (D(2027, 2, 14), D(2027, 2, 17))


@pytest.mark.parametrize(("on", "reason", "stored", "expected"), [
    (D(2027, 2, 14), None, None, OK),
    (D(2027, 2, 17), "late bus", "late bus", OK),
    (D(2027, 2, 18), "  patient unwell  ", "patient unwell", OK),
    (D(2027, 2, 13), "   ", None, r"^NK infusion 2 on 2027-02-13 is outside its window 2027-02-14 to 2027-02-17; "
                                   r"give a deviation_reason to record it anyway$"),
    (D(2027, 2, 18), None, None, r"outside its window"),
])
def test_an_entry_outside_its_window_needs_a_deviation_reason(on, reason, stored, expected):
    _check(lambda: rules.in_window("NK infusion 2", on, *WINDOW, reason), expected)
    if expected is None:
        assert rules.in_window("NK infusion 2", on, *WINDOW, reason) == stored


# -- enrollment -----------------------------------------------------------------------------------

def _screened(earliest: D | None) -> ScreeningResult:
    limit = f"day 0 on or after {earliest} (more than 3 days after 2027-01-20)" if earliest else "n/a"
    criteria = [
        CriterionResult(id="E2.systemic_steroid", kind="exclusion", text="steroids", status=Status.MET, value="x", limit=limit, reason=""),
        CriterionResult(id="I1.age", kind="inclusion", text="age", status=Status.MET, value="40", limit=limit, reason=""),
    ]
    return ScreeningResult(subject_id="S-001", protocol_version="v", verdict=Verdict.ELIGIBLE, day0_on=None, earliest_day0_on=earliest,
                           earliest_day0_is_lower_bound=False, criteria=criteria)


@pytest.mark.parametrize(("earliest", "day0", "today", "expected"), [
    (D(2027, 1, 24), D(2027, 1, 24), D(2027, 1, 20), OK),
    (None, D(2027, 1, 20), D(2027, 1, 20), OK),
    (D(2027, 1, 24), D(2027, 1, 23), D(2027, 1, 20),
     r"^planned_day0 2027-01-23 is before the earliest permissible date 2027-01-24 \(E2.systemic_steroid\); choose 2027-01-24 or later$"),
    (D(2027, 1, 24), D(2027, 1, 25), D(2027, 1, 26), r"^planned_day0 2027-01-25 is in the past; plan infusion 1 for today or later$"),
])
def test_day_0_is_neither_before_the_washouts_nor_in_the_past(earliest, day0, today, expected):
    _check(lambda: rules.check_planned_day0(_screened(earliest), day0, today), expected)


@pytest.mark.parametrize(("stagger", "sentinel", "day0", "expected"), [
    (0, ("S-001", D(2027, 2, 1)), D(2027, 2, 1), OK),
    (7, None, D(2027, 2, 1), OK),
    (7, ("S-001", D(2027, 2, 1)), D(2027, 2, 8), OK),
    (7, ("S-001", D(2027, 2, 1)), D(2027, 2, 7),
     r"^planned_day0 2027-02-07 is too soon after the sentinel S-001 \(day 0 2027-02-01\): "
     r"the protocol staggers patients by 7 days, so choose 2027-02-08 or later$"),
])
def test_with_a_sentinel_stagger_the_cohort_waits_after_its_first_patient(stagger, sentinel, day0, expected):
    sid, on = sentinel or (None, None)
    _check(lambda: rules.check_sentinel_stagger(day0, stagger_days=stagger, sentinel_id=sid, sentinel_day0_on=on), expected)


@pytest.mark.parametrize(("enrolled", "cohort"), [
    ([], 1),
    ([(1, None), (1, None)], 1),
    ([(1, None), (1, True), (1, None)], 2),
    ([(1, None), (1, False), (1, True)], 1),  # a replaced patient does not count
    ([(1, True), (1, True), (1, True), (2, None)], 2),
    ([(1, True), (1, True), (1, True), (2, True), (2, None), (2, True)], 3),
])
def test_a_patient_joins_the_first_cohort_with_room(enrolled, cohort):
    assert rules.cohort_with_room(enrolled, 3) == cohort


# -- NK infusions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("number", "lot", "cells", "expected"), [
    (1, "LOT-1", 1e8, OK),
    (2, "LOT-2", 1e8, OK),
    (0, "LOT-1", 1e8, r"^infusion_number 0 does not exist; the protocol has infusions 1 to 2$"),
    (3, "LOT-1", 1e8, r"^infusion_number 3 does not exist; the protocol has infusions 1 to 2$"),
    (1, "  ", 1e8, r"^product_lot is required: every infusion records the product lot it came from$"),
    (1, "LOT-1", 0, r"^cells_infused must be greater than 0$"),
])
def test_an_infusion_exists_names_its_lot_and_infused_cells(protocol, number, lot, cells, expected):
    _check(lambda: rules.check_infusion_entry(protocol, infusion_number=number, product_lot=lot, cells_infused=cells), expected)


@pytest.mark.parametrize(("level", "cells", "reason", "expected"), [
    (1, 1.0e8, None, OK),
    (1, 1.2e8, None, OK),
    (1, 0.8e8, None, OK),
    (1, 1.3e8, "short bag", OK),
    (1, 1.3e8, None, r"^cells_infused 1.30e\+08 differs from dose level 1's 1.0e\+08 by more than 20%; "
                     r"give a deviation_reason to record it anyway$"),
    (2, 3.0e8, " ", r"dose level 2's 5.0e\+08 by more than 20%"),
])
def test_cells_within_the_tolerance_of_the_level_s_dose_or_a_deviation_reason(protocol, level, cells, reason, expected):
    _check(lambda: rules.check_dose(protocol, dose_level=level, cells_infused=cells, deviation_reason=reason), expected)


@pytest.mark.parametrize(("dose_level", "assigned", "expected"), [
    (2, 2, OK),
    (1, 2, r"^dose_level 1 does not match S-001's assigned dose level 2$"),
])
def test_the_infusion_s_dose_level_is_the_assigned_one(dose_level, assigned, expected):
    _check(lambda: rules.check_assigned_level("S-001", dose_level, assigned), expected)


@pytest.mark.parametrize(("number", "given", "expected"), [
    (1, set(), OK),
    (2, {1}, OK),
    (2, set(), r"^NK infusion 2 for S-001 cannot be recorded before infusion 1$"),
])
def test_infusion_n_needs_infusion_n_minus_1(number, given, expected):
    _check(lambda: rules.check_infusion_order("S-001", number, given), expected)


@pytest.mark.parametrize(("given_on", "earliest", "expected"), [
    (D(2027, 1, 24), D(2027, 1, 24), OK),
    (D(2027, 1, 20), None, OK),
    (D(2027, 1, 23), D(2027, 1, 24), r"^given_at 2027-01-23 is before S-001's earliest permissible day 0 2027-01-24 \(washouts\)$"),
])
def test_infusion_1_is_not_given_before_the_earliest_permissible_day_0(given_on, earliest, expected):
    _check(lambda: rules.check_not_before_earliest_day0("S-001", given_on, earliest), expected)


# -- IL-2 -----------------------------------------------------------------------------------------

AT = dt.datetime(2027, 2, 2, 9, 0)


@pytest.mark.parametrize(("number", "given", "given_at", "missed", "expected"), [
    (1, True, AT, None, OK),
    (28, False, None, "vomited", OK),
    (0, True, AT, None, r"^dose_number 0 does not exist; IL-2 doses are numbered 1 to 28$"),
    (29, True, AT, None, r"^dose_number 29 does not exist; IL-2 doses are numbered 1 to 28$"),
    (3, True, None, None, r"^given_at is required when the IL-2 dose was given$"),
    (3, False, None, " ", r"^missed_reason is required when the IL-2 dose was missed$"),
])
def test_an_il2_dose_exists_and_has_its_time_or_its_missed_reason(protocol, number, given, given_at, missed, expected):
    _check(lambda: rules.check_il2_entry(protocol, dose_number=number, given=given, given_at=given_at, missed_reason=missed), expected)


@pytest.mark.parametrize(("given", "expected"), [
    ({1}, OK),
    (set(), r"^IL-2 dose 4 for S-001 cannot be recorded before NK infusion 1$"),
])
def test_il2_follows_nk_infusion_1(given, expected):
    _check(lambda: rules.check_il2_after_infusion_1("S-001", 4, given), expected)


# -- lab results ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "fields", "expected"), [
    ("donor_nk_count", {"pk_day": 7, "donor_nk_cells_per_ul": 12.0}, OK),
    ("donor_nk_count", {"pk_day": 7}, r"^donor_nk_count needs pk_day \(the PK sample's protocol day\) and donor_nk_cells_per_ul$"),
    ("donor_nk_count", {"donor_nk_cells_per_ul": 12.0}, r"^donor_nk_count needs pk_day"),
    ("mrd_mfc", {"mrd": MrdStatus.NEGATIVE}, OK),
    ("mrd_mfc", {}, r"^mrd_mfc needs mrd: positive or negative$"),
    ("response", {"response": Response.CR}, OK),
    ("response", {}, r"^response needs response: one of CR, CRi, MLFS, PR, SD, PD$"),
])
def test_each_kind_of_lab_result_carries_its_own_value(kind, fields, expected):
    values = {"pk_day": None, "donor_nk_cells_per_ul": None, "mrd": None, "response": None} | fields
    _check(lambda: rules.check_lab_fields(kind, **values), expected)


@pytest.mark.parametrize(("pk_day", "expected"), [
    (7, OK),
    (8, r"^pk_day 8 is not a PK sample day for S-001; sample days are \[0, 1, 3, 7\]$"),
])
def test_a_pk_result_names_a_pk_sample_day(pk_day, expected):
    _check(lambda: rules.check_pk_day("S-001", pk_day, [7, 0, 3, 1]), expected)


# -- site time ------------------------------------------------------------------------------------

def test_an_aware_time_from_a_form_becomes_site_local_and_a_naive_one_stays(protocol):
    naive = dt.datetime(2027, 2, 1, 9, 0)
    assert rules.site_local(protocol, naive) is naive
    aware = rules.site_instant(protocol, naive, "given_at")
    assert aware.tzinfo is not None and rules.site_local(protocol, aware) == naive
    assert rules.site_today(protocol, aware) == naive.date()
