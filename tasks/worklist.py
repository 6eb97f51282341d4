"""The coordinators' worklist: everything due today and in the next days across active patients,
overdue first, then by time, with who does it and the window; and the trial's state in words.

A pure read of the trial database, no Prefect: the daily-rounds flow publishes it as the
`worklist` artifact. Times are site time with the zone named.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from sqlmodel import Session, select

from models.queries import active_subject_pks
from models.tables import CalendarEventRow, DoseLevelState, EscalationDecision, EventStatus, LevelStatus, Signature, Subject
from protocol.calendar import EventKey, EventKind
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.recording import site_today
from protocol.roles import Act
from protocol.three_plus_three import Action
from tasks.due_events import told_roles

HORIZON_DAYS = 7
RECORDED_BY = {  # events a person records; the roles come from the protocol's delegation log
    EventKind.NK_INFUSION: Act.RECORD_INFUSION,
    EventKind.IL2_DOSE: Act.RECORD_IL2,
    EventKind.PK_SAMPLE: Act.RECORD_VISIT_OR_LAB,
    EventKind.VISIT_1_MONTH: Act.RECORD_VISIT_OR_LAB,
    EventKind.VISIT_3_MONTH: Act.RECORD_VISIT_OR_LAB,
}


@dataclass(frozen=True)
class WorkItem:
    subject_id: str
    what: str
    due_at: dt.datetime  # UTC
    window: str
    who: str
    overdue: bool = False


@dataclass
class Worklist:
    today: dt.date
    until: dt.date
    timezone: str
    active_patients: int
    headline: list[str] = field(default_factory=list)  # TRIAL STOPPED, a level closed: in words, first
    items: list[WorkItem] = field(default_factory=list)  # overdue first, then by time

    @property
    def overdue(self) -> list[WorkItem]:
        return [i for i in self.items if i.overdue]

    @property
    def due_today(self) -> list[WorkItem]:
        return [i for i in self.items if not i.overdue and to_local(self.timezone, i.due_at).date() <= self.today]

    @property
    def coming(self) -> list[WorkItem]:
        return [i for i in self.items if not i.overdue and to_local(self.timezone, i.due_at).date() > self.today]

    def markdown(self, casebook_link=lambda sid: None) -> str:
        tz = self.timezone
        lines = [f"# Worklist {self.today} ({tz})", ""]
        lines += [f"## {h}" for h in self.headline] + ([""] if self.headline else [])
        lines += [f"{self.active_patients} active patient(s). Due today and in the next {(self.until - self.today).days} days "
                  f"(to {self.until}), overdue first, then by time. Times are site time, {tz}.", ""]
        for title, items in ((f"Overdue ({len(self.overdue)})", self.overdue),
                             (f"Today {self.today} ({len(self.due_today)})", self.due_today),
                             (f"Next {(self.until - self.today).days} days ({len(self.coming)})", self.coming)):
            lines += [f"## {title}", ""]
            if not items:
                lines += ["nothing", ""]
                continue
            lines += [f"| due ({tz}) | patient | who | what | window |", "|---|---|---|---|---|"]
            for i in items:
                link = casebook_link(i.subject_id)
                who = f"[{i.subject_id}]({link})" if link else i.subject_id
                lines.append(f"| {to_local(tz, i.due_at):%Y-%m-%d %H:%M} | {who} | {i.who} | {i.what} | {i.window} |")
            lines.append("")
        return "\n".join(lines)


def trial_headline(session: Session) -> list[str]:
    """The trial's stop and closed levels, in words, from the signed decisions and the levels' states."""
    lines = []
    signed = session.exec(select(EscalationDecision, Signature).join(Signature, Signature.decision_id == EscalationDecision.id)
                          .order_by(EscalationDecision.id.desc())).all()  # newest first: a stop leads
    for d, sig in signed:
        if d.chosen_action == Action.STOP:
            lines.append(f"TRIAL STOPPED: stop signed by {sig.printed_name} ({sig.signer_id}) for DL{d.from_level}; "
                         "no more infusions for patients not yet dosed")
        elif d.chosen_action == Action.DEESCALATE:
            lines.append(f"DL{d.from_level} CLOSED: de-escalation signed by {sig.printed_name} ({sig.signer_id})")
    for level in session.exec(select(DoseLevelState).order_by(DoseLevelState.level)):
        if level.status is LevelStatus.TOO_TOXIC and not any(f"DL{level.level} CLOSED" in h for h in lines):
            lines.append(f"DL{level.level} CLOSED: too toxic")
    return lines


def worklist(session: Session, protocol: ProtocolDefinition, *, now: dt.datetime, days: int = HORIZON_DAYS) -> Worklist:
    """Planned events of active patients that are overdue (their window ended, not recorded) or due from today to today + days."""
    tz = protocol.timezone
    today = site_today(protocol, now)
    until = today + dt.timedelta(days=days)
    rows = session.exec(select(Subject.subject_id, CalendarEventRow).join(Subject, Subject.id == CalendarEventRow.subject_pk)
                        .where(CalendarEventRow.subject_pk.in_(active_subject_pks()), CalendarEventRow.status == EventStatus.PLANNED,
                               CalendarEventRow.kind != EventKind.DLT_WINDOW_OPEN,
                               CalendarEventRow.local_on <= until)).all()
    active = len(session.exec(active_subject_pks()).all())
    items: list[WorkItem] = []
    il2: dict[tuple[str, bool], list[CalendarEventRow]] = defaultdict(list)
    for sid, row in rows:
        late = row.kind in RECORDED_BY and row.window_end_on < today
        if not late and row.window_end_on < today:
            continue  # past, and nothing to record (a product request sent, a DLT window closed)
        if row.kind is EventKind.IL2_DOSE:
            il2[(sid, late)].append(row)
            continue
        items.append(WorkItem(sid, _what(row, late), row.due_at, _window(row), _who(protocol, row.kind), late))
    for (sid, late), doses in il2.items():
        doses.sort(key=lambda r: r.due_at)
        items.append(_il2_item(protocol, sid, doses, late))
    items.sort(key=lambda i: (not i.overdue, i.due_at, i.subject_id))
    return Worklist(today, until, tz, active, trial_headline(session), items)


def _what(row: CalendarEventRow, late: bool) -> str:
    text = row.label
    if row.kind is EventKind.DLT_WINDOW_CLOSE:
        text = f"{row.label} (the system closes it)"
    elif row.kind is EventKind.PRODUCT_REQUEST:
        text = f"{row.label} (to the cell lab)"
    return f"**not recorded**: {text}" if late else text


def _window(row: CalendarEventRow) -> str:
    return f"{row.window_start_on:%m-%d} → {row.window_end_on:%m-%d}" if row.window_start_on != row.window_end_on else "that day"


def _who(protocol: ProtocolDefinition, kind: EventKind) -> str:
    act = RECORDED_BY.get(kind)
    roles = protocol.authority.acts.get(act, ()) if act else told_roles(kind)
    names = ", ".join(r.value for r in roles)
    return (names if act else f"{names} (told)") if roles else "coordinator"


def _il2_item(protocol: ProtocolDefinition, sid: str, doses: list[CalendarEventRow], late: bool) -> WorkItem:
    """One line for a patient's IL-2 doses in the list: the late ones, or those due from today on."""
    il2 = protocol.il2
    numbers = [EventKey.parse(r.key).number for r in doses]
    span = f"dose {numbers[0]}" if len(numbers) == 1 else f"doses {numbers[0]}–{numbers[-1]}" \
        if numbers == list(range(numbers[0], numbers[-1] + 1)) else "doses " + ", ".join(map(str, numbers))
    what = f"IL-2 {il2.dose_miu.value:g} MIU {il2.route.value} daily, {span}"
    window = f"{doses[0].local_on:%m-%d} → {doses[-1].local_on:%m-%d}" if len(doses) > 1 else "that day"
    return WorkItem(sid, f"**not recorded** (given or missed?): {what}" if late else what, doses[0].due_at, window,
                    _who(protocol, EventKind.IL2_DOSE), late)
