"""The PI's signature on a cohort decision: its one-time code and the signed act itself.

A signature needs the signer's staff ID and a code issued for (this decision, this signer) and sent
only to the signer's own channel; the codes, the checks and the lockout are `tasks.signing`. What
the PI may choose is `protocol.cohorts.check_choice`; what a signed decision opens or closes is
`tasks.escalation_gate.apply_signed_decision`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.tables import DecisionStatus, EscalationDecision, Signature, SignatureAttempt
from protocol.cohorts import check_choice, declared_mtd
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.three_plus_three import Action
from tasks.closure import close_undosed
from tasks.escalation_gate import apply_signed_decision, trial_state
from tasks.signing import SentCode, SignedAct, check_signature, record_accepted, record_refusal, send_signing_code
from tasks.staff import recorded_as


def allowed_meanings(protocol: ProtocolDefinition) -> tuple[str, ...]:
    """What a signature on a cohort decision may mean (the protocol file's escalation.signature_meanings)."""
    return protocol.escalation.signature_meanings.value


def resolve_meaning(protocol: ProtocolDefinition, meaning: str | None) -> str:
    """One of the allowed meanings, given in full or by the word before its colon ("approval"); else one sentence."""
    text = (meaning or "").strip()
    for m in allowed_meanings(protocol):
        if text.casefold() in (m.casefold(), m.split(":", 1)[0].strip().casefold()):
            return m
    short = ", ".join(m.split(":", 1)[0].strip().lower() for m in allowed_meanings(protocol))
    if not text:
        raise UserError(f"meaning is required: choose one of the allowed meanings of a signature ({short})")
    raise UserError(f"meaning '{text[:40]}' is not one of the allowed meanings of a signature ({short}); choose one")


@dataclass(frozen=True)
class SignedDecision:
    """A signed cohort decision as people read it: what, who, when (site time, zone named), and what the signature means."""

    decision_id: int
    action: str
    level: int | None
    signer_id: str
    printed_name: str
    signed_at_site: str  # "2027-03-01 09:00 Asia/Shanghai"
    meaning: str
    rationale: str | None

    @property
    def what(self) -> str:
        return self.action + (f" DL{self.level}" if self.level else "")

    @property
    def state_name(self) -> str:
        """The review run's final state name: short enough for the state badge."""
        return f"Signed {self.what} by {self.signer_id}"

    @property
    def sentence(self) -> str:
        return (f"decision {self.decision_id}: signed {self.what} by {self.signer_id} ({self.printed_name}) on {self.signed_at_site}; "
                f"meaning: {self.meaning}" + (f"; rationale: {self.rationale}" if self.rationale else ""))


def signed_decision(engine, protocol: ProtocolDefinition, decision_id: int) -> SignedDecision | None:
    """The decision's signature as people read it, or None while it waits."""
    from protocol.dates import to_local

    with Session(engine) as s:
        d = s.get(EscalationDecision, decision_id)
        sig = s.exec(select(Signature).where(Signature.decision_id == decision_id)).first()
        if d is None or sig is None or d.chosen_action is None:
            return None
        tz = protocol.timezone
        return SignedDecision(d.id, Action(d.chosen_action).value, d.chosen_level, sig.signer_id, sig.printed_name,
                              f"{to_local(tz, sig.signed_at):%Y-%m-%d %H:%M} {tz}", sig.meaning, d.rationale)


@dataclass
class SignOutcome:
    accepted: bool
    reason: str
    decision_id: int
    chosen: Action | None = None
    level: int | None = None


# -- signing codes: bound to (decision, signer), sent only to the signer's channel (tasks.signing) -----

def send_decision_code(engine, protocol: ProtocolDefinition, channels: list, *, decision_id: int, signer_id: str, clock: Clock,
                       link: str | None = None, actor: str | None = None) -> SentCode:
    """A one-time code for (decision, signer), sent to the signer's own channel; earlier unused codes of theirs stop working."""
    return send_signing_code(engine, protocol, channels, act=SignedAct.decision(decision_id), signer_id=signer_id, clock=clock, link=link,
                             actor=actor)


# -- the signed act --------------------------------------------------------------------------------

def sign_decision(
    engine, protocol: ProtocolDefinition, *, decision_id: int, signer_id: str, printed_name: str | None, action: Action,
    rationale: str | None, code: str, meaning: str, attempt_key: str, clock: Clock, link: str | None = None,
) -> SignOutcome:
    """Sign a cohort decision with the signer's one-time code. Every refusal (tasks.signing's checks, then a
    bolder choice than the rule) is logged as an attempt and changes nothing else; wrong codes count towards
    the lockout. A replayed attempt returns its first answer."""
    act = SignedAct.decision(decision_id)
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
        reason = record_refusal(engine, protocol, act=act, signer_id=signer_id, attempt_key=attempt_key, exc=exc, clock=clock)
        return SignOutcome(False, reason, decision_id)


def _sign(engine, protocol, *, decision_id, signer_id, printed_name, action, rationale, code, meaning, attempt_key, clock, link) -> SignOutcome:
    """Check the signer and their code (tasks.signing), then the choice (protocol.cohorts); store the
    signature with the register's printed name, then apply the decision."""
    who = (signer_id or "").strip()
    meaning = resolve_meaning(protocol, meaning)  # before any code is checked or counted
    with UnitOfWork(engine, actor=recorded_as(who), reason=f"escalation decision {decision_id} signed: {action.value}", clock=clock) as u:
        s = u.session
        member, used = check_signature(s, protocol, act=SignedAct.decision(decision_id), signer_id=who, printed_name=printed_name,
                                       code=code, at=u.at)
        d = _waiting_decision(s, decision_id)
        state = trial_state(s, protocol)
        level = check_choice(decision_id=d.id, recommended=Action(d.recommended_action), recommended_level=d.recommended_level,
                             from_level=d.from_level, early_stop=d.early_stop, prepared_history=d.history,
                             current_history=state.history, action=action, rationale=rationale)
        used.used_at = u.at
        s.add(used)
        said = f"signed: {action.value}" + (f" at DL{level}" if level else "")
        _store_signature(s, d, action=action, level=level, rationale=rationale, signer_id=who, printed_name=member.printed_name,
                         meaning=meaning, attempt_key=attempt_key, said=said, at=u.at)
        apply_signed_decision(s, protocol, d, state, u.at, link)
        close_undosed(s, protocol, d, u.at, link)  # a stop or de-escalation: patients not yet dosed there will not be
        u.commit()
        return SignOutcome(True, said, d.id, action, level)


def _waiting_decision(s: Session, decision_id: int) -> EscalationDecision:
    d = s.get(EscalationDecision, decision_id)
    if d is None:
        raise UserError(f"decision {decision_id} does not exist")
    if d.status != DecisionStatus.WAITING:
        raise UserError(f"decision {decision_id} is already signed; a signature cannot be reused for another decision")
    return d


def _store_signature(s: Session, d: EscalationDecision, *, action: Action, level: int | None, rationale: str | None, signer_id: str,
                     printed_name: str, meaning: str, attempt_key: str, said: str, at: dt.datetime) -> None:
    """The decision as signed, its signature (bound to a digest of what it signs) and the accepted attempt."""
    d.chosen_action, d.chosen_level, d.rationale = action, level, (rationale or "").strip() or None
    d.mtd = declared_mtd(Action(d.recommended_action), action, d.mtd)
    d.decided_at, d.status = at, DecisionStatus.SIGNED
    s.add(d)
    s.flush()
    digest = hashlib.sha256(f"{d.id}|{d.history}|{action.value}|{d.chosen_level}|{d.mtd}|{at.isoformat()}".encode()).hexdigest()
    s.add(Signature(decision_id=d.id, signer_id=signer_id.strip(), printed_name=printed_name.strip(), meaning=meaning.strip(),
                    decision_digest=digest, signed_at=at))
    record_accepted(s, act=SignedAct.decision(d.id), signer_id=signer_id, attempt_key=attempt_key, said=said, at=at)
    s.flush()
