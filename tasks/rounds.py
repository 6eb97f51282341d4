"""Daily rounds: IL-2 due today and missed yesterday, visits closing undone, overdue items, and the
coordinators' digest, for every active patient at once.

Active means on study: enrolled, on treatment or in follow-up. A patient whom a signed stop or
de-escalation left undosed is off study ("not dosed: trial stopped", `tasks.closure`): not active,
nothing of theirs is on the worklists, and the digest counts them apart.

A plain function, no Prefect: the daily-rounds flow calls it. A handful of set-based queries,
whatever the number of patients; each notice is written once a day however often rounds run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import select

from models.clock import Clock
from models.db import UnitOfWork
from models.queries import active_subject_pks, count_active, not_dosed
from models.tables import CalendarEventRow, EventStatus, Subject
from protocol.calendar import EventKey, EventKind
from protocol.definition import ProtocolDefinition
from protocol.recording import site_today
from protocol.roles import Role
from tasks.notices import Notice, NoticeEvent, enqueue_many, waiting

VISITS = (EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH)


@dataclass
class RoundsReport:
    today: dt.date
    active_patients: int = 0  # on study: enrolled, on treatment or in follow-up
    not_dosed: list[str] = field(default_factory=list)  # left undosed by a signed stop or de-escalation; not active
    il2_due: list[tuple[str, str]] = field(default_factory=list)
    il2_missed: list[tuple[str, str]] = field(default_factory=list)
    visits_closing: list[tuple[str, str]] = field(default_factory=list)
    overdue: list[tuple[str, str]] = field(default_factory=list)
    notices: int = 0
    waiting: str = ""  # undelivered notices, how many and since when (tasks.notices.waiting); empty when none wait

    @property
    def digest(self) -> str:
        """The coordinators' one-line digest."""
        apart = f" ({len(self.not_dosed)} not dosed after a signed stop or de-escalation, off study)" if self.not_dosed else ""
        text = (f"{self.active_patients} active{apart}; IL-2 due {len(self.il2_due)}, missed yesterday {len(self.il2_missed)}; "
                f"visits closing undone {len(self.visits_closing)}; overdue {len(self.overdue)}")
        if self.overdue:
            text += ": " + ", ".join(f"{sid} {key}" for sid, key in self.overdue[:20]) + (" …" if len(self.overdue) > 20 else "")
        if self.waiting:
            text += f"; {self.waiting}"
        return text


def daily_rounds(engine: sa.Engine, protocol: ProtocolDefinition, *, clock: Clock, link: str | None = None) -> RoundsReport:
    """IL-2 due today and missed yesterday, visits closing undone, overdue items, and the digest."""
    today = site_today(protocol, clock())
    report = RoundsReport(today=today)
    with UnitOfWork(engine, actor="system:daily-rounds", reason=f"daily rounds {today}", clock=clock) as u:
        s = u.session
        report.active_patients = count_active(s)
        report.not_dosed = [sid for sid, _ in not_dosed(s).values()]
        _read_worklists(s, report)
        if (w := waiting(s)).count:
            report.waiting = w.sentence(u.at)
        report.notices = enqueue_many(s, _notices(report, link), at=u.at)
        u.commit()
    return report


def _read_worklists(s, report: RoundsReport) -> None:
    today, yesterday = report.today, report.today - dt.timedelta(days=1)
    base = (select(Subject.subject_id, CalendarEventRow.key, CalendarEventRow.label, CalendarEventRow.local_on)
            .join(Subject, Subject.id == CalendarEventRow.subject_pk)
            .where(CalendarEventRow.subject_pk.in_(active_subject_pks()), CalendarEventRow.status == EventStatus.PLANNED))
    il2 = s.exec(base.where(CalendarEventRow.kind == EventKind.IL2_DOSE, CalendarEventRow.local_on.in_([today, yesterday]))).all()
    report.il2_due = [(sid, key) for sid, key, _, on in il2 if on == today]
    report.il2_missed = [(sid, key) for sid, key, _, on in il2 if on == yesterday]
    report.visits_closing = [(sid, key) for sid, key, _, _ in s.exec(
        base.where(CalendarEventRow.kind.in_(list(VISITS)), CalendarEventRow.window_end_on == today)).all()]
    report.overdue = [(sid, key) for sid, key, _, _ in s.exec(
        base.where(CalendarEventRow.kind.in_([EventKind.NK_INFUSION, EventKind.PK_SAMPLE, *VISITS]),
                   CalendarEventRow.window_end_on < today).order_by(Subject.subject_id, CalendarEventRow.key)).all()]


def _notices(report: RoundsReport, link: str | None) -> list[tuple[Notice, str]]:
    """Each notice with its once-a-day dedup key."""
    today, yesterday = report.today, report.today - dt.timedelta(days=1)
    notices: list[tuple[Notice, str]] = []
    for sid, key in report.il2_due:
        notices.append((Notice(Role.NURSE, NoticeEvent.IL2_DUE, sid, due_on=today, detail=_il2(key), link=link), f"{sid}:{key}:due"))
    for sid, key in report.il2_missed:
        for role in (Role.NURSE, Role.COORDINATOR):
            notices.append((Notice(role, NoticeEvent.IL2_MISSED, sid, due_on=yesterday, detail=_il2(key), link=link), f"{sid}:{key}:missed"))
    for sid, key in report.visits_closing:
        notices.append((Notice(Role.COORDINATOR, NoticeEvent.VISIT_OUT_OF_WINDOW, sid, due_on=today, detail=key.replace("_", " "),
                               link=link), f"{sid}:{key}:closing"))
    notices.append((Notice(Role.COORDINATOR, NoticeEvent.DAILY_DIGEST, due_on=today, detail=report.digest, link=link), f"digest:{today}"))
    return notices


def _il2(key: str) -> str:
    return f"IL-2 dose {EventKey.parse(key).number}"
