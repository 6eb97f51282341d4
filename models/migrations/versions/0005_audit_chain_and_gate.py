"""audit hash chain, audit checkpoint, and the dose-level gate on every statement (INSERT and UPDATE)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:00:00

The gate now holds on UPDATE as well as INSERT: a subject, enrollment, calendar row or NK infusion
cannot move to a dose level no signed approval opened; clinical rows cannot move to another
subject; a dose level becomes `open` only when the latest signed decision opens it (or it is
level 1 before any decision), `full` only from `open`, and gains slots only while open. An
approval counts only if its signature has its audit rows: a signature written out of band opens
nothing. Existing audit rows are chained here (the append-only trigger is lifted for that one
UPDATE, as the owner, inside this migration's transaction).
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types
from models.audit_chain import GENESIS, row_hash


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

OPENING = "('escalate', 'expand', 'deescalate')"
AUDITED_SIGNATURE = (  # the signature row has the audit row the unit of work wrote with it
    "EXISTS (SELECT 1 FROM audit_log a WHERE a.entity = 'signature' AND a.entity_id = CAST(s.id AS VARCHAR(64)) "
    "AND a.field = 'decision_id' AND a.new_value = CAST(s.decision_id AS VARCHAR(64)))"
)
APPROVED = (  # a signed, audited approval whose chosen level is {level}
    "SELECT 1 FROM signature s JOIN escalation_decision d ON d.id = s.decision_id "
    f"WHERE d.chosen_level = {{level}} AND d.chosen_action IN {OPENING} AND {AUDITED_SIGNATURE}"
)
LATEST_OPENS = (  # the latest audited signature approves a decision that opens {level}
    "SELECT 1 FROM escalation_decision d WHERE d.chosen_level = {level} "
    f"AND d.chosen_action IN {OPENING} AND d.id = (SELECT s.decision_id FROM signature s "
    f"WHERE s.decision_id IS NOT NULL AND {AUDITED_SIGNATURE} ORDER BY s.id DESC LIMIT 1)"
)
NO_SIGNATURE_YET = "NOT EXISTS (SELECT 1 FROM signature WHERE decision_id IS NOT NULL)"
GATE = "dose level gate: no signed escalation approval opens this dose level"
SUBJECT_FIXED = ("calendar_event", "enrollment", "administration", "adverse_event", "lab_result", "screening_result")
GATED = ("enrollment", "administration", "calendar_event", "subject", "dose_level_state")


def _sqlite_triggers() -> dict[str, str]:
    """name -> CREATE TRIGGER; each body is a list of `SELECT RAISE(...) WHERE <refused>`."""
    def trig(name, when, table, checks):
        body = " ".join(f"SELECT RAISE(ABORT, '{msg}') WHERE {cond};" for cond, msg in checks)
        return name, f"CREATE TRIGGER {name} BEFORE {when} ON {table} BEGIN {body} END"

    def unapproved(level):
        return f"{level} > 1 AND NOT EXISTS ({APPROVED.format(level=level)})"

    subject_level = "(SELECT dose_level FROM subject WHERE id = NEW.subject_pk)"
    out = dict([
        trig("enrollment_gate_insert", "INSERT", "enrollment", [(unapproved("NEW.dose_level"), GATE)]),
        trig("enrollment_gate_update", "UPDATE", "enrollment",
             [(f"NEW.dose_level IS NOT OLD.dose_level AND {unapproved('NEW.dose_level')}", GATE)]),
        trig("administration_gate_insert", "INSERT", "administration",
             [(f"NEW.kind = 'nk_infusion' AND {unapproved('NEW.dose_level')}", GATE)]),
        trig("administration_gate_update", "UPDATE", "administration",
             [(f"(NEW.dose_level IS NOT OLD.dose_level OR NEW.kind IS NOT OLD.kind) AND NEW.kind = 'nk_infusion' "
               f"AND {unapproved('NEW.dose_level')}", GATE)]),
        trig("calendar_event_gate_insert", "INSERT", "calendar_event", [(unapproved(subject_level), GATE)]),
        trig("subject_gate_insert", "INSERT", "subject", [(unapproved("NEW.dose_level"), GATE)]),
        trig("subject_gate_update", "UPDATE", "subject",
             [(f"NEW.dose_level IS NOT OLD.dose_level AND {unapproved('NEW.dose_level')}", GATE)]),
        trig("dose_level_state_gate_insert", "INSERT", "dose_level_state",
             [(f"NEW.status = 'open' AND {unapproved('NEW.level')}", GATE)]),
        trig("dose_level_state_gate_update", "UPDATE", "dose_level_state", [
            ("NEW.level IS NOT OLD.level", "dose level gate: a dose level cannot be renumbered"),
            (f"NEW.status = 'open' AND OLD.status NOT IN ('open', 'full') AND NOT EXISTS ({LATEST_OPENS.format(level='NEW.level')}) "
             f"AND NOT (NEW.level = 1 AND {NO_SIGNATURE_YET})",
             "dose level gate: a dose level opens only by the latest signed escalation approval"),
            ("NEW.status = 'full' AND OLD.status NOT IN ('open', 'full')", "dose level gate: only an open dose level can become full"),
            ("NEW.slots_open > OLD.slots_open AND NEW.status <> 'open'", "dose level gate: slots open only at an open dose level"),
            (f"NEW.slots_open > OLD.slots_open + 1 AND NOT EXISTS ({LATEST_OPENS.format(level='NEW.level')})",
             "dose level gate: more than one replacement slot opens only by a signed escalation approval"),
        ]),
    ])
    for table in SUBJECT_FIXED:
        out.update([trig(f"{table}_subject_fixed", "UPDATE", table,
                         [("NEW.subject_pk IS NOT OLD.subject_pk", f"{table}: a row cannot move to another subject")])])
    return out


PG_FUNCTION = f"""
CREATE FUNCTION trial_gate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE lvl integer; moved boolean := TG_OP = 'INSERT';
BEGIN
  IF TG_OP = 'UPDATE' AND TG_TABLE_NAME IN {tuple(SUBJECT_FIXED)!r} THEN
    IF NEW.subject_pk IS DISTINCT FROM OLD.subject_pk THEN
      RAISE EXCEPTION '%: a row cannot move to another subject', TG_TABLE_NAME;
    END IF;
  END IF;
  IF TG_TABLE_NAME = 'dose_level_state' THEN
    IF TG_OP = 'INSERT' THEN
      IF NEW.status = 'open' AND NEW.level > 1 AND NOT EXISTS ({APPROVED.format(level='NEW.level')}) THEN
        RAISE EXCEPTION '{GATE}';
      END IF;
      RETURN NEW;
    END IF;
    IF NEW.level IS DISTINCT FROM OLD.level THEN RAISE EXCEPTION 'dose level gate: a dose level cannot be renumbered'; END IF;
    IF NEW.status = 'open' AND OLD.status NOT IN ('open', 'full') AND NOT EXISTS ({LATEST_OPENS.format(level='NEW.level')})
       AND NOT (NEW.level = 1 AND {NO_SIGNATURE_YET}) THEN
      RAISE EXCEPTION 'dose level gate: a dose level opens only by the latest signed escalation approval';
    END IF;
    IF NEW.status = 'full' AND OLD.status NOT IN ('open', 'full') THEN
      RAISE EXCEPTION 'dose level gate: only an open dose level can become full';
    END IF;
    IF NEW.slots_open > OLD.slots_open AND NEW.status <> 'open' THEN
      RAISE EXCEPTION 'dose level gate: slots open only at an open dose level';
    END IF;
    IF NEW.slots_open > OLD.slots_open + 1 AND NOT EXISTS ({LATEST_OPENS.format(level='NEW.level')}) THEN
      RAISE EXCEPTION 'dose level gate: more than one replacement slot opens only by a signed escalation approval';
    END IF;
    RETURN NEW;
  END IF;
  IF TG_TABLE_NAME = 'calendar_event' THEN
    IF TG_OP = 'UPDATE' THEN RETURN NEW; END IF;  -- its level is its subject's, and the subject is fixed
    SELECT dose_level INTO lvl FROM subject WHERE id = NEW.subject_pk;
  ELSIF TG_TABLE_NAME = 'administration' THEN
    IF NEW.kind <> 'nk_infusion' THEN RETURN NEW; END IF;
    lvl := NEW.dose_level;
    IF TG_OP = 'UPDATE' THEN moved := NEW.dose_level IS DISTINCT FROM OLD.dose_level OR NEW.kind IS DISTINCT FROM OLD.kind; END IF;
  ELSIF TG_TABLE_NAME IN ('enrollment', 'subject') THEN
    lvl := NEW.dose_level;
    IF TG_OP = 'UPDATE' THEN moved := NEW.dose_level IS DISTINCT FROM OLD.dose_level; END IF;
  ELSE
    RETURN NEW;
  END IF;
  IF (moved OR TG_TABLE_NAME = 'calendar_event') AND lvl > 1 AND NOT EXISTS ({APPROVED.format(level='lvl')}) THEN
    RAISE EXCEPTION 'dose level gate: no signed escalation approval opens dose level %', lvl;
  END IF;
  RETURN NEW;
END $$
"""
PG_TABLES = tuple(dict.fromkeys(GATED + SUBJECT_FIXED))


def _chain_existing_rows() -> None:
    bind = op.get_bind()
    audit = sa.table("audit_log", sa.column("id", sa.Integer), sa.column("at", models.types.UTCDateTime()),
                     *(sa.column(c, sa.String) for c in ("actor", "entity", "entity_id", "field", "old_value", "new_value",
                                                         "reason", "prev_hash", "row_hash")))
    rows = bind.execute(sa.select(audit).order_by(audit.c.id)).mappings().all()
    if not rows:
        return
    sqlite = bind.dialect.name == "sqlite"
    if sqlite:
        op.execute("DROP TRIGGER audit_log_no_update")
    else:
        op.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    prev = GENESIS
    for r in rows:
        h = row_hash(dict(r), prev)
        bind.execute(sa.update(audit).where(audit.c.id == r["id"]).values(prev_hash=prev, row_hash=h))
        prev = h
    if sqlite:
        op.execute("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
                   "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")
    else:
        op.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


def upgrade() -> None:
    op.add_column('audit_log', sa.Column('prev_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column('audit_log', sa.Column('row_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_index('ix_audit_log_entity', 'audit_log', ['entity', 'entity_id'], unique=False)
    op.create_table('audit_checkpoint',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('verified_to_id', sa.Integer(), nullable=False),
    sa.Column('verified_to_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('intact', sa.Boolean(), nullable=False),
    sa.Column('problem', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.Column('checked_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    _chain_existing_rows()
    if op.get_bind().dialect.name == "sqlite":
        for table in ("enrollment", "administration", "calendar_event"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_dose_level_gate")
        for sql in _sqlite_triggers().values():
            op.execute(sql)
        return
    for table in ("enrollment", "administration", "calendar_event"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_dose_level_gate ON {table}")
    op.execute("DROP FUNCTION IF EXISTS dose_level_gate()")
    op.execute(PG_FUNCTION)
    for table in PG_TABLES:
        op.execute(f"CREATE TRIGGER {table}_gate BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION trial_gate()")


OLD_APPROVED = (
    "SELECT 1 FROM signature s JOIN escalation_decision d ON d.id = s.decision_id "
    "WHERE d.chosen_level = {level} AND d.chosen_action IN ('escalate', 'expand', 'deescalate')"
)
OLD_GUARDED = {
    "enrollment": ("1 = 1", "NEW.dose_level"),
    "administration": ("NEW.kind = 'nk_infusion'", "NEW.dose_level"),
    "calendar_event": ("1 = 1", "(SELECT dose_level FROM subject WHERE id = NEW.subject_pk)"),
}


def _restore_0003_gate() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table, (condition, level) in OLD_GUARDED.items():
            op.execute(
                f"CREATE TRIGGER {table}_dose_level_gate BEFORE INSERT ON {table} "
                f"WHEN {condition} AND {level} > 1 AND NOT EXISTS ({OLD_APPROVED.format(level=level)}) "
                "BEGIN SELECT RAISE(ABORT, 'dose level gate: no signed escalation approval opens this dose level'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION dose_level_gate() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "DECLARE lvl integer; BEGIN "
        "IF TG_TABLE_NAME = 'calendar_event' THEN SELECT dose_level INTO lvl FROM subject WHERE id = NEW.subject_pk; "
        "ELSIF TG_TABLE_NAME = 'administration' THEN "
        "IF NEW.kind <> 'nk_infusion' THEN RETURN NEW; END IF; lvl := NEW.dose_level; "
        "ELSE lvl := NEW.dose_level; END IF; "
        f"IF lvl > 1 AND NOT EXISTS ({OLD_APPROVED.format(level='lvl')}) THEN "
        "RAISE EXCEPTION 'dose level gate: no signed escalation approval opens dose level %', lvl; END IF; "
        "RETURN NEW; END $$"
    )
    for table in OLD_GUARDED:
        op.execute(f"CREATE TRIGGER {table}_dose_level_gate BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION dose_level_gate()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in _sqlite_triggers():
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        for table in PG_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_gate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS trial_gate()")
    _restore_0003_gate()
    op.drop_table('audit_checkpoint')
    op.drop_index('ix_audit_log_entity', table_name='audit_log')
    # Plain ALTER TABLE (SQLite >= 3.35 drops a column in place): a batch copy would lose audit_log's triggers.
    op.execute("ALTER TABLE audit_log DROP COLUMN row_hash")
    op.execute("ALTER TABLE audit_log DROP COLUMN prev_hash")
