"""Exports: per-role iCalendar feeds (RFC 5545, site timezone), CSV, and CDISC-SDTM-shaped EX, AE and SV.

Every export names patients by subject ID only. SDTM here is the shape (domain, standard
variable names, ISO 8601 dates, study days), not a submission package: terms are as reported,
not MedDRA-coded, and there are no define.xml or SUPP-- datasets.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
from pathlib import Path

import icalendar
from sqlmodel import Session, select

from models.tables import Administration, AdministrationKind, AdverseEvent, CalendarEventRow, EventStatus, Subject
from protocol.calendar import EventKind
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.roles import Role

# Which calendar events each role's feed carries.
FEEDS: dict[Role, tuple[EventKind, ...]] = {
    Role.NURSE: (EventKind.NK_INFUSION, EventKind.IL2_DOSE, EventKind.PK_SAMPLE),
    Role.CELL_LAB: (EventKind.PRODUCT_REQUEST,),
    Role.PHARMACY: (EventKind.IL2_DOSE,),
    Role.COORDINATOR: (EventKind.NK_INFUSION, EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH, EventKind.DLT_WINDOW_CLOSE),
    Role.PI: (EventKind.DLT_WINDOW_CLOSE, EventKind.VISIT_1_MONTH),
}
EVENT_MINUTES = 30
SV_VISITS = {"nk_infusion-1": (1, "NK INFUSION 1"), "nk_infusion-2": (2, "NK INFUSION 2"), "visit_1_month": (3, "MONTH 1"),
             "visit_3_month": (4, "MONTH 3")}


def _rows(session: Session, kinds=None):
    q = (select(Subject.subject_id, CalendarEventRow).join(Subject, Subject.id == CalendarEventRow.subject_pk)
         .where(CalendarEventRow.status != EventStatus.CANCELLED).order_by(CalendarEventRow.due_at, Subject.subject_id))
    if kinds:
        q = q.where(CalendarEventRow.kind.in_(list(kinds)))
    return session.exec(q).all()


def ical_feed(session: Session, protocol: ProtocolDefinition, role: Role, *, stamp: dt.datetime) -> bytes:
    """One role's feed: each event at its site-local time with a TZID, and the VTIMEZONE it needs.

    The calendar's head and its VTIMEZONE come from icalendar; the events are written here, as icalendar writes them
    (same properties, order, escaping and folding), because building and serializing thousands of its components was
    most of a report refresh (no-dlt rehearsal, 2026-11-27: 24 s of 50 s)."""
    tz = protocol.timezone
    cal = icalendar.Calendar()
    cal.add("prodid", f"-//nktrial//{protocol.protocol.trial_id} schedule//EN")
    cal.add("version", "2.0")
    cal.add("x-wr-calname", f"{protocol.protocol.trial_id} · {role.value}")
    cal.add("x-wr-timezone", tz)
    cal.add_component(_vtimezone(tz))
    head = cal.to_ical()
    if not head.endswith(END_CALENDAR):
        raise ValueError("icalendar wrote a calendar that does not end with END:VCALENDAR")
    head = head.removesuffix(END_CALENDAR)
    dtstamp = (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")  # naive: UTC
    domain = f"{protocol.protocol.trial_id.lower()}.nktrial"
    lines = []
    for sid, row in _rows(session, FEEDS[role]):
        local = to_local(tz, row.actual_at or row.due_at)
        window = f"window {row.window_start_on} to {row.window_end_on}; " if row.window_start_on != row.window_end_on else ""
        lines += ["BEGIN:VEVENT",
                  _fold(f"SUMMARY:{_text(f'{sid} · {row.label}')}"),
                  f"DTSTART;TZID={tz}:{local:%Y%m%dT%H%M%S}",
                  f"DTEND;TZID={tz}:{local + dt.timedelta(minutes=EVENT_MINUTES):%Y%m%dT%H%M%S}",
                  f"DTSTAMP:{dtstamp}",
                  _fold(f"UID:{_text(f'{sid}-{row.key}@{domain}')}"),
                  _fold(f"DESCRIPTION:{_text(f'{window}protocol day {row.protocol_day}; {row.status.value}')}"),
                  "STATUS:CONFIRMED",
                  "END:VEVENT"]
    return head + "".join(line + "\r\n" for line in lines).encode("utf-8") + END_CALENDAR


END_CALENDAR = b"END:VCALENDAR\r\n"


def _text(value: str) -> str:
    """An iCalendar TEXT value (RFC 5545 3.3.11): backslash, semicolon, comma and line breaks escaped."""
    return (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\r", "\\n").replace("\n", "\\n"))


def _fold(line: str) -> str:
    """A content line folded as RFC 5545 3.1 asks: each piece under 75 octets, never inside a character, and a backslash
    that would end a piece carried over with what follows it (as icalendar folds)."""
    if len(line.encode("utf-8")) < 75:
        return line
    pieces, piece, size = [], "", 0
    for char in line:
        n = len(char.encode("utf-8"))
        if piece and size + n >= 75:
            if len(piece) > 1 and piece[-1] == "\\":
                pieces.append(piece[:-1])
                piece, size = "\\", 1
            else:
                pieces.append(piece)
                piece, size = "", 0
        piece += char
        size += n
    pieces.append(piece)
    return "\r\n ".join(pieces)


@functools.lru_cache(maxsize=4)
def _vtimezone(tzid: str) -> icalendar.Timezone:
    """The VTIMEZONE of a zone over icalendar's default span (its transitions take ~50 ms to compute); read-only."""
    return icalendar.Timezone.from_tzid(tzid)


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _local(protocol: ProtocolDefinition, at: dt.datetime | None) -> str:
    return to_local(protocol.timezone, at).isoformat(timespec="minutes") if at else ""


def csv_exports(session: Session, protocol: ProtocolDefinition, folder: Path) -> list[Path]:
    cal = [[sid, r.key, r.kind.value, r.label, r.protocol_day, _local(protocol, r.due_at), r.window_start_on, r.window_end_on,
            r.status.value, _local(protocol, r.actual_at), r.deviation_reason or ""] for sid, r in _rows(session)]
    admin = [[sid, a.kind.value, a.event_key, "yes" if a.given else "no", _local(protocol, a.given_at), a.dose_level or "",
              f"{a.cells_infused:.3e}" if a.cells_infused else "", a.product_lot or "", a.dose_miu or "", a.missed_reason or "",
              a.deviation_reason or ""]
             for sid, a in session.exec(select(Subject.subject_id, Administration).join(Subject, Subject.id == Administration.subject_pk)
                                        .order_by(Subject.subject_id, Administration.id))]
    aes = [[sid, ae.id, ae.term, ae.category, ae.grade, ae.onset_on, ae.resolved_on or "", ae.attribution, "yes" if ae.serious else "no",
            ae.dlt_screen or "", ae.adjudication.value]
           for sid, ae in session.exec(select(Subject.subject_id, AdverseEvent).join(Subject, Subject.id == AdverseEvent.subject_pk)
                                       .order_by(AdverseEvent.id))]
    return [
        _csv(folder / "calendars.csv", ["subject_id", "event_key", "kind", "label", "protocol_day", "due_site_time", "window_start",
                                        "window_end", "status", "actual_site_time", "deviation_reason"], cal),
        _csv(folder / "administrations.csv", ["subject_id", "kind", "event_key", "given", "given_site_time", "dose_level", "cells_infused",
                                              "product_lot", "dose_miu", "missed_reason", "deviation_reason"], admin),
        _csv(folder / "adverse_events.csv", ["subject_id", "ae_id", "term", "category", "grade", "onset_on", "resolved_on", "attribution",
                                             "serious", "dlt_screen", "adjudication"], aes),
    ]


def _study_day(on: dt.date, ref: dt.date) -> int:
    """SDTM --DY: day 1 is the reference start date; there is no day 0."""
    return (on - ref).days + (1 if on >= ref else 0)


def sdtm_exports(session: Session, protocol: ProtocolDefinition, folder: Path) -> list[Path]:
    study = protocol.protocol.trial_id
    tz = protocol.timezone
    ref: dict[str, dt.date] = {}  # RFSTDTC: first NK infusion
    ex, seq = [], {}
    admin = session.exec(select(Subject.subject_id, Administration).join(Subject, Subject.id == Administration.subject_pk)
                         .where(Administration.given.is_(True)).order_by(Subject.subject_id, Administration.given_at)).all()
    for sid, a in admin:
        if a.kind is AdministrationKind.NK_INFUSION and a.event_key == "nk_infusion-1":
            ref[sid] = to_local(tz, a.given_at).date()
    for sid, a in admin:
        when = to_local(tz, a.given_at)
        seq[sid] = seq.get(sid, 0) + 1
        nk = a.kind is AdministrationKind.NK_INFUSION
        ex.append([study, "EX", f"{study}-{sid}", seq[sid], "DONOR NK CELLS" if nk else "INTERLEUKIN-2",
                   f"{a.cells_infused:.3e}" if nk else a.dose_miu, "CELLS" if nk else "MIU", "SUSPENSION" if nk else "INJECTION",
                   "ONCE" if nk else "QD", (protocol.nk_infusions.route.value if nk else protocol.il2.route.value).upper(),
                   when.isoformat(timespec="minutes"), when.isoformat(timespec="minutes"),
                   _study_day(when.date(), ref[sid]) if sid in ref else ""])
    ae_rows, seq = [], {}
    for sid, ae in session.exec(select(Subject.subject_id, AdverseEvent).join(Subject, Subject.id == AdverseEvent.subject_pk)
                                .order_by(Subject.subject_id, AdverseEvent.onset_on, AdverseEvent.id)):
        seq[sid] = seq.get(sid, 0) + 1
        ae_rows.append([study, "AE", f"{study}-{sid}", seq[sid], ae.term, ae.term.upper(), ae.category.upper(), ae.grade,
                        "Y" if ae.serious else "N", ae.attribution.upper(), ae.onset_on.isoformat(),
                        ae.resolved_on.isoformat() if ae.resolved_on else "", _study_day(ae.onset_on, ref[sid]) if sid in ref else ""])
    sv = []
    for sid, r in _rows(session, (EventKind.NK_INFUSION, EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH)):
        if r.status is not EventStatus.DONE or r.key not in SV_VISITS:
            continue
        num, name = SV_VISITS[r.key]
        on = to_local(tz, r.actual_at).date()
        sv.append([study, "SV", f"{study}-{sid}", num, name, on.isoformat(), on.isoformat(), _study_day(on, ref[sid]) if sid in ref else ""])
    return [
        _csv(folder / "ex.csv", ["STUDYID", "DOMAIN", "USUBJID", "EXSEQ", "EXTRT", "EXDOSE", "EXDOSU", "EXDOSFRM", "EXDOSFRQ", "EXROUTE",
                                 "EXSTDTC", "EXENDTC", "EXSTDY"], ex),
        _csv(folder / "ae.csv", ["STUDYID", "DOMAIN", "USUBJID", "AESEQ", "AETERM", "AEDECOD", "AECAT", "AETOXGR", "AESER", "AEREL",
                                 "AESTDTC", "AEENDTC", "AESTDY"], ae_rows),
        _csv(folder / "sv.csv", ["STUDYID", "DOMAIN", "USUBJID", "VISITNUM", "VISIT", "SVSTDTC", "SVENDTC", "SVSTDY"], sv),
    ]


def write_feeds(session: Session, protocol: ProtocolDefinition, folder: Path, *, stamp: dt.datetime) -> list[Path]:
    out = []
    for role in FEEDS:
        path = folder / f"{role.value}.ics"
        path.write_bytes(ical_feed(session, protocol, role, stamp=stamp))
        out.append(path)
    return out
