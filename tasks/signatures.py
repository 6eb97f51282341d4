"""The PI's signature on a cohort decision: one-time signing codes and the signed act itself.

A signature needs the signer's staff ID and a code sent only to the signer's own channel; only
the code's hash is kept. What the PI may choose is `protocol.cohorts.check_choice`; what a signed
decision opens or closes is `tasks.escalation_gate.apply_signed_decision`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.tables import DecisionStatus, EscalationDecision, Signature, SignatureAttempt, SigningCode
from protocol.cohorts import check_choice, declared_mtd
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.three_plus_three import Action
from tasks.escalation_gate import apply_signed_decision, trial_state

CODE_DIGITS = 8


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


# -- signing codes ---------------------------------------------------------------------------------

def _code_hash(decision_id: int, code: str) -> str:
    return hashlib.sha256(f"nktrial-signing:{decision_id}:{code.strip()}".encode()).hexdigest()


def issue_signing_code(engine, protocol: ProtocolDefinition, *, decision_id: int, clock: Clock) -> str:
    """A fresh one-time code for one decision. Only its hash is stored; earlier unused codes stop working."""
    code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
    with UnitOfWork(engine, actor="system:cohort-review", reason=f"signing code issued for decision {decision_id}", clock=clock) as u:
        s = u.session
        d = s.get(EscalationDecision, decision_id)
        if d is None or d.status != DecisionStatus.WAITING:
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


def _check_code(s: Session, decision_id: int, code: str, now: dt.datetime) -> SigningCode:
    """The code's row, or the sentence that refuses it: wrong, already used, or expired."""
    h = _code_hash(decision_id, code or "")
    rows = s.exec(select(SigningCode).where(SigningCode.decision_id == decision_id)).all()
    match = next((r for r in rows if hmac.compare_digest(r.code_hash, h)), None)
    if match is None:
        raise UserError("signing_code is wrong for this decision")
    if match.used_at is not None:
        raise UserError("signing_code was already used; each code signs once")
    if match.expires_at <= now:
        raise UserError("signing_code has expired; ask for a new one")
    return match


# -- the signed act --------------------------------------------------------------------------------

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
        _record_refusal(engine, decision_id=decision_id, signer_id=signer_id, attempt_key=attempt_key, reason=str(exc), clock=clock)
        return SignOutcome(False, str(exc), decision_id)


def _record_refusal(engine, *, decision_id: int, signer_id: str, attempt_key: str, reason: str, clock: Clock) -> None:
    with UnitOfWork(engine, actor=signer_id or "unknown", reason="signature refused", clock=clock) as u:
        u.session.add(SignatureAttempt(decision_id=decision_id, attempt_key=attempt_key, signer_id=signer_id or "unknown",
                                       accepted=False, reason=reason[:300], at=u.at))
        u.commit()


def _sign(engine, protocol, *, decision_id, signer_id, printed_name, action, rationale, code, meaning, attempt_key, clock, link) -> SignOutcome:
    """Load the decision and the outcomes, check the code and the choice (protocol.cohorts), store the
    signature, then apply the decision."""
    if not signer_id.strip() or not printed_name.strip():
        raise UserError("signer_id and printed_name are required for a signature")
    with UnitOfWork(engine, actor=signer_id, reason=f"escalation decision {decision_id} signed: {action.value}", clock=clock) as u:
        s = u.session
        d = _waiting_decision(s, decision_id)
        used = _check_code(s, decision_id, code, u.at)
        state = trial_state(s, protocol)
        level = check_choice(decision_id=d.id, recommended=Action(d.recommended_action), recommended_level=d.recommended_level,
                             from_level=d.from_level, early_stop=d.early_stop, prepared_history=d.history,
                             current_history=state.history, action=action, rationale=rationale)
        used.used_at = u.at
        s.add(used)
        said = f"signed: {action.value}" + (f" at DL{level}" if level else "")
        _store_signature(s, d, action=action, level=level, rationale=rationale, signer_id=signer_id, printed_name=printed_name,
                         meaning=meaning, attempt_key=attempt_key, said=said, at=u.at)
        apply_signed_decision(s, protocol, d, state, u.at, link)
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
    s.add(SignatureAttempt(decision_id=d.id, attempt_key=attempt_key, signer_id=signer_id, accepted=True, reason=said, at=at))
    s.flush()
