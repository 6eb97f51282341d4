"""The no-dlt rehearsal: escalate twice, expand the top level, MTD DL3; the reports read back against the database."""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path

import icalendar
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from sqlmodel import Session, select

from models.tables import CalendarEventRow, EventStatus, LabKind, LabResult, Subject
from tasks.exports import FEEDS
from tests.flows.rehearsals import P, ends_where_the_3_plus_3_rules_say


@pytest.mark.parametrize("name", ["no-dlt"])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    ends_where_the_3_plus_3_rules_say(*rehearsed(name)[:2])


def test_no_dlt_escalates_twice_expands_the_top_level_and_names_dl3(rehearsed):
    res, engine, out = rehearsed("no-dlt")
    assert res.history == "1NNN 2NNN 3NNN 3NNN" and res.mtd == 3
    assert [(lv["dose_level"], lv["patients"], lv["dlts"]) for lv in res.levels] == [(1, 3, 0), (2, 3, 0), (3, 6, 0)]
    assert all(p["status"] == "completed" and p["evaluable"] for p in res.patients)
    assert res.wall_seconds > 0


def test_the_reports_hold_what_the_database_holds(rehearsed):
    res, engine, out = rehearsed("no-dlt")
    reports = Path(res.reports)
    png = (reports / "swimmer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    with Session(engine) as s:
        values = s.exec(select(Subject.subject_id, LabResult.value).join(Subject, Subject.id == LabResult.subject_pk)
                        .where(LabResult.kind == LabKind.DONOR_NK_COUNT)).all()
        planned = {role: s.exec(select(CalendarEventRow).where(CalendarEventRow.kind.in_(list(kinds)),
                                                               CalendarEventRow.status != EventStatus.CANCELLED)).all()
                   for role, kinds in FEEDS.items()}
    cmax = {}
    for sid, v in values:
        cmax[sid] = max(cmax.get(sid, 0), v)
    pk_rows = [line.split("|")[1:-1] for line in (reports / "pk.md").read_text().splitlines() if line.startswith("| S-")]
    assert {r[0].strip(): float(r[3]) for r in pk_rows} == cmax
    outcomes = (reports / "outcomes.md").read_text()
    assert "| DL3 | 6 | 6 | 4/6 (67 %) | 6 | 4/6 (67 %) | 4/6 (67 %) |" in outcomes  # S-008 and S-011 MRD-positive, PR and SD
    dashboard = (reports / "dashboard.md").read_text()
    assert "Enrolled **12** of the target **12**" in dashboard and "| 4 | `1NNN 2NNN 3NNN 3NNN` | stop (MTD DL3) | stop | pi-01 |" in dashboard

    for role, rows in planned.items():
        feed = (reports / "ical" / f"{role.value}.ics").read_bytes()
        assert all(len(line) <= 75 for line in feed.split(b"\r\n")) and feed.endswith(b"END:VCALENDAR\r\n")  # RFC 5545 3.1
        cal = icalendar.Calendar.from_ical(feed)
        events = cal.walk("VEVENT")
        assert len(events) == len(rows) > 0
        assert [tz["TZID"] for tz in cal.walk("VTIMEZONE")] == [P.timezone]
        for ev in events:
            start = ev.decoded("dtstart")
            assert str(start.tzinfo) == P.timezone and ev["dtstart"].params["TZID"] == P.timezone
            assert re.fullmatch(r"S-\d{3} · .+", str(ev["summary"]))
    nurse = icalendar.Calendar.from_ical((reports / "ical" / "nurse.ics").read_bytes()).walk("VEVENT")
    first_infusion = next(ev for ev in nurse if str(ev["summary"]) == "S-001 · NK infusion 1 (1.0e+08 cells)")
    assert first_infusion.decoded("dtstart").replace(tzinfo=None) == dt.datetime(2027, 3, 8, 9, 0)  # 09:00 site time, not UTC
    assert {str(ev["summary"]).split(" · ")[1].split(" ")[0] for ev in nurse} == {"NK", "IL-2", "PK"}

    expected = {"ex": ["STUDYID", "DOMAIN", "USUBJID", "EXSEQ", "EXTRT", "EXDOSE", "EXDOSU", "EXDOSFRM", "EXDOSFRQ", "EXROUTE", "EXSTDTC",
                       "EXENDTC", "EXSTDY"],
                "sv": ["STUDYID", "DOMAIN", "USUBJID", "VISITNUM", "VISIT", "SVSTDTC", "SVENDTC", "SVSTDY"]}
    for domain, columns in expected.items():
        rows = list(csv.DictReader(open(reports / "sdtm" / f"{domain}.csv", encoding="utf-8")))
        assert list(rows[0]) == columns and len(rows) > 12
        assert all(all(r[c] for c in columns) for r in rows), f"{domain}: every standard variable is filled"
        assert {r["DOMAIN"] for r in rows} == {domain.upper()} and all(r["USUBJID"].startswith("NCT06641648-S-") for r in rows)
    ex = list(csv.DictReader(open(reports / "sdtm" / "ex.csv", encoding="utf-8")))
    assert len([r for r in ex if r["EXTRT"] == "DONOR NK CELLS"]) == 24 and len([r for r in ex if r["EXTRT"] == "INTERLEUKIN-2"]) == 12 * 28
    assert {r["EXSTDY"] for r in ex if r["EXTRT"] == "DONOR NK CELLS"} == {"1", "15"}  # SDTM has no day 0
    with get_client(sync_client=True) as client:  # daily rounds published them as artifacts too
        latest = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trial-dashboard", "swimmer-plot"])))
    assert {a.key for a in latest} == {"trial-dashboard", "swimmer-plot"}
    assert any("data:image/png;base64," in (a.data or "") for a in latest if a.key == "swimmer-plot")
