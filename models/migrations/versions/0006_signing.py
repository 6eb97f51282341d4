"""signing codes bound to one signer and one signed act (a decision or an AE's adjudication), refusal kinds, lockouts

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 15:00:00

Codes issued before this revision were bound to no signer: they are expired here, so every live
code is one that only its signer received.
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE signing_code SET expires_at = issued_at WHERE used_at IS NULL")
    with op.batch_alter_table('signing_code', schema=None) as batch_op:
        batch_op.alter_column('decision_id', existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column('ae_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('signer_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('salt', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_signing_code_ae_id'), ['ae_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_signing_code_signer_id'), ['signer_id'], unique=False)
        batch_op.create_foreign_key('fk_signing_code_ae_id', 'adverse_event', ['ae_id'], ['id'])
        batch_op.create_check_constraint('ck_signing_code_one_act', '(decision_id IS NULL) <> (ae_id IS NULL)')
    with op.batch_alter_table('signing_code', schema=None) as batch_op:
        batch_op.alter_column('signer_id', server_default=None)
        batch_op.alter_column('salt', server_default=None)

    with op.batch_alter_table('signature_attempt', schema=None) as batch_op:
        batch_op.alter_column('decision_id', existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column('ae_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('refusal', sa.Enum('blank_signer', 'not_authorized', 'wrong_name', 'locked_out', 'wrong_code',
                                                         'used_code', 'expired_code', 'other', name='signingrefusal',
                                                         native_enum=False, length=16), nullable=True))
        batch_op.create_index(batch_op.f('ix_signature_attempt_ae_id'), ['ae_id'], unique=False)
        batch_op.create_foreign_key('fk_signature_attempt_ae_id', 'adverse_event', ['ae_id'], ['id'])
        batch_op.create_unique_constraint('uq_signature_attempt_ae_key', ['ae_id', 'attempt_key'])

    op.create_table('signing_lockout',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=True),
    sa.Column('ae_id', sa.Integer(), nullable=True),
    sa.Column('signer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('after_attempt_id', sa.Integer(), nullable=False),
    sa.Column('locked_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('until_at', models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ae_id'], ['adverse_event.id'], ),
    sa.ForeignKeyConstraint(['decision_id'], ['escalation_decision.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('signing_lockout', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signing_lockout_ae_id'), ['ae_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_signing_lockout_decision_id'), ['decision_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('signing_lockout', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signing_lockout_decision_id'))
        batch_op.drop_index(batch_op.f('ix_signing_lockout_ae_id'))
    op.drop_table('signing_lockout')

    op.execute("DELETE FROM signature_attempt WHERE decision_id IS NULL")
    with op.batch_alter_table('signature_attempt', schema=None) as batch_op:
        batch_op.drop_constraint('uq_signature_attempt_ae_key', type_='unique')
        batch_op.drop_constraint('fk_signature_attempt_ae_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_signature_attempt_ae_id'))
        batch_op.drop_column('refusal')
        batch_op.drop_column('ae_id')
        batch_op.alter_column('decision_id', existing_type=sa.Integer(), nullable=False)

    op.execute("DELETE FROM signing_code WHERE decision_id IS NULL")
    with op.batch_alter_table('signing_code', schema=None) as batch_op:
        batch_op.drop_constraint('ck_signing_code_one_act', type_='check')
        batch_op.drop_constraint('fk_signing_code_ae_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_signing_code_signer_id'))
        batch_op.drop_index(batch_op.f('ix_signing_code_ae_id'))
        batch_op.drop_column('salt')
        batch_op.drop_column('signer_id')
        batch_op.drop_column('ae_id')
        batch_op.alter_column('decision_id', existing_type=sa.Integer(), nullable=False)
