"""Engines and the unit of work. Nothing here connects at import time.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every transaction
starts with BEGIN IMMEDIATE so a read-then-write never fails with SQLITE_BUSY_SNAPSHOT.
PostgreSQL is used when a postgresql URL is given.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from enum import Enum
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import attributes
from sqlmodel import Session, SQLModel

from models.audit_chain import GENESIS, row_hash
from models.clock import Clock, wall_clock
from models.tables import AccessRefusal, AuditLog
from protocol.errors import AccessRefused
from protocol.plausible import text_fits

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _private_sqlite_file(path: Path) -> None:
    """The trial database is its owner's only: a new folder 0700, the file 0600, created here before SQLite opens it
    (SQLite gives its -wal and -shm files the database file's mode); an existing one loses group and other access."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # an empty file is an empty database
    except OSError:
        pass  # it exists, or SQLite will say why it cannot be created
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"), path.with_name(path.name + "-journal")):
        try:
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)
        except OSError:
            pass


def make_engine(url: str, **kw) -> sa.Engine:
    """An engine for the trial database. SQLite files get WAL, a busy timeout and BEGIN IMMEDIATE."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() != "sqlite":
        return sa.create_engine(u, pool_pre_ping=True, **kw)
    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        _private_sqlite_file(Path(u.database))
    engine = sa.create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _plain(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _pk(obj: SQLModel) -> str:
    ident = sa.inspect(obj).mapper.primary_key_from_instance(obj)
    return ",".join(str(i) for i in ident)


class UnitOfWork:
    """One transaction that commits or rolls back whole, and audits every change it writes.

    Every inserted, updated or deleted row leaves audit rows (actor, UTC time, entity, field,
    old → new, reason) in the same transaction. Use as a context manager; call `commit()`.
    """

    def __init__(self, engine: sa.Engine, *, actor: str, reason: str, clock: Clock = wall_clock):
        if not actor or not actor.strip():
            raise ValueError("actor: every clinical write needs who made it")
        if len(actor.strip()) > 64:
            raise ValueError("actor: a staff ID or system name is at most 64 characters")
        if not reason or not reason.strip():
            raise ValueError("reason: every clinical write needs why it was made")
        text_fits("reason (kept in audit_log.reason)", reason.strip(), AuditLog.__table__.c.reason.type.length)
        self.engine, self.actor, self.reason, self.clock = engine, actor.strip(), reason.strip(), clock
        self.session: Session | None = None

    def __enter__(self) -> UnitOfWork:
        self.session = Session(self.engine, expire_on_commit=False)
        self.session.info["uow"] = self
        self.at = self.clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.session is not None
        try:
            if exc_type is not None or self.session.in_transaction():
                self.session.rollback()
        finally:
            self.session.close()
        if isinstance(exc, AccessRefused):
            self._log_refusal(exc)

    def _log_refusal(self, exc: AccessRefused) -> None:
        """A refused write leaves nothing but this: who asked, for what, when, and why not."""
        with Session(self.engine) as s:
            s.info["uow"] = self
            s.add(AccessRefusal(actor=exc.actor[:64], act=exc.act[:64], reason=str(exc)[:300], at=self.at))
            s.commit()

    def commit(self) -> None:
        assert self.session is not None
        self.session.commit()


def _check_text_lengths(session: Session) -> None:
    """Every String column's value fits its declared length, checked before the database sees it: PostgreSQL would
    fail mid-transaction and SQLite would store it whole, so both engines refuse it here with the same sentence."""
    for obj in session.new | session.dirty:
        for col in sa.inspect(obj).mapper.columns:
            limit = getattr(col.type, "length", None)  # String, sqlmodel's AutoString (a TypeDecorator) and Enum all carry it
            if isinstance(limit, int) and limit > 0:
                value = getattr(obj, col.key, None)
                if isinstance(value, str):
                    text_fits(f"{obj.__tablename__}.{col.name}", value, limit)


@event.listens_for(Session, "before_flush")
def _collect_audit(session: Session, _ctx, _instances) -> None:
    _check_text_lengths(session)
    uow: UnitOfWork | None = session.info.get("uow")
    pending = session.info.setdefault("audit_pending", [])
    for obj in session.dirty | session.deleted:
        if isinstance(obj, AuditLog):
            raise ValueError("audit_log is append-only: audit rows cannot be changed or deleted")
    if uow is None:
        if any(not isinstance(o, AuditLog) for o in session.new | session.dirty | session.deleted):
            raise RuntimeError("clinical writes must go through a UnitOfWork so they are audited")
        return
    for obj in session.new:
        if isinstance(obj, AuditLog):
            continue
        for col in sa.inspect(obj).mapper.column_attrs:
            new = getattr(obj, col.key)
            if new is not None:
                pending.append((obj, col.key, None, _plain(new)))
    for obj in session.dirty:
        if not session.is_modified(obj, include_collections=False):
            continue
        for col in sa.inspect(obj).mapper.column_attrs:
            hist = attributes.get_history(obj, col.key)
            if hist.has_changes():
                old = hist.deleted[0] if hist.deleted else None
                new = hist.added[0] if hist.added else None
                if _plain(old) != _plain(new):
                    pending.append((obj, col.key, _plain(old), _plain(new)))
    for obj in session.deleted:
        for col in sa.inspect(obj).mapper.column_attrs:
            pending.append((obj, col.key, _plain(getattr(obj, col.key)), None))


@event.listens_for(Session, "after_flush")
def _write_audit(session: Session, _ctx) -> None:
    uow: UnitOfWork | None = session.info.get("uow")
    pending = session.info.pop("audit_pending", [])
    if uow is None or not pending:
        return
    conn = session.connection()
    head = conn.execute(sa.select(AuditLog.id, AuditLog.row_hash).order_by(AuditLog.id.desc()).limit(1)).first()
    next_id, prev = (head[0] + 1, head[1] or GENESIS) if head else (1, GENESIS)
    rows = []
    for obj, field, old, new in pending:
        row = dict(id=next_id, at=uow.at, actor=uow.actor, entity=obj.__tablename__, entity_id=_pk(obj),
                   field=field, old_value=old, new_value=new, reason=uow.reason)
        row["prev_hash"], row["row_hash"] = prev, row_hash(row, prev)
        rows.append(row)
        next_id, prev = next_id + 1, row["row_hash"]
    # Written now, in this flush, so a later statement of the same transaction (the dose-level gate) sees them.
    conn.execute(sa.insert(AuditLog.__table__), rows)


AUDIT_CHAIN_LOCK = 0x6E6B_6175_6469_74  # "nkaudit": PostgreSQL writers take it first, so the chain never forks


@event.listens_for(Session, "after_begin")
def _serialise_writers(session: Session, _transaction, connection) -> None:
    """On PostgreSQL a unit of work holds one transaction-level advisory lock from its start: audit rows are
    chained in commit order (SQLite gets the same from BEGIN IMMEDIATE). Taken first, so it never deadlocks
    against row locks."""
    if session.info.get("uow") is not None and connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_CHAIN_LOCK})")
