"""The manage-staff form, and every form's `recorded_by` checked against the staff register: against a real Prefect server."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session, func, select

from flows.enrollment import EnrollmentRequest, enroll_patient
from flows.recording import InfusionRecord, OffStudyRequest, VisitRecord, off_study, record_infusion, record_visit
from flows.staff import StaffChangeForm, manage_staff
from models.tables import AccessRefusal, AuditLog, Staff, Subject
from protocol.eligibility import ScreeningRecord

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
DAY0 = dt.datetime(2027, 1, 31, 9, 0)


def enrollment(sid: str, recorded_by: str = "coord-1") -> EnrollmentRequest:
    return EnrollmentRequest(screening=ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid}), planned_day0=DAY0,
                             recorded_by=recorded_by)


def refusals(engine) -> list[tuple[str, str]]:
    with Session(engine) as s:
        return [(r.actor, r.act) for r in s.exec(select(AccessRefusal).order_by(AccessRefusal.id))]


def test_the_pi_adds_and_deactivates_staff_from_the_form_and_each_change_is_audited(trial_db, clock, channels):
    added = manage_staff(StaffChangeForm(action="add", staff_id="nurse-20", printed_name="Nurse Twenty", roles=["nurse"],
                                         recorded_by="pi-01"), return_state=True)
    assert added.is_completed(), added.message
    assert "nurse-20 (Nurse Twenty) added to the staff register as nurse; their own channel is tag 'staff:nurse-20'" in added.message
    gone = manage_staff(StaffChangeForm(action="deactivate", staff_id="nurse-20", reason="moved to another unit", recorded_by="pi-01"),
                        return_state=True)
    assert gone.is_completed() and "nurse-20 is no longer active" in gone.message
    with Session(trial_db) as s:
        member = s.exec(select(Staff).where(Staff.staff_id == "nurse-20")).one()
        audit = s.exec(select(AuditLog).where(AuditLog.entity == "staff", AuditLog.entity_id == str(member.id))).all()
    assert member.active_to_at == clock() and {a.actor for a in audit} == {"pi-01"}
    assert "staff nurse-20 deactivated: moved to another unit" in {a.reason for a in audit}


def test_a_form_from_someone_who_may_not_manage_staff_ends_failed_with_the_sentence(trial_db, clock, channels):
    state = manage_staff(StaffChangeForm(action="add", staff_id="nurse-21", printed_name="N", roles=["nurse"], recorded_by="nurse-7"),
                         return_state=True)
    assert state.is_failed()
    assert state.message == "nurse-7 (nurse) may not manage staff: the delegation log gives it to pi"
    incomplete = manage_staff(StaffChangeForm(action="add", staff_id="nurse-21", recorded_by="pi-01"), return_state=True)
    assert incomplete.is_failed() and incomplete.message == "to add a staff member give printed_name and at least one role"
    with Session(trial_db) as s:
        assert s.exec(select(Staff).where(Staff.staff_id == "nurse-21")).first() is None
    assert refusals(trial_db) == [("nurse-7", "manage staff")]


def test_every_form_refuses_an_unregistered_or_unqualified_recorder_and_logs_it(trial_db, clock, channels):
    ghost = enroll_patient(enrollment("S-301", recorded_by="ghost-1"), return_state=True)
    assert ghost.is_failed()
    assert ghost.message == ("'ghost-1' is not a registered staff member; to screen and enroll a patient you must be a registered "
                             "coordinator or investigator or pi")
    with Session(trial_db) as s:
        assert s.exec(select(func.count()).select_from(Subject)).one() == 0
    assert enroll_patient(enrollment("S-301"), return_state=True).name == "Enrolled"
    clock.set(dt.datetime(2027, 2, 1, 1, 0, tzinfo=dt.timezone.utc))
    by_coordinator = record_infusion(InfusionRecord(subject_id="S-301", infusion_number=1, dose_level=1, given_at=DAY0, cells_infused=1e8,
                                                    product_lot="L1", recorded_by="coord-1"), return_state=True)
    assert by_coordinator.is_failed()
    assert by_coordinator.message == ("coord-1 (coordinator) may not record an NK infusion: the delegation log gives it to nurse "
                                      "or investigator")
    off = off_study(OffStudyRequest(subject_id="S-301", reason="withdrawal", effective_on=dt.date(2027, 2, 1), recorded_by="coord-1"),
                    return_state=True)
    assert off.is_failed() and off.message.startswith("coord-1 (coordinator) may not put a patient off study")
    visit = record_visit(VisitRecord(subject_id="S-301", visit="visit_1_month", done_on=dt.date(2027, 2, 1), recorded_by="pharm-1"),
                         return_state=True)
    assert visit.is_failed() and visit.message.startswith("pharm-1 (pharmacy) may not record a visit, a lab or a PK result")
    assert refusals(trial_db) == [("ghost-1", "screen and enroll a patient"), ("coord-1", "record an NK infusion"),
                                  ("coord-1", "put a patient off study"), ("pharm-1", "record a visit, a lab or a PK result")]


@pytest.mark.parametrize("recorded_by", ["", "Nurse 7", "system:daily-rounds", "x"])
def test_a_forms_recorded_by_must_be_a_well_formed_staff_id(recorded_by):
    with pytest.raises(ValidationError, match="recorded_by"):
        InfusionRecord(subject_id="S-1", infusion_number=1, dose_level=1, given_at=DAY0, cells_infused=1e8, product_lot="L",
                       recorded_by=recorded_by)
    with pytest.raises(ValidationError, match="recorded_by"):
        enrollment("S-001", recorded_by=recorded_by)
