"""The staff register on SQLite and PostgreSQL: every write is made by a registered, active staff member whose
role allows it; a refusal is one sentence, writes nothing, and leaves an access_refusal row."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from models.tables import AccessRefusal, AuditLog, OffStudyReason, Staff, Subject
from protocol.eligibility import ScreeningRecord
from protocol.errors import AccessRefused, UserError
from protocol.roles import Act
from tasks import enrollment, recording
from tasks.staff import BOOTSTRAP_ACTOR, add_staff, authorize, deactivate_staff, list_staff
from tests.helpers import STAFF_SINCE

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
NOW = dt.datetime(2027, 1, 20, 1, 0, tzinfo=dt.timezone.utc)


def at_now():
    return NOW


def count(engine, table) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(table)).one()


def written(engine) -> int:
    """Audit rows of everything but the refusals themselves (a refusal's row is audited too)."""
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(AuditLog).where(AuditLog.entity != "access_refusal")).one()


def refusals(engine) -> list[AccessRefusal]:
    with Session(engine) as s:
        return list(s.exec(select(AccessRefusal).order_by(AccessRefusal.id)))


def enroll_as(engine, protocol, actor, sid="S-001"):
    rec = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid})
    return enrollment.enroll(engine, protocol, record=rec, planned_day0=dt.datetime(2027, 1, 31, 9, 0), actor=actor, clock=at_now)


def assert_refused_and_logged(engine, exc_info, *, actor: str, act: Act, audit_before: int) -> None:
    sentence = str(exc_info.value)
    assert isinstance(exc_info.value, AccessRefused)
    assert actor in sentence and act.value in sentence and "\n" not in sentence
    assert written(engine) == audit_before  # nothing written
    last = refusals(engine)[-1]
    assert (last.actor, last.act, last.reason, last.at) == (actor, act.value, sentence, NOW)


# -- refusals, on every service ---------------------------------------------------------------------

def test_an_unknown_actor_is_refused_in_one_sentence_and_nothing_is_written(staffed_engine, protocol):
    audit = written(staffed_engine)
    with pytest.raises(AccessRefused) as refused:
        enroll_as(staffed_engine, protocol, "ghost-9")
    assert str(refused.value) == ("'ghost-9' is not a registered staff member; to screen and enroll a patient you must be a registered "
                                  "coordinator or investigator or pi")
    assert_refused_and_logged(staffed_engine, refused, actor="ghost-9", act=Act.ENROLL, audit_before=audit)
    assert count(staffed_engine, Subject) == 0


def test_a_blank_actor_is_refused_and_logged_as_blank(staffed_engine, protocol):
    audit = written(staffed_engine)
    with pytest.raises(AccessRefused) as refused:
        enroll_as(staffed_engine, protocol, "  ")
    assert str(refused.value).startswith("'(blank)' is not a registered staff member; to screen and enroll a patient")
    assert_refused_and_logged(staffed_engine, refused, actor="(blank)", act=Act.ENROLL, audit_before=audit)


def test_an_inactive_staff_member_is_refused(staffed_engine, protocol):
    deactivate_staff(staffed_engine, protocol, staff_id="coord-1", reason="left the unit", actor="pi-01",
                     clock=lambda: NOW - dt.timedelta(days=1))
    audit = written(staffed_engine)
    with pytest.raises(AccessRefused) as refused:
        enroll_as(staffed_engine, protocol, "coord-1")
    assert str(refused.value) == ("coord-1 is not active on the staff register at this time; to screen and enroll a patient you must be "
                                  "an active coordinator or investigator or pi")
    assert_refused_and_logged(staffed_engine, refused, actor="coord-1", act=Act.ENROLL, audit_before=audit)


def test_a_coordinator_may_not_put_a_patient_off_study_or_record_an_infusion(staffed_engine, protocol):
    assert enroll_as(staffed_engine, protocol, "coord-1").status is enrollment.EnrollmentStatus.ENROLLED
    audit = written(staffed_engine)
    with pytest.raises(AccessRefused) as off:
        recording.take_off_study(staffed_engine, protocol, subject_id="S-001", reason=OffStudyReason.WITHDRAWAL,
                                 effective_on=dt.date(2027, 1, 20), actor="coord-1", clock=at_now)
    assert str(off.value) == "coord-1 (coordinator) may not put a patient off study: the delegation log gives it to investigator or pi"
    assert_refused_and_logged(staffed_engine, off, actor="coord-1", act=Act.OFF_STUDY, audit_before=audit)
    with pytest.raises(AccessRefused) as infusion:
        recording.record_infusion(staffed_engine, protocol, subject_id="S-001", infusion_number=1, given_at=dt.datetime(2027, 1, 20, 8, 0),
                                  dose_level=1, cells_infused=1e8, product_lot="L1", actor="coord-1", clock=at_now)
    assert str(infusion.value) == ("coord-1 (coordinator) may not record an NK infusion: the delegation log gives it to nurse or "
                                   "investigator")
    assert_refused_and_logged(staffed_engine, infusion, actor="coord-1", act=Act.RECORD_INFUSION, audit_before=audit)
    assert [r.act for r in refusals(staffed_engine)] == [Act.OFF_STUDY.value, Act.RECORD_INFUSION.value]


def test_a_nurse_may_record_an_infusion_and_the_audit_names_her(staffed_engine, protocol):
    enroll_as(staffed_engine, protocol, "coord-1")
    recording.record_infusion(staffed_engine, protocol, subject_id="S-001", infusion_number=1, given_at=dt.datetime(2027, 1, 31, 9, 0),
                              dose_level=1, cells_infused=1e8, product_lot="L1", actor="nurse-7",
                              clock=lambda: dt.datetime(2027, 2, 1, 1, 0, tzinfo=dt.timezone.utc))
    with Session(staffed_engine) as s:
        assert s.exec(select(AuditLog).where(AuditLog.entity == "administration")).first().actor == "nurse-7"
    assert refusals(staffed_engine) == []


def test_authorize_names_the_roles_the_delegation_log_gives_each_act(staffed_engine, protocol):
    with Session(staffed_engine) as s:
        assert authorize(s, protocol, actor="pi-01", act=Act.SIGN_ESCALATION, at=NOW).staff_id == "pi-01"
        with pytest.raises(AccessRefused, match=r"^nurse-7 \(nurse\) may not sign a cohort escalation decision: .* gives it to pi$"):
            authorize(s, protocol, actor="nurse-7", act=Act.SIGN_ESCALATION, at=NOW)
        with pytest.raises(AccessRefused, match="not active on the staff register"):
            authorize(s, protocol, actor="pi-01", act=Act.MANAGE_STAFF, at=STAFF_SINCE - dt.timedelta(seconds=1))


# -- the register itself ---------------------------------------------------------------------------

def test_the_first_staff_member_is_the_bootstrap_and_must_be_a_pi(engine, protocol):
    with pytest.raises(UserError, match="the staff register is empty: the first staff member must be a pi"):
        add_staff(engine, protocol, staff_id="nurse-01", printed_name="Nurse", roles="nurse", actor=None, clock=at_now,
                  allow_bootstrap=True)
    with pytest.raises(UserError, match="add the first staff member, the PI, at the site terminal"):
        add_staff(engine, protocol, staff_id="pi-01", printed_name="PI", roles="pi", actor="pi-01", clock=at_now)  # a form: no bootstrap
    first = add_staff(engine, protocol, staff_id="pi-01", printed_name="Principal  Investigator", roles="pi,investigator", actor=None,
                      clock=at_now, allow_bootstrap=True)
    assert first.bootstrap and "Recorded as bootstrap:site" in first.message and "nktrial --as pi-01 staff add" in first.message
    with Session(engine) as s:
        rows = s.exec(select(AuditLog).where(AuditLog.entity == "staff")).all()
        pi = s.exec(select(Staff)).one()
    assert {r.actor for r in rows} == {BOOTSTRAP_ACTOR} and {r.field for r in rows} >= {"staff_id", "roles", "channel_tag"}
    assert (pi.printed_name, pi.roles, pi.channel_tag) == ("Principal Investigator", "pi,investigator", "staff:pi-01")
    assert pi.active_from_at == NOW
    # the bootstrap is over: the next add needs a PI
    with pytest.raises(AccessRefused, match=r"^'\(blank\)' is not a registered staff member; to manage staff you must be a registered pi$"):
        add_staff(engine, protocol, staff_id="nurse-01", printed_name="Nurse", roles="nurse", actor=None, clock=at_now,
                  allow_bootstrap=True)
    second = add_staff(engine, protocol, staff_id="nurse-01", printed_name="Nurse One", roles=["nurse"], channel_tag="nurse", actor="pi-01",
                       clock=at_now)
    assert not second.bootstrap and "nurse-01 (Nurse One) added to the staff register as nurse" in second.message
    with pytest.raises(AccessRefused, match=r"^nurse-01 \(nurse\) may not manage staff: the delegation log gives it to pi$"):
        add_staff(engine, protocol, staff_id="coord-01", printed_name="C", roles="coordinator", actor="nurse-01", clock=at_now)
    with Session(engine) as s:
        assert {r.actor for r in s.exec(select(AuditLog).where(AuditLog.entity == "staff", AuditLog.entity_id == "2"))} == {"pi-01"}
    assert [r.act for r in refusals(engine)] == ["manage staff", "manage staff"]


BAD_STAFF = [
    ({"staff_id": "Nurse 1"}, "staff ID 'Nurse 1' is not a staff ID: 2 to 32 characters"),
    ({"staff_id": "system:x"}, "staff ID 'system:x' is not a staff ID"),
    ({"printed_name": "  "}, "printed_name: give the name as it appears on a signature"),
    ({"roles": "nurse,doctor"}, "roles: 'doctor' is not a role; roles are coordinator, nurse, investigator, pi"),
    ({"roles": ""}, "roles: give at least one role"),
    ({"channel_tag": "my channel"}, "channel_tag 'my channel' is not an apprise tag"),
    ({"staff_id": "nurse-7"}, "staff ID nurse-7 is already on the staff register (Nurse Seven, nurse, active); a staff ID is never reused"),
]


@pytest.mark.parametrize(("change", "message"), BAD_STAFF)
def test_bad_staff_input_is_one_sentence(staffed_engine, protocol, change, message):
    fields = {"staff_id": "nurse-9", "printed_name": "Nurse Nine", "roles": "nurse", "channel_tag": None, **change}
    audit = written(staffed_engine)
    with pytest.raises(UserError) as exc:
        add_staff(staffed_engine, protocol, **fields, actor="pi-01", clock=at_now)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
    assert written(staffed_engine) == audit


def test_deactivation_is_audited_and_ends_authority_from_then_on(staffed_engine, protocol):
    out = deactivate_staff(staffed_engine, protocol, staff_id="nurse-7", reason="left the unit", actor="pi-01", clock=at_now)
    assert out.message.startswith("nurse-7 is no longer active on the staff register from 2027-01-20 09:00 Asia/Shanghai")
    with Session(staffed_engine) as s:
        (row,) = s.exec(select(AuditLog).where(AuditLog.entity == "staff", AuditLog.field == "active_to_at")).all()
    assert (row.actor, row.old_value, row.reason) == ("pi-01", None, "staff nurse-7 deactivated: left the unit")
    listed = {r.staff_id: r for r in list_staff(staffed_engine, at=NOW)}
    assert not listed["nurse-7"].active and listed["nurse-1"].active and listed["nurse-7"].active_to_at == NOW
    with pytest.raises(UserError, match="nurse-7 is already inactive since 2027-01-20 09:00 Asia/Shanghai"):
        deactivate_staff(staffed_engine, protocol, staff_id="nurse-7", reason="again", actor="pi-01", clock=at_now)
    with pytest.raises(UserError, match="reason: say why"):
        deactivate_staff(staffed_engine, protocol, staff_id="nurse-1", reason=" ", actor="pi-01", clock=at_now)
    with pytest.raises(UserError, match="staff ID nobody is not on the staff register"):
        deactivate_staff(staffed_engine, protocol, staff_id="nobody", reason="x", actor="pi-01", clock=at_now)
    with pytest.raises(AccessRefused, match=r"^inv-2 \(investigator\) may not manage staff"):
        deactivate_staff(staffed_engine, protocol, staff_id="nurse-1", reason="x", actor="inv-2", clock=at_now)
    with pytest.raises(UserError, match="pi-01 is the last active staff member who may manage staff: add another pi first"):
        deactivate_staff(staffed_engine, protocol, staff_id="pi-01", reason="leaves", actor="pi-01", clock=at_now)
