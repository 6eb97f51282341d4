"""`nktrial notify`: the notification outbox."""

from __future__ import annotations

from nktrial.cli.shared import engine, table, writer
from protocol.errors import UserError

MAX_LIST = 10_000


def cmd_notify_deliver(args) -> None:
    """One delivery pass. An apprise config that is unset, empty or malformed is an error (exit 2) and sends nothing."""
    from tasks.delivery import deliver_pending, require_channels
    from tasks.settings import get_settings

    channels = require_channels(get_settings().apprise_config)
    eng, _, clock = writer(args)
    print(deliver_pending(eng, channels, clock=clock).summary)


def cmd_notify_list(args) -> None:
    """The newest notices; a pending one says how long it has waited and why."""
    from sqlmodel import Session, select

    from models.clock import wall_clock
    from models.tables import NotificationOutbox, OutboxStatus
    from tasks.delivery import ChannelConfigError, load_channels
    from tasks.notices import waited, waiting
    from tasks.settings import get_settings

    if not 1 <= args.limit <= MAX_LIST:
        raise UserError(f"--limit {args.limit} must be between 1 and {MAX_LIST}")
    config = get_settings().apprise_config
    try:
        served, problem = {t for c in load_channels(config) for t in c.tags}, None
        if config is None:
            problem = "NKTRIAL_APPRISE_CONFIG is not set"
    except ChannelConfigError as exc:
        served, problem = set(), str(exc)
    now = wall_clock()
    with Session(engine()) as s:
        rows = s.exec(select(NotificationOutbox).order_by(NotificationOutbox.id.desc()).limit(args.limit)).all()
        w = waiting(s)

    def why(r) -> str:
        if r.status is not OutboxStatus.PENDING:
            return ""
        if problem:
            return "the apprise config cannot be used"
        if r.role.value not in served:
            return f"no channel serves {r.role.value}"
        if r.claimed_by and r.claim_expires_at and r.claim_expires_at > now:
            return "being sent"
        return "a channel did not answer" if r.attempts else "not yet sent"

    print(w.sentence(now) + (f"; {problem}" if problem and w.count else ""))
    print(table([[str(r.id), f"{r.created_at:%Y-%m-%d %H:%M}", r.role.value, r.status.value,
                  waited(r.created_at, now) if r.status is OutboxStatus.PENDING else "", why(r), r.body[:90]] for r in rows],
                ["id", "created (UTC)", "role", "status", "waiting", "why", "message"]))


def add_parsers(sub) -> None:
    note = sub.add_parser("notify", help="the notification outbox").add_subparsers(dest="action", required=True, metavar="ACTION")
    note.add_parser("deliver", help="deliver pending notices now (also after a restart); exit 2 if the apprise config cannot be used"
                    ).set_defaults(func=cmd_notify_deliver)
    nl = note.add_parser("list", help="the newest notices, their status, and how long a pending one has waited and why")
    nl.add_argument("--limit", type=int, default=20)
    nl.set_defaults(func=cmd_notify_list)
