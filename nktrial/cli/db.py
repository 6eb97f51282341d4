"""`nktrial db`: create or migrate the trial database's schema, and its state in a few lines."""

from __future__ import annotations

from nktrial.cli.shared import engine, load_protocol


def cmd_db_upgrade(args) -> None:
    from models.crud import register_protocol
    from models.db import UnitOfWork
    from models.migrate import current_revision, upgrade
    from tasks.settings import get_settings

    eng = engine()
    before = current_revision(eng)
    owner_url = get_settings().database_owner_url
    if owner_url:  # PostgreSQL with roles: the owner migrates and grants; the app role below only writes rows
        from models.pg_roles import upgrade_as_owner

        upgrade_as_owner(owner_url, app=eng.url.username)
    else:
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


def cmd_db_roles(args) -> None:
    import sqlalchemy as sa

    from models.pg_roles import create_roles
    from protocol.errors import UserError
    from tasks.settings import get_settings

    settings = get_settings()
    if not settings.database_url or not settings.database_owner_url:
        raise UserError("NKTRIAL_DATABASE_URL (the app role) and NKTRIAL_DATABASE_OWNER_URL (the owner) must both be set "
                        "to PostgreSQL URLs of the same database")
    app, owner = sa.engine.make_url(settings.database_url), sa.engine.make_url(settings.database_owner_url)
    if app.get_backend_name() != "postgresql" or app.database != owner.database or app.username == owner.username:
        raise UserError("NKTRIAL_DATABASE_URL and NKTRIAL_DATABASE_OWNER_URL must name the same PostgreSQL database with two different roles")
    create_roles(args.admin_url, database=app.database, owner=owner.username, app=app.username)
    print(f"roles ready on {app.database}: owner {owner.username} (migrations), app {app.username} (rows only), "
          "reader nktrial_reader (audit verify); next: nktrial db upgrade")


def add_parsers(sub) -> None:
    db = sub.add_parser("db", help="the trial database").add_subparsers(dest="action", required=True, metavar="ACTION")
    db.add_parser("upgrade", help="create or migrate the schema (idempotent) and register the protocol").set_defaults(func=cmd_db_upgrade)
    roles = db.add_parser("roles", help="PostgreSQL: create the owner, app and reader roles and give the owner the schema (idempotent)")
    roles.add_argument("--admin-url", required=True, help="a PostgreSQL URL of a role that may create roles (e.g. postgres)")
    roles.set_defaults(func=cmd_db_roles)
    db.add_parser("status", help="schema revision and a few counts").set_defaults(func=cmd_db_status)
