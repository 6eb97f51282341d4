"""`nktrial notify`: the notification outbox."""

from __future__ import annotations

from nktrial.cli.shared import engine, table, writer


def cmd_notify_deliver(args) -> None:
    from tasks.delivery import deliver_pending, load_channels
    from tasks.settings import get_settings

    eng, _, clock = writer(args)
    report = deliver_pending(eng, load_channels(get_settings().apprise_config), clock=clock)
    print(f"{report.delivered} delivered, {report.no_channel} with no channel configured, {report.pending} still waiting for a channel")


def cmd_notify_list(args) -> None:
    from sqlmodel import Session, select

    from models.tables import NotificationOutbox

    with Session(engine()) as s:
        rows = s.exec(select(NotificationOutbox).order_by(NotificationOutbox.id.desc()).limit(args.limit)).all()
    print(table([[str(r.id), f"{r.created_at:%Y-%m-%d %H:%M}", r.role, r.status.value, r.body[:90]] for r in rows],
                ["id", "created (UTC)", "role", "status", "message"]))


def add_parsers(sub) -> None:
    note = sub.add_parser("notify", help="the notification outbox").add_subparsers(dest="action", required=True, metavar="ACTION")
    note.add_parser("deliver", help="deliver pending notices now (also after a restart)").set_defaults(func=cmd_notify_deliver)
    nl = note.add_parser("list", help="the newest notices and their status")
    nl.add_argument("--limit", type=int, default=20)
    nl.set_defaults(func=cmd_notify_list)
