"""initial trial schema, with an append-only audit log enforced by the database

Revision ID: 0001
Revises:
Create Date: 2026-11-26 00:18:02.695408
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('entity', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('entity_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('field', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('old_value', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('new_value', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)

    op.create_table('dose_level_state',
    sa.Column('level', sa.Integer(), nullable=False),
    sa.Column('cells_per_infusion', sa.Float(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'open', 'full', 'closed', 'too_toxic', name='levelstatus', native_enum=False, length=32), nullable=False),
    sa.Column('opened_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('closed_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('level')
    )
    op.create_table('escalation_decision',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('from_level', sa.Integer(), nullable=False),
    sa.Column('history', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('recommended_action', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('recommended_level', sa.Integer(), nullable=True),
    sa.Column('chosen_action', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('chosen_level', sa.Integer(), nullable=True),
    sa.Column('mtd', sa.Integer(), nullable=True),
    sa.Column('rationale', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.Column('created_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('decided_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('notification_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dedup_key', sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('subject_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('event', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('title', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('body', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
    sa.Column('link', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True),
    sa.Column('status', sa.Enum('pending', 'delivered', 'no_channel', 'failed', name='outboxstatus', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedup_key')
    )
    op.create_table('protocol_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('content_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('loaded_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version')
    )
    op.create_table('signature',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=False),
    sa.Column('signer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('printed_name', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('meaning', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('decision_digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('signed_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['decision_id'], ['escalation_decision.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('decision_id')
    )
    op.create_table('subject',
    sa.Column('subject_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('screening', 'screen_failed', 'waitlisted', 'enrolled', 'on_treatment', 'follow_up', 'completed', 'off_study', name='subjectstatus', native_enum=False, length=32), nullable=False),
    sa.Column('dose_level', sa.Integer(), nullable=True),
    sa.Column('planned_day0_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('off_study_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('created_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dose_level'], ['dose_level_state.level'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subject_subject_id'), ['subject_id'], unique=True)

    op.create_table('administration',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('nk_infusion', 'il2_dose', name='administrationkind', native_enum=False, length=32), nullable=False),
    sa.Column('event_key', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('given', sa.Boolean(), nullable=False),
    sa.Column('given_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dose_level', sa.Integer(), nullable=True),
    sa.Column('cells_infused', sa.Float(), nullable=True),
    sa.Column('product_lot', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('dose_miu', sa.Float(), nullable=True),
    sa.Column('missed_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('deviation_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('recorded_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject_pk', 'event_key', name='uq_administration_subject_event')
    )
    with op.batch_alter_table('administration', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_administration_subject_pk'), ['subject_pk'], unique=False)

    op.create_table('adverse_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('term', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('grade', sa.Integer(), nullable=False),
    sa.Column('onset_on', sa.Date(), nullable=False),
    sa.Column('attribution', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('serious', sa.Boolean(), nullable=False),
    sa.Column('resolved_on', sa.Date(), nullable=True),
    sa.Column('candidate_dlt', sa.Boolean(), nullable=False),
    sa.Column('adjudication', sa.Enum('not_candidate', 'pending', 'confirmed', 'rejected', name='adjudication', native_enum=False, length=32), nullable=False),
    sa.Column('adjudication_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('reported_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('adverse_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adverse_event_subject_pk'), ['subject_pk'], unique=False)

    op.create_table('calendar_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('kind', sa.Enum('product_request', 'pk_sample', 'nk_infusion', 'dlt_window_open', 'il2_dose', 'visit_1_month', 'visit_3_month', 'dlt_window_close', 'contraception_end', name='eventkind', native_enum=False, length=32), nullable=False),
    sa.Column('label', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('protocol_day', sa.Integer(), nullable=False),
    sa.Column('local_on', sa.Date(), nullable=False),
    sa.Column('due_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('window_start_on', sa.Date(), nullable=False),
    sa.Column('window_end_on', sa.Date(), nullable=False),
    sa.Column('status', sa.Enum('planned', 'done', 'missed', 'cancelled', name='eventstatus', native_enum=False, length=32), nullable=False),
    sa.Column('actual_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('anchor_version', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('flow_run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject_pk', 'key', name='uq_calendar_event_subject_key')
    )
    with op.batch_alter_table('calendar_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_calendar_event_subject_pk'), ['subject_pk'], unique=False)

    op.create_table('enrollment',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('dose_level', sa.Integer(), nullable=False),
    sa.Column('cohort', sa.Integer(), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('enrolled_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dose_level'], ['dose_level_state.level'], ),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dose_level', 'slot', name='uq_enrollment_level_slot'),
    sa.UniqueConstraint('subject_pk')
    )
    op.create_table('screening_result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('protocol_version', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('earliest_day0_on', sa.Date(), nullable=True),
    sa.Column('result_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('screened_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('screening_result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_screening_result_subject_pk'), ['subject_pk'], unique=False)

    op.create_table('waitlist_entry',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('added_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('offered_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject_pk')
    )

    _make_audit_append_only()


def _make_audit_append_only() -> None:
    """The database itself refuses UPDATE and DELETE on audit_log, whatever path they come from."""
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )
    else:
        op.execute(
            "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.drop_table('waitlist_entry')
    with op.batch_alter_table('screening_result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_screening_result_subject_pk'))

    op.drop_table('screening_result')
    op.drop_table('enrollment')
    with op.batch_alter_table('calendar_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_calendar_event_subject_pk'))

    op.drop_table('calendar_event')
    with op.batch_alter_table('adverse_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adverse_event_subject_pk'))

    op.drop_table('adverse_event')
    with op.batch_alter_table('administration', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_administration_subject_pk'))

    op.drop_table('administration')
    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subject_subject_id'))

    op.drop_table('subject')
    op.drop_table('signature')
    op.drop_table('protocol_version')
    op.drop_table('notification_outbox')
    op.drop_table('escalation_decision')
    op.drop_table('dose_level_state')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
