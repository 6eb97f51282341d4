"""The escalation gate over the trial database: the cohort's state, the review the PI signs, and
what a signed decision opens or closes.

The rules are `protocol.cohorts` and `protocol.three_plus_three`; this module loads, stores and
notifies. The gate is enforced twice: here, with sentences a person can act on, and by database
triggers that refuse an enrollment, calendar or NK infusion at a level no signed approval has opened.
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.queries import enrolled_at_level, not_dosed, signed_stop, undosed_on_study
from models.tables import (
    Adjudication,
    AdverseEvent,
    DecisionStatus,
    DoseLevelState,
    Enrollment,
    EscalationDecision,
    LevelStatus,
    Signature,
    Subject,
    WaitlistEntry,
)
from protocol.cohorts import PatientRecord, TrialState, cohort_state, design_for
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.roles import Role
from protocol.three_plus_three import Action, too_toxic
from tasks.adverse_events import pending_adjudications
from tasks.notices import Notice, NoticeEvent, enqueue

OPENING_ACTIONS = (Action.ESCALATE, Action.EXPAND, Action.DEESCALATE)  # a signed one of these approves its chosen level


def trial_state(session: Session, protocol: ProtocolDefinition) -> TrialState:
    """The outcome history as 3+3 sees it, whether the newest cohort is ready for review, and the rule's advice."""
    rows = session.exec(select(Enrollment, Subject).join(Subject, Subject.id == Enrollment.subject_pk).order_by(Enrollment.id)).all()
    dlt_at = {pk: at for pk, at in session.exec(select(AdverseEvent.subject_pk, AdverseEvent.adjudicated_at)
                                                 .where(AdverseEvent.adjudication == Adjudication.CONFIRMED))}
    undosed = not_dosed(session)  # a signed stop or de-escalation ended their dosing before it began
    records = [PatientRecord(subj.subject_id, e.dose_level, e.cohort, e.evaluable, e.dlt_window_closed_at,
                             had_dlt=subj.id in dlt_at, dlt_adjudicated_at=dlt_at.get(subj.id),
                             not_dosed=undosed[subj.id][1] if subj.id in undosed else None) for e, subj in rows]
    state = cohort_state(design_for(protocol), records)
    for subject in undosed_on_study(session, tuple(range(1, len(protocol.dose_levels.levels) + 1))):  # what a stop would close
        state.undosed.setdefault(subject.dose_level, []).append(subject.subject_id)
    return state


def read_trial_state(engine, protocol: ProtocolDefinition) -> TrialState:
    """`trial_state` in a session of its own."""
    with Session(engine) as s:
        return trial_state(s, protocol)


def level_is_approved(session: Session, level: int) -> bool:
    """Level 1 needs no approval; any other level needs a signed decision that opens it."""
    if level <= 1:
        return True
    return session.exec(select(Signature.id).join(EscalationDecision, EscalationDecision.id == Signature.decision_id)
                        .where(EscalationDecision.chosen_level == level,
                               EscalationDecision.chosen_action.in_(OPENING_ACTIONS))).first() is not None


def assert_level_approved(session: Session, level: int, what: str) -> None:
    if not level_is_approved(session, level):
        raise UserError(f"{what}: dose level {level} is not open — no signed escalation approval opens it yet")


def waiting_reviews(session: Session) -> list[EscalationDecision]:
    return session.exec(select(EscalationDecision).where(EscalationDecision.status == DecisionStatus.WAITING)).all()


# -- the review ------------------------------------------------------------------------------------

def open_review(engine, protocol: ProtocolDefinition, *, clock: Clock) -> EscalationDecision | None:
    """The decision waiting for the PI for the current history: created once, found again after."""
    with UnitOfWork(engine, actor="system:cohort-review", reason="cohort ready for review", clock=clock) as u:
        s = u.session
        state = trial_state(s, protocol)
        if not state.ready or signed_stop(s) is not None:  # after a signed stop there is nothing more to decide
            return None
        existing = s.exec(select(EscalationDecision).where(EscalationDecision.history == state.history)).first()
        if existing is not None:
            u.commit()  # nothing written; ends the transaction without expiring what the caller reads
            return existing
        rec = state.recommendation
        d = EscalationDecision(from_level=state.level, history=state.history, recommended_action=rec.action,
                               recommended_level=rec.dose_level, mtd=rec.mtd, created_at=u.at, early_stop=state.early_stop,
                               basis_at=state.basis_at, status=DecisionStatus.WAITING, rationale=None)
        s.add(d)
        u.commit()
        return d


def record_review_run(engine, *, decision_id: int, flow_run_id: str, clock: Clock) -> None:
    """Keep which flow run holds the review (the PI's form), once."""
    with UnitOfWork(engine, actor="system:cohort-review", reason="review run recorded", clock=clock) as u:
        row = u.session.get(EscalationDecision, decision_id)
        if row.review_flow_run_id != flow_run_id:
            row.review_flow_run_id = flow_run_id
            u.session.add(row)
            u.commit()


def review_held_by(engine, flow_run_id: str) -> EscalationDecision | None:
    """The decision whose review this flow run holds (the run re-runs from the top after each resume)."""
    with Session(engine) as s:
        return s.exec(select(EscalationDecision).where(EscalationDecision.review_flow_run_id == flow_run_id)).first()


def announce_review(engine, d: EscalationDecision, *, clock: Clock, link: str | None = None) -> None:
    """Tell the PI and the coordinator that a cohort review waits for a signature."""
    with UnitOfWork(engine, actor="system:cohort-review", reason="review waiting", clock=clock) as u:
        for role in (Role.PI, Role.COORDINATOR):
            enqueue(u.session, Notice(role, NoticeEvent.REVIEW_WAITING, detail=f"DL{d.from_level}, recommended {d.recommended_action}",
                                      link=link), dedup=f"decision-{d.id}:review-open", at=u.at)
        u.commit()


def pi_reminders(engine, protocol: ProtocolDefinition, *, clock: Clock, link: str | None = None) -> tuple[int, int]:
    """Daily: remind the PI of reviews waiting for a signature and candidate DLTs waiting for adjudication."""
    with UnitOfWork(engine, actor="system:daily-rounds", reason="PI reminders", clock=clock) as u:
        s = u.session
        today = to_local(protocol.timezone, u.at).date()
        reviews = waiting_reviews(s)
        for d in reviews:
            enqueue(s, Notice(Role.PI, NoticeEvent.REVIEW_WAITING, detail=f"DL{d.from_level}, recommended {d.recommended_action}",
                              due_on=today, link=link), dedup=f"decision-{d.id}:waiting:{today}", at=u.at)
        pending = pending_adjudications(s)
        for sid, ae_id in pending:
            enqueue(s, Notice(Role.PI, NoticeEvent.ADJUDICATION_PENDING, sid, detail=f"AE {ae_id}", due_on=today, link=link),
                    dedup=f"{sid}:ae-{ae_id}:adjudication:{today}", at=u.at)
        u.commit()
        return len(reviews), len(pending)


# -- what a signed decision does -------------------------------------------------------------------

def apply_signed_decision(s: Session, protocol: ProtocolDefinition, d: EscalationDecision, state: TrialState, at: dt.datetime,
                          link: str | None) -> None:
    """Open the slots the signed decision allows, close what it closes, and tell people."""
    levels = {lv.level: lv for lv in s.exec(select(DoseLevelState))}
    current = levels[d.from_level]
    dlts = sum(c.dlts for c in state.cohorts if c.dose_level == d.from_level)
    current.status, current.closed_at = (LevelStatus.TOO_TOXIC if too_toxic(dlts) else LevelStatus.CLOSED), at
    s.add(current)
    s.flush()  # close before opening: two levels never enroll at once
    if d.chosen_level is not None:
        _open_level(s, protocol, d, levels[d.chosen_level], at, link)
    else:
        _stop_trial(s, d, levels.values(), at, link)


def _open_level(s: Session, protocol: ProtocolDefinition, d: EscalationDecision, target: DoseLevelState, at: dt.datetime,
                link: str | None) -> None:
    """Open k slots at the chosen level, offer them to the waitlist in order, and tell the coordinator and the PI."""
    k = protocol.escalation.cohort_size.value
    target.status, target.slots_open = LevelStatus.OPEN, enrolled_at_level(s, target.level) + k
    target.opened_at = target.opened_at or at
    target.closed_at = None
    s.add(target)
    s.flush()
    offered = s.exec(select(WaitlistEntry).where(WaitlistEntry.offered_at.is_(None)).order_by(WaitlistEntry.id).limit(k)).all()
    for w in offered:
        w.offered_at = at
        s.add(w)
    detail = f"{Action(d.chosen_action).value}: {k} slots open at DL{target.level}" + (
        f"; offered to the waitlist in order ({len(offered)})" if offered else "")
    for role in (Role.COORDINATOR, Role.PI):
        enqueue(s, Notice(role, NoticeEvent.ESCALATION_SIGNED, detail=detail, link=link), dedup=f"decision-{d.id}:signed", at=at)


def _stop_trial(s: Session, d: EscalationDecision, levels, at: dt.datetime, link: str | None) -> None:
    """Close every level still open or waiting, and tell every role how the trial ended."""
    for lv in levels:
        if lv.status in (LevelStatus.OPEN, LevelStatus.FULL, LevelStatus.PENDING):
            lv.status, lv.closed_at = LevelStatus.CLOSED, at
            s.add(lv)
    outcome = f"MTD DL{d.mtd}" if d.mtd else "no tolerable dose" if d.recommended_action == Action.STOP else "stopped by the PI"
    for role in Role:
        enqueue(s, Notice(role, NoticeEvent.TRIAL_STOPPED, detail=f"enrollment closed; {outcome}", link=link),
                dedup=f"decision-{d.id}:stopped", at=at)
