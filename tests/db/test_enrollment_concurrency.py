"""Concurrent enrollments never over-fill a cohort: the unique slot is the guard, on both engines."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from sqlmodel import Session, select

from models.db import make_engine
from models.migrate import upgrade
from models.tables import Enrollment, Subject, SubjectStatus, WaitlistEntry
from protocol.eligibility import ScreeningRecord
from tasks.enrollment import EnrollmentStatus, enroll
from tests.helpers import register_staff

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
NOW = dt.datetime(2027, 1, 20, 1, 0, tzinfo=dt.timezone.utc)


def _enroll(engine, protocol, sid: str):
    rec = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid})
    return enroll(engine, protocol, record=rec, planned_day0=dt.datetime(2027, 1, 31, 9, 0), actor="coord-1", clock=lambda: NOW)


def test_concurrent_enrollment_into_the_last_slot_yields_exactly_one_patient(db_url, protocol):
    engine = make_engine(db_url, pool_size=10) if db_url.startswith("postgresql") else make_engine(db_url)
    upgrade(engine)
    register_staff(engine, protocol)
    assert _enroll(engine, protocol, "S-001").status is EnrollmentStatus.ENROLLED
    assert _enroll(engine, protocol, "S-002").status is EnrollmentStatus.ENROLLED
    contenders = [f"S-{n:03d}" for n in range(10, 18)]
    outcomes, errors = {}, []
    barrier = threading.Barrier(len(contenders))

    def go(sid):
        try:
            barrier.wait()
            outcomes[sid] = _enroll(engine, protocol, sid).status
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(sid,)) for sid in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(outcomes.values()).count(EnrollmentStatus.ENROLLED) == 1
    assert sorted(outcomes.values()).count(EnrollmentStatus.WAITLISTED) == len(contenders) - 1
    with Session(engine) as s:
        slots = sorted(e.slot for e in s.exec(select(Enrollment)))
        assert slots == [1, 2, 3]
        waitlist = s.exec(select(Subject.subject_id).join(WaitlistEntry, WaitlistEntry.subject_pk == Subject.id)
                          .order_by(WaitlistEntry.id)).all()
        assert len(waitlist) == len(contenders) - 1
        assert all(s.exec(select(Subject).where(Subject.subject_id == sid)).one().status is SubjectStatus.WAITLISTED for sid in waitlist)
    engine.dispose()


def test_a_sentinel_stagger_holds_the_next_patients_back(tmp_path, protocol):
    import pytest

    from protocol.errors import UserError

    esc = protocol.escalation.model_copy(update={"sentinel_stagger_days": protocol.escalation.sentinel_stagger_days.model_copy(update={"value": 7})})
    staggered = protocol.model_copy(update={"escalation": esc, "protocol": protocol.protocol.model_copy(update={"version": "1.0.1"})})
    engine = make_engine(f"sqlite:///{tmp_path / 'trial.db'}")
    upgrade(engine)
    register_staff(engine, staggered)
    assert _enroll(engine, staggered, "S-001").status is EnrollmentStatus.ENROLLED  # the sentinel, day 0 2027-01-31
    with pytest.raises(UserError, match=r"too soon after the sentinel S-001 \(day 0 2027-01-31\).*choose 2027-02-07 or later"):
        _enroll(engine, staggered, "S-002")
    rec = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": "S-002"})
    ok = enroll(engine, staggered, record=rec, planned_day0=dt.datetime(2027, 2, 7, 9, 0), actor="coord-1", clock=lambda: NOW)
    assert ok.status is EnrollmentStatus.ENROLLED and ok.cohort == 1


def test_a_waitlisted_patient_takes_the_slot_a_withdrawal_opens_and_leaves_the_waitlist(staffed_engine, protocol):
    engine = staffed_engine
    from models.tables import DoseLevelState, OffStudyReason
    from tasks.recording import take_off_study

    for sid in ("S-001", "S-002", "S-003"):
        assert _enroll(engine, protocol, sid).status is EnrollmentStatus.ENROLLED
    assert _enroll(engine, protocol, "S-004").status is EnrollmentStatus.WAITLISTED
    assert _enroll(engine, protocol, "S-004").status is EnrollmentStatus.WAITLISTED  # asking again keeps one place in the queue
    take_off_study(engine, protocol, subject_id="S-002", reason=OffStudyReason.WITHDRAWAL, effective_on=dt.date(2027, 1, 20),
                   actor="inv-2", clock=lambda: NOW)
    with Session(engine) as s:
        assert s.get(DoseLevelState, 1).slots_open == 4  # the replacement slot
    again = _enroll(engine, protocol, "S-004")
    assert (again.status, again.cohort, again.slot) == (EnrollmentStatus.ENROLLED, 1, 4)
    with Session(engine) as s:
        assert s.exec(select(WaitlistEntry)).all() == []
        assert s.exec(select(Subject).where(Subject.subject_id == "S-004")).one().status is SubjectStatus.ENROLLED
