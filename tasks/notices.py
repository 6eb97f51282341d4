"""Staff notifications: composed from a fixed vocabulary, written to the outbox with the change.

A notice carries the subject ID, the event, the due date and a link to the Prefect run, and
nothing else about the patient: no name, birth date, free text or lab values. That is enforced
here by construction: a message is built only from those fields.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from sqlmodel import Session, func, select

from models.tables import NotificationOutbox, OutboxStatus
from protocol.roles import Role


class NoticeEvent(StrEnum):
    """What happened, in words staff read. The value is the text shown."""

    ENROLLED = "enrolled"
    WAITLISTED = "eligible, waitlisted: no open slot"
    NOT_ELIGIBLE = "screening: not eligible"
    PRODUCT_REQUEST = "NK product request"
    INFUSION_PREP = "NK infusion preparation"
    INFUSION_RECORDED = "NK infusion recorded"
    IL2_DUE = "IL-2 dose due today"
    IL2_MISSED = "IL-2 dose missed (no administration recorded)"
    VISIT_WINDOW_OPEN = "visit window opens"
    VISIT_OUT_OF_WINDOW = "visit window closes today, visit not done"
    PK_SAMPLE_DUE = "PK sample due"
    DLT_WINDOW_CLOSED = "DLT window closed"
    OVERDUE = "overdue"
    OFF_STUDY = "off study: future visits and reminders cancelled"
    DAILY_DIGEST = "daily digest"
    CANDIDATE_DLT = "candidate DLT"
    AE_NEEDS_INFORMATION = "AE needs information for the DLT screen"
    SAE_REPORTED = "serious adverse event: reporting clock started"
    SAE_DEADLINE = "SAE report not yet recorded"
    ADJUDICATION_PENDING = "candidate DLT waiting for adjudication"
    REVIEW_WAITING = "cohort review waiting for the PI signature"
    ESCALATION_SIGNED = "escalation decision signed"
    TRIAL_STOPPED = "trial stopped"
    NOT_DOSED = "will not be dosed: NK infusions, product requests and preparation cancelled"
    DOSING_TO_CONFIRM = "trial stopped or level closed: do not infuse, NK infusion 1 was due already: record it if it was given"
    REPLACEMENT_SLOT = "not evaluable: a replacement slot is open"
    AUDIT_BREAK = "audit trail check failed: rows changed, deleted or written out of band"
    SIGNING_LOCKED_OUT = "signing locked out after repeated wrong codes"  # the staff ID and the act; never a code
    WRONG_TRIAL = "a run of another trial database was refused here: it did nothing"  # the two instances and the run's link
    RUN_STUCK = "a run stuck or crashed"  # the run's label, its state, how long, and what was done (tasks.projection)


@dataclass(frozen=True)
class Notice:
    role: Role
    event: NoticeEvent
    subject_id: str | None = None
    due_on: dt.date | None = None
    detail: str = ""  # protocol wording only (e.g. "infusion 2, DL2"); never patient data
    link: str | None = None

    @property
    def title(self) -> str:
        return f"[NCT06641648] {self.subject_id + ' · ' if self.subject_id else ''}{self.event.value}"

    @property
    def body(self) -> str:
        parts = [self.subject_id or "trial", self.event.value]
        if self.detail:
            parts.append(self.detail)
        if self.due_on:
            parts.append(f"due {self.due_on.isoformat()}")
        if self.link:
            parts.append(self.link)
        return " · ".join(parts)


def _key(notice: Notice, dedup: str) -> str:
    return f"{notice.role.value}:{dedup}"[:160]


def _row(notice: Notice, key: str, at: dt.datetime) -> NotificationOutbox:
    return NotificationOutbox(dedup_key=key, role=notice.role.value, subject_id=notice.subject_id, event=notice.event.name.lower(),
                              title=notice.title, body=notice.body, link=notice.link, created_at=at)


def enqueue(session: Session, notice: Notice, *, dedup: str, at: dt.datetime) -> NotificationOutbox | None:
    """Add a notice to the outbox in the caller's transaction. The same `dedup` key is written once."""
    key = _key(notice, dedup)
    if session.exec(select(NotificationOutbox.id).where(NotificationOutbox.dedup_key == key)).first() is not None:
        return None
    row = _row(notice, key, at)
    session.add(row)
    return row


def enqueue_many(session: Session, notices: list[tuple[Notice, str]], *, at: dt.datetime) -> int:
    """enqueue() for many notices, with one look-up per 500 keys of those already written."""
    wanted = {_key(n, d): n for n, d in notices}
    keys = list(wanted)
    seen: set[str] = set()
    for i in range(0, len(keys), 500):
        seen.update(session.exec(select(NotificationOutbox.dedup_key).where(NotificationOutbox.dedup_key.in_(keys[i:i + 500]))).all())
    fresh = [k for k in keys if k not in seen]
    session.add_all([_row(wanted[k], k, at) for k in fresh])
    return len(fresh)


def cancel_pending(session: Session, *, subject_id: str) -> int:
    """Cancel every undelivered notice of one subject (off study). Delivered ones stay as they were."""
    rows = session.exec(
        select(NotificationOutbox).where(NotificationOutbox.subject_id == subject_id, NotificationOutbox.status == OutboxStatus.PENDING)
    ).all()
    for row in rows:
        row.status = OutboxStatus.CANCELLED
        session.add(row)
    return len(rows)


def waited(since: dt.datetime, now: dt.datetime) -> str:
    """How long a notice has waited, in words staff read: 12 min, 3 h 5 min, 2 d 4 h."""
    minutes = max(0, int((now - since).total_seconds() // 60))
    days, hours, mins = minutes // 1440, minutes // 60 % 24, minutes % 60
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {mins} min" if hours else f"{mins} min"


@dataclass(frozen=True)
class Waiting:
    """Undelivered notices: how many, since when, and how many per role."""

    count: int
    oldest_at: dt.datetime | None
    by_role: dict[str, int]

    def sentence(self, now: dt.datetime) -> str:
        if not self.count:
            return "no notice waits in the outbox"
        roles = ", ".join(f"{role} {n}" for role, n in sorted(self.by_role.items()))
        return f"notices waiting {self.count}, oldest {waited(self.oldest_at, now)} ({roles})"


def waiting(session: Session) -> Waiting:
    """The pending notices: the digest and `nktrial notify list` show what waits and for how long."""
    rows = session.exec(select(NotificationOutbox.role, func.count(), func.min(NotificationOutbox.created_at))
                        .where(NotificationOutbox.status == OutboxStatus.PENDING).group_by(NotificationOutbox.role)).all()
    oldest = [at for _, _, at in rows if at is not None]
    return Waiting(count=sum(n for _, n, _ in rows), oldest_at=_utc(min(oldest)) if oldest else None,
                   by_role={(r.value if isinstance(r, Role) else str(r)): n for r, n, _ in rows})


def _utc(at: dt.datetime) -> dt.datetime:
    """min() over a UTC column comes back without the column's type on SQLite: a naive UTC string or datetime."""
    if isinstance(at, str):
        at = dt.datetime.fromisoformat(at)
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
