"""The DLT screen: a table of cases over the protocol's DLT rules."""

from __future__ import annotations

import datetime as dt

import pytest

from protocol.dlt import AeCategory as C
from protocol.dlt import AeFacts, screen_dlt
from protocol.dlt import Attribution as A
from protocol.dlt import DltScreen as S

START, END = dt.date(2027, 1, 31), dt.date(2027, 2, 28)
IN = dt.date(2027, 2, 10)


def ae(category, grade, onset=IN, attribution=A.POSSIBLE, **facts):
    return AeFacts(category=category, grade=grade, onset_on=onset, attribution=attribution, **facts)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (ae(C.NON_HAEMATOLOGICAL, 3), S.CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 2), S.NOT_CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 4, attribution=A.UNLIKELY), S.NOT_CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 4, attribution=A.DEFINITE), S.CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 3, onset=dt.date(2027, 3, 1)), S.NOT_CANDIDATE),  # the day after day 28
        (ae(C.NON_HAEMATOLOGICAL, 3, onset=END), S.CANDIDATE),  # day 28 still counts
        (ae(C.NON_HAEMATOLOGICAL, 3, onset=START), S.CANDIDATE),
        (ae(C.FEVER, 3), S.NOT_CANDIDATE),
        (ae(C.FEVER, 4), S.CANDIDATE),
        (ae(C.INFUSION_REACTION, 3, resolved_to_grade_1_within_72h=True), S.NOT_CANDIDATE),
        (ae(C.INFUSION_REACTION, 3, resolved_to_grade_1_within_72h=False), S.CANDIDATE),
        (ae(C.INFUSION_REACTION, 3), S.NEEDS_INFORMATION),
        (ae(C.INFUSION_REACTION, 4), S.CANDIDATE),
        (ae(C.ACUTE_GVHD, 2), S.NOT_CANDIDATE),
        (ae(C.ACUTE_GVHD, 3), S.CANDIDATE),
        (ae(C.CRS, 2), S.NOT_CANDIDATE),
        (ae(C.CRS, 3), S.CANDIDATE),
        (ae(C.ICANS, 3), S.CANDIDATE),
        (ae(C.NEUTROPENIA, 4, duration_days=15, caused_by_leukaemia=False), S.CANDIDATE),
        (ae(C.NEUTROPENIA, 4, duration_days=14, caused_by_leukaemia=False), S.NOT_CANDIDATE),  # more than 14 days
        (ae(C.THROMBOCYTOPENIA, 4, duration_days=20, caused_by_leukaemia=True), S.NOT_CANDIDATE),
        (ae(C.THROMBOCYTOPENIA, 4), S.NEEDS_INFORMATION),
        (ae(C.NEUTROPENIA, 3, duration_days=30, caused_by_leukaemia=False), S.NOT_CANDIDATE),
        (ae(C.OTHER_HAEMATOLOGICAL, 4), S.NOT_CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 5, caused_by_progression=False), S.CANDIDATE),
        (ae(C.NEUTROPENIA, 5, caused_by_progression=False), S.CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 5, caused_by_progression=True), S.NOT_CANDIDATE),
        (ae(C.NON_HAEMATOLOGICAL, 5), S.NEEDS_INFORMATION),
    ],
)
def test_the_dlt_screen(protocol, event, expected):
    result = screen_dlt(protocol.dlt.rules, event, window_start_on=START, window_end_on=END)
    assert result.screen is expected, result.rule
    assert result.rule
