"""escalation gate: AE facts for the DLT screen, signing codes, signatures, and the dose-level gate in the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 01:14:10.076825
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('signature_attempt',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=False),
    sa.Column('attempt_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('signer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('accepted', sa.Boolean(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['decision_id'], ['escalation_decision.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('decision_id', 'attempt_key', name='uq_signature_attempt_key')
    )
    with op.batch_alter_table('signature_attempt', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signature_attempt_decision_id'), ['decision_id'], unique=False)

    op.create_table('signing_code',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=False),
    sa.Column('code_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('issued_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('used_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['decision_id'], ['escalation_decision.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('signing_code', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signing_code_decision_id'), ['decision_id'], unique=False)

    with op.batch_alter_table('adverse_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dlt_screen', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=True))
        batch_op.add_column(sa.Column('dlt_rule', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch_op.add_column(sa.Column('resolved_to_grade_1_within_72h', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('duration_days', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('caused_by_leukaemia', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('caused_by_progression', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('sae_reported_at', models.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('adjudicated_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('adjudicated_at', models.types.UTCDateTime(timezone=True), nullable=True))

    with op.batch_alter_table('protocol_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instance_id', sqlmodel.sql.sqltypes.AutoString(length=32), server_default='', nullable=False))

    with op.batch_alter_table('escalation_decision', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), server_default='waiting', nullable=False))
        batch_op.add_column(sa.Column('early_stop', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('basis_at', models.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('review_flow_run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True))

    op.create_index("uq_one_open_level", "dose_level_state", ["status"], unique=True,
                    sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))
    _dose_level_gate()


APPROVED = (
    "SELECT 1 FROM signature s JOIN escalation_decision d ON d.id = s.decision_id "
    "WHERE d.chosen_level = {level} AND d.chosen_action IN ('escalate', 'expand', 'deescalate')"
)
GUARDED = {  # table -> (condition that the row belongs to a level, the level)
    "enrollment": ("1 = 1", "NEW.dose_level"),
    "administration": ("NEW.kind = 'nk_infusion'", "NEW.dose_level"),
    "calendar_event": ("1 = 1", "(SELECT dose_level FROM subject WHERE id = NEW.subject_pk)"),
}


def _dose_level_gate() -> None:
    """No enrollment, calendar or NK infusion at a level above 1 without a signed approval opening it."""
    if op.get_bind().dialect.name == "sqlite":
        for table, (condition, level) in GUARDED.items():
            op.execute(
                f"CREATE TRIGGER {table}_dose_level_gate BEFORE INSERT ON {table} "
                f"WHEN {condition} AND {level} > 1 AND NOT EXISTS ({APPROVED.format(level=level)}) "
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
        f"IF lvl > 1 AND NOT EXISTS ({APPROVED.format(level='lvl')}) THEN "
        "RAISE EXCEPTION 'dose level gate: no signed escalation approval opens dose level %', lvl; END IF; "
        "RETURN NEW; END $$"
    )
    for table in GUARDED:
        op.execute(f"CREATE TRIGGER {table}_dose_level_gate BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION dose_level_gate()")


def downgrade() -> None:
    for table in GUARDED:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_dose_level_gate" + ("" if op.get_bind().dialect.name == "sqlite" else f" ON {table}"))
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP FUNCTION IF EXISTS dose_level_gate()")
    op.drop_index("uq_one_open_level", table_name="dose_level_state")
    with op.batch_alter_table('protocol_version', schema=None) as batch_op:
        batch_op.drop_column('instance_id')

    with op.batch_alter_table('escalation_decision', schema=None) as batch_op:
        batch_op.drop_column('review_flow_run_id')
        batch_op.drop_column('basis_at')
        batch_op.drop_column('early_stop')
        batch_op.drop_column('status')

    with op.batch_alter_table('adverse_event', schema=None) as batch_op:
        batch_op.drop_column('adjudicated_at')
        batch_op.drop_column('adjudicated_by')
        batch_op.drop_column('sae_reported_at')
        batch_op.drop_column('caused_by_progression')
        batch_op.drop_column('caused_by_leukaemia')
        batch_op.drop_column('duration_days')
        batch_op.drop_column('resolved_to_grade_1_within_72h')
        batch_op.drop_column('dlt_rule')
        batch_op.drop_column('dlt_screen')

    with op.batch_alter_table('signing_code', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signing_code_decision_id'))

    op.drop_table('signing_code')
    with op.batch_alter_table('signature_attempt', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signature_attempt_decision_id'))

    op.drop_table('signature_attempt')
