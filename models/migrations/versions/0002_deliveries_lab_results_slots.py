"""notification deliveries, lab results, slots, evaluability and reminder tracking

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:28:20.486686
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('notification_delivery',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('outbox_id', sa.Integer(), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('delivered_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['outbox_id'], ['notification_outbox.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('outbox_id', 'channel', name='uq_delivery_outbox_channel')
    )
    with op.batch_alter_table('notification_delivery', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_notification_delivery_outbox_id'), ['outbox_id'], unique=False)

    op.create_table('lab_result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('donor_nk_count', 'mrd_mfc', 'response', name='labkind', native_enum=False, length=32), nullable=False),
    sa.Column('event_key', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('sampled_on', sa.Date(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('unit', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('recorded_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subject_pk'], ['subject.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject_pk', 'kind', 'event_key', name='uq_lab_result_subject_kind_event')
    )
    with op.batch_alter_table('lab_result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lab_result_subject_pk'), ['subject_pk'], unique=False)

    with op.batch_alter_table('dose_level_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('slots_open', sa.Integer(), server_default='0', nullable=False))

    with op.batch_alter_table('calendar_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('remind_at', models.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('reminder_sent_at', models.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deviation_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))

    with op.batch_alter_table('enrollment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('evaluable', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('dlt_window_closed_at', models.types.UTCDateTime(timezone=True), nullable=True))

    with op.batch_alter_table('notification_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True))

    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.add_column(sa.Column('off_study_on', sa.Date(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('subject', schema=None) as batch_op:
        batch_op.drop_column('off_study_on')

    with op.batch_alter_table('notification_outbox', schema=None) as batch_op:
        batch_op.drop_column('last_error')

    with op.batch_alter_table('calendar_event', schema=None) as batch_op:
        batch_op.drop_column('deviation_reason')
        batch_op.drop_column('reminder_sent_at')
        batch_op.drop_column('remind_at')

    with op.batch_alter_table('enrollment', schema=None) as batch_op:
        batch_op.drop_column('dlt_window_closed_at')
        batch_op.drop_column('evaluable')

    with op.batch_alter_table('dose_level_state', schema=None) as batch_op:
        batch_op.drop_column('slots_open')

    with op.batch_alter_table('lab_result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lab_result_subject_pk'))

    op.drop_table('lab_result')
    with op.batch_alter_table('notification_delivery', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_notification_delivery_outbox_id'))

    op.drop_table('notification_delivery')
