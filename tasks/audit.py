"""The audit trail's integrity: walk the hash chain, check the database's guards are in place, and
check that every decision, signature and signed adjudication (and the dose-level fields the gate
protects) matches its audit trail.

`verify` is what `nktrial audit verify` runs, on a connection that cannot write (a read-only
SQLite file; on PostgreSQL a READ ONLY transaction as the reader role when the app role may take
it). `rounds_check` is what daily rounds run: the rows added since the last checkpoint, the
guards and the links; it writes a checkpoint and, on a break, alerts the safety desk and the PI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

from models.audit_chain import CHAINED_FIELDS, GENESIS, row_hash
from models.clock import Clock
from models.db import UnitOfWork, _plain
from models.tables import (
    Administration,
    AdverseEvent,
    AuditCheckpoint,
    AuditLog,
    CalendarEventRow,
    DoseLevelState,
    Enrollment,
    EscalationDecision,
    Signature,
    SigningCode,
    Staff,
    Subject,
)
from protocol.roles import Role
from tasks.notices import Notice, NoticeEvent, enqueue

READER_ROLE = "nktrial_reader"
MAX_SENTENCES = 20

# The guards the migrations install (0001, 0005); a missing or disabled one is itself a finding.
GATE_TABLES_PG = ("enrollment", "administration", "calendar_event", "subject", "dose_level_state",
                  "adverse_event", "lab_result", "screening_result")
EXPECTED_TRIGGERS = {
    "sqlite": ("audit_log_no_update", "audit_log_no_delete",
               "enrollment_gate_insert", "enrollment_gate_update", "administration_gate_insert", "administration_gate_update",
               "calendar_event_gate_insert", "subject_gate_insert", "subject_gate_update",
               "dose_level_state_gate_insert", "dose_level_state_gate_update",
               *(f"{t}_subject_fixed" for t in ("calendar_event", "enrollment", "administration", "adverse_event", "lab_result",
                                                 "screening_result"))),
    "postgresql": ("audit_log_append_only", "audit_log_no_truncate", *(f"{t}_gate" for t in GATE_TABLES_PG)),
}
# Rows whose values must be what their audit trail says: None = every column.
LINKED: dict[type, tuple[str, ...] | None] = {
    EscalationDecision: None,
    Signature: None,
    AdverseEvent: ("adjudication", "adjudication_reason", "adjudicated_by", "adjudicated_at"),  # signed adjudications only
    DoseLevelState: ("level", "status", "slots_open"),
    Enrollment: ("subject_pk", "dose_level"),
    Subject: ("dose_level",),
    Administration: ("subject_pk", "kind", "dose_level"),
    CalendarEventRow: ("subject_pk",),
    Staff: None,  # who may sign and with which roles: a row changed outside the application would grant authority
    SigningCode: None,  # a code row planted outside the application would let its planter sign
    AuditCheckpoint: None,  # its own audit rows anchor the chain's tail: deleting the newest rows shows here too
}


@dataclass(frozen=True)
class Problem:
    kind: str  # changed | inserted | deleted | guard | unlinked
    message: str  # one sentence
    row_id: int | None = None  # the audit row, for chain problems


@dataclass
class AuditReport:
    rows: int = 0  # audit rows walked
    head_id: int | None = None
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    verified_to_id: int | None = None  # the last row of the intact prefix
    verified_to_hash: str = GENESIS
    read_as: str = ""

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        if self.intact:
            return f"audit trail intact: {self.rows} rows, chain head {self.head_id or 0} {self.head_hash}"
        return "\n".join(p.message for p in self.problems)

    def as_json(self) -> dict:
        return {"intact": self.intact, "rows": self.rows, "head_id": self.head_id, "head_hash": self.head_hash,
                "read_as": self.read_as, "problems": [{"kind": p.kind, "row_id": p.row_id, "message": p.message} for p in self.problems]}


# -- the chain -------------------------------------------------------------------------------------

def walk_chain(rows: Iterable, report: AuditReport, *, after_id: int = 0, prev: str = GENESIS) -> None:
    """Walk audit rows in id order from after `after_id` (whose hash is `prev`); record the FIRST bad row and stop."""
    last_id = after_id
    report.verified_to_id, report.verified_to_hash = after_id or None, prev
    for r in rows:
        report.rows += 1
        report.head_id, report.head_hash = r.id, r.row_hash or ""
        content = {k: getattr(r, k) for k in CHAINED_FIELDS}
        if r.row_hash is None or r.prev_hash is None:
            report.problems.append(Problem("inserted", f"audit row {r.id} was inserted out of band: it carries no hash.", r.id))
            return
        if row_hash(content, r.prev_hash) != r.row_hash:
            report.problems.append(Problem("changed", f"audit row {r.id} was changed: its content no longer matches its hash.", r.id))
            return
        if r.prev_hash != prev:
            if r.id > last_id + 1:
                gone = f"row {last_id + 1} was" if r.id == last_id + 2 else f"rows {last_id + 1}–{r.id - 1} were"
                report.problems.append(Problem("deleted", f"audit {gone} deleted: the chain breaks before row {r.id}.", last_id + 1))
            else:
                report.problems.append(Problem("inserted", f"audit row {r.id} does not follow row {last_id}: it was inserted out of band, "
                                                           "or the row before it was replaced.", r.id))
            return
        prev, last_id = r.row_hash, r.id
        report.verified_to_id, report.verified_to_hash = r.id, r.row_hash


def _chain_rows(conn, after_id: int = 0):
    cols = [AuditLog.__table__.c[k] for k in (*CHAINED_FIELDS, "prev_hash", "row_hash")]
    return conn.execute(sa.select(*cols).where(AuditLog.id > after_id).order_by(AuditLog.id)).all()


def check_checkpoint(conn, report: AuditReport) -> AuditCheckpoint | None:
    """The last intact checkpoint must still find its row, with its hash: rows at the tail are not deleted unseen."""
    cp = conn.execute(sa.select(AuditCheckpoint).where(AuditCheckpoint.intact.is_(True))
                      .order_by(AuditCheckpoint.id.desc()).limit(1)).first()
    if cp is None:
        return None
    got = conn.execute(sa.select(AuditLog.row_hash).where(AuditLog.id == cp.verified_to_id)).scalar()
    if got != cp.verified_to_hash:
        report.problems.append(Problem(
            "deleted" if got is None else "changed",
            f"audit row {cp.verified_to_id}, verified on {cp.checked_at:%Y-%m-%d %H:%M} UTC, "
            + ("was deleted." if got is None else "was changed since: its hash differs."), cp.verified_to_id))
    return cp


# -- the guards and the links ---------------------------------------------------------------------

def check_guards(conn, report: AuditReport) -> None:
    """Every trigger the migrations install is there (SQLite cannot refuse DROP TRIGGER) and enabled (PostgreSQL)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        present = {n: "O" for (n,) in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    else:
        present = dict(conn.exec_driver_sql("SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal").all())
    for name in EXPECTED_TRIGGERS.get(dialect, ()):
        if name not in present:
            report.problems.append(Problem("guard", f"database trigger {name} is missing: it was dropped, and what it refuses "
                                                    "could have been written since."))
        elif present[name] == "D":
            report.problems.append(Problem("guard", f"database trigger {name} is disabled."))


def _same(audit_value: str | None, current: object) -> bool:
    if current is None or audit_value is None:
        return current is None and audit_value is None
    if _plain(current) == audit_value:
        return True
    try:
        if isinstance(current, dt.datetime):
            return dt.datetime.fromisoformat(audit_value) == current
        if isinstance(current, float) and not isinstance(current, bool):
            return float(audit_value) == current
    except ValueError:
        return False
    return False


def check_links(conn, report: AuditReport) -> None:
    """Each decision, signature, signed adjudication and gate-protected field holds what its audit trail last wrote."""
    sentences: list[str] = []
    for model, fields in LINKED.items():
        table = model.__table__
        trail: dict[str, dict[str, str | None]] = {}
        # Only the trail of the fields compared is read (a calendar row's trail is mostly fields not linked here), and,
        # for the rows that have one, which have a trail at all (the index on entity and entity_id answers that).
        query = sa.select(AuditLog.entity_id, AuditLog.field, AuditLog.new_value).where(AuditLog.entity == table.name)
        if fields:
            query = query.where(AuditLog.field.in_(fields))
        for entity_id, fld, new in conn.execute(query.order_by(AuditLog.id)):
            trail.setdefault(entity_id, {})[fld] = new
        audited = set(trail) if not fields else set(conn.execute(
            sa.select(AuditLog.entity_id).where(AuditLog.entity == table.name).distinct()).scalars())
        names = fields or tuple(c.name for c in table.columns if not c.primary_key)  # the key is the trail's entity_id
        keys = list(table.primary_key.columns)
        query = sa.select(*keys, *(table.c[n] for n in names if n not in {k.name for k in keys})).order_by(*keys)
        if model is AdverseEvent:
            query = query.where(table.c.adjudicated_by.is_not(None))
        for row in conn.execute(query).mappings():
            pk = ",".join(str(row[c.name]) for c in table.primary_key.columns)
            if pk not in audited:
                sentences.append(f"{table.name} {pk} has no audit trail: it was written out of band.")
                continue
            for name in names:
                if not _same(trail.get(pk, {}).get(name), row[name]):
                    sentences.append(f"{table.name} {pk}: {name} differs from its audit trail: it was changed out of band.")
    for s in sentences[:MAX_SENTENCES]:
        report.problems.append(Problem("unlinked", s))
    if len(sentences) > MAX_SENTENCES:
        report.problems.append(Problem("unlinked", f"{len(sentences) - MAX_SENTENCES} more rows differ from their audit trail."))


# -- the command and the rounds -------------------------------------------------------------------

def reader_engine(url: str) -> sa.Engine:
    """An engine that cannot write: a read-only SQLite file, or PostgreSQL (see `_read_only`)."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        from pathlib import Path

        path = Path(u.database or "").resolve()
        if not path.exists():
            raise ValueError(f"trial database {path} does not exist")
        return sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    return sa.create_engine(u, pool_pre_ping=True)


def _read_only(conn) -> str:
    """Make this transaction unable to write; on PostgreSQL, also take the reader role when we may. Returns who reads."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
        return "read-only SQLite connection"
    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    if conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER_ROLE}') "
                            f"AND pg_has_role(current_user, '{READER_ROLE}', 'MEMBER')").scalar():
        conn.exec_driver_sql(f"SET LOCAL ROLE {READER_ROLE}")
    return f"role {conn.exec_driver_sql('SELECT current_user').scalar()}, read-only transaction"


def verify(url: str) -> AuditReport:
    """The whole chain from its first row, the last checkpoint, the guards and the links."""
    engine = reader_engine(url)
    report = AuditReport()
    try:
        with engine.begin() as conn:
            report.read_as = _read_only(conn)
            walk_chain(_chain_rows(conn), report)
            check_checkpoint(conn, report)
            check_guards(conn, report)
            check_links(conn, report)
    finally:
        engine.dispose()
    return report


def rounds_check(engine: sa.Engine, *, clock: Clock, link: str | None = None) -> AuditReport:
    """Daily: the rows added since the last intact checkpoint, the guards and the links; a checkpoint; an alert on a break."""
    report = AuditReport(read_as="daily rounds")
    with UnitOfWork(engine, actor="system:daily-rounds", reason="daily audit trail check", clock=clock) as u:
        conn = u.session.connection()
        cp = check_checkpoint(conn, report)
        after_id, prev = (cp.verified_to_id, cp.verified_to_hash) if cp and report.intact else (0, GENESIS)
        walk_chain(_chain_rows(conn, after_id), report, after_id=after_id, prev=prev)
        check_guards(conn, report)
        check_links(conn, report)
        first = report.problems[0] if report.problems else None
        u.session.add(AuditCheckpoint(verified_to_id=report.verified_to_id or 0, verified_to_hash=report.verified_to_hash,
                                      intact=report.intact, problem=first.message[:500] if first else None, checked_at=u.at))
        if first:
            key = f"audit-break:row-{first.row_id}" if first.row_id is not None else f"audit-break:{first.message[:80]}"
            detail = f"{len(report.problems)} finding(s), the first: {first.message.rstrip('.')}; see nktrial audit verify"
            for role in (Role.SAFETY, Role.PI):  # the trail's own words: row numbers and table names, no patient data
                enqueue(u.session, Notice(role, NoticeEvent.AUDIT_BREAK, detail=detail[:600], link=link), dedup=key, at=u.at)
        u.commit()
    return report
