"""Eligibility screening: each criterion met / not met / unknown, and the earliest day 0."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.eligibility import ScreeningRecord, Status, Verdict, screen
from protocol.errors import UserError

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())


def record(**changes) -> ScreeningRecord:
    data = json.loads(json.dumps(EXAMPLE))
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            data[outer][inner] = value
        elif value is ...:
            data.pop(key)
        else:
            data[key] = value
    return ScreeningRecord.model_validate(data)


def row(result, cid):
    return next(c for c in result.criteria if c.id == cid)


def test_the_example_candidate_is_eligible_from_the_last_washout(protocol):
    res = screen(protocol, record())
    assert res.verdict is Verdict.ELIGIBLE
    # steroid on 2027-01-20, 3-day washout, a dose exactly 3 days before still counts: 01-24.
    assert res.earliest_day0_on == dt.date(2027, 1, 24)
    assert not res.earliest_day0_is_lower_bound
    assert res.failing == [] and res.unknown == []


@pytest.mark.parametrize(
    ("changes", "cid", "status"),
    [
        ({"age_years": 17}, "I1", Status.NOT_MET),
        ({"age_years": 18}, "I1", Status.MET),
        ({"age_years": ...}, "I1", Status.UNKNOWN),
        ({"expected_survival_months": 2.9}, "I2", Status.NOT_MET),
        ({"ecog": 3}, "I3", Status.NOT_MET),
        ({"ecog": 2}, "I3", Status.MET),
        ({"mrd_positive_mfc": False}, "I4A_B", Status.NOT_MET),
        ({"mrd_positive_mfc": False, "marrow_blasts_percent": 5.0}, "I4A_B", Status.MET),
        ({"mrd_positive_mfc": False, "marrow_blasts_percent": 4.9}, "I4A_B", Status.NOT_MET),
        ({"mrd_positive_mfc": False, "extramedullary_infiltration": True}, "I4A_B", Status.MET),
        ({"mrd_positive_mfc": ..., "peripheral_blood_leukaemia_cells": False}, "I4A_B", Status.UNKNOWN),
        ({"prior_allo_hsct": False}, "I4A_B", Status.NOT_MET),
        ({"agvhd_max_grade_post_transplant": 2}, "I4C", Status.NOT_MET),
        ({"donor_available": False}, "I4D", Status.NOT_MET),
        ({"donor_available": ...}, "I4D", Status.UNKNOWN),
        ({"labs__alt": {"value": 121, "uln": 40}}, "I5_LIVER", Status.NOT_MET),
        ({"labs__alt": {"value": 120, "uln": 40}}, "I5_LIVER", Status.MET),
        ({"labs__total_bilirubin": {"value": 43, "uln": 21}}, "I5_LIVER", Status.NOT_MET),
        ({"labs__ast": None}, "I5_LIVER", Status.UNKNOWN),
        ({"labs__inr": {"value": 1.9, "uln": 1.2}}, "I5_COAG", Status.NOT_MET),
        ({"labs__inr": None}, "I5_COAG", Status.MET),
        ({"labs__inr": None, "labs__aptt": None}, "I5_COAG", Status.UNKNOWN),
        ({"labs__serum_creatinine": {"value": 200, "uln": 104}}, "I5_RENAL", Status.MET),
        ({"labs__serum_creatinine": {"value": 200, "uln": 104}, "labs__creatinine_clearance_ml_min": 25}, "I5_RENAL", Status.NOT_MET),
        ({"labs__serum_creatinine": {"value": 200, "uln": 104}, "labs__creatinine_clearance_ml_min": None}, "I5_RENAL", Status.UNKNOWN),
        ({"lvef_percent": 44}, "I5_CARDIAC", Status.NOT_MET),
        ({"lvef_percent": 45}, "I5_CARDIAC", Status.MET),
        ({"contraception_commitment": False}, "I6", Status.NOT_MET),
        ({"contraception_commitment": False}, "E5", Status.MET),
        ({"consent_on": ...}, "I7", Status.UNKNOWN),
        ({"cns_involvement": True}, "E1", Status.MET),
        ({"cns_involvement": ...}, "E1", Status.UNKNOWN),
        ({"hypersensitivity_murine_or_biologics": True}, "E4", Status.MET),
        ({"pregnant_or_lactating": True}, "E6", Status.MET),
        ({"serious_autoimmune_or_immunodeficiency": True}, "E7", Status.MET),
        ({"alcohol_or_drug_dependence": True}, "E8", Status.MET),
        ({"investigator_judges_unsuitable": True}, "E9", Status.MET),
        ({"last_dli_on": ...}, "E2.dli", Status.UNKNOWN),
    ],
)
def test_each_criterion_reports_its_status(protocol, changes, cid, status):
    res = screen(protocol, record(**changes))
    r = row(res, cid)
    assert r.status is status, (r.value, r.limit)
    assert r.value and r.limit and r.reason
    if r.allows_enrollment is False:
        assert res.verdict is Verdict.NOT_ELIGIBLE
    elif r.allows_enrollment is None:
        assert res.verdict is Verdict.INCOMPLETE


@pytest.mark.parametrize(
    ("last_on", "half_life", "clear_on"),
    [
        # 2 weeks or 5 half-lives, whichever is SHORTER; a dose exactly N days before still counts.
        ("2027-01-01", 1.0, "2027-01-07"),  # 5 days < 14: day 0 from the 6th day after
        ("2027-01-01", 2.5, "2027-01-15"),  # 12.5 -> 13 days
        ("2027-01-01", 3.0, "2027-01-16"),  # 15 days > 14: the 14-day limit wins
        ("2027-01-01", 30.0, "2027-01-16"),  # long half-life: still 14 days
        ("2027-01-01", None, "2027-01-16"),  # no half-life: 14 days is never shorter than the rule
    ],
)
def test_anti_tumour_washout_takes_the_shorter_limit(protocol, last_on, half_life, clear_on):
    rec = record(last_antitumour_therapy_on=last_on, antitumour_half_life_days=half_life,
                 last_systemic_steroid_on="never", last_dli_on="never", last_iv_anti_infective_on="never", consent_on="2026-12-20")
    res = screen(protocol, rec)
    assert res.earliest_day0_on == dt.date.fromisoformat(clear_on)
    assert row(res, "E2.antitumour_therapy").status is Status.NOT_MET


def test_modified_cell_therapy_washout_counts_calendar_months(protocol):
    rec = record(last_modified_cell_therapy_on="2026-08-31", last_systemic_steroid_on="never", last_antitumour_therapy_on="never",
                 last_dli_on="never", last_iv_anti_infective_on="never", consent_on="2026-12-01")
    res = screen(protocol, rec)
    assert res.earliest_day0_on == dt.date(2027, 3, 1)  # Aug 31 + 6 months = Feb 28, then the next day


def test_a_day0_inside_a_washout_fails_with_the_clear_date(protocol):
    res = screen(protocol, record(), day0_on=dt.date(2027, 1, 22))
    assert res.verdict is Verdict.NOT_ELIGIBLE
    steroid = row(res, "E2.systemic_steroid")
    assert steroid.status is Status.MET
    assert "clear from 2027-01-24" in steroid.reason
    assert screen(protocol, record(), day0_on=dt.date(2027, 1, 24)).verdict is Verdict.ELIGIBLE


def test_missing_washout_data_makes_the_earliest_date_a_lower_bound(protocol):
    res = screen(protocol, record(last_radiotherapy_on=...))
    assert res.verdict is Verdict.INCOMPLETE
    assert res.earliest_day0_is_lower_bound
    assert [c.id for c in res.unknown] == ["E2.radiotherapy"]


def test_a_name_instead_of_a_subject_id_is_refused(protocol):
    with pytest.raises(UserError, match="subject_id 'Jane Doe' must match the pseudonymous pattern"):
        screen(protocol, record(subject_id="Jane Doe"))


def test_day0_before_consent_is_refused(protocol):
    with pytest.raises(UserError, match="day0 2027-01-01 is before consent_on 2027-01-10"):
        screen(protocol, record(), day0_on=dt.date(2027, 1, 1))


def test_unknown_fields_are_refused_so_no_identifying_data_slips_in():
    with pytest.raises(ValueError, match="full_name"):
        record(full_name="Jane Doe")


@settings(max_examples=200, deadline=None)
@given(
    steroid=st.dates(min_value=dt.date(2026, 1, 1), max_value=dt.date(2027, 1, 9)),
    rt=st.dates(min_value=dt.date(2026, 1, 1), max_value=dt.date(2027, 1, 9)),
    hl=st.none() | st.floats(min_value=0.1, max_value=40),
)
def test_day0_on_the_earliest_date_passes_every_washout_and_the_day_before_fails_one(protocol, steroid, rt, hl):
    rec = record(last_systemic_steroid_on=steroid.isoformat(), last_radiotherapy_on=rt.isoformat(), antitumour_half_life_days=hl)
    earliest = screen(protocol, rec).earliest_day0_on
    assert screen(protocol, rec, day0_on=earliest).verdict is Verdict.ELIGIBLE
    if earliest > rec.consent_on:
        assert screen(protocol, rec, day0_on=earliest - dt.timedelta(days=1)).verdict is Verdict.NOT_ELIGIBLE


# -- the words a coordinator reads (form titles, run message, screening artifact) -------------------------------


def test_washouts_in_words_take_their_numbers_from_the_protocol_file(protocol):
    from protocol.eligibility import washout_in_words

    by_id = {w.id: w for w in protocol.eligibility.washouts}
    relation = "more than" if protocol.eligibility.washout_boundary.value == "inclusive" else "at least"
    steroid, antitumour, car_t = by_id["systemic_steroid"], by_id["antitumour_therapy"], by_id["modified_cell_therapy"]
    assert washout_in_words(protocol, steroid) == f"{relation} {steroid.days} days"
    assert washout_in_words(protocol, antitumour) == (
        f"{relation} the {antitumour.rule} of {antitumour.days} days or {antitumour.half_lives} half-lives")
    assert washout_in_words(protocol, car_t) == f"{relation} {car_t.months} months"


def test_every_criterion_reads_in_words_with_a_status_word_and_no_field_names(protocol):
    from protocol.eligibility import criterion_in_words, status_in_words

    res = screen(protocol, record(ecog=3, cns_involvement=None, last_dli_on=None))
    texts = {c.id: c.text for c in [*protocol.eligibility.inclusion, *protocol.eligibility.exclusion]}
    for c in res.criteria:
        assert criterion_in_words(c).startswith(texts[c.id.split(".")[0]]) and f"({c.id})" in criterion_in_words(c)
        assert "_" not in c.value.replace(c.id, ""), c.value  # "no", "last date missing", not "cns_involvement=no"
    assert status_in_words(row(res, "I3")) == "NOT MET, keeps the candidate out"
    assert status_in_words(row(res, "I1")) == "MET, passes"
    assert status_in_words(row(res, "E1")) == "UNKNOWN, data missing"
    assert status_in_words(row(res, "E4")) == "NOT MET, passes"  # an exclusion that does not apply
    assert criterion_in_words(row(res, "E2.dli")) == "Washouts before the first infusion: donor lymphocyte infusion (E2.dli)"
