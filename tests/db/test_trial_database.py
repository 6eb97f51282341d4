"""The trial database on SQLite and PostgreSQL: migrations, audit trail, constraints, UTC."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel, select

from models.crud import create_subject, register_protocol, store_calendar, store_screening
from models.db import UnitOfWork, make_engine
from models.migrate import current_revision, downgrade, head_revision, upgrade
from models.tables import AuditLog, CalendarEventRow, DoseLevelState, Enrollment, LevelStatus, OffStudyReason, Subject, SubjectStatus
from protocol.calendar import compute_calendar
from protocol.eligibility import ScreeningRecord, screen

T0 = dt.datetime(2027, 1, 10, 1, 0, tzinfo=dt.timezone.utc)


def clock():
    return T0


def uow(engine, reason="test"):
    return UnitOfWork(engine, actor="coordinator:c1", reason=reason, clock=clock)


def test_migration_is_idempotent_and_matches_the_models(engine):
    assert current_revision(engine) == head_revision()
    upgrade(engine)  # a second run changes nothing
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert diff == []


def test_downgrade_removes_everything_and_upgrade_restores_it(engine, owner_url):
    owner = make_engine(owner_url)  # schema changes are the owner's (on PostgreSQL the app role may not make them)
    downgrade(owner, "base")
    assert set(sa.inspect(owner).get_table_names()) <= {"alembic_version"}
    upgrade(owner)
    assert "audit_log" in sa.inspect(owner).get_table_names()
    owner.dispose()


def test_every_write_leaves_audit_rows_with_who_when_what_and_why(engine, protocol):
    with uow(engine, "register protocol") as u:
        register_protocol(u.session, protocol=protocol, at=u.at)
        u.commit()
    with uow(engine, "enroll S-001") as u:
        s = create_subject(u.session, subject_id="S-001", at=u.at)
        u.commit()
    with uow(engine, "withdrawal of consent") as u:
        s = u.session.get(Subject, s.id)
        s.status = SubjectStatus.OFF_STUDY
        s.off_study_reason = OffStudyReason.WITHDRAWAL
        u.commit()
    with Session(engine) as db:
        rows = db.exec(select(AuditLog).where(AuditLog.entity == "subject").order_by(AuditLog.id)).all()
    created = {r.field: r.new_value for r in rows if r.reason == "enroll S-001"}
    assert created["subject_id"] == "S-001" and created["status"] == "screening"
    changes = [(r.field, r.old_value, r.new_value) for r in rows if r.reason == "withdrawal of consent"]
    assert sorted(changes) == [("off_study_reason", None, "withdrawal"), ("status", "screening", "off_study")]
    assert all(r.actor == "coordinator:c1" and r.at == T0 and r.entity_id == str(s.id) for r in rows)


def test_a_failed_unit_of_work_leaves_nothing_half_written(engine):
    with pytest.raises(RuntimeError):
        with uow(engine) as u:
            create_subject(u.session, subject_id="S-002", at=u.at)
            u.session.flush()
            raise RuntimeError("the step failed after a write")
    with Session(engine) as db:
        assert db.exec(select(Subject)).all() == []
        assert db.exec(select(AuditLog)).all() == []


def test_the_audit_trail_is_append_only_even_in_raw_sql(engine):
    with uow(engine) as u:
        create_subject(u.session, subject_id="S-003", at=u.at)
        u.commit()
    for sql in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only|permission denied"):  # the trigger, or the app role's grants
            with engine.begin() as conn:
                conn.exec_driver_sql(sql)
    with Session(engine) as db:
        assert {r.actor for r in db.exec(select(AuditLog))} == {"coordinator:c1"}


def test_the_orm_refuses_to_change_an_audit_row(engine):
    with uow(engine) as u:
        create_subject(u.session, subject_id="S-004", at=u.at)
        u.commit()
    with pytest.raises(ValueError, match="append-only"):
        with uow(engine) as u:
            row = u.session.exec(select(AuditLog)).first()
            row.new_value = "tampered"
            u.commit()


def test_writes_outside_a_unit_of_work_are_refused(engine):
    with Session(engine) as db:
        db.add(Subject(subject_id="S-005", created_at=T0))
        with pytest.raises(RuntimeError, match="UnitOfWork"):
            db.commit()


def test_a_unit_of_work_needs_an_actor_and_a_reason(engine):
    with pytest.raises(ValueError, match="actor"):
        UnitOfWork(engine, actor=" ", reason="x")
    with pytest.raises(ValueError, match="reason"):
        UnitOfWork(engine, actor="x", reason="")


def test_instants_round_trip_as_utc_and_naive_ones_are_refused(engine):
    shanghai = dt.timezone(dt.timedelta(hours=8))
    with uow(engine) as u:
        s = create_subject(u.session, subject_id="S-006", at=dt.datetime(2027, 1, 10, 9, 0, tzinfo=shanghai))
        u.commit()
    with Session(engine) as db:
        got = db.get(Subject, s.id).created_at
    assert got == T0 and got.utcoffset() == dt.timedelta(0)
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        with uow(engine) as u:
            create_subject(u.session, subject_id="S-007", at=dt.datetime(2027, 1, 10, 9, 0))
            u.commit()


def test_a_slot_cannot_be_taken_twice(engine, protocol):
    with uow(engine) as u:
        register_protocol(u.session, protocol=protocol, at=u.at)
        a = create_subject(u.session, subject_id="S-010", at=u.at)
        b = create_subject(u.session, subject_id="S-011", at=u.at)
        u.session.add(Enrollment(subject_pk=a.id, dose_level=1, cohort=1, slot=1, enrolled_at=u.at))
        u.commit()
    with pytest.raises(sa.exc.IntegrityError):
        with uow(engine) as u:
            u.session.add(Enrollment(subject_pk=b.id, dose_level=1, cohort=1, slot=1, enrolled_at=u.at))
            u.commit()


def test_concurrent_writers_both_succeed_without_busy_errors(db_url, protocol):
    """Read-then-write from two threads: BEGIN IMMEDIATE (SQLite) serializes them instead of failing."""
    engine = make_engine(db_url)
    upgrade(engine)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(5):
                with UnitOfWork(engine, actor=f"worker:{i}", reason="concurrency", clock=clock) as u:
                    n = len(u.session.exec(select(Subject)).all())
                    create_subject(u.session, subject_id=f"S-{i}{j}{n % 10}", at=u.at)
                    u.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Session(engine) as db:
        assert len(db.exec(select(Subject)).all()) == 20
    engine.dispose()


def test_protocol_registration_is_idempotent_and_refuses_a_silent_amendment(engine, protocol):
    for _ in range(2):
        with uow(engine) as u:
            register_protocol(u.session, protocol=protocol, at=u.at)
            u.commit()
    with Session(engine) as db:
        levels = db.exec(select(DoseLevelState).order_by(DoseLevelState.level)).all()
    assert [(lv.level, lv.status) for lv in levels] == [(1, LevelStatus.OPEN), (2, LevelStatus.PENDING), (3, LevelStatus.PENDING)]
    changed = protocol.model_copy(update={"protocol": protocol.protocol.model_copy(update={"title": "changed"})})
    with pytest.raises(ValueError, match="amendment must carry a new protocol.version"):
        with uow(engine) as u:
            register_protocol(u.session, protocol=changed, at=u.at)


def test_a_screening_and_a_calendar_are_stored_and_re_anchored_in_place(engine, protocol):
    rec = ScreeningRecord(subject_id="S-020", consent_on=dt.date(2027, 1, 10), age_years=50)
    day0 = dt.datetime(2027, 1, 31, 9, 0)
    with uow(engine) as u:
        register_protocol(u.session, protocol=protocol, at=u.at)
        s = create_subject(u.session, subject_id="S-020", at=u.at)
        store_screening(u.session, subject=s, result=screen(protocol, rec), at=u.at)
        store_calendar(u.session, subject=s, calendar=compute_calendar(protocol, dose_level=1, day0=day0), protocol=protocol)
        u.commit()
    late = compute_calendar(protocol, dose_level=1, day0=day0, actual_infusions={1: day0 + dt.timedelta(days=1)})
    with uow(engine, "infusion 1 given a day late") as u:
        store_calendar(u.session, subject=u.session.get(Subject, s.id), calendar=late, protocol=protocol)
        u.commit()
    with Session(engine) as db:
        rows = db.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == s.id)).all()
        moved = db.exec(select(AuditLog).where(AuditLog.reason == "infusion 1 given a day late", AuditLog.field == "due_at")).all()
        reminded = {r.key: r.remind_at for r in rows}
    assert len(rows) == len(late.events)
    assert {r.key: r.due_at for r in rows}["nk_infusion-1"] == late.event("nk_infusion-1").at_utc
    assert len(moved) == len(late.events)  # every event moved a day, each change audited
    assert reminded["il2_dose-01"] is None  # daily rounds cover IL-2
    assert reminded["nk_infusion-2"] == late.event("nk_infusion-2").at_utc - dt.timedelta(days=1)
    assert reminded["visit_1_month"] == dt.datetime(2027, 2, 26, 1, 0, tzinfo=dt.timezone.utc)  # window opens day 25, 09:00 local


def test_the_database_refuses_a_level_no_signed_approval_opened(engine, protocol):
    """The gate holds even for writes that bypass the application, on both engines."""
    from models.tables import EscalationDecision, Signature

    with uow(engine) as u:
        register_protocol(u.session, protocol=protocol, at=u.at)
        s1 = create_subject(u.session, subject_id="S-030", at=u.at)
        u.commit()
    insert = sa.insert(Enrollment.__table__).values(subject_pk=s1.id, dose_level=2, cohort=1, slot=1, enrolled_at=T0)
    with pytest.raises(sa.exc.DatabaseError, match="dose level gate"):
        with engine.begin() as conn:
            conn.execute(insert)
    with uow(engine, "PI signed escalation to DL2") as u:
        d = EscalationDecision(from_level=1, history="1NNN", recommended_action="escalate", recommended_level=2,
                               chosen_action="escalate", chosen_level=2, created_at=u.at, status="signed")
        u.session.add(d)
        u.session.flush()
        u.session.add(Signature(decision_id=d.id, signer_id="pi-01", printed_name="PI", meaning="approval", decision_digest="x", signed_at=u.at))
        u.commit()
    with engine.begin() as conn:
        conn.execute(insert)  # now it is open
