"""Signed acts on SQLite and PostgreSQL: a code is bound to one signer and one decision, sent only to the
signer's own channel; impersonation, another signer's code, brute force, reuse, expiry, blank and unknown
signers are refused, and every refusal is logged."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlmodel import Session, select

from models.clock import VirtualClock
from models.db import UnitOfWork
from models.tables import AccessRefusal, EscalationDecision, NotificationOutbox, SignatureAttempt, SigningCode, SigningLockout
from nktrial.receiver import Receiver
from protocol.errors import AccessRefused, UserError
from protocol.three_plus_three import Action
from tasks import signatures, signing
from tasks.delivery import load_channels
from tasks.staff import add_staff
from tests.helpers import TEST_STAFF

T0 = dt.datetime(2027, 3, 1, 1, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


class Desk:
    """A waiting decision, the staff's own channels on a real receiver, and a virtual clock."""

    def __init__(self, engine, protocol, receiver, tmp_path):
        self.engine, self.p, self.receiver, self.clock = engine, protocol, receiver, VirtualClock(T0)
        add_staff(engine, protocol, staff_id="pi-02", printed_name="Second PI", roles="pi", channel_tag="staff:pi-02", actor="pi-01",
                  clock=lambda: T0 - dt.timedelta(days=1))
        cfg = tmp_path / "apprise.yml"
        own = {sid: [tag] for sid, _, _, tag in TEST_STAFF} | {"pi-02": ["staff:pi-02"]}
        cfg.write_text(receiver.apprise_yaml(own), encoding="utf-8")
        self.channels = load_channels(cfg)
        self.start = len(receiver.messages)
        with UnitOfWork(engine, actor="system:test", reason="a review waits", clock=self.clock) as u:
            d = EscalationDecision(from_level=1, history="1NNN", recommended_action="escalate", recommended_level=2, created_at=u.at)
            u.session.add(d)
            u.session.flush()
            self.decision_id = d.id
            u.commit()
        self.n = 0

    def code(self, signer: str) -> str:
        sent = signatures.send_decision_code(self.engine, self.p, self.channels, decision_id=self.decision_id, signer_id=signer,
                                             clock=self.clock)
        assert sent.sentence == f"sent to {signer}'s channel"
        (body,) = [m.body for m in self.receiver.messages[self.start:] if m.path == signer][-1:]
        return re.search(r"signing code (\d{8})", body).group(1)

    def sign(self, signer: str, code: str, printed_name: str | None = None):
        self.n += 1
        return signatures.sign_decision(self.engine, self.p, decision_id=self.decision_id, signer_id=signer, printed_name=printed_name,
                                        action=Action.ESCALATE, rationale=None, code=code, meaning="approval", attempt_key=f"k{self.n}",
                                        clock=self.clock)

    def attempts(self) -> list[tuple[str, str | None]]:
        with Session(self.engine) as s:
            return [(a.signer_id, a.refusal) for a in s.exec(select(SignatureAttempt).order_by(SignatureAttempt.id))]

    def passes_every_check(self, signer: str, code: str) -> bool:
        with Session(self.engine) as s:
            signing.check_signature(s, self.p, act=signing.SignedAct.decision(self.decision_id), signer_id=signer, printed_name=None,
                                    code=code, at=self.clock())
        return True


@pytest.fixture
def desk(staffed_engine, protocol, receiver, tmp_path):
    return Desk(staffed_engine, protocol, receiver, tmp_path)


def test_the_code_goes_only_to_the_signers_own_channel_and_only_its_hash_is_kept(desk):
    code = desk.code("pi-01")
    to = [m.path for m in desk.receiver.messages[desk.start:]]
    assert to == ["pi-01"]
    with Session(desk.engine) as s:
        row = s.exec(select(SigningCode)).one()
        assert (row.signer_id, row.decision_id) == ("pi-01", desk.decision_id) and code not in row.code_hash + row.salt


def test_a_coordinator_cannot_sign_or_get_a_code_and_both_are_logged(desk):
    code = desk.code("pi-01")
    out = desk.sign("coord-1", code)
    assert not out.accepted and "coord-1 (coordinator) may not sign a cohort escalation decision" in out.reason
    with pytest.raises(AccessRefused, match="may not sign"):
        desk.code("coord-1")
    assert desk.attempts() == [("coord-1", "not_authorized")]
    with Session(desk.engine) as s:
        assert {r.actor for r in s.exec(select(AccessRefusal))} == {"coord-1"}


def test_only_the_signer_may_ask_for_their_code_and_a_request_by_someone_else_is_logged(desk):
    live = desk.code("pi-01")
    with pytest.raises(AccessRefused, match="coord-1 may not ask for pi-01's signing code: a signer asks for their own"):
        signatures.send_decision_code(desk.engine, desk.p, desk.channels, decision_id=desk.decision_id, signer_id="pi-01",
                                      clock=desk.clock, actor="coord-1")
    assert desk.passes_every_check("pi-01", live)  # the refused request did not replace pi-01's live code
    with Session(desk.engine) as s:
        assert [r.actor for r in s.exec(select(AccessRefusal))] == ["coord-1"]


def test_a_code_sent_to_one_pi_is_wrong_for_another(desk):
    code = desk.code("pi-01")
    out = desk.sign("pi-02", code)
    assert not out.accepted and out.reason.startswith(f"signing_code is wrong for decision {desk.decision_id} and signer pi-02")
    assert desk.passes_every_check("pi-01", code)  # still good for the one it was sent to


def test_five_wrong_codes_lock_the_signer_out_for_30_minutes_and_tell_the_safety_desk_and_the_pi(desk):
    code = desk.code("pi-01")
    wrong = "00000000" if code != "00000000" else "11111111"
    reasons = [desk.sign("pi-01", wrong).reason for _ in range(5)]
    assert "(4 of 5 wrong codes)" in reasons[3] and "pi-01 is locked out of decision" in reasons[4] and "30 minutes" in reasons[4]
    right = desk.sign("pi-01", code)
    assert not right.accepted and "pi-01 is locked out of signing decision" in right.reason
    assert desk.attempts()[-1] == ("pi-01", "locked_out")
    with Session(desk.engine) as s:
        lock = s.exec(select(SigningLockout)).one()
        assert lock.until_at - lock.locked_at == dt.timedelta(minutes=30)
        notices = s.exec(select(NotificationOutbox)).all()
    assert {n.role for n in notices} == {"safety", "pi"}
    assert all(code not in n.body and n.body.startswith("trial · signing locked out after repeated wrong codes · pi-01 on decision")
               for n in notices)
    assert desk.passes_every_check("pi-02", desk.code("pi-02"))  # another signer is not locked out
    desk.clock.advance(minutes=29)
    assert "locked out" in desk.sign("pi-01", code).reason
    desk.clock.advance(minutes=1)
    assert desk.passes_every_check("pi-01", code)
    assert "(1 of 5 wrong codes)" in desk.sign("pi-01", wrong).reason  # the count starts afresh


def test_a_used_code_an_expired_code_and_a_replaced_code_are_refused(desk):
    code = desk.code("pi-01")
    with UnitOfWork(desk.engine, actor="pi-01", reason="the code signs once", clock=desk.clock) as u:
        row = u.session.exec(select(SigningCode)).one()
        row.used_at = u.at
        u.session.add(row)
        u.commit()
    assert "already used" in desk.sign("pi-01", code).reason
    fresh = desk.code("pi-01")
    newer = desk.code("pi-01")
    assert "expired" in desk.sign("pi-01", fresh).reason  # a new code replaces the signer's earlier one
    desk.clock.advance(hours=72)
    assert "expired" in desk.sign("pi-01", newer).reason
    assert [k for _, k in desk.attempts()] == ["used_code", "expired_code", "expired_code"]


def test_blank_and_unknown_signers_and_a_wrong_printed_name_are_refused_and_logged(desk):
    code = desk.code("pi-01")
    assert "signer_id is blank" in desk.sign("  ", code).reason
    assert "'mallory' is not a registered staff member" in desk.sign("mallory", code).reason
    assert "is not the staff register's name for pi-01" in desk.sign("pi-01", code, printed_name="Someone Else").reason
    assert desk.attempts() == [("(blank)", "blank_signer"), ("mallory", "not_authorized"), ("pi-01", "wrong_name")]
    assert desk.passes_every_check("pi-01", code)


def test_no_code_is_issued_to_a_signer_without_an_own_channel(desk):
    add_staff(desk.engine, desk.p, staff_id="pi-03", printed_name="Third PI", roles="pi", channel_tag="staff:pi-03", actor="pi-01",
              clock=lambda: T0 - dt.timedelta(days=1))
    with pytest.raises(UserError, match=r"^pi-03's channel \(tag 'staff:pi-03'\) is not configured in the apprise config; no signing code"):
        desk.code("pi-03")
    with Session(desk.engine) as s:
        assert s.exec(select(SigningCode)).all() == []
