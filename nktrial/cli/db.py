"""`nktrial db`: create or migrate the trial database's schema, and its state in a few lines."""

from __future__ import annotations

from nktrial.cli.shared import engine, load_protocol


def cmd_db_upgrade(args) -> None:
    from models.crud import register_protocol
    from models.db import UnitOfWork
    from models.migrate import current_revision, upgrade

    eng = engine()
    before = current_revision(eng)
    upgrade(eng)
    after = current_revision(eng)
    with UnitOfWork(eng, actor="system", reason="register the protocol version in force") as uow:
        register_protocol(uow.session, protocol=load_protocol(args), at=uow.at)
        uow.commit()
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    print(f"trial database {eng.url.render_as_string(hide_password=True)}: {state} schema {after}")


def cmd_db_status(args) -> None:
    from sqlmodel import Session, func, select

    from models.migrate import current_revision, head_revision
    from models.tables import AuditLog, DoseLevelState, Subject

    eng = engine()
    rev, head = current_revision(eng), head_revision()
    print(f"trial database {eng.url.render_as_string(hide_password=True)}")
    print(f"schema {rev or 'empty'} (newest {head}){'' if rev == head else ' — run: nktrial db upgrade'}")
    if rev != head:
        return
    with Session(eng) as s:
        levels = s.exec(select(DoseLevelState).order_by(DoseLevelState.level)).all()
        print("dose levels: " + (", ".join(f"DL{lv.level} {lv.status.value}" for lv in levels) or "none"))
        print(f"subjects: {s.exec(select(func.count()).select_from(Subject)).one()}, "
              f"audit rows: {s.exec(select(func.count()).select_from(AuditLog)).one()}")


def add_parsers(sub) -> None:
    db = sub.add_parser("db", help="the trial database").add_subparsers(dest="action", required=True, metavar="ACTION")
    db.add_parser("upgrade", help="create or migrate the schema (idempotent) and register the protocol").set_defaults(func=cmd_db_upgrade)
    db.add_parser("status", help="schema revision and a few counts").set_defaults(func=cmd_db_status)
