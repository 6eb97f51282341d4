"""Signed acts: one-time codes bound to one signer and one act, the checks a signature makes, the lockout.

A signed act is a cohort escalation decision (Act.SIGN_ESCALATION) or a DLT adjudication of one AE
(Act.ADJUDICATE_DLT). A code is issued for (that act, that signer), sent only to the signer's own
channel (`Staff.channel_tag`), and kept only as a salted slow hash; it is never printed, stored in
clear, logged, or put in a Prefect parameter, run input or artifact by this module.

Checks, in this order, each refusal one sentence: a blank signer; an unknown or inactive signer, or a
role the delegation log does not give the act (`tasks.staff.authorize`, the one call for signed acts);
a printed name that is not the register's; a signer locked out of this act; a wrong code (one issued
to another signer is wrong for this one); a used code; an expired code. After
`signing_max_wrong_codes` wrong codes by one signer for one act, that signer is locked out of it for
`signing_lockout_minutes`, and the safety desk and the PI are told (no code, no patient data).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlmodel import Session, col, select

from models.clock import Clock
from models.db import UnitOfWork
from models.tables import (
    AdverseEvent,
    DecisionStatus,
    EscalationDecision,
    SignatureAttempt,
    SigningCode,
    SigningLockout,
    SigningRefusal,
    Staff,
)
from protocol.definition import ProtocolDefinition
from protocol.dlt import DltScreen
from protocol.errors import AccessRefused, UserError
from protocol.roles import Act, Role, may
from tasks.notices import Notice, NoticeEvent, enqueue
from tasks.staff import authorize

CODE_DIGITS = 8
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # ~50 ms a check: 10^8 codes cannot be tried offline from a copied hash


@dataclass(frozen=True)
class SignedAct:
    """What a signature is for: one escalation decision, or the adjudication of one AE."""

    decision_id: int | None = None
    ae_id: int | None = None

    @classmethod
    def decision(cls, decision_id: int) -> SignedAct:
        return cls(decision_id=decision_id)

    @classmethod
    def adjudication(cls, ae_id: int) -> SignedAct:
        return cls(ae_id=ae_id)

    @property
    def act(self) -> Act:
        return Act.SIGN_ESCALATION if self.decision_id is not None else Act.ADJUDICATE_DLT

    @property
    def label(self) -> str:
        return f"decision {self.decision_id}" if self.decision_id is not None else f"AE {self.ae_id}"

    @property
    def key(self) -> str:
        return f"decision:{self.decision_id}" if self.decision_id is not None else f"ae:{self.ae_id}"

    def where(self, table):
        """The filter selecting this act's rows of a signing table."""
        if self.decision_id is not None:
            return table.decision_id == self.decision_id
        return table.ae_id == self.ae_id

    def columns(self) -> dict:
        return {"decision_id": self.decision_id, "ae_id": self.ae_id}


class SigningRefused(UserError):
    """A signing attempt refused: one sentence, and the kind kept on the attempt row."""

    def __init__(self, sentence: str, kind: SigningRefusal):
        super().__init__(sentence)
        self.kind = kind


@dataclass(frozen=True)
class SentCode:
    signer_id: str
    printed_name: str

    @property
    def sentence(self) -> str:
        return f"sent to {self.signer_id}'s channel"


# -- codes -----------------------------------------------------------------------------------------

def _hash(act: SignedAct, signer_id: str, code: str, salt: str) -> str:
    text = f"nktrial-signing:{act.key}:{signer_id}:{(code or '').strip()}".encode()
    return hashlib.scrypt(text, salt=bytes.fromhex(salt), **_SCRYPT).hex()


def _require_signable(s: Session, act: SignedAct) -> None:
    if act.decision_id is not None:
        d = s.get(EscalationDecision, act.decision_id)
        if d is None or d.status != DecisionStatus.WAITING:
            raise UserError(f"decision {act.decision_id} is not waiting for a signature")
    else:
        ae = s.get(AdverseEvent, act.ae_id)
        if ae is None:
            raise UserError(f"ae_id {act.ae_id} does not exist")
        if ae.dlt_screen == DltScreen.NOT_CANDIDATE:
            raise UserError(f"AE {act.ae_id} is not a candidate DLT; there is nothing to adjudicate")


def _issue(s: Session, protocol: ProtocolDefinition, act: SignedAct, member: Staff, at: dt.datetime) -> str:
    """A fresh code for (act, member) in the caller's transaction; earlier unused codes of theirs stop working."""
    code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
    for old in s.exec(select(SigningCode).where(act.where(SigningCode), SigningCode.signer_id == member.staff_id,
                                                col(SigningCode.used_at).is_(None))):
        old.expires_at = min(old.expires_at, at)
        s.add(old)
    salt = secrets.token_hex(16)
    s.add(SigningCode(**act.columns(), signer_id=member.staff_id, salt=salt, code_hash=_hash(act, member.staff_id, code, salt),
                      issued_at=at, expires_at=at + dt.timedelta(hours=protocol.escalation.signing_code_valid_hours.value)))
    return code


def _own_channels(channels: list, member: Staff) -> list:
    tag = (member.channel_tag or "").strip()
    if not tag:
        raise UserError(f"{member.staff_id} has no channel on the staff register; no signing code was issued")
    if tag in {r.value for r in Role}:
        raise UserError(f"{member.staff_id}'s channel tag '{tag}' is a role's shared tag; a signing code goes only to the signer's own "
                        "channel, so none was issued")
    own = [ch for ch in channels if tag in ch.tags]
    if not own:
        raise UserError(f"{member.staff_id}'s channel (tag '{tag}') is not configured in the apprise config; no signing code was issued")
    return own


def send_signing_code(engine, protocol: ProtocolDefinition, channels: list, *, act: SignedAct, signer_id: str, clock: Clock,
                      link: str | None = None, actor: str | None = None) -> SentCode:
    """Issue a code for (act, signer) and send it to the signer's own channel only. The code is returned to nobody."""
    from tasks.delivery import send_direct

    who = (signer_id or "").strip()
    with UnitOfWork(engine, actor=actor or who or "(blank)", reason=f"signing code issued to {who or '(blank)'} for {act.label}",
                    clock=clock) as u:
        s = u.session
        _require_signable(s, act)
        requester = (actor or who).strip()
        if not requester.startswith("system:") and requester != who:
            raise AccessRefused(f"{requester} may not ask for {who or '(blank)'}'s signing code: a signer asks for their own "
                                f"(run it as --as {who or 'SIGNER'})", actor=requester, act=act.act.value)
        member = authorize(s, protocol, actor=who, act=act.act, at=u.at)
        _own_channels(channels, member)
        code = _issue(s, protocol, act, member, u.at)
        u.commit()
        printed = member.printed_name
        tag = member.channel_tag.strip()
    what = (f"decision {act.decision_id}, cohort review" if act.decision_id is not None else f"AE {act.ae_id}, DLT adjudication")
    hours = protocol.escalation.signing_code_valid_hours.value
    body = f"trial · signing code {code} for {who} · {what}, valid {hours} h" + (f" · {link}" if link else "")
    sent = send_direct(channels, tag, title=f"[NCT06641648] your signing code for {act.label}", body=body)
    if not sent:
        _withdraw(engine, act, who, clock)
        raise UserError(f"{who}'s channel did not take the signing code; it was withdrawn: try again when the channel is up")
    return SentCode(who, printed)


def _withdraw(engine, act: SignedAct, signer_id: str, clock: Clock) -> None:
    with UnitOfWork(engine, actor="system:signing", reason=f"signing code for {act.label} withdrawn: not delivered", clock=clock) as u:
        for row in u.session.exec(select(SigningCode).where(act.where(SigningCode), SigningCode.signer_id == signer_id,
                                                            col(SigningCode.used_at).is_(None))):
            row.expires_at = min(row.expires_at, u.at)
            u.session.add(row)
        u.commit()


def eligible_signers(engine, protocol: ProtocolDefinition, *, act: SignedAct, at: dt.datetime) -> list[str]:
    """Active staff whose role the delegation log lets perform this signed act."""
    with Session(engine) as s:
        staff = s.exec(select(Staff).order_by(Staff.staff_id)).all()
    return [m.staff_id for m in staff if m.active_at(at) and may(protocol.authority.acts, m.role_set, act.act)]


def send_codes_to_signers(engine, protocol: ProtocolDefinition, channels: list, *, act: SignedAct, clock: Clock,
                          link: str | None = None) -> tuple[list[str], list[str]]:
    """Each eligible signer without a live code gets their own. Returns (sent to, not sent: one sentence each)."""
    sent, missed = [], []
    for signer in eligible_signers(engine, protocol, act=act, at=clock()):
        if has_live_code(engine, act=act, signer_id=signer, now=clock()):
            continue
        try:
            sent.append(send_signing_code(engine, protocol, channels, act=act, signer_id=signer, clock=clock, link=link,
                                          actor="system:signing").signer_id)
        except UserError as exc:
            missed.append(str(exc))
    return sent, missed


def has_live_code(engine, *, act: SignedAct, signer_id: str, now: dt.datetime) -> bool:
    with Session(engine) as s:
        return s.exec(select(SigningCode.id).where(act.where(SigningCode), SigningCode.signer_id == signer_id,
                                                   col(SigningCode.used_at).is_(None), SigningCode.expires_at > now)).first() is not None


# -- the checks a signature makes --------------------------------------------------------------------

def _same_name(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _lockout(s: Session, act: SignedAct, signer_id: str, at: dt.datetime) -> SigningLockout | None:
    return s.exec(select(SigningLockout).where(act.where(SigningLockout), SigningLockout.signer_id == signer_id,
                                               SigningLockout.until_at > at).order_by(col(SigningLockout.until_at).desc())).first()


def check_signature(s: Session, protocol: ProtocolDefinition, *, act: SignedAct, signer_id: str, printed_name: str | None, code: str,
                    at: dt.datetime) -> tuple[Staff, SigningCode]:
    """The signer and their code's row, or SigningRefused/AccessRefused with the sentence that refuses it.

    Marks nothing: the caller sets `used_at` when the act itself is accepted."""
    who = (signer_id or "").strip()
    if not who:
        raise SigningRefused(f"signer_id is blank: a signature to {act.act.value} needs your staff ID", SigningRefusal.BLANK_SIGNER)
    member = authorize(s, protocol, actor=who, act=act.act, at=at)  # unknown, inactive, or a role that may not sign
    if printed_name and printed_name.strip() and not _same_name(printed_name, member.printed_name):
        raise SigningRefused(f"printed_name '{printed_name.strip()[:60]}' is not the staff register's name for {who}",
                             SigningRefusal.WRONG_NAME)
    locked = _lockout(s, act, who, at)
    if locked is not None:
        raise SigningRefused(f"{who} is locked out of signing {act.label} until {locked.until_at:%Y-%m-%d %H:%M} UTC after "
                             f"{protocol.escalation.signing_max_wrong_codes.value} wrong codes", SigningRefusal.LOCKED_OUT)
    rows = s.exec(select(SigningCode).where(act.where(SigningCode), SigningCode.signer_id == who)).all()
    match = next((r for r in rows if r.salt and hmac.compare_digest(r.code_hash, _hash(act, who, code, r.salt))), None)
    if match is None:
        raise SigningRefused(f"signing_code is wrong for {act.label} and signer {who}", SigningRefusal.WRONG_CODE)
    if match.used_at is not None:
        raise SigningRefused("signing_code was already used; each code signs once", SigningRefusal.USED_CODE)
    if match.expires_at <= at:
        raise SigningRefused("signing_code has expired; ask for a new one", SigningRefusal.EXPIRED_CODE)
    return member, match


def record_accepted(s: Session, *, act: SignedAct, signer_id: str, attempt_key: str, said: str, at: dt.datetime) -> None:
    s.add(SignatureAttempt(**act.columns(), attempt_key=attempt_key, signer_id=signer_id, accepted=True, reason=said[:300], at=at))


def refusal_kind(exc: UserError) -> SigningRefusal:
    if isinstance(exc, SigningRefused):
        return exc.kind
    if isinstance(exc, AccessRefused):
        return SigningRefusal.NOT_AUTHORIZED
    return SigningRefusal.OTHER


def record_refusal(engine, protocol: ProtocolDefinition, *, act: SignedAct, signer_id: str, attempt_key: str, exc: UserError,
                   clock: Clock) -> str:
    """Log a refused attempt (its own transaction: the refused act rolled back). A wrong code that reaches the limit
    locks the signer out of this act and tells the safety desk and the PI. Returns the sentence to show."""
    who = (signer_id or "").strip()[:64] or "(blank)"
    kind, reason = refusal_kind(exc), str(exc)
    with UnitOfWork(engine, actor=who, reason=f"signature for {act.label} refused", clock=clock) as u:
        s = u.session
        attempt = SignatureAttempt(**act.columns(), attempt_key=attempt_key, signer_id=who, accepted=False, refusal=kind,
                                   reason=reason[:300], at=u.at)
        s.add(attempt)
        s.flush()
        if kind is SigningRefusal.WRONG_CODE:
            reason = _maybe_lock(s, protocol, act, who, attempt, reason)
            attempt.reason = reason[:300]
            s.add(attempt)
        u.commit()
    return reason


def _maybe_lock(s: Session, protocol: ProtocolDefinition, act: SignedAct, who: str, attempt: SignatureAttempt, reason: str) -> str:
    limit = protocol.escalation.signing_max_wrong_codes.value
    since = max([0] + [r.after_attempt_id for r in s.exec(select(SigningLockout).where(act.where(SigningLockout),
                                                                                       SigningLockout.signer_id == who))]
                + [a for a in s.exec(select(SignatureAttempt.id).where(act.where(SignatureAttempt), SignatureAttempt.signer_id == who,
                                                                      col(SignatureAttempt.accepted).is_(True)))])
    wrong = len(s.exec(select(SignatureAttempt.id).where(act.where(SignatureAttempt), SignatureAttempt.signer_id == who,
                                                         SignatureAttempt.refusal == SigningRefusal.WRONG_CODE,
                                                         SignatureAttempt.id > since)).all())
    if wrong < limit:
        return f"{reason} ({wrong} of {limit} wrong codes)"
    minutes = protocol.escalation.signing_lockout_minutes.value
    lock = SigningLockout(**act.columns(), signer_id=who, after_attempt_id=attempt.id, locked_at=attempt.at,
                          until_at=attempt.at + dt.timedelta(minutes=minutes))
    s.add(lock)
    s.flush()
    for role in (Role.SAFETY, Role.PI):
        enqueue(s, Notice(role, NoticeEvent.SIGNING_LOCKED_OUT, None, detail=f"{who} on {act.label}, {minutes} minutes"),
                dedup=f"signing-lockout:{act.key}:{who}:{lock.id}", at=attempt.at)
    return f"{reason}; {limit} wrong codes: {who} is locked out of {act.label} for {minutes} minutes, and the safety desk and the PI are told"
