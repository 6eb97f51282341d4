"""The plausibility rules: dates in the order the trial allows, numbers finite and in range, text that fits its column,
protocol values in sane ranges. Each refusal is one sentence naming the field and the rule."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from protocol import plausible
from protocol.definition import PROTOCOL_BOUNDS, parse_protocol
from protocol.errors import ProtocolFileError, UserError
from tests.helpers import protocol_data_with

D = dt.date
TODAY = D(2027, 3, 1)


def _refused(call, *args, **kwargs) -> str | None:
    try:
        call(*args, **kwargs)
    except UserError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


@pytest.mark.parametrize(("label", "due_on", "today", "refusal"), [
    ("IL-2 dose 3 for S-001", D(2027, 3, 4), TODAY, "IL-2 dose 3 for S-001 is due on 2027-03-04; it cannot be recorded as missed before"),
    ("IL-2 dose 3 for S-001", D(2027, 3, 2), TODAY, "cannot be recorded as missed before it was due (today is 2027-03-01)"),
    ("IL-2 dose 3 for S-001", D(2027, 3, 1), TODAY, None),  # due today: it may be missed today
    ("IL-2 dose 1 for S-001", D(2027, 2, 1), TODAY, None),
])
def test_nothing_is_recorded_as_missed_before_it_was_due(label, due_on, today, refusal):
    got = _refused(plausible.missed_not_before_due, label, due_on, today)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("effective_on", "refusal"), [
    (D(2000, 1, 1), "effective_on 2000-01-01 is before the date the patient entered the study (2027-01-20)"),
    (D(2027, 1, 19), "is before the date the patient entered the study"),
    (D(2027, 3, 2), "effective_on 2027-03-02 is in the future (today is 2027-03-01)"),
    (D(1, 1, 1), "effective_on 0001-01-01 is not a plausible date"),
    (D(2027, 1, 20), None),
    (TODAY, None),
])
def test_off_study_is_not_before_entry_nor_in_the_future(effective_on, refusal):
    got = _refused(plausible.off_study_date, effective_on, entered_on=D(2027, 1, 20), today=TODAY)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("onset", "resolved", "consent", "refusal"), [
    (D(1900, 1, 1), None, D(2027, 1, 10), "onset_on 1900-01-01 is before the patient's informed consent (2027-01-10)"),
    (D(2027, 1, 9), None, D(2027, 1, 10), "is before the patient's informed consent"),
    (D(2027, 3, 2), None, D(2027, 1, 10), "onset_on 2027-03-02 is in the future"),
    (D(2027, 2, 5), D(2027, 2, 4), D(2027, 1, 10), "resolved_on 2027-02-04 is before onset_on 2027-02-05"),
    (D(2027, 2, 5), D(2027, 3, 5), D(2027, 1, 10), "resolved_on 2027-03-05 is in the future"),
    (D(1800, 1, 1), None, None, "onset_on 1800-01-01 is not a plausible date"),
    (D(2027, 1, 10), D(2027, 1, 10), D(2027, 1, 10), None),
    (D(2027, 2, 5), None, None, None),  # no consent date known: only the other rules
])
def test_an_adverse_event_starts_after_consent_and_resolves_after_onset(onset, resolved, consent, refusal):
    got = _refused(plausible.ae_dates, onset, resolved, consent_on=consent, today=TODAY)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("value", "low", "high", "refusal"), [
    (math.inf, None, None, "cells_infused inf is not a finite number"),
    (-math.inf, 0, None, "cells_infused -inf is not a finite number"),
    (math.nan, 0, 1, "cells_infused nan is not a finite number"),
    (-1.0, 0, None, "cells_infused -1.0 must be at least 0"),
    (2.0, 0, 1, "cells_infused 2.0 must be at most 1"),
    (1e8, 0, None, None),
    (None, 0, 1, None),
])
def test_numbers_are_finite_and_in_range(value, low, high, refusal):
    got = _refused(plausible.finite_number, "cells_infused", value, low=low, high=high)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("values", "refusal"), [
    ([2.0, 2.0, 2.0], "--p values are probabilities: each must be between 0 and 1, got 2.0"),
    ([math.nan, 0.1, 0.2], "got nan"),
    ([0.1, math.inf, 0.2], "got inf"),
    ([-0.1, 0.1, 0.2], "got -0.1"),
    ([0.1, 0.2], "--p needs one DLT probability per dose level (3), got 2"),
    ([0.0, 0.5, 1.0], None),
])
def test_dlt_probabilities_are_one_per_level_and_between_0_and_1(values, refusal):
    got = _refused(plausible.probabilities, "--p", values, 3)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("value", "refusal"), [
    ("L" * 65, "administration.product_lot is 65 characters; at most 64 are allowed"),
    ("L" * 64, None),
    ("", None),
    (None, None),
])
def test_text_fits_its_column(value, refusal):
    got = _refused(plausible.text_fits, "administration.product_lot", value, 64)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("day", "refusal"), [
    (D(9999, 12, 31), "not a plausible date: give one between 1900-01-01 and 2999-12-31"),
    (D(1899, 12, 31), "not a plausible date"),
    (dt.datetime(9999, 12, 31, 23, 0), "not a plausible date"),
    (D(1900, 1, 1), None),
    (D(2999, 12, 31), None),
])
def test_a_date_is_within_the_calendar_the_trial_can_compute(day, refusal):
    got = _refused(plausible.plausible_date, "--day0", day)
    assert (got is None) if refusal is None else (refusal in got)


@pytest.mark.parametrize(("path", "value", "message"), [
    ("escalation.signing_code_valid_hours.value", 10**12, "signing_code_valid_hours must be from 1 to 336"),
    ("nk_infusions.infusions.1.day", 10**9, "nk_infusions.infusions[1].day is 1000000000; it must be from 0 to 3650"),
    ("nk_infusions.infusions.1.window.plus_days", 400, "nk_infusions.infusions[1].window.plus_days is 400; it must be from 0 to 90"),
    ("visits.1.day", 99999, "visits[1].day is 99999"),
    ("il2.duration_days.value", 10**7, "il2 last day"),
    ("nk_infusions.product_request_lead_days.value", 1000, "product_request_lead_days is 1000; it must be from 0 to 90"),
    ("notifications.sae_report_deadline_hours", 10**6, "sae_report_deadline_hours is 1000000; it must be from 0 to 720"),
])
def test_protocol_values_outside_their_sane_range_are_refused_with_the_reason(path, value, message):
    with pytest.raises(ProtocolFileError) as err:
        parse_protocol(protocol_data_with(path, value))
    assert message in str(err.value)


def test_every_protocol_bound_carries_its_reason():
    assert all(high > 0 and len(reason) > 20 for high, reason in PROTOCOL_BOUNDS.values())
