"""Safety and the escalation gate: AEs and DLT adjudication, cohort reviews, the PI's signature.

Plain functions over the trial database, like tasks.records; flows and the CLI call them. The
gate is enforced twice: here, with sentences a person can act on, and by database triggers
that refuse an enrollment, calendar or NK infusion at a level no signed approval has opened.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select

from models.queries import get_subject
from models.clock import Clock
from models.db import UnitOfWork
from models.tables import (
    Adjudication, AdverseEvent, CalendarEventRow, DoseLevelState, Enrollment, EscalationDecision, LevelStatus, Signature,
    SignatureAttempt, SigningCode, Subject, WaitlistEntry,
)
from protocol.definition import ProtocolDefinition
from protocol.dlt import AeCategory, AeFacts, Attribution, DltScreen, screen_dlt
from protocol.errors import UserError
from protocol.three_plus_three import BOLDNESS, Action, Cohort, Decision, Design
from protocol.roles import Role
from tasks.notices import Notice, NoticeEvent, enqueue

CODE_DIGITS = 8


def design_for(protocol: ProtocolDefinition) -> Design:
    return Design(num_levels=len(protocol.dose_levels.levels), cohort_size=protocol.escalation.cohort_size.value)


# -- adverse events -------------------------------------------------------------------------------

class AeReport(BaseModel):
    """An adverse event as the investigator reports it. The term stays in the database, never in a notice."""

    model_config = ConfigDict(extra="forbid")
    subject_id: str = Field(description="e.g. S-003")
    term: str = Field(min_length=1, max_length=120, description="CTCAE term")
    category: AeCategory
    grade: int = Field(ge=1, le=5, description="CTCAE grade; acute GVHD: overall grade I–IV as 1–4")
    onset_on: dt.date
    attribution: Attribution = Field(description="relatedness to NK cells or IL-2")
    serious: bool = False
    resolved_on: dt.date | None = None
    resolved_to_grade_1_within_72h: bool | None = Field(default=None, description="infusion reactions")
    duration_days: int | None = Field(default=None, ge=0, description="cytopenias: days it lasted")
    caused_by_leukaemia: bool | None = Field(default=None, description="cytopenias")
    caused_by_progression: bool | None = Field(default=None, description="grade 5")


@dataclass
class AeOutcome:
    ae_id: int
    subject_id: str
    screen: DltScreen
    rule: str
    serious: bool


def _dlt_window(session: Session, subject: Subject) -> tuple[dt.date, dt.date]:
    rows = {r.key: r for r in session.exec(select(CalendarEventRow).where(
        CalendarEventRow.subject_pk == subject.id, CalendarEventRow.key.in_(["dlt_window_open", "dlt_window_close"])))}
    if len(rows) < 2:
        raise UserError(f"{subject.subject_id} has no DLT window: only enrolled patients have adverse events reported here")
    return rows["dlt_window_open"].window_start_on, rows["dlt_window_close"].local_on


def _screen(protocol: ProtocolDefinition, ae: AdverseEvent, window: tuple[dt.date, dt.date]):
    facts = AeFacts(category=AeCategory(ae.category), grade=ae.grade, onset_on=ae.onset_on, attribution=Attribution(ae.attribution),
                    resolved_to_grade_1_within_72h=ae.resolved_to_grade_1_within_72h, duration_days=ae.duration_days,
                    caused_by_leukaemia=ae.caused_by_leukaemia, caused_by_progression=ae.caused_by_progression)
    return screen_dlt(protocol.dlt.rules, facts, window_start_on=window[0], window_end_on=window[1])


def _apply_screen(session: Session, protocol: ProtocolDefinition, ae: AdverseEvent, subject: Subject, at, link) -> tuple[DltScreen, str]:
    result = _screen(protocol, ae, _dlt_window(session, subject))
    was_candidate = ae.candidate_dlt
    ae.dlt_screen, ae.dlt_rule = result.screen.value, result.rule[:200]
    ae.candidate_dlt = result.screen is DltScreen.CANDIDATE
    if result.screen is DltScreen.NOT_CANDIDATE:
        if ae.adjudication is Adjudication.PENDING:
            ae.adjudication = Adjudication.NOT_CANDIDATE
    elif ae.adjudication is Adjudication.NOT_CANDIDATE:
        ae.adjudication = Adjudication.PENDING
    session.add(ae)
    session.flush()
    sid = subject.subject_id
    if ae.candidate_dlt and not was_candidate:
        for role in (Role.PI, Role.COORDINATOR):
            enqueue(session, Notice(role, NoticeEvent.CANDIDATE_DLT, sid, due_on=ae.onset_on, detail=f"AE {ae.id}, adjudicate", link=link),
                    dedup=f"{sid}:ae-{ae.id}:candidate", at=at)
    if result.screen is DltScreen.NEEDS_INFORMATION:
        enqueue(session, Notice(Role.COORDINATOR, NoticeEvent.AE_NEEDS_INFORMATION, sid, due_on=ae.onset_on, detail=f"AE {ae.id}", link=link),
                dedup=f"{sid}:ae-{ae.id}:needs-information:{ae.grade}", at=at)
    return result.screen, result.rule


def report_adverse_event(engine, protocol: ProtocolDefinition, *, report: AeReport, actor: str, clock: Clock,
                         link: str | None = None) -> AeOutcome:
    """Record an AE, screen it against the DLT rules; a candidate reaches the PI and coordinator at once."""
    with UnitOfWork(engine, actor=actor, reason=f"AE reported for {report.subject_id}", clock=clock) as u:
        s = u.session
        subject = get_subject(s, subject_id=report.subject_id)
        if subject is None:
            raise UserError(f"subject_id {report.subject_id} is not in the trial database")
        today = _local_today(protocol, u.at)
        if report.onset_on > today:
            raise UserError(f"onset_on {report.onset_on} is in the future")
        if report.resolved_on and report.resolved_on < report.onset_on:
            raise UserError(f"resolved_on {report.resolved_on} is before onset_on {report.onset_on}")
        ae = AdverseEvent(subject_pk=subject.id, term=report.term.strip(), category=report.category.value, grade=report.grade,
                          onset_on=report.onset_on, attribution=report.attribution.value, serious=report.serious,
                          resolved_on=report.resolved_on, resolved_to_grade_1_within_72h=report.resolved_to_grade_1_within_72h,
                          duration_days=report.duration_days, caused_by_leukaemia=report.caused_by_leukaemia,
                          caused_by_progression=report.caused_by_progression, reported_at=u.at)
        s.add(ae)
        s.flush()
        screen, rule = _apply_screen(s, protocol, ae, subject, u.at, link)
        if report.serious:
            deadline = u.at + dt.timedelta(hours=protocol.notifications.sae_report_deadline_hours)
            for role in (Role.SAFETY, Role.COORDINATOR):
                enqueue(s, Notice(role, NoticeEvent.SAE_REPORTED, report.subject_id, due_on=_local_today(protocol, deadline),
                                  detail=f"AE {ae.id}, report within {protocol.notifications.sae_report_deadline_hours} h", link=link),
                        dedup=f"{report.subject_id}:ae-{ae.id}:sae", at=u.at)
        u.commit()
        return AeOutcome(ae.id, report.subject_id, screen, rule, report.serious)


class AeUpdate(BaseModel):
    """A change to a reported AE: its grade, its resolution, or a fact the DLT screen needs."""

    model_config = ConfigDict(extra="forbid")
    ae_id: int
    grade: int | None = Field(default=None, ge=1, le=5)
    resolved_on: dt.date | None = None
    resolved_to_grade_1_within_72h: bool | None = None
    duration_days: int | None = Field(default=None, ge=0)
    caused_by_leukaemia: bool | None = None
    caused_by_progression: bool | None = None
    reason: str = Field(min_length=1, max_length=200, description="why it changed (kept in the audit trail)")


def update_adverse_event(engine, protocol: ProtocolDefinition, *, update: AeUpdate, actor: str, clock: Clock,
                         link: str | None = None) -> AeOutcome:
    """Change an AE; the audit trail keeps every earlier value; the DLT screen runs again."""
    with UnitOfWork(engine, actor=actor, reason=update.reason, clock=clock) as u:
        s = u.session
        ae = s.get(AdverseEvent, update.ae_id)
        if ae is None:
            raise UserError(f"ae_id {update.ae_id} does not exist")
        changes = update.model_dump(exclude={"ae_id", "reason"}, exclude_none=True)
        if not changes:
            raise UserError("nothing to update: give a new grade, resolved_on or a DLT fact")
        for key, value in changes.items():
            setattr(ae, key, value)
        subject = s.get(Subject, ae.subject_pk)
        screen, rule = _apply_screen(s, protocol, ae, subject, u.at, link)
        u.commit()
        return AeOutcome(ae.id, subject.subject_id, screen, rule, ae.serious)


def adjudicate_dlt(engine, protocol: ProtocolDefinition, *, ae_id: int, confirm: bool, reason: str, investigator_id: str,
                   clock: Clock, link: str | None = None) -> bool:
    """The investigator's call on a candidate DLT. Returns True when it makes a level too toxic (early stop)."""
    if not reason.strip():
        raise UserError("reason is required: say why the DLT is confirmed or rejected")
    with UnitOfWork(engine, actor=investigator_id, reason=f"DLT adjudication of AE {ae_id}: {reason.strip()}", clock=clock) as u:
        s = u.session
        ae = s.get(AdverseEvent, ae_id)
        if ae is None:
            raise UserError(f"ae_id {ae_id} does not exist")
        if ae.dlt_screen == DltScreen.NOT_CANDIDATE.value:
            raise UserError(f"AE {ae_id} is not a candidate DLT ({ae.dlt_rule}); there is nothing to adjudicate")
        ae.adjudication = Adjudication.CONFIRMED if confirm else Adjudication.REJECTED
        ae.adjudication_reason, ae.adjudicated_by, ae.adjudicated_at = reason.strip(), investigator_id, u.at
        s.add(ae)
        s.flush()
        enrollment = s.exec(select(Enrollment).where(Enrollment.subject_pk == ae.subject_pk)).one()
        if confirm:
            enrollment.evaluable = True  # a DLT in the window makes the patient evaluable
            s.add(enrollment)
        dlts = _confirmed_dlts_at(s, enrollment.dose_level)
        u.commit()
        return confirm and dlts >= 2


def record_sae_report(engine, *, ae_id: int, actor: str, clock: Clock) -> None:
    with UnitOfWork(engine, actor=actor, reason=f"expedited SAE report filed for AE {ae_id}", clock=clock) as u:
        ae = u.session.get(AdverseEvent, ae_id)
        if ae is None or not ae.serious:
            raise UserError(f"ae_id {ae_id} is not a serious adverse event")
        if ae.sae_reported_at is not None:
            raise UserError(f"the SAE report for AE {ae_id} is already recorded ({ae.sae_reported_at:%Y-%m-%d %H:%M} UTC)")
        ae.sae_reported_at = u.at
        u.session.add(ae)
        u.commit()


def sae_deadline_check(engine, protocol: ProtocolDefinition, *, ae_id: int, clock: Clock, link: str | None = None) -> str:
    """Before the reporting deadline: remind the safety desk if the SAE report is not recorded."""
    with UnitOfWork(engine, actor="system:sae-reminder", reason=f"SAE reporting clock of AE {ae_id}", clock=clock) as u:
        ae = u.session.get(AdverseEvent, ae_id)
        if ae is None or ae.sae_reported_at is not None:
            return f"AE {ae_id}: SAE report already recorded; no reminder"
        sid = u.session.get(Subject, ae.subject_pk).subject_id
        deadline = ae.reported_at + dt.timedelta(hours=protocol.notifications.sae_report_deadline_hours)
        for role in (Role.SAFETY, Role.COORDINATOR):
            enqueue(u.session, Notice(role, NoticeEvent.SAE_DEADLINE, sid, due_on=_local_today(protocol, deadline),
                                      detail=f"AE {ae_id}, deadline {deadline:%H:%M} UTC", link=link),
                    dedup=f"{sid}:ae-{ae_id}:sae-deadline", at=u.at)
        u.commit()
        return f"AE {ae_id}: SAE report not recorded; safety desk reminded"


def _confirmed_dlts_at(session: Session, level: int) -> int:
    return session.exec(select(sa.func.count()).select_from(AdverseEvent)
                        .join(Enrollment, Enrollment.subject_pk == AdverseEvent.subject_pk)
                        .where(Enrollment.dose_level == level, AdverseEvent.adjudication == Adjudication.CONFIRMED)).one()


def _local_today(protocol: ProtocolDefinition, at: dt.datetime) -> dt.date:
    from protocol.dates import to_local

    return to_local(protocol.timezone, at).date()


# -- the trial's history, from adjudicated outcomes ------------------------------------------------

@dataclass
class PatientOutcome:
    subject_id: str
    dose_level: int
    cohort: int
    letter: str | None  # "T" confirmed DLT, "N" evaluable without DLT, None pending or replaced
    status: str  # words for the cohort status table


@dataclass
class TrialState:
    cohorts: list[Cohort]
    patients: list[PatientOutcome]
    level: int | None  # the level under review (of the newest cohort)
    ready: bool
    early_stop: bool
    basis_at: dt.datetime | None
    pending: list[str] = field(default_factory=list)
    recommendation: Decision | None = None

    @property
    def history(self) -> str:
        return " ".join(f"{c.dose_level}{c.outcomes}" for c in self.cohorts)


def trial_state(session: Session, protocol: ProtocolDefinition) -> TrialState:
    """The outcome history as 3+3 sees it, whether the newest cohort is ready for review, and the rule's advice."""
    design = design_for(protocol)
    rows = session.exec(select(Enrollment, Subject).join(Subject, Subject.id == Enrollment.subject_pk).order_by(Enrollment.id)).all()
    dlt_subjects = {pk: at for pk, at in session.exec(select(AdverseEvent.subject_pk, AdverseEvent.adjudicated_at)
                                                        .where(AdverseEvent.adjudication == Adjudication.CONFIRMED))}
    groups: dict[tuple[int, int], list[PatientOutcome]] = defaultdict(list)
    order: list[tuple[int, int]] = []
    basis: dict[tuple[int, int], list[dt.datetime]] = defaultdict(list)
    for e, subj in rows:
        key = (e.dose_level, e.cohort)
        if key not in groups:
            order.append(key)
        if subj.id in dlt_subjects:
            letter, status = "T", "DLT (adjudicated)"
            basis[key].append(dlt_subjects[subj.id])
        elif e.dlt_window_closed_at is not None and e.evaluable:
            letter, status = "N", "DLT window closed, no DLT"
            basis[key].append(e.dlt_window_closed_at)
        elif e.evaluable is False:
            letter, status = None, "not evaluable (to be replaced)"
        else:
            letter, status = None, "DLT window open"
        groups[key].append(PatientOutcome(subj.subject_id, e.dose_level, e.cohort, letter, status))
    cohorts = [Cohort(lvl, "".join(p.letter for p in groups[(lvl, c)] if p.letter)) for lvl, c in order]
    patients = [p for key in order for p in groups[key]]
    if not order:
        return TrialState([], [], None, False, False, None, recommendation=design.decide([]))
    level = order[-1][0]
    last = groups[order[-1]]
    pending = [p.subject_id for p in last if p.letter is None and p.status == "DLT window open"]
    dlts_at_level = sum(c.dlts for c in cohorts if c.dose_level == level)
    early = dlts_at_level >= 2
    evaluable = sum(1 for p in last if p.letter)
    ready = early or (not pending and evaluable >= design.cohort_size)
    complete = [c for c in cohorts if c.outcomes]
    decision = design.decide(complete) if ready else None
    basis_at = max((t for key in order if key[0] == level for t in basis[key]), default=None) if ready else None
    return TrialState(complete, patients, level, ready, early, basis_at, pending, decision)


# -- cohort review and signature ------------------------------------------------------------------

def open_review(engine, protocol: ProtocolDefinition, *, clock: Clock) -> EscalationDecision | None:
    """The decision waiting for the PI for the current history: created once, found again after."""
    with UnitOfWork(engine, actor="system:cohort-review", reason="cohort ready for review", clock=clock) as u:
        s = u.session
        state = trial_state(s, protocol)
        if not state.ready:
            return None
        existing = s.exec(select(EscalationDecision).where(EscalationDecision.history == state.history)).first()
        if existing is not None:
            u.commit()  # nothing written; ends the transaction without expiring what the caller reads
            return existing
        rec = state.recommendation
        d = EscalationDecision(from_level=state.level, history=state.history, recommended_action=rec.action.value,
                               recommended_level=rec.dose_level, mtd=rec.mtd, created_at=u.at, early_stop=state.early_stop,
                               basis_at=state.basis_at, status="waiting", rationale=None)
        s.add(d)
        u.commit()
        return d


def issue_signing_code(engine, protocol: ProtocolDefinition, *, decision_id: int, clock: Clock) -> str:
    """A fresh one-time code for one decision. Only its hash is stored; earlier unused codes stop working."""
    code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
    with UnitOfWork(engine, actor="system:cohort-review", reason=f"signing code issued for decision {decision_id}", clock=clock) as u:
        s = u.session
        d = s.get(EscalationDecision, decision_id)
        if d is None or d.status != "waiting":
            raise UserError(f"decision {decision_id} is not waiting for a signature")
        for old in s.exec(select(SigningCode).where(SigningCode.decision_id == decision_id, SigningCode.used_at.is_(None))):
            old.expires_at = min(old.expires_at, u.at)
            s.add(old)
        hours = protocol.escalation.signing_code_valid_hours.value
        s.add(SigningCode(decision_id=decision_id, code_hash=_code_hash(decision_id, code), issued_at=u.at,
                          expires_at=u.at + dt.timedelta(hours=hours)))
        u.commit()
    return code


def has_live_code(engine, *, decision_id: int, now: dt.datetime) -> bool:
    with Session(engine) as s:
        return s.exec(select(SigningCode).where(SigningCode.decision_id == decision_id, SigningCode.used_at.is_(None),
                                                SigningCode.expires_at > now)).first() is not None


def _code_hash(decision_id: int, code: str) -> str:
    return hashlib.sha256(f"nktrial-signing:{decision_id}:{code.strip()}".encode()).hexdigest()


class Meaning(StrEnum):
    APPROVAL = "approval"
    REVIEW = "review"


@dataclass
class SignOutcome:
    accepted: bool
    reason: str
    decision_id: int
    chosen: Action | None = None
    level: int | None = None


def sign_decision(
    engine, protocol: ProtocolDefinition, *, decision_id: int, signer_id: str, printed_name: str, action: Action,
    rationale: str | None, code: str, meaning: str, attempt_key: str, clock: Clock, link: str | None = None,
) -> SignOutcome:
    """Sign a cohort decision with a one-time code. Refusals (wrong, reused, expired code; a bolder
    choice than the rule) are logged and change nothing else. A replayed attempt returns its first answer."""
    with Session(engine) as s:
        if s.get(EscalationDecision, decision_id) is None:
            return SignOutcome(False, f"decision {decision_id} does not exist", decision_id)
        seen = s.exec(select(SignatureAttempt).where(SignatureAttempt.decision_id == decision_id,
                                                     SignatureAttempt.attempt_key == attempt_key)).first()
        if seen is not None:
            return SignOutcome(seen.accepted, seen.reason, decision_id)
    try:
        return _sign(engine, protocol, decision_id=decision_id, signer_id=signer_id, printed_name=printed_name, action=action,
                     rationale=rationale, code=code, meaning=meaning, attempt_key=attempt_key, clock=clock, link=link)
    except UserError as exc:
        with UnitOfWork(engine, actor=signer_id or "unknown", reason="signature refused", clock=clock) as u:
            u.session.add(SignatureAttempt(decision_id=decision_id, attempt_key=attempt_key, signer_id=signer_id or "unknown",
                                           accepted=False, reason=str(exc)[:300], at=u.at))
            u.commit()
        return SignOutcome(False, str(exc), decision_id)


def _sign(engine, protocol, *, decision_id, signer_id, printed_name, action, rationale, code, meaning, attempt_key, clock, link) -> SignOutcome:
    if not signer_id.strip() or not printed_name.strip():
        raise UserError("signer_id and printed_name are required for a signature")
    with UnitOfWork(engine, actor=signer_id, reason=f"escalation decision {decision_id} signed: {action.value}", clock=clock) as u:
        s = u.session
        d = s.get(EscalationDecision, decision_id)
        if d is None:
            raise UserError(f"decision {decision_id} does not exist")
        if d.status != "waiting":
            raise UserError(f"decision {decision_id} is already signed; a signature cannot be reused for another decision")
        _check_code(s, decision_id, code, u.at)
        recommended = Action(d.recommended_action)
        if BOLDNESS[action] > BOLDNESS[recommended]:
            raise UserError(f"decision '{action.value}' is bolder than the 3+3 recommendation '{recommended.value}'; "
                            "choose it or a more cautious action")
        if action is not recommended and not (rationale or "").strip():
            raise UserError(f"rationale is required when choosing '{action.value}' over the recommendation '{recommended.value}'")
        state = trial_state(s, protocol)
        if state.history != d.history:
            raise UserError(f"decision {decision_id} was prepared for history '{d.history}', but the outcomes are now "
                            f"'{state.history}'; a new review is needed")
        level = _chosen_level(protocol, d, action)
        used = s.exec(select(SigningCode).where(SigningCode.decision_id == decision_id,
                                                SigningCode.code_hash == _code_hash(decision_id, code))).one()
        used.used_at = u.at
        s.add(used)
        d.chosen_action, d.chosen_level, d.rationale = action.value, level, (rationale or "").strip() or None
        d.mtd = d.mtd if (action is Action.STOP and recommended is Action.STOP) else None  # a PI's early stop declares no MTD
        d.decided_at, d.status = u.at, "signed"
        s.add(d)
        s.flush()
        digest = hashlib.sha256(f"{d.id}|{d.history}|{d.chosen_action}|{d.chosen_level}|{d.mtd}|{u.at.isoformat()}".encode()).hexdigest()
        s.add(Signature(decision_id=d.id, signer_id=signer_id.strip(), printed_name=printed_name.strip(), meaning=meaning.strip(),
                        decision_digest=digest, signed_at=u.at))
        s.add(SignatureAttempt(decision_id=d.id, attempt_key=attempt_key, signer_id=signer_id, accepted=True,
                               reason=f"signed: {action.value}" + (f" at DL{level}" if level else ""), at=u.at))
        s.flush()
        _apply(s, protocol, d, action, level, state, u.at, link)
        u.commit()
        return SignOutcome(True, f"signed: {action.value}" + (f" at DL{level}" if level else ""), d.id, action, level)


def _check_code(s: Session, decision_id: int, code: str, now: dt.datetime) -> None:
    h = _code_hash(decision_id, code or "")
    rows = s.exec(select(SigningCode).where(SigningCode.decision_id == decision_id)).all()
    match = next((r for r in rows if hmac.compare_digest(r.code_hash, h)), None)
    if match is None:
        raise UserError("signing_code is wrong for this decision")
    if match.used_at is not None:
        raise UserError("signing_code was already used; each code signs once")
    if match.expires_at <= now:
        raise UserError("signing_code has expired; ask for a new one")


def _chosen_level(protocol: ProtocolDefinition, d: EscalationDecision, action: Action) -> int | None:
    match action:
        case Action.ESCALATE:
            return d.recommended_level
        case Action.EXPAND | Action.ENROLL:
            if Action(d.recommended_action) is Action.DEESCALATE or d.early_stop:
                raise UserError(f"level {d.from_level} is too toxic; it cannot take more patients")
            return d.from_level
        case Action.DEESCALATE:
            if d.from_level <= 1:
                raise UserError("there is no level below 1 to de-escalate to; choose stop")
            return d.from_level - 1
        case Action.STOP:
            return None


def _apply(s: Session, protocol, d: EscalationDecision, action: Action, level: int | None, state: TrialState, at, link) -> None:
    """Open the slots the signed decision allows, close what it closes, and tell people."""
    k = protocol.escalation.cohort_size.value
    levels = {lv.level: lv for lv in s.exec(select(DoseLevelState))}
    current = levels[d.from_level]
    too_toxic = sum(c.dlts for c in state.cohorts if c.dose_level == d.from_level) >= 2
    current.status, current.closed_at = (LevelStatus.TOO_TOXIC if too_toxic else LevelStatus.CLOSED), at
    s.add(current)
    s.flush()  # close before opening: two levels never enroll at once
    if level is not None:
        target = levels[level]
        taken = s.exec(select(sa.func.count()).select_from(Enrollment).where(Enrollment.dose_level == level)).one()
        target.status, target.slots_open = LevelStatus.OPEN, taken + k
        target.opened_at = target.opened_at or at
        target.closed_at = None
        s.add(target)
        s.flush()
        offered = s.exec(select(WaitlistEntry).where(WaitlistEntry.offered_at.is_(None)).order_by(WaitlistEntry.id).limit(k)).all()
        for w in offered:
            w.offered_at = at
            s.add(w)
        detail = f"{action.value}: {k} slots open at DL{level}" + (f"; offered to the waitlist in order ({len(offered)})" if offered else "")
        enqueue(s, Notice(Role.COORDINATOR, NoticeEvent.ESCALATION_SIGNED, detail=detail, link=link), dedup=f"decision-{d.id}:signed", at=at)
        enqueue(s, Notice(Role.PI, NoticeEvent.ESCALATION_SIGNED, detail=detail, link=link), dedup=f"decision-{d.id}:signed", at=at)
        return
    for lv in levels.values():
        if lv.status in (LevelStatus.OPEN, LevelStatus.FULL, LevelStatus.PENDING):
            lv.status, lv.closed_at = LevelStatus.CLOSED, at
            s.add(lv)
    outcome = f"MTD DL{d.mtd}" if d.mtd else "no tolerable dose" if Action(d.recommended_action) is Action.STOP else "stopped by the PI"
    for role in Role:
        enqueue(s, Notice(role, NoticeEvent.TRIAL_STOPPED, detail=f"enrollment closed; {outcome}", link=link), dedup=f"decision-{d.id}:stopped", at=at)


def level_is_approved(session: Session, level: int) -> bool:
    """Level 1 needs no approval; any other level needs a signed decision that opens it."""
    if level <= 1:
        return True
    return session.exec(select(Signature.id).join(EscalationDecision, EscalationDecision.id == Signature.decision_id)
                        .where(EscalationDecision.chosen_level == level,
                               EscalationDecision.chosen_action.in_(["escalate", "expand", "deescalate"]))).first() is not None


def assert_level_approved(session: Session, level: int, what: str) -> None:
    if not level_is_approved(session, level):
        raise UserError(f"{what}: dose level {level} is not open — no signed escalation approval opens it yet")


def waiting_reviews(session: Session) -> list[EscalationDecision]:
    return session.exec(select(EscalationDecision).where(EscalationDecision.status == "waiting")).all()


def pending_adjudications(session: Session) -> list[tuple[str, int]]:
    return session.exec(select(Subject.subject_id, AdverseEvent.id).join(Subject, Subject.id == AdverseEvent.subject_pk)
                        .where(AdverseEvent.adjudication == Adjudication.PENDING)).all()



def pi_reminders(engine, protocol: ProtocolDefinition, *, clock: Clock, link: str | None = None) -> tuple[int, int]:
    """Daily: remind the PI of reviews waiting for a signature and candidate DLTs waiting for adjudication."""
    with UnitOfWork(engine, actor="system:daily-rounds", reason="PI reminders", clock=clock) as u:
        s = u.session
        today = _local_today(protocol, u.at)
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


def review_markdown(protocol: ProtocolDefinition, state: TrialState, d: EscalationDecision, refused: str | None = None) -> str:
    """What the PI needs on the Resume form: the tally, the recommendation, the rule, what each choice does."""
    design = design_for(protocol)
    tallies = design.tallies(state.cohorts)
    k = design.cohort_size
    lines = [f"## Cohort review — dose level {d.from_level}", "",
             f"Outcome history (3+3 notation): `{d.history}`" + (" — **early stop: 2 DLTs at this level**" if d.early_stop else ""), "",
             "| level | patients | DLTs |", "|---|---|---|"]
    lines += [f"| DL{lv} | {t.n} | {t.dlts} |" for lv, t in tallies.items() if t.n]
    rec = f"**{d.recommended_action}**" + (f" at DL{d.recommended_level}" if d.recommended_level else "") + (f", MTD DL{d.mtd}" if d.mtd else "")
    lines += ["", f"3+3 recommends {rec}.", ""]
    if state.recommendation:
        lines += [f"Rule applied: {state.recommendation.reason}.", ""]
    lines += ["What each choice does (you may choose the recommendation or a more cautious action):", ""]
    choices = {
        Action.ESCALATE: f"close DL{d.from_level}, open {k} slots at DL{d.from_level + 1}",
        Action.EXPAND: f"open {k} more slots at DL{d.from_level}",
        Action.DEESCALATE: f"close DL{d.from_level}, open {k} slots at DL{d.from_level - 1}" if d.from_level > 1 else "not possible at DL1",
        Action.STOP: "close enrollment for the trial and tell everyone",
    }
    rec_action = Action(d.recommended_action)
    for action, effect in choices.items():
        allowed = BOLDNESS[action] <= BOLDNESS[rec_action] and not (action is Action.DEESCALATE and d.from_level <= 1) \
            and not (action is Action.EXPAND and (d.early_stop or rec_action is Action.DEESCALATE))
        lines.append(f"- `{action.value}` — {effect}" + ("" if allowed else " *(not allowed here)*"))
    lines += ["", "Enter your signer ID, printed name, the decision, and the one-time code sent to your PI channel. "
              "Your signature records your printed name, the UTC time, its meaning and the decision it signs."]
    if refused:
        lines += ["", f"**The previous attempt was refused:** {refused}"]
    return "\n".join(lines)


def cohort_status_table(state: TrialState) -> list[dict]:
    return [{"subject": p.subject_id, "dose level": p.dose_level, "cohort": p.cohort, "status": p.status,
             "counts as": {"T": "DLT", "N": "no DLT"}.get(p.letter or "", "—")} for p in state.patients]


def next_cohort_table(protocol: ProtocolDefinition, state: TrialState) -> str:
    """The decision table for the next cohort: each possible outcome and where the rule would go."""
    design = design_for(protocol)
    rec = state.recommendation
    if rec is None or rec.dose_level is None:
        return ""
    rows = ["| next cohort at DL%d | then 3+3 says |" % rec.dose_level, "|---|---|"]
    for outcome in ("NNN", "TNN", "TTN"):
        shown = outcome if outcome != "TTN" else "TT"
        nxt = design.decide([*state.cohorts, Cohort(rec.dose_level, shown)])
        where = f" DL{nxt.dose_level}" if nxt.dose_level else ""
        mtd = f", MTD DL{nxt.mtd}" if nxt.mtd else ""
        rows.append(f"| {outcome.count('T') if outcome != 'TTN' else '2+'} DLT | {nxt.action.value}{where}{mtd} |")
    return "\n".join(rows)
