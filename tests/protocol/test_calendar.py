"""The treatment calendar: dates, windows, re-anchoring, and daylight saving."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol.calendar import Anchor, EventKind, compute_calendar
from protocol.definition import parse_protocol
from protocol.errors import CalendarError
from tests.helpers import protocol_data_with

DAY0 = dt.datetime(2027, 1, 31, 9, 0)
UTC = dt.timezone.utc


def _events(cal, kind):
    return [e for e in cal.events if e.kind is kind]


def test_the_calendar_holds_every_protocol_item(protocol):
    cal = compute_calendar(protocol, dose_level=2, day0=DAY0)
    assert [e.protocol_day for e in _events(cal, EventKind.NK_INFUSION)] == [0, 14]
    assert [e.protocol_day for e in _events(cal, EventKind.IL2_DOSE)] == list(range(1, 29))
    assert [e.protocol_day for e in _events(cal, EventKind.PRODUCT_REQUEST)] == [-14, 0]
    assert [e.protocol_day for e in _events(cal, EventKind.PK_SAMPLE)] == [0, 1, 3, 7, 14, 15, 17, 21, 28, 60, 90]
    assert cal.event("dlt_window_open").protocol_day == 0
    assert cal.event("dlt_window_close").protocol_day == 28
    v1, v3 = cal.event("visit_1_month"), cal.event("visit_3_month")
    assert (v1.protocol_day, v1.window_start, v1.window_end) == (28, dt.date(2027, 2, 25), dt.date(2027, 3, 3))
    assert (v3.protocol_day, v3.window_start, v3.window_end) == (90, dt.date(2027, 4, 24), dt.date(2027, 5, 8))
    assert cal.event("nk_infusion-2").window_end == dt.date(2027, 2, 17)
    assert cal.cells_per_infusion == 5.0e8


def test_instants_are_utc_from_the_site_timezone(protocol):
    cal = compute_calendar(protocol, dose_level=1, day0=DAY0)
    inf1 = cal.event("nk_infusion-1")
    assert inf1.at_utc == dt.datetime(2027, 1, 31, 1, 0, tzinfo=UTC)  # Asia/Shanghai is UTC+8
    close = cal.event("dlt_window_close")
    assert close.local_date == dt.date(2027, 2, 28)
    assert close.at_utc == dt.datetime(2027, 2, 28, 16, 0, tzinfo=UTC)  # end of local day 28


def test_the_pre_infusion_sample_comes_before_the_infusion(protocol):
    cal = compute_calendar(protocol, dose_level=1, day0=DAY0)
    keys = [e.key for e in cal.events]
    assert keys.index("pk_sample-infusion_1+0") < keys.index("nk_infusion-1")
    assert keys.index("pk_sample-infusion_2+0") < keys.index("nk_infusion-2")


def test_a_late_infusion_1_moves_everything(protocol):
    planned = compute_calendar(protocol, dose_level=1, day0=DAY0)
    late = compute_calendar(protocol, dose_level=1, day0=DAY0, actual_infusions={1: DAY0 + dt.timedelta(days=1)})
    for before in planned.events:
        after = late.event(before.key)
        assert after.protocol_day == before.protocol_day or before.kind is EventKind.CONTRACEPTION_END
        assert after.local_date == before.local_date + dt.timedelta(days=1) or before.kind is EventKind.CONTRACEPTION_END
    assert late.event("nk_infusion-1").actual
    assert late.anchor_version != planned.anchor_version


def test_a_late_infusion_2_moves_nothing_anchored_to_day_0(protocol):
    planned = compute_calendar(protocol, dose_level=1, day0=DAY0)
    late = compute_calendar(protocol, dose_level=1, day0=DAY0, actual_infusions={2: dt.datetime(2027, 2, 16, 10, 30)})
    inf2 = late.event("nk_infusion-2")
    assert (inf2.protocol_day, inf2.actual, inf2.flags) == (16, True, ())
    moved = {e.key for e in planned.events if late.event(e.key).at_utc != e.at_utc}
    assert moved == {
        "nk_infusion-2", "pk_sample-infusion_2+0", "pk_sample-infusion_2+1", "pk_sample-infusion_2+3",
        "pk_sample-infusion_2+7", "contraception_end",
    }
    assert late.event("pk_sample-infusion_2+1").protocol_day == 17
    assert all(late.event(k).anchor in (Anchor.INFUSION_2, Anchor.LAST_INFUSION) for k in moved - {"nk_infusion-2"})


def test_an_infusion_2_outside_its_window_is_flagged(protocol):
    cal = compute_calendar(protocol, dose_level=1, day0=DAY0, actual_infusions={2: dt.datetime(2027, 2, 19, 9)})
    assert "out_of_window" in cal.event("nk_infusion-2").flags


def test_infusion_2_before_infusion_1_is_refused(protocol):
    with pytest.raises(CalendarError, match="infusion 2 on day -1 is not after infusion 1"):
        compute_calendar(protocol, dose_level=1, day0=DAY0, actual_infusions={2: DAY0 - dt.timedelta(days=1)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dose_level": 4}, "dose level 4 does not exist"),
        ({"dose_level": 0}, "dose level 0 does not exist"),
        ({"actual_infusions": {3: DAY0}}, "infusion 3 does not exist"),
        ({"day0": DAY0.replace(tzinfo=UTC)}, "day0: give the local wall-clock time"),
    ],
)
def test_bad_calendar_input_is_one_sentence(protocol, kwargs, message):
    args = {"dose_level": 1, "day0": DAY0} | kwargs
    with pytest.raises(ValueError, match=message):
        compute_calendar(protocol, **args)


def _in_zone(zone: str):
    return parse_protocol(protocol_data_with("site.timezone.value", zone))


def test_a_day0_in_a_daylight_saving_gap_is_refused():
    ny = _in_zone("America/New_York")
    with pytest.raises(CalendarError, match=r"2027-03-14 02:30 does not exist in America/New_York"):
        compute_calendar(ny, dose_level=1, day0=dt.datetime(2027, 3, 14, 2, 30))


def test_an_infusion_in_a_repeated_hour_is_refused_not_guessed():
    ny = _in_zone("America/New_York")
    with pytest.raises(CalendarError, match="happens twice"):
        compute_calendar(ny, dose_level=1, day0=dt.datetime(2027, 11, 7, 1, 30))


def test_a_derived_event_in_a_repeated_hour_is_flagged():
    data = protocol_data_with("site.timezone.value", "America/New_York")
    data["site"]["default_event_time"]["value"] = "01:30"
    p = parse_protocol(data)
    # day 0 = 2027-10-31; IL-2 dose 7 falls on 2027-11-07, when 01:30 happens twice.
    cal = compute_calendar(p, dose_level=1, day0=dt.datetime(2027, 10, 31, 9, 0))
    dose7 = cal.event("il2_dose-07")
    assert dose7.local_date == dt.date(2027, 11, 7)
    assert dose7.flags == ("ambiguous_local_time",)
    assert dose7.at_utc == dt.datetime(2027, 11, 7, 5, 30, tzinfo=UTC)  # first occurrence, EDT
    for e in cal.events:
        repeated = e.local_date == dt.date(2027, 11, 7) and e.local_time == dt.time(1, 30)
        assert e.flags == (("ambiguous_local_time",) if repeated else ()), e.key


def test_across_a_dst_change_the_wall_clock_time_is_kept():
    london = _in_zone("Europe/London")
    cal = compute_calendar(london, dose_level=1, day0=dt.datetime(2027, 3, 20, 9, 0))
    inf1, inf2 = cal.event("nk_infusion-1"), cal.event("nk_infusion-2")
    assert inf1.at_utc.hour == 9 and inf2.at_utc.hour == 8  # GMT, then BST
    assert (inf2.at_utc - inf1.at_utc) == dt.timedelta(days=14, hours=-1)


def test_contraception_end_is_one_calendar_step_from_the_last_infusion(protocol):
    # Infusion 2 on 2028-02-29 (leap day): twelve months later is 2029-02-28, clamped.
    cal = compute_calendar(protocol, dose_level=1, day0=dt.datetime(2028, 2, 15, 9), actual_infusions={2: dt.datetime(2028, 2, 29, 9)})
    assert cal.event("contraception_end").local_date == dt.date(2029, 2, 28)


ZONES = ["Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe", "America/Santiago", "Pacific/Apia"]
_protocols = {z: _in_zone(z) for z in ZONES}


@st.composite
def _anchors(draw):
    zone = draw(st.sampled_from(ZONES))
    day = draw(st.dates(min_value=dt.date(2024, 1, 1), max_value=dt.date(2036, 12, 31)))
    at = draw(st.times(), label="time").replace(second=0, microsecond=0)
    late2 = draw(st.none() | st.integers(min_value=0, max_value=5))
    return zone, dt.datetime.combine(day, at), late2


def _calendar_or_reject(zone, day0, late2):
    actual = {2: day0 + dt.timedelta(days=14 + late2)} if late2 is not None else None
    try:
        return compute_calendar(_protocols[zone], dose_level=1, day0=day0, actual_infusions=actual)
    except CalendarError:
        assume(False)


@settings(max_examples=300, deadline=None)
@given(_anchors())
def test_events_are_in_time_order(args):
    cal = _calendar_or_reject(*args)
    instants = [e.at_utc for e in cal.events]
    assert instants == sorted(instants)
    days = [e.protocol_day for e in cal.events]
    assert days == sorted(days)


@settings(max_examples=300, deadline=None)
@given(_anchors())
def test_every_planned_window_contains_its_target(args):
    cal = _calendar_or_reject(*args)
    for e in cal.events:
        if not e.actual:
            assert e.window_start <= e.local_date <= e.window_end, e.key


@settings(max_examples=300, deadline=None)
@given(_anchors())
def test_protocol_day_n_is_n_local_calendar_days_after_day_0(args):
    zone, day0, _ = args
    cal = _calendar_or_reject(*args)
    tz = zoneinfo.ZoneInfo(zone)
    for e in cal.events:
        assert e.local_date == day0.date() + dt.timedelta(days=e.protocol_day)
        if e.local_time is not None:
            local = e.at_utc.astimezone(tz)
            assert (local.date(), local.time().replace(second=0)) == (e.local_date, e.local_time), e.key
        assert e.at_utc.tzinfo is not None and e.at_utc.utcoffset() == dt.timedelta(0)
