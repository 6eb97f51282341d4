"""One patient's casebook: the calendar planned against actual, administrations with IL-2 adherence,
AEs with their adjudication, visits and labs, the cohort decisions at the patient's level, status and
the DLT window's state; and the one-click link to all of the patient's runs in the Prefect UI.

A pure read of the trial database, no Prefect: `flows.casebook.publish_casebook` publishes it as
the `casebook-s-001` artifact after every write about the patient.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlencode

from sqlmodel import Session, select

from models.queries import require_subject
from models.tables import (
    Adjudication,
    Administration,
    AdministrationKind,
    AdverseEvent,
    CalendarEventRow,
    Enrollment,
    EscalationDecision,
    EventStatus,
    LabResult,
    Signature,
)
from protocol.calendar import EventKey, EventKind, compute_calendar
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition

RUNS_MARGIN = dt.timedelta(days=30)  # the runs link covers enrollment to the last event, with this much either side
AS_OF = " · as of "  # the one part of a casebook that follows the clock rather than the record


def same_record(a: str, b: str) -> bool:
    """Two casebook texts that say the same about the patient: equal but for the time they were drawn ("as of")."""
    return _without_as_of(a) == _without_as_of(b)


def _without_as_of(markdown: str) -> str:
    head, sep, rest = markdown.partition(AS_OF)
    return head + (rest.partition("\n")[2] if sep else "")


def casebook_key(subject_id: str) -> str:
    """The artifact key: `casebook-s-001` (keys allow lower case letters, digits and '-')."""
    return "casebook-" + "".join(c if c.isalnum() else "-" for c in subject_id.lower())


def runs_url(ui_url: str, subject_id: str, start_at: dt.datetime, end_at: dt.datetime) -> str:
    """The Prefect UI's Runs page filtered to one patient's tag over a date range that includes the future,
    oldest first: the UI reads `tag`, `type=range`, `startDate`, `endDate` and `flow-runs-sort` from the address."""
    iso = "%Y-%m-%dT%H:%M:%S.000Z"
    query = {"tag": f"subject:{subject_id}", "type": "range",
             "startDate": start_at.astimezone(dt.timezone.utc).strftime(iso), "endDate": end_at.astimezone(dt.timezone.utc).strftime(iso),
             "flow-runs-sort": "EXPECTED_START_TIME_ASC"}
    return f"{ui_url.rstrip('/')}/runs?{urlencode(query)}"


def runs_range(session: Session, subject_id: str) -> tuple[dt.datetime, dt.datetime]:
    """From a month before the patient was created to a month after their last calendar event."""
    subject = require_subject(session, subject_id)
    last = session.exec(select(CalendarEventRow.due_at).where(CalendarEventRow.subject_pk == subject.id)
                        .order_by(CalendarEventRow.due_at.desc())).first()
    start = _utc(subject.created_at)
    return start - RUNS_MARGIN, _utc(last or start) + RUNS_MARGIN


def _utc(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


def casebook_markdown(session: Session, protocol: ProtocolDefinition, subject_id: str, *, now: dt.datetime,
                      runs_link: str | None = None) -> str:
    tz = protocol.timezone
    subject = require_subject(session, subject_id)
    enrollment = session.exec(select(Enrollment).where(Enrollment.subject_pk == subject.id)).first()
    rows = session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id).order_by(CalendarEventRow.due_at)).all()
    given = session.exec(select(Administration).where(Administration.subject_pk == subject.id).order_by(Administration.event_key)).all()

    def local(at: dt.datetime | None) -> str:
        return f"{to_local(tz, _utc(at)):%Y-%m-%d %H:%M}" if at else ""

    status = subject.status.value.replace("_", " ")
    if subject.off_study_reason:
        status += f" ({subject.off_study_reason.value.replace('_', ' ')}, since {subject.off_study_on})"
    lines = [f"# Casebook {subject.subject_id}", "",
             f"**Status:** {status} · **dose level:** DL{subject.dose_level or '–'}"
             + (f", cohort {enrollment.cohort}, slot {enrollment.slot} · **enrolled** {local(enrollment.enrolled_at)}"
                if enrollment else ""),
             f"· times are site time, **{tz}**{AS_OF}{local(now)}", ""]
    if runs_link:
        lines += [f"**[All of {subject.subject_id}'s runs, done and planned, oldest first]({runs_link})**", ""]
    lines += [f"**DLT window:** {_dlt_state(rows, enrollment, given, local)}", ""]
    lines += _calendar(protocol, subject, rows, given, local)
    lines += _administrations(protocol, given, rows, local)
    lines += _adverse_events(session, subject, local)
    lines += _labs(session, subject, rows, local)
    lines += _decisions(session, subject.dose_level, local)
    return "\n".join(lines)


def _dlt_state(rows, enrollment, given, local) -> str:
    close = next((r for r in rows if r.kind is EventKind.DLT_WINDOW_CLOSE), None)
    infusion_1 = next((a for a in given if a.kind is AdministrationKind.NK_INFUSION and a.given and a.event_key.endswith("-1")), None)
    if close is None:
        return "no calendar"
    ends = f"{local(close.due_at)} (end of day {close.protocol_day})"
    if enrollment and enrollment.dlt_window_closed_at:
        evaluable = {True: "evaluable", False: "not evaluable (replaced)", None: "evaluability not set"}[enrollment.evaluable]
        return f"closed at {local(enrollment.dlt_window_closed_at)}; {evaluable}"
    if close.status is EventStatus.CANCELLED:
        return "will not open: " + (close.deviation_reason or "cancelled")
    if infusion_1 is None:
        return f"not open yet: opens at NK infusion 1; planned to close {ends}"
    return f"**open** since {local(infusion_1.given_at)}; closes {ends}"


def _calendar(protocol, subject, rows, given, local) -> list[str]:
    """Each event as planned at enrollment, as now due (when an actual infusion moved it) and done; IL-2 in one line."""
    plan = {}
    if subject.planned_day0_at and subject.dose_level:
        cal = compute_calendar(protocol, dose_level=subject.dose_level, day0=to_local(protocol.timezone, _utc(subject.planned_day0_at)))
        plan = {e.key: e.at_utc for e in cal.events}
    lines = ["## Calendar: planned and actual", "", "| day | event | planned | window | actual | status |", "|---|---|---|---|---|---|"]
    il2 = [r for r in rows if r.kind is EventKind.IL2_DOSE]
    for r in rows:
        if r.kind is EventKind.IL2_DOSE:
            if r is il2[0]:
                lines.append(_il2_calendar_line(protocol, il2))
            continue
        planned = plan.get(r.key)
        moved = planned is None or abs(planned - _utc(r.due_at)) >= dt.timedelta(minutes=1)
        window = f"{r.window_start_on:%m-%d} → {r.window_end_on:%m-%d}" if r.window_start_on != r.window_end_on else ""
        state = r.status.value + (f", now due {local(r.due_at)}" if moved and r.status is EventStatus.PLANNED else "")
        state += f": {r.deviation_reason}" if r.deviation_reason else ""
        lines.append(f"| {r.protocol_day} | {r.label} | {local(planned)} | {window} | {local(r.actual_at)} | {state} |")
    return lines + [""]


def _il2_calendar_line(protocol, il2_rows) -> str:
    il2 = protocol.il2
    counts = {s: sum(r.status is s for r in il2_rows) for s in EventStatus}
    first, last = il2_rows[0], il2_rows[-1]
    return (f"| {first.protocol_day}–{last.protocol_day} "
            f"| IL-2 {il2.dose_miu.value:g} MIU {il2.route.value} daily, doses 1–{len(il2_rows)} "
            f"| {first.local_on} {to_local(protocol.timezone, _utc(first.due_at)):%H:%M} | {first.local_on:%m-%d} → {last.local_on:%m-%d} "
            f"| {counts[EventStatus.DONE]} given, {counts[EventStatus.MISSED]} missed "
            f"| {', '.join(f'{n} {s.value}' for s, n in counts.items() if n)} |")


def _administrations(protocol, given, rows, local) -> list[str]:
    nk = [a for a in given if a.kind is AdministrationKind.NK_INFUSION]
    lines = ["## Administrations", "", "### NK infusions", ""]
    if nk:
        lines += ["| infusion | given at | cells infused | product lot | dose level | deviation |", "|---|---|---|---|---|---|"]
        lines += [f"| {EventKey.parse(a.event_key).number} | {local(a.given_at)} | {a.cells_infused:.2e} | {a.product_lot} "
                  f"| DL{a.dose_level} "
                  f"| {a.deviation_reason or ''} |" for a in nk]
    else:
        lines.append("none given yet")
    doses = [a for a in given if a.kind is AdministrationKind.IL2_DOSE]
    planned = sum(r.kind is EventKind.IL2_DOSE for r in rows) or protocol.il2.duration_days.value
    done = [a for a in doses if a.given]
    missed = [a for a in doses if not a.given]
    lines += ["", "### IL-2", "", f"**Adherence: {len(done)}/{planned} doses given**, {len(missed)} missed, "
              f"{planned - len(doses)} not recorded yet."]
    if missed:
        lines += [f"- dose {EventKey.parse(a.event_key).number} missed: {a.missed_reason or 'no reason given'}" for a in missed]
    return lines + [""]


def _adverse_events(session, subject, local) -> list[str]:
    aes = session.exec(select(AdverseEvent).where(AdverseEvent.subject_pk == subject.id).order_by(AdverseEvent.id)).all()
    lines = ["## Adverse events", ""]
    if not aes:
        return lines + ["none reported", ""]
    lines += ["| AE | term | grade | onset | attribution | serious | DLT screen | adjudication | by, at |", "|---" * 9 + "|"]
    for a in aes:
        adjudication = a.adjudication.value.replace("_", " ") + (f": {a.adjudication_reason}" if a.adjudication_reason else "")
        if a.adjudication is Adjudication.PENDING:
            adjudication = "**waiting for the investigator or PI**"
        screen = (a.dlt_screen.value.replace("_", " ") if a.dlt_screen else "") + (f" ({a.dlt_rule})" if a.dlt_rule else "")
        by = f"{a.adjudicated_by}, {local(a.adjudicated_at)}" if a.adjudicated_by else ""
        lines.append(f"| {a.id} | {a.term} | {a.grade} | {a.onset_on} | {a.attribution.value} | {'yes' if a.serious else 'no'} | {screen} "
                     f"| {adjudication} | {by} |")
    return lines + [""]


def _labs(session, subject, rows, local) -> list[str]:
    visits = [r for r in rows if r.kind in (EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH)]
    lines = ["## Visits and labs", ""]
    lines += [f"- {r.label}: {r.status.value}" + (f" on {local(r.actual_at)[:10]}" if r.actual_at else f" (window {r.window_start_on} → "
              f"{r.window_end_on})") for r in visits]
    labs = session.exec(select(LabResult).where(LabResult.subject_pk == subject.id).order_by(LabResult.sampled_on, LabResult.id)).all()
    if labs:
        lines += ["", "| sampled on | result | value | for |", "|---|---|---|---|"]
        lines += [f"| {lab.sampled_on} | {lab.kind.value.replace('_', ' ')} | {_lab_value(lab)} | {lab.event_key} |" for lab in labs]
    else:
        lines += ["", "no lab or PK result recorded yet"]
    return lines + [""]


def _lab_value(lab: LabResult) -> str:
    return " ".join(p for p in (lab.category, None if lab.value is None else f"{lab.value:g}", lab.unit) if p)


def _decisions(session, level, local) -> list[str]:
    if level is None:
        return []
    rows = session.exec(select(EscalationDecision, Signature).join(Signature, Signature.decision_id == EscalationDecision.id, isouter=True)
                        .where(EscalationDecision.from_level == level).order_by(EscalationDecision.id)).all()
    lines = [f"## Cohort decisions at DL{level}", ""]
    if not rows:
        return lines + ["no cohort review at this level yet", ""]
    lines += ["| review | outcomes | 3+3 recommends | signed decision | signed by, at |", "|---|---|---|---|---|"]
    for d, sig in rows:
        chosen = (d.chosen_action.value + (f" DL{d.chosen_level}" if d.chosen_level else "")) if d.chosen_action else "waiting for the PI"
        lines.append(f"| {d.id} | {d.history} | {d.recommended_action.value} | {chosen} "
                     f"| {f'{sig.printed_name} ({sig.signer_id}), {local(sig.signed_at)}' if sig else ''} |")
    return lines + [""]
