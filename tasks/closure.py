"""Stop means stop: what a signed stop or de-escalation closes for patients enrolled but not yet dosed.

Which levels a signed action closes is `protocol.cohorts.levels_closed_to_undosed` (stop: every
level; de-escalation: the level de-escalated from). For each patient on study at those levels who
has not been given any NK infusion, in the signing's own unit of work (so the audit rows name the
signer): every planned calendar event is cancelled (each hangs from infusion 1, which will not
happen: product requests, infusion preparation, the infusions, IL-2, the DLT window, visits, PK),
their undelivered notices are cancelled, they go off study with the reason `trial_stopped` or
`dose_level_closed` (their status reads "not dosed: trial stopped"), and the coordinator, the cell
lab and the nurses are told. They are not replaced. Patients already dosed keep everything.
A patient whose NK infusion 1 window has already opened when the decision is signed may have been
dosed without it being recorded yet: nothing irreversible is done to them; the coordinator, the
nurses and the PI are told not to infuse, to record infusion 1 if it was given, and otherwise to
take the patient off study.

After the signature is committed, `reproject_not_dosed` cancels their scheduled Prefect runs;
enrollment after a signed stop is refused by `refuse_enrollment_after_stop`.
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session, select

from models.queries import not_dosed, signed_stop, undosed_on_study
from models.tables import (
    CalendarEventRow,
    DoseLevelState,
    EscalationDecision,
    EventStatus,
    OffStudyReason,
    Signature,
    Subject,
    SubjectStatus,
)
from protocol.calendar import EventKey
from protocol.cohorts import levels_closed_to_undosed, not_dosed_words
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.recording import site_today
from protocol.roles import Role
from protocol.three_plus_three import Action
from tasks.notices import Notice, NoticeEvent, cancel_pending, enqueue

TOLD = (Role.COORDINATOR, Role.CELL_LAB, Role.NURSE)  # who prepares, requests or gives an infusion
CONFIRM = (Role.COORDINATOR, Role.NURSE, Role.PI)  # who knows whether infusion 1 was given, and who decides if it was not
REASON = {Action.STOP: OffStudyReason.TRIAL_STOPPED, Action.DEESCALATE: OffStudyReason.DOSE_LEVEL_CLOSED}


def close_undosed(s: Session, protocol: ProtocolDefinition, d: EscalationDecision, at: dt.datetime, link: str | None) -> list[str]:
    """In the signing's unit of work, after the decision is stored: end dosing for the patients not yet
    dosed at the levels the signed action closes. Returns their subject IDs (none for escalate or expand)."""
    action = Action(d.chosen_action)
    num_levels = len(s.exec(select(DoseLevelState.level)).all())
    closed = []
    for subject in undosed_on_study(s, levels_closed_to_undosed(action, from_level=d.from_level, num_levels=num_levels)):
        if _may_have_been_dosed(s, protocol, subject, at):
            _ask_to_confirm(s, d, subject, at, link)
            continue
        words = not_dosed_words(action, dose_level=subject.dose_level)
        planned = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                        CalendarEventRow.status == EventStatus.PLANNED)).all()
        for row in planned:
            row.status, row.deviation_reason = EventStatus.CANCELLED, f"{words} (decision {d.id})"
            s.add(row)
        cancel_pending(s, subject_id=subject.subject_id)  # an undelivered product request or reminder goes too
        subject.status, subject.off_study_reason = SubjectStatus.OFF_STUDY, REASON[action]
        subject.off_study_on = site_today(protocol, at)
        s.add(subject)
        why = "trial stopped" if action is Action.STOP else f"DL{subject.dose_level} closed after de-escalation"
        for role in TOLD:
            enqueue(s, Notice(role, NoticeEvent.NOT_DOSED, subject.subject_id, detail=f"{why}; {len(planned)} planned events cancelled",
                              link=link), dedup=f"{subject.subject_id}:not-dosed:decision-{d.id}", at=at)
        closed.append(subject.subject_id)
    s.flush()
    return closed


def _may_have_been_dosed(s: Session, protocol: ProtocolDefinition, subject: Subject, at: dt.datetime) -> bool:
    """NK infusion 1's window has opened by the signature: it may have been given and not yet recorded (a nurse
    records after the bedside). Nothing irreversible is done to such a patient; the unit confirms instead."""
    row = s.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                CalendarEventRow.key == str(EventKey.nk_infusion(1)))).first()
    return row is not None and row.window_start_on <= site_today(protocol, at)


def _ask_to_confirm(s: Session, d: EscalationDecision, subject: Subject, at: dt.datetime, link: str | None) -> None:
    """The coordinator, the nurses and the PI are told not to infuse and to record infusion 1 if it was given;
    if it was not, the investigator takes the patient off study."""
    for role in CONFIRM:
        enqueue(s, Notice(role, NoticeEvent.DOSING_TO_CONFIRM, subject.subject_id, detail=f"decision {d.id}; if not given, "
                          "take the patient off study", link=link), dedup=f"{subject.subject_id}:dosing-to-confirm:decision-{d.id}", at=at)


def reproject_not_dosed(client, engine, *, now: dt.datetime) -> int:
    """Cancel the scheduled Prefect runs of every patient a signed stop or de-escalation left undosed
    (safe to repeat: their calendar has nothing planned, so nothing is wanted). Returns runs cancelled."""
    from tasks.projection import project

    with Session(engine) as s:
        subject_ids = [sid for sid, _ in not_dosed(s).values()]
    return sum(project(client, engine, now=now, subject_id=sid).cancelled for sid in subject_ids)


def refuse_enrollment_after_stop(s: Session, protocol: ProtocolDefinition, subject_id: str) -> None:
    """One sentence refusing any screening or enrollment once the PI has signed a stop."""
    stop = signed_stop(s)
    if stop is not None:
        d, sig = stop
        raise UserError(f"enrollment of {subject_id} is refused: the trial was stopped by decision {d.id}, signed by {sig.signer_id} "
                        f"on {to_local(protocol.timezone, sig.signed_at):%Y-%m-%d %H:%M} ({protocol.timezone}); "
                        "no patient can be enrolled or waitlisted")


def closures_in_words(session: Session, protocol: ProtocolDefinition) -> tuple[list[str], list[dict]]:
    """The dashboard's headline: a signed stop (TRIAL STOPPED) and each signed de-escalation, in words, newest
    first; and the patients they left undosed, with their status in words."""
    tz = protocol.timezone
    undosed = not_dosed(session)
    rows = {s.id: s for s in session.exec(select(Subject).where(Subject.id.in_(list(undosed))))} if undosed else {}
    patients = [{"subject_id": sid, "level": rows[pk].dose_level, "status": words, "since": f"{rows[pk].off_study_on}"}
                for pk, (sid, words) in undosed.items()]
    headline = []
    for d, sig in session.exec(select(EscalationDecision, Signature).join(Signature, Signature.decision_id == EscalationDecision.id)
                               .where(EscalationDecision.chosen_action.in_([Action.STOP, Action.DEESCALATE]))
                               .order_by(EscalationDecision.id.desc())):
        when = f"signed by {sig.signer_id} on {to_local(tz, sig.signed_at):%Y-%m-%d %H:%M} ({tz})"
        if d.chosen_action == Action.STOP:
            outcome = f"MTD DL{d.mtd}" if d.mtd else "no tolerable dose" if d.recommended_action == Action.STOP else "stopped by the PI"
            headline.append(f"TRIAL STOPPED: enrollment closed, {outcome}; decision {d.id} {when}")
        else:
            headline.append(f"DL{d.from_level} closed after de-escalation to DL{d.chosen_level}; decision {d.id} {when}")
    gone = [p["subject_id"] for p in patients]
    if gone:
        headline.append(f"Will not be dosed ({len(gone)}): {', '.join(gone)}; their infusions and preparation are cancelled")
    return headline, patients
