"""Adverse events: reporting and updating one, the DLT screen, the investigator's adjudication, and
the SAE reporting clock.

Plain functions over the trial database; flows and the CLI call them. The DLT rules are
`protocol.dlt`; "two DLTs make a level too toxic" is `protocol.three_plus_three.too_toxic`.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.queries import calendar_event, get_subject
from models.tables import Adjudication, AdverseEvent, Enrollment, ScreeningRecordRow, Subject
from protocol import plausible
from protocol.calendar import EventKey, EventKind
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.dlt import AeCategory, AeFacts, Attribution, DltScreen, screen_dlt
from protocol.errors import UserError
from protocol.recording import site_today
from protocol.roles import Act, Role
from protocol.three_plus_three import too_toxic
from tasks.notices import Notice, NoticeEvent, enqueue
from tasks.signing import SignedAct, check_signature, record_accepted, record_refusal
from tasks.staff import authorize, recorded_as

MAX_AE_DAYS = 3650  # a cytopenia lasting ten years is a typing error (and a larger number overflows the database's integer)


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
    duration_days: int | None = Field(default=None, ge=0, le=MAX_AE_DAYS, description="cytopenias: days it lasted")
    caused_by_leukaemia: bool | None = Field(default=None, description="cytopenias")
    caused_by_progression: bool | None = Field(default=None, description="grade 5")


class AeUpdate(BaseModel):
    """A change to a reported AE: its grade, its resolution, or a fact the DLT screen needs."""

    model_config = ConfigDict(extra="forbid")
    ae_id: int
    grade: int | None = Field(default=None, ge=1, le=5)
    resolved_on: dt.date | None = None
    resolved_to_grade_1_within_72h: bool | None = None
    duration_days: int | None = Field(default=None, ge=0, le=MAX_AE_DAYS)
    caused_by_leukaemia: bool | None = None
    caused_by_progression: bool | None = None
    reason: str = Field(min_length=1, max_length=200, description="why it changed (kept in the audit trail)")


@dataclass
class AeOutcome:
    ae_id: int
    subject_id: str
    screen: DltScreen
    rule: str
    serious: bool


# -- reporting and the DLT screen ------------------------------------------------------------------

AePage = Callable[[int], str | None]  # an AE's id -> the address of its page (the AE summary and the adjudication form's link)


def report_adverse_event(engine, protocol: ProtocolDefinition, *, report: AeReport, actor: str, clock: Clock,
                         link: str | None = None, ae_page: AePage | None = None) -> AeOutcome:
    """Record an AE, screen it against the DLT rules; a candidate reaches the PI and coordinator at once.
    With `ae_page`, the candidate's notice links to the AE's page instead of `link`."""
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"AE reported for {report.subject_id}", clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.REPORT_AE, at=u.at)
        subject = get_subject(s, subject_id=report.subject_id)
        if subject is None:
            raise UserError(f"subject_id {report.subject_id} is not in the trial database")
        plausible.ae_dates(report.onset_on, report.resolved_on, consent_on=_consent_on(s, protocol, subject),
                           today=site_today(protocol, u.at))
        ae = AdverseEvent(subject_pk=subject.id, term=report.term.strip(), reported_at=u.at,
                          **report.model_dump(exclude={"subject_id", "term"}))
        s.add(ae)
        s.flush()
        screen, rule = _apply_screen(s, protocol, ae, subject, u.at, _page(ae.id, link, ae_page))
        if report.serious:
            _start_sae_clock(s, protocol, ae, report.subject_id, u.at, link)
        u.commit()
        return AeOutcome(ae.id, report.subject_id, screen, rule, report.serious)


def _consent_on(session: Session, protocol: ProtocolDefinition, subject: Subject) -> dt.date:
    """The consent date kept with the screening (criterion I7's value); without one, the date the patient entered the
    trial database, which consent always precedes."""
    rows = session.exec(select(ScreeningRecordRow).where(ScreeningRecordRow.subject_pk == subject.id)
                        .order_by(ScreeningRecordRow.id.desc())).all()
    for row in rows:
        for criterion in json.loads(row.result_json).get("criteria", []):
            if criterion.get("id") == "I7":
                try:
                    return dt.date.fromisoformat(str(criterion.get("value")))
                except ValueError:
                    break
    return to_local(protocol.timezone, subject.created_at).date()


def update_adverse_event(engine, protocol: ProtocolDefinition, *, update: AeUpdate, actor: str, clock: Clock,
                         link: str | None = None, ae_page: AePage | None = None) -> AeOutcome:
    """Change an AE; the audit trail keeps every earlier value; the DLT screen runs again."""
    with UnitOfWork(engine, actor=recorded_as(actor), reason=update.reason, clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.REPORT_AE, at=u.at)
        ae = _require_ae(s, update.ae_id)
        changes = update.model_dump(exclude={"ae_id", "reason"}, exclude_none=True)
        if not changes:
            raise UserError("nothing to update: give a new grade, resolved_on or a DLT fact")
        plausible.ae_dates(ae.onset_on, changes.get("resolved_on", ae.resolved_on), consent_on=None,
                           today=site_today(protocol, u.at))
        for key, value in changes.items():
            setattr(ae, key, value)
        subject = s.get(Subject, ae.subject_pk)
        screen, rule = _apply_screen(s, protocol, ae, subject, u.at, _page(ae.id, link, ae_page))
        u.commit()
        return AeOutcome(ae.id, subject.subject_id, screen, rule, ae.serious)


def _page(ae_id: int, link: str | None, ae_page: AePage | None) -> str | None:
    return (ae_page(ae_id) if ae_page else None) or link


def _require_ae(s: Session, ae_id: int) -> AdverseEvent:
    ae = s.get(AdverseEvent, ae_id)
    if ae is None:
        raise UserError(f"ae_id {ae_id} does not exist")
    return ae


def _dlt_window(session: Session, subject: Subject) -> tuple[dt.date, dt.date]:
    try:
        opens = calendar_event(session, subject, EventKey(EventKind.DLT_WINDOW_OPEN))
        closes = calendar_event(session, subject, EventKey(EventKind.DLT_WINDOW_CLOSE))
    except UserError:
        raise UserError(f"{subject.subject_id} has no DLT window: only enrolled patients have adverse events reported here") from None
    return opens.window_start_on, closes.local_on


def _screen(protocol: ProtocolDefinition, ae: AdverseEvent, window: tuple[dt.date, dt.date]):
    facts = AeFacts(category=AeCategory(ae.category), grade=ae.grade, onset_on=ae.onset_on, attribution=Attribution(ae.attribution),
                    resolved_to_grade_1_within_72h=ae.resolved_to_grade_1_within_72h, duration_days=ae.duration_days,
                    caused_by_leukaemia=ae.caused_by_leukaemia, caused_by_progression=ae.caused_by_progression)
    return screen_dlt(protocol.dlt.rules, facts, window_start_on=window[0], window_end_on=window[1])


def _apply_screen(session: Session, protocol: ProtocolDefinition, ae: AdverseEvent, subject: Subject, at, link) -> tuple[DltScreen, str]:
    """Screen the AE, keep the verdict on it, and tell people what it needs: adjudication or more facts."""
    result = _screen(protocol, ae, _dlt_window(session, subject))
    was_candidate = ae.candidate_dlt
    ae.dlt_screen, ae.dlt_rule = result.screen, result.rule[:200]
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


# -- adjudication ----------------------------------------------------------------------------------

def adjudicate_dlt(engine, protocol: ProtocolDefinition, *, ae_id: int, confirm: bool, reason: str, investigator_id: str, code: str,
                   clock: Clock, link: str | None = None, attempt_key: str | None = None) -> bool:
    """The investigator's (or PI's) signed call on a candidate DLT, with the one-time code issued for (this AE,
    this signer). Returns True when it makes a level too toxic (early stop). Every refusal of a signer or a
    code is logged as a signature attempt (tasks.signing), and wrong codes count towards the lockout."""
    if not reason.strip():
        raise UserError("reason is required: say why the DLT is confirmed or rejected")
    if len(reason.strip()) > 200:
        raise UserError(f"reason is {len(reason.strip())} characters; at most 200 are kept with an adjudication")
    act, who = SignedAct.adjudication(ae_id), (investigator_id or "").strip()
    key = attempt_key or f"adj-{uuid.uuid4().hex[:16]}"
    with Session(engine) as s:
        _require_candidate(_require_ae(s, ae_id))  # nothing to sign: refused before any code is checked or counted
    try:
        with UnitOfWork(engine, actor=recorded_as(who), reason=f"DLT adjudication of AE {ae_id}: {reason.strip()}", clock=clock) as u:
            s = u.session
            _, used = check_signature(s, protocol, act=act, signer_id=who, printed_name=None, code=code, at=u.at)  # authorizes the signer
            ae = _require_candidate(_require_ae(s, ae_id))
            used.used_at = u.at
            s.add(used)
            ae.adjudication = Adjudication.CONFIRMED if confirm else Adjudication.REJECTED
            ae.adjudication_reason, ae.adjudicated_by, ae.adjudicated_at = reason.strip(), who, u.at
            s.add(ae)
            s.flush()
            record_accepted(s, act=act, signer_id=who, attempt_key=key, said=f"DLT {'confirmed' if confirm else 'rejected'}", at=u.at)
            enrollment = s.exec(select(Enrollment).where(Enrollment.subject_pk == ae.subject_pk)).one()
            if confirm:
                enrollment.evaluable = True  # a DLT in the window makes the patient evaluable
                s.add(enrollment)
            dlts = _confirmed_dlts_at(s, enrollment.dose_level)
            u.commit()
            return confirm and too_toxic(dlts)
    except UserError as exc:
        raise UserError(record_refusal(engine, protocol, act=act, signer_id=who, attempt_key=key, exc=exc, clock=clock)) from None


def _require_candidate(ae: AdverseEvent) -> AdverseEvent:
    if ae.dlt_screen == DltScreen.NOT_CANDIDATE:
        raise UserError(f"AE {ae.id} is not a candidate DLT ({ae.dlt_rule}); there is nothing to adjudicate")
    return ae


def _confirmed_dlts_at(session: Session, level: int) -> int:
    return session.exec(select(sa.func.count()).select_from(AdverseEvent)
                        .join(Enrollment, Enrollment.subject_pk == AdverseEvent.subject_pk)
                        .where(Enrollment.dose_level == level, AdverseEvent.adjudication == Adjudication.CONFIRMED)).one()


def ae_markdown(engine, protocol: ProtocolDefinition, ae_id: int, *, adjudicate_link: str | None) -> str:
    """The AE's page: its summary, its DLT screen and adjudication, and the link to the adjudication form.
    (The page lives in Prefect, behind the UI's login; notices carry only the subject ID, the event and its link.)"""
    from protocol.dates import to_local

    with Session(engine) as s:
        ae = _require_ae(s, ae_id)
        sid = s.get(Subject, ae.subject_pk).subject_id
    tz = protocol.timezone
    status = {Adjudication.PENDING: "**waiting for adjudication**", Adjudication.CONFIRMED: "**DLT confirmed**",
              Adjudication.REJECTED: "**not a DLT**", Adjudication.NOT_CANDIDATE: "not a candidate DLT"}[Adjudication(ae.adjudication)]

    def yes_no(v):
        return "—" if v is None else "yes" if v else "no"

    rows = [("subject", sid), ("term (CTCAE)", ae.term), ("category", str(ae.category).replace("_", " ")), ("grade", ae.grade),
            ("onset", ae.onset_on), ("attribution", ae.attribution), ("serious", yes_no(ae.serious)),
            ("resolved on", ae.resolved_on or "—"), ("DLT screen", f"{ae.dlt_screen} ({ae.dlt_rule})"), ("adjudication", status)]
    if ae.adjudicated_by:
        rows.append(("adjudicated", f"by {ae.adjudicated_by} on {to_local(tz, ae.adjudicated_at):%Y-%m-%d %H:%M} {tz}: "
                                    f"{ae.adjudication_reason}"))
    lines = [f"# AE {ae.id} · {sid} · {status}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if adjudicate_link and ae.dlt_screen != DltScreen.NOT_CANDIDATE:
        lines += ["", f"**[Adjudicate AE {ae.id} →]({adjudicate_link})** opens the `adjudicate-dlt` form for this AE: choose "
                      "*DLT confirmed* or *not a DLT* (there is no default), say why, and sign with your staff ID and the one-time code "
                      "sent to your own channel."]
    return "\n".join(lines)


def pending_adjudications(session: Session) -> list[tuple[str, int]]:
    return session.exec(select(Subject.subject_id, AdverseEvent.id).join(Subject, Subject.id == AdverseEvent.subject_pk)
                        .where(AdverseEvent.adjudication == Adjudication.PENDING)).all()


# -- the SAE reporting clock -----------------------------------------------------------------------

def _start_sae_clock(s: Session, protocol: ProtocolDefinition, ae: AdverseEvent, subject_id: str, at: dt.datetime, link) -> None:
    hours = protocol.notifications.sae_report_deadline_hours
    deadline = at + dt.timedelta(hours=hours)
    for role in (Role.SAFETY, Role.COORDINATOR):
        enqueue(s, Notice(role, NoticeEvent.SAE_REPORTED, subject_id, due_on=site_today(protocol, deadline),
                          detail=f"AE {ae.id}, report within {hours} h", link=link),
                dedup=f"{subject_id}:ae-{ae.id}:sae", at=at)


def record_sae_report(engine, protocol: ProtocolDefinition, *, ae_id: int, actor: str, clock: Clock) -> None:
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"expedited SAE report filed for AE {ae_id}", clock=clock) as u:
        authorize(u.session, protocol, actor=actor, act=Act.RECORD_SAE_REPORT, at=u.at)
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
            enqueue(u.session, Notice(role, NoticeEvent.SAE_DEADLINE, sid, due_on=site_today(protocol, deadline),
                                      detail=f"AE {ae_id}, deadline {deadline:%H:%M} UTC", link=link),
                    dedup=f"{sid}:ae-{ae_id}:sae-deadline", at=u.at)
        u.commit()
        return f"AE {ae_id}: SAE report not recorded; safety desk reminded"
