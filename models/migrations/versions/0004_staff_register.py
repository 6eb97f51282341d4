"""staff register and access refusals

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 13:20:00
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('staff',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('staff_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('printed_name', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('roles', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('channel_tag', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('active_from_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('active_to_at', models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('staff', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_staff_staff_id'), ['staff_id'], unique=True)

    op.create_table('access_refusal',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('act', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('access_refusal')
    with op.batch_alter_table('staff', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_staff_staff_id'))
    op.drop_table('staff')
