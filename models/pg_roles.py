"""PostgreSQL roles: the owner runs the migrations; the application only reads and writes rows.

- owner (NKTRIAL_DATABASE_OWNER_URL's user, e.g. `nktrial_owner`): owns the tables, functions and
  triggers; only it (or a superuser) can ALTER, DROP or disable a trigger.
- app (NKTRIAL_DATABASE_URL's user, e.g. `nktrial_app`): SELECT, INSERT, UPDATE, DELETE on rows and
  USAGE on sequences; no TRUNCATE, no UPDATE or DELETE on audit_log, no DDL, no CREATE in the schema.
- reader (`nktrial_reader`, no login): SELECT only; the app role may take it (SET ROLE) so that
  `nktrial audit verify` reads with a role that cannot write.

`create_roles` needs a role with CREATEROLE (a superuser URL, once per cluster and database);
every statement is idempotent. `grant_app` runs as the owner after each migration.
"""

from __future__ import annotations

import sqlalchemy as sa

READER = "nktrial_reader"


def _ident(_conn, name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _create_role(conn, name: str, login: bool) -> None:
    """CREATE ROLE if missing; two processes racing on it both succeed."""
    exists = conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %(n)s", {"n": name}).first()
    if exists:
        return
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(f"CREATE ROLE {_ident(conn, name)} {'LOGIN' if login else 'NOLOGIN'}")
    except sa.exc.DBAPIError as exc:  # duplicate_object, or unique_violation when another session created it first
        if getattr(exc.orig, "sqlstate", None) not in ("42710", "23505"):
            raise


def create_roles(admin_url: str | sa.URL, *, database: str, owner: str, app: str, reader: str = READER) -> None:
    """Create the three roles (idempotently) and give the owner the schema of `database`; existing objects move to the owner."""
    admin = sa.create_engine(sa.engine.make_url(admin_url).set(database=database))
    try:
        with admin.begin() as conn:
            for name, login in ((owner, True), (app, True), (reader, False)):
                _create_role(conn, name, login)
            o, a, r = (_ident(conn, n) for n in (owner, app, reader))
            conn.exec_driver_sql(f"GRANT {r} TO {a}")
            db = _ident(conn, database)
            conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {db} TO {o}, {a}")
            conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            conn.exec_driver_sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {o}")
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {a}, {r}")
            for (table,) in conn.exec_driver_sql("SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public' "
                                                 "AND tableowner <> %(o)s", {"o": owner}):
                conn.exec_driver_sql(f"ALTER TABLE {table} OWNER TO {o}")
            for (fn,) in conn.exec_driver_sql("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                                              "WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> %(o)s", {"o": owner}):
                conn.exec_driver_sql(f"ALTER FUNCTION {fn} OWNER TO {o}")
    finally:
        admin.dispose()


def grant_app(conn, *, app: str, reader: str = READER) -> None:
    """As the owner, after a migration: rows for the app, SELECT for the reader, and nothing on the audit trail but INSERT."""
    a = _ident(conn, app)
    conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {a}")
    conn.exec_driver_sql(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {a}")
    conn.exec_driver_sql(f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM {a}")
    conn.exec_driver_sql(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM {a}")
    if conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %(n)s", {"n": reader}).first():
        conn.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {_ident(conn, reader)}")


def upgrade_as_owner(owner_url: str, *, app: str | None) -> None:
    """Migrate with the owner's URL, then grant the app role its rows (when it differs from the owner)."""
    from models.db import make_engine
    from models.migrate import upgrade

    engine = make_engine(owner_url)
    try:
        upgrade(engine)
        if app and app != engine.url.username and engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                grant_app(conn, app=app)
    finally:
        engine.dispose()
