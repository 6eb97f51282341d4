"""outbox claims: a delivery pass claims the notices it sends; notices marked no_channel wait again

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 20:30:00

`claimed_by` / `claim_expires_at` hold a delivery pass's lease on a notice (tasks/delivery.py).
Notices an earlier version marked `no_channel` (no channel configured, or a config apprise could
not read) were never delivered: they are set back to `pending` here, so the next delivery pass
with a working config sends them (their body carries their due date, and `nktrial notify list`
shows how long they waited). Each change leaves an audit row, chained like the unit of work's.
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel

import models.types
from models.audit_chain import GENESIS, row_hash


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

ACTOR = "system:migration-0007"
REASON = "no_channel is not delivered: the notice waits in the outbox for a channel (migration 0007)"


def upgrade() -> None:
    with op.batch_alter_table('notification_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('claim_expires_at', models.types.UTCDateTime(timezone=True), nullable=True))
    _requeue_no_channel()


def _requeue_no_channel() -> None:
    import datetime as dt

    bind = op.get_bind()
    outbox = sa.table("notification_outbox", sa.column("id", sa.Integer), sa.column("status", sa.String))
    ids = [r[0] for r in bind.execute(sa.select(outbox.c.id).where(outbox.c.status == "no_channel").order_by(outbox.c.id))]
    if not ids:
        return
    audit = sa.table("audit_log", sa.column("id", sa.Integer), sa.column("at", models.types.UTCDateTime()),
                     *(sa.column(c, sa.String) for c in ("actor", "entity", "entity_id", "field", "old_value", "new_value",
                                                         "reason", "prev_hash", "row_hash")))
    head = bind.execute(sa.select(audit.c.id, audit.c.row_hash).order_by(audit.c.id.desc()).limit(1)).first()
    next_id, prev = (head[0] + 1, head[1] or GENESIS) if head else (1, GENESIS)
    at = dt.datetime.now(dt.UTC)
    rows = []
    for outbox_id in ids:
        row = {"id": next_id, "at": at, "actor": ACTOR, "entity": "notification_outbox", "entity_id": str(outbox_id),
               "field": "status", "old_value": "no_channel", "new_value": "pending", "reason": REASON}
        row["prev_hash"], row["row_hash"] = prev, row_hash(row, prev)
        rows.append(row)
        next_id, prev = next_id + 1, row["row_hash"]
    bind.execute(sa.update(outbox).where(outbox.c.status == "no_channel").values(status="pending"))
    bind.execute(sa.insert(audit), rows)


def downgrade() -> None:
    with op.batch_alter_table('notification_outbox', schema=None) as batch_op:
        batch_op.drop_column('claim_expires_at')
        batch_op.drop_column('claimed_by')
