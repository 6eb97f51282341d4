"""Tampering with the trial record: each attack is refused by the database or reported by `nktrial audit verify`,
on SQLite and on PostgreSQL (where the tests write as the application role, as in production)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from models.crud import create_subject, register_protocol
from models.db import UnitOfWork, make_engine
from models.tables import (
    Administration,
    AdministrationKind,
    AuditCheckpoint,
    CalendarEventRow,
    DoseLevelState,
    Enrollment,
    EscalationDecision,
    LevelStatus,
    NotificationOutbox,
    Signature,
)
from protocol.calendar import EventKind
from tasks.audit import rounds_check, verify

T0 = dt.datetime(2027, 1, 10, 1, 0, tzinfo=dt.timezone.utc)
ROOT = Path(__file__).parents[2]
GATE = "dose level gate|permission denied"


def uow(engine, reason="test"):
    return UnitOfWork(engine, actor="coordinator:c1", reason=reason, clock=lambda: T0)


@pytest.fixture
def trial(engine, protocol):
    """DL1 full with one enrolled subject (calendar row, NK infusion); a second subject; DL2 and DL3 pending."""
    with uow(engine, "set up") as u:
        register_protocol(u.session, protocol=protocol, at=u.at)
        a = create_subject(u.session, subject_id="S-001", at=u.at)
        b = create_subject(u.session, subject_id="S-002", at=u.at)
        a.dose_level = 1
        u.session.add(Enrollment(subject_pk=a.id, dose_level=1, cohort=1, slot=1, enrolled_at=u.at))
        u.session.add(CalendarEventRow(subject_pk=a.id, key="nk_infusion-1", kind=EventKind.NK_INFUSION, label="NK infusion 1", protocol_day=0,
                                       local_on=dt.date(2027, 1, 31), due_at=T0, window_start_on=dt.date(2027, 1, 31),
                                       window_end_on=dt.date(2027, 1, 31), anchor_version="1"))
        u.session.add(Administration(subject_pk=a.id, kind=AdministrationKind.NK_INFUSION, event_key="nk_infusion-1", given=True,
                                     given_at=T0, dose_level=1, cells_infused=1e7, product_lot="L1", recorded_at=T0))
        u.session.get(DoseLevelState, 1).status = LevelStatus.FULL  # the application marks a level full when its last slot goes
        u.commit()
    return {"a": a.id, "b": b.id}


def raw(engine, sql: str, **params):
    with engine.begin() as conn:
        return conn.execute(sa.text(sql), params)


def cli_verify(url: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NKTRIAL_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "nktrial.cli", "audit", "verify", *extra], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def owner_engine(owner_url):
    return make_engine(owner_url)


# -- an untouched database ---------------------------------------------------------------------

def test_an_untouched_database_verifies_clean(engine, db_url, trial):
    report = verify(db_url)
    assert report.intact, report.summary
    out = cli_verify(db_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"audit trail intact: {report.rows} rows, chain head {report.head_id} ")
    assert json.loads(cli_verify(db_url, "--json").stdout)["intact"] is True


def test_verify_reads_with_a_connection_that_cannot_write(db_url, trial):
    report = verify(db_url)
    assert "read-only" in report.read_as
    if db_url.startswith("postgresql"):
        assert "nktrial_reader" in report.read_as


# -- the gate on every statement ---------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "UPDATE enrollment SET dose_level = 2",
    "UPDATE subject SET dose_level = 2 WHERE subject_id = 'S-001'",
    "UPDATE administration SET dose_level = 2 WHERE kind = 'nk_infusion'",
    "UPDATE dose_level_state SET status = 'open', slots_open = 3 WHERE level = 2",
    "UPDATE dose_level_state SET status = 'full' WHERE level = 3",
    "UPDATE dose_level_state SET slots_open = 9 WHERE level = 2",
    "UPDATE dose_level_state SET status = 'open', slots_open = slots_open + 3 WHERE level = 1",  # an unsigned expansion of a full level
])
def test_moving_a_row_to_a_level_no_signed_approval_opened_is_refused(engine, trial, sql):
    with pytest.raises(sa.exc.DatabaseError, match=GATE):
        raw(engine, sql)


def test_a_calendar_row_cannot_move_to_another_subject(engine, trial):
    with pytest.raises(sa.exc.DatabaseError, match="cannot move to another subject"):
        raw(engine, "UPDATE calendar_event SET subject_pk = :b", b=trial["b"])


def test_a_forged_decision_and_signature_open_nothing_and_verify_names_them(engine, db_url, trial):
    raw(engine, "INSERT INTO escalation_decision (from_level, history, recommended_action, recommended_level, chosen_action, "
                "chosen_level, created_at, status, early_stop) VALUES (2, '2NNN', 'escalate', 3, 'escalate', 3, :at, 'signed', false)", at=T0)
    d = raw(engine, "SELECT max(id) FROM escalation_decision").scalar()
    raw(engine, "INSERT INTO signature (decision_id, signer_id, printed_name, meaning, decision_digest, signed_at) "
                "VALUES (:d, 'pi-01', 'PI', 'approval', 'x', :at)", d=d, at=T0)
    with pytest.raises(sa.exc.DatabaseError, match=GATE):
        raw(engine, "UPDATE dose_level_state SET status = 'open', slots_open = 3 WHERE level = 3")
    with pytest.raises(sa.exc.DatabaseError, match=GATE):
        raw(engine, "INSERT INTO enrollment (subject_pk, dose_level, cohort, slot, enrolled_at) VALUES (:b, 3, 1, 1, :at)", b=trial["b"], at=T0)
    out = cli_verify(db_url)
    assert out.returncode == 1
    assert f"escalation_decision {d} has no audit trail" in out.stdout
    assert "signature" in out.stdout and "has no audit trail" in out.stdout


def test_the_application_s_own_level_changes_still_work(engine, db_url, trial):
    """Full → open for a replacement slot; a signed, audited approval opens DL2; its rows are accepted there."""
    with uow(engine, "replacement slot") as u:
        lv = u.session.get(DoseLevelState, 1)
        lv.status, lv.slots_open = LevelStatus.OPEN, lv.slots_open + 1
        u.commit()
    with uow(engine, "PI signed escalation to DL2") as u:
        d = EscalationDecision(from_level=1, history="1NNN", recommended_action="escalate", recommended_level=2,
                               chosen_action="escalate", chosen_level=2, created_at=u.at, status="signed")
        u.session.add(d)
        u.session.flush()
        u.session.add(Signature(decision_id=d.id, signer_id="pi-01", printed_name="PI", meaning="approval", decision_digest="x", signed_at=u.at))
        u.session.flush()
        u.session.get(DoseLevelState, 1).status = LevelStatus.CLOSED
        u.session.flush()
        two = u.session.get(DoseLevelState, 2)
        two.status, two.slots_open = LevelStatus.OPEN, 3
        u.commit()
    with uow(engine, "enroll at DL2") as u:
        u.session.add(Enrollment(subject_pk=trial["b"], dose_level=2, cohort=1, slot=1, enrolled_at=u.at))
        u.commit()
    with pytest.raises(sa.exc.DatabaseError, match=GATE):  # DL1, closed by that decision, does not reopen by hand
        raw(engine, "UPDATE dose_level_state SET status = 'open' WHERE level = 1")
    assert verify(db_url).intact  # decisions and signatures written by the application are linked to their audit rows


def test_a_staff_member_given_the_pi_role_behind_the_system_s_back_is_reported(engine, db_url, trial, protocol):
    from tasks.staff import add_staff

    add_staff(engine, protocol, staff_id="pi-01", printed_name="PI", roles="pi", actor=None, clock=lambda: T0, allow_bootstrap=True)
    add_staff(engine, protocol, staff_id="coord-1", printed_name="Coordinator", roles="coordinator", actor="pi-01", clock=lambda: T0)
    assert verify(db_url).intact
    raw(engine, "UPDATE staff SET roles = 'coordinator,pi' WHERE staff_id = 'coord-1'")
    out = cli_verify(db_url)
    assert out.returncode == 1 and "staff" in out.stdout and "roles" in out.stdout


# -- the hash chain -----------------------------------------------------------------------------

def test_an_audit_row_inserted_out_of_band_is_reported(engine, db_url, trial):
    raw(engine, "INSERT INTO audit_log (id, at, actor, entity, entity_id, field, old_value, new_value, reason) "
                "VALUES ((SELECT max(id) + 1 FROM audit_log), :at, 'x', 'subject', '1', 'dose_level', '1', '2', 'forged')", at=T0)
    n = raw(engine, "SELECT max(id) FROM audit_log").scalar()
    out = cli_verify(db_url)
    assert out.returncode == 1
    assert f"audit row {n} was inserted out of band" in out.stdout.splitlines()[0]


def test_deleting_or_changing_audit_rows_after_lifting_the_guard_is_reported(engine, owner_url, db_url, trial):
    """SQLite cannot refuse DROP TRIGGER; PostgreSQL's owner can disable one. Both leave traces verify reports."""
    owner = owner_engine(owner_url)
    pg = owner.dialect.name == "postgresql"
    with owner.begin() as conn:
        if pg:
            conn.exec_driver_sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_log_no_delete")
            conn.exec_driver_sql("DROP TRIGGER audit_log_no_update")
        conn.exec_driver_sql("DELETE FROM audit_log WHERE id = 5")
        conn.exec_driver_sql("UPDATE audit_log SET new_value = 'tampered' WHERE id = 9")
    owner.dispose()
    report = verify(db_url)
    assert report.problems[0].message == "audit row 5 was deleted: the chain breaks before row 6."
    guards = [p.message for p in report.problems if p.kind == "guard"]
    assert guards == (["database trigger audit_log_append_only is disabled."] if pg else
                      ["database trigger audit_log_no_update is missing: it was dropped, and what it refuses could have been written since.",
                       "database trigger audit_log_no_delete is missing: it was dropped, and what it refuses could have been written since."])
    out = cli_verify(db_url)
    assert out.returncode == 1 and out.stdout.splitlines()[0] == "audit row 5 was deleted: the chain breaks before row 6."


def test_a_changed_audit_row_is_named(engine, owner_url, db_url, trial):
    owner = owner_engine(owner_url)
    with owner.begin() as conn:
        if owner.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            conn.exec_driver_sql("UPDATE audit_log SET actor = 'someone else' WHERE id = 7")
            conn.exec_driver_sql("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_log_no_update")
            conn.exec_driver_sql("UPDATE audit_log SET actor = 'someone else' WHERE id = 7")
            conn.exec_driver_sql("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
                                 "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")
    owner.dispose()
    report = verify(db_url)
    assert [p.message for p in report.problems] == ["audit row 7 was changed: its content no longer matches its hash."]


def test_a_dropped_gate_trigger_is_reported_and_what_it_let_through_too(engine, owner_url, db_url, trial):
    owner = owner_engine(owner_url)
    with owner.begin() as conn:
        if owner.dialect.name == "postgresql":
            conn.exec_driver_sql("DROP TRIGGER subject_gate ON subject")
        else:
            conn.exec_driver_sql("DROP TRIGGER subject_gate_update")
        conn.exec_driver_sql("UPDATE subject SET dose_level = 2 WHERE subject_id = 'S-001'")
    owner.dispose()
    messages = [p.message for p in verify(db_url).problems]
    assert any(m.startswith("database trigger subject_gate") and "missing" in m for m in messages)
    assert f"subject {trial['a']}: dose_level differs from its audit trail: it was changed out of band." in messages


@pytest.mark.postgres
def test_the_app_role_cannot_alter_drop_truncate_or_delete_the_audit_trail(engine, db_url, trial):
    if not db_url.startswith("postgresql"):
        pytest.skip("roles are PostgreSQL's")
    for sql in ("ALTER TABLE audit_log DISABLE TRIGGER ALL", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
                "DROP TRIGGER audit_log_append_only ON audit_log", "TRUNCATE audit_log", "DELETE FROM audit_log",
                "UPDATE audit_log SET actor = 'x'", "DROP TABLE audit_log", "ALTER TABLE subject DISABLE TRIGGER subject_gate",
                "CREATE TABLE sneaky (id int)"):
        with pytest.raises(sa.exc.DatabaseError, match="must be owner|permission denied|append-only"):
            raw(engine, sql)
    assert verify(db_url).intact


# -- daily rounds -------------------------------------------------------------------------------

def test_rounds_checkpoint_an_intact_trail_and_alert_the_safety_desk_and_the_pi_on_a_break(engine, owner_url, trial):
    first = rounds_check(engine, clock=lambda: T0)
    assert first.intact
    with uow(engine, "more work") as u:
        create_subject(u.session, subject_id="S-003", at=u.at)
        u.commit()
    second = rounds_check(engine, clock=lambda: T0)
    assert second.intact and second.rows < first.rows, second.summary  # only what was added since the checkpoint
    owner = owner_engine(owner_url)
    with owner.begin() as conn:  # delete the newest rows, the last checkpointed one among them
        if owner.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_log_no_delete")
        conn.exec_driver_sql(f"DELETE FROM audit_log WHERE id >= {second.verified_to_id - 1}")
        if owner.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
    owner.dispose()
    broken = rounds_check(engine, clock=lambda: T0)
    assert not broken.intact
    assert broken.problems[0].message.startswith(f"audit row {second.verified_to_id}, verified on ")
    from sqlmodel import Session

    with Session(engine) as s:
        alerts = s.exec(select(NotificationOutbox).where(NotificationOutbox.event == "audit_break")).all()
        checkpoints = s.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).all()
    assert sorted(a.role for a in alerts) == ["pi", "safety"]
    assert all(a.subject_id is None and "S-00" not in a.body for a in alerts)
    assert [c.intact for c in checkpoints] == [True, True, False]
    rounds_check(engine, clock=lambda: T0)  # still broken tomorrow: no second alert for the same break
    with engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT dedup_key FROM notification_outbox WHERE event = 'audit_break'")).scalars().all()
    assert len(keys) == 2, keys
