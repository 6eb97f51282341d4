"""Reports from the trial database: what a coordinator and PI would rather look at than read.

Each report is a pure read of the database: the dashboard (levels, tallies, decisions and
signatures, enrollment against target, waitlist), PK (donor NK Cmax and Tmax from the recorded
samples), and the 3-month outcomes by dose level. The swimmer plot and the exports live in
`tasks.swimmer` and `tasks.exports`; `write_all` writes every one of them to a folder.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session, func, select

from models.queries import get_subject
from models.tables import (
    CalendarEventRow,
    DoseLevelState,
    Enrollment,
    EscalationDecision,
    LabKind,
    LabResult,
    Signature,
    Subject,
    WaitlistEntry,
)
from protocol.calendar import EventKind
from protocol.cohorts import design_for
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.recording import site_today
from tasks.closure import closures_in_words
from tasks.escalation_gate import trial_state


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f} %)" if n else "0/0 (—)"


# -- dashboard ------------------------------------------------------------------------------------

@dataclass
class Dashboard:
    levels: list[dict]
    decisions: list[dict]
    enrolled: int
    target: int
    maximum: int
    waitlist: list[dict]
    history: str
    recommendation: str
    headline: list[str] = field(default_factory=list)  # TRIAL STOPPED, a level closed after de-escalation: in words, first
    not_dosed: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["# NCT06641648 cohort and trial dashboard", ""]
        lines += [f"## {h}" for h in self.headline] + ([""] if self.headline else [])
        lines += [f"Enrolled **{self.enrolled}** of the target **{self.target}** (at most {self.maximum} under 3+3) · "
                  f"outcome history `{self.history or 'none yet'}` · {self.recommendation}", "",
                  "| level | cells/infusion | status | enrolled | evaluable | DLTs | slots open |", "|---|---|---|---|---|---|---|"]
        lines += [f"| DL{lv['level']} | {lv['cells']:.1e} | {lv['status']} | {lv['enrolled']} | {lv['evaluable']} | {lv['dlts']} | "
                  f"{lv['slots_open']} |" for lv in self.levels]
        lines += ["", "## Decisions", ""]
        if self.decisions:
            lines += ["| # | history | rule | signed | signed by | printed name | when (site time) | meaning |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {d['n']} | `{d['history']}` | {d['rule']} | {d['signed'] or 'waiting'} | {d['signer'] or ''} | "
                      f"{d['printed_name'] or ''} | {d['signed_at'] or ''} | {d.get('meaning') or ''} |" for d in self.decisions]
        else:
            lines.append("No cohort has been reviewed yet.")
        if self.not_dosed:
            lines += ["", "## Patients who will not be dosed", "", "| patient | level | status | off study since |", "|---|---|---|---|"]
            lines += [f"| {p['subject_id']} | DL{p['level']} | {p['status']} | {p['since']} |" for p in self.not_dosed]
        lines += ["", "## Waitlist", ""]
        if self.waitlist:
            lines += ["| position | patient | waiting since | offered a slot |", "|---|---|---|---|"]
            lines += [f"| {i} | {w['subject_id']} | {w['since']} | {w['offered'] or 'not yet'} |" for i, w in enumerate(self.waitlist, 1)]
        else:
            lines.append("Nobody is waiting.")
        return "\n".join(lines)


def dashboard(session: Session, protocol: ProtocolDefinition) -> Dashboard:
    tz = protocol.timezone
    state = trial_state(session, protocol)
    tallies = design_for(protocol).tallies(state.cohorts)
    enrolled_by = dict(session.exec(select(Enrollment.dose_level, func.count()).group_by(Enrollment.dose_level)).all())
    levels = [{"level": lv.level, "cells": lv.cells_per_infusion, "status": lv.status.value.replace("_", " "),
               "enrolled": enrolled_by.get(lv.level, 0), "evaluable": tallies[lv.level].n, "dlts": tallies[lv.level].dlts,
               "slots_open": max(lv.slots_open - enrolled_by.get(lv.level, 0), 0) if lv.status.value == "open" else 0}
              for lv in session.exec(select(DoseLevelState).order_by(DoseLevelState.level))]
    decisions = []
    for n, d in enumerate(session.exec(select(EscalationDecision).order_by(EscalationDecision.id)), start=1):
        sig = session.exec(select(Signature).where(Signature.decision_id == d.id)).first()
        rule = d.recommended_action + (f" DL{d.recommended_level}" if d.recommended_level else "") + (f" (MTD DL{d.mtd})" if d.mtd else "")
        signed = (d.chosen_action + (f" DL{d.chosen_level}" if d.chosen_level else "")) if d.chosen_action else None
        decisions.append({"n": n, "history": d.history, "rule": rule, "signed": signed, "signer": sig.signer_id if sig else None,
                          "printed_name": sig.printed_name if sig else None,
                          "signed_at": f"{to_local(tz, sig.signed_at):%Y-%m-%d %H:%M} {tz}" if sig else None,
                          "meaning": sig.meaning.split(":", 1)[0] if sig else None})
    waitlist = [{"subject_id": sid, "since": f"{to_local(tz, added):%Y-%m-%d}", "offered": f"{to_local(tz, offered):%Y-%m-%d}" if offered else None}
                for sid, added, offered in session.exec(select(Subject.subject_id, WaitlistEntry.added_at, WaitlistEntry.offered_at)
                                                        .join(Subject, Subject.id == WaitlistEntry.subject_pk).order_by(WaitlistEntry.id))]
    headline, undosed = closures_in_words(session, protocol)
    rec = state.recommendation
    advice = f"the rule now says: {rec.action.value}" + (f" DL{rec.dose_level}" if rec.dose_level else "") if state.ready and rec else \
        ("waiting for DLT windows: " + ", ".join(state.pending) if state.pending else "no cohort waiting for review")
    esc = protocol.escalation
    if headline and headline[0].startswith("TRIAL STOPPED"):
        advice = "the trial is stopped: nothing more to decide"
    return Dashboard(levels, decisions, sum(enrolled_by.values()), esc.target_enrollment.value, esc.max_enrollment.value, waitlist,
                     state.history, advice, headline, undosed)


# -- PK -------------------------------------------------------------------------------------------

@dataclass
class PkPatient:
    subject_id: str
    dose_level: int
    samples: int
    cmax: float | None
    tmax_day: int | None
    unit: str


@dataclass
class PkReport:
    patients: list[PkPatient]
    levels: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["# Donor NK cell PK (donor NK cells/µL)", "", "Cmax is the highest recorded count; Tmax its protocol day "
                 "(the earliest, on a tie).", "", "| level | patients | median Cmax | Cmax range | median Tmax (day) |", "|---|---|---|---|---|"]
        lines += [f"| DL{lv['dose_level']} | {lv['patients']} | {lv['median_cmax']} | {lv['cmax_range']} | {lv['median_tmax_day']} |"
                  for lv in self.levels]
        lines += ["", "| patient | level | samples | Cmax | Tmax (day) |", "|---|---|---|---|---|"]
        lines += [f"| {p.subject_id} | DL{p.dose_level} | {p.samples} | {p.cmax if p.cmax is not None else '—'} | "
                  f"{p.tmax_day if p.tmax_day is not None else '—'} |" for p in self.patients]
        return "\n".join(lines)


def pk(session: Session) -> PkReport:

    rows = session.exec(select(Subject.subject_id, Subject.dose_level, LabResult.value, LabResult.unit, CalendarEventRow.protocol_day)
                        .join(Subject, Subject.id == LabResult.subject_pk)
                        .join(CalendarEventRow, sa.and_(CalendarEventRow.subject_pk == LabResult.subject_pk,
                                                        CalendarEventRow.key == LabResult.event_key))
                        .where(LabResult.kind == LabKind.DONOR_NK_COUNT, LabResult.value.is_not(None))
                        .order_by(Subject.subject_id, CalendarEventRow.protocol_day)).all()
    by: dict[str, list] = {}
    for sid, level, value, unit, day in rows:
        by.setdefault(sid, []).append((level, value, unit, day))
    patients = []
    for sid, samples in by.items():
        level, cmax, unit, tmax = max(samples, key=lambda s: (s[1], -s[3]))
        patients.append(PkPatient(sid, level, len(samples), cmax, tmax, unit or "cells/uL"))
    report = PkReport(sorted(patients, key=lambda p: (p.dose_level, p.subject_id)))
    for level in sorted({p.dose_level for p in patients}):
        ps = [p for p in patients if p.dose_level == level]
        cm = [p.cmax for p in ps]
        report.levels.append({"dose_level": level, "patients": len(ps), "median_cmax": round(statistics.median(cm), 2),
                              "cmax_range": f"{min(cm)}–{max(cm)}", "median_tmax_day": f"{statistics.median(p.tmax_day for p in ps):g}"})
    return report


# -- 3-month outcomes -----------------------------------------------------------------------------

@dataclass
class Outcomes:
    levels: list[dict]

    def markdown(self) -> str:
        lines = ["# 3-month outcomes by dose level", "", "Rates over patients with a recorded 3-month result; CR/CRi counts both.",
                 "", "| level | enrolled | MRD assessed | MRD-negative | response assessed | CR | CR/CRi |", "|---|---|---|---|---|---|---|"]
        lines += [f"| DL{lv['dose_level']} | {lv['enrolled']} | {lv['mrd_assessed']} | {lv['mrd_negative']} | {lv['response_assessed']} | "
                  f"{lv['cr']} | {lv['cr_cri']} |" for lv in self.levels]
        return "\n".join(lines)


def outcomes(session: Session, protocol: ProtocolDefinition) -> Outcomes:
    enrolled = dict(session.exec(select(Enrollment.dose_level, func.count()).group_by(Enrollment.dose_level)).all())
    results = session.exec(select(Subject.dose_level, LabResult.kind, LabResult.category).join(Subject, Subject.id == LabResult.subject_pk)
                           .where(LabResult.kind.in_([LabKind.MRD_MFC, LabKind.RESPONSE]),
                                  LabResult.event_key == "visit_3_month")).all()
    levels = []
    for lv in protocol.dose_levels.levels:
        mrd = [c for level, kind, c in results if level == lv.level and kind is LabKind.MRD_MFC]
        resp = [c for level, kind, c in results if level == lv.level and kind is LabKind.RESPONSE]
        neg, cr, cri = mrd.count("negative"), resp.count("CR"), resp.count("CRi")
        levels.append({"dose_level": lv.level, "enrolled": enrolled.get(lv.level, 0), "mrd_assessed": len(mrd),
                       "mrd_negative": _pct(neg, len(mrd)), "mrd_negative_count": neg, "response_assessed": len(resp),
                       "cr": _pct(cr, len(resp)), "cr_count": cr, "cr_cri": _pct(cr + cri, len(resp)), "cr_cri_count": cr + cri})
    return Outcomes(levels)


# -- everything, to a folder ----------------------------------------------------------------------

@dataclass
class ReportSet:
    folder: str
    files: list[str]
    dashboard: str
    pk: str
    outcomes: str
    swimmer_png: bytes


def build(session: Session, protocol: ProtocolDefinition, *, now: dt.datetime) -> ReportSet:
    """Every report, in memory (the artifacts need no files)."""
    from tasks.swimmer import swimmer_png

    png = swimmer_png(session, protocol, site_today(protocol, now))
    return ReportSet("", [], dashboard(session, protocol).markdown(), pk(session).markdown(), outcomes(session, protocol).markdown(), png)


def write_all(session: Session, protocol: ProtocolDefinition, folder, *, now: dt.datetime) -> ReportSet:
    """Every report and export under `folder`: swimmer.png, the markdown reports, iCalendar feeds, CSV and SDTM."""
    from pathlib import Path

    from tasks.exports import csv_exports, sdtm_exports, write_feeds

    folder = Path(folder)
    for sub in ("ical", "csv", "sdtm"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rs = build(session, protocol, now=now)
    (folder / "swimmer.png").write_bytes(rs.swimmer_png)
    files = [folder / "swimmer.png"]
    for name, text in (("dashboard.md", rs.dashboard), ("pk.md", rs.pk), ("outcomes.md", rs.outcomes)):
        (folder / name).write_text(text + "\n", encoding="utf-8")
        files.append(folder / name)
    files += write_feeds(session, protocol, folder / "ical", stamp=now)
    files += csv_exports(session, protocol, folder / "csv")
    files += sdtm_exports(session, protocol, folder / "sdtm")
    rs.folder, rs.files = str(folder), [str(f.relative_to(folder)) for f in files]
    return rs


# -- the cohort review: what the PI reads before signing --------------------------------------------

def schedule_table(session: Session, protocol: ProtocolDefinition, subject_id: str) -> list[dict]:
    """The patient's whole plan in site time, one row per event; the IL-2 doses in one row. Each row's date and time
    are the instant its run acts on (the DLT window's close is the end of its last day: the next day's 00:00)."""
    from models.tables import EventStatus

    subject = get_subject(session, subject_id=subject_id)
    rows = session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id)
                        .order_by(CalendarEventRow.due_at)).all()
    tz = protocol.timezone
    il2 = [r for r in rows if r.kind is EventKind.IL2_DOSE]
    out = []
    for r in rows:
        local = to_local(tz, r.due_at)
        if r.kind is EventKind.IL2_DOSE:
            if r is il2[0]:
                counts = {st: sum(d.status is st for d in il2) for st in EventStatus}
                out.append({"day": f"{il2[0].protocol_day}–{il2[-1].protocol_day}", "date": f"{il2[0].local_on} → {il2[-1].local_on}",
                            "time": f"{local:%H:%M}",
                            "event": f"IL-2 {protocol.il2.dose_miu.value:g} MIU {protocol.il2.route.value} daily, doses 1–{len(il2)}",
                            "window": "", "status": ", ".join(f"{n} {st.value}" for st, n in counts.items() if n),
                            "reminder": "daily rounds"})
            continue
        event = r.label
        if r.kind is EventKind.DLT_WINDOW_CLOSE:
            event = f"DLT window closes at the end of day {r.protocol_day} ({r.local_on}), that is {local:%Y-%m-%d %H:%M} {tz}"
        out.append({
            "day": r.protocol_day,
            "date": f"{local:%Y-%m-%d}",
            "time": f"{local:%H:%M}",
            "event": event,
            "window": f"{r.window_start_on} – {r.window_end_on}" if r.window_start_on != r.window_end_on else "",
            "status": r.status.value,
            "reminder": f"{to_local(tz, r.remind_at):%Y-%m-%d %H:%M}" if r.remind_at else "",
        })
    return out


def rounds_markdown(r, projection: str) -> str:
    """Daily rounds (a `tasks.rounds.RoundsReport`) and the projection check, for the artifact."""
    def items(pairs):
        return ", ".join(f"{sid} {key}" for sid, key in pairs) or "none"

    return "\n".join([
        f"# Daily rounds {r.today}", "",
        f"- active patients: **{r.active_patients}**",
        f"- IL-2 due today ({len(r.il2_due)}): {items(r.il2_due)}",
        f"- IL-2 missed yesterday ({len(r.il2_missed)}): {items(r.il2_missed)}",
        f"- visits whose window closes today, not done ({len(r.visits_closing)}): {items(r.visits_closing)}",
        f"- overdue ({len(r.overdue)}): {items(r.overdue[:50])}",
        f"- notices written: {r.notices}",
        f"- Prefect projection: {projection}",
        "- what is due today and in the next 7 days, by patient and time: the `worklist` artifact; each patient: `casebook-s-…`",
    ])
