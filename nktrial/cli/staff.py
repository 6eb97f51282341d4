"""`nktrial staff add|deactivate|list`: the staff register, the delegation log's people.

The first `staff add` on an empty register is the bootstrap: it must give the PI role and needs no
one's authority (it is recorded as `bootstrap:site`). Every later change is made as a PI, named by
--as or NKTRIAL_ACTOR. The services are imported inside each command: building the parser stays cheap.
"""

from __future__ import annotations

from nktrial.cli.shared import NAME_YOURSELF, actor, local_datetime, print_json, table, writer
from protocol.errors import UserError


def cmd_staff_add(args) -> None:
    from tasks.staff import add_staff, bootstrap_open

    engine, p, clock = writer(args)
    who = actor(args, required=False)
    if who is None and not bootstrap_open(engine, p, at=clock()):
        raise UserError(NAME_YOURSELF)
    out = add_staff(engine, p, staff_id=args.id, printed_name=args.name, roles=args.roles, channel_tag=args.channel_tag,
                    active_from=local_datetime("--active-from", args.active_from) if args.active_from else None,
                    actor=who, clock=clock, allow_bootstrap=True)
    print(out.message)


MAX_REASON = 200  # as an AE update's or an adjudication's reason: the audit row keeps it whole


def cmd_staff_deactivate(args) -> None:
    from protocol.plausible import text_fits
    from tasks.staff import deactivate_staff

    text_fits("--reason", args.reason, MAX_REASON)
    engine, p, clock = writer(args)
    out = deactivate_staff(engine, p, staff_id=args.id, reason=args.reason, actor=actor(args), clock=clock)
    print(out.message)


def cmd_staff_list(args) -> None:
    from protocol.dates import to_local
    from tasks.staff import list_staff

    engine, p, clock = writer(args)
    rows = list_staff(engine, at=clock())
    local = lambda at: None if at is None else f"{to_local(p.timezone, at):%Y-%m-%d %H:%M}"  # noqa: E731
    if args.json:
        print_json([{"staff_id": r.staff_id, "printed_name": r.printed_name, "roles": list(r.roles), "channel_tag": r.channel_tag,
                     "active": r.active, "active_from_at": r.active_from_at.isoformat(),
                     "active_to_at": r.active_to_at.isoformat() if r.active_to_at else None} for r in rows])
        return
    if not rows:
        print("the staff register is empty: add the PI first, e.g. "
              "nktrial staff add --id pi-01 --name \"Principal Investigator\" --roles pi,investigator")
        return
    print(table([[r.staff_id, r.printed_name, ",".join(r.roles), r.channel_tag, "yes" if r.active else "no", local(r.active_from_at),
                  local(r.active_to_at) or ""] for r in rows],
                ["staff ID", "printed name", "roles", "channel tag", "active", "from (site)", "to (site)"]))


def add_parsers(sub) -> None:
    st = sub.add_parser("staff", help="the staff register: who may write, in which role").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = st.add_parser("add", help="add a staff member (the first one, on an empty register, must be the PI)")
    add.add_argument("--id", required=True, help="staff ID, e.g. nurse-01: lower case letters, digits, '.', '_' or '-'")
    add.add_argument("--name", required=True, help="printed name, as on a signature")
    add.add_argument("--roles", required=True, help="comma-separated: coordinator, nurse, investigator, pi, cell-lab, pharmacy, safety")
    add.add_argument("--channel-tag", help="the apprise tag of their own channel (default: staff:<id>)")
    add.add_argument("--active-from", help="site-local, e.g. 2027-02-01T08:00 (default: now)")
    add.set_defaults(func=cmd_staff_add)
    de = st.add_parser("deactivate", help="end a staff member's authority from now (the record of what they did stays)")
    de.add_argument("--id", required=True)
    de.add_argument("--reason", required=True)
    de.set_defaults(func=cmd_staff_deactivate)
    ls = st.add_parser("list", help="everyone on the register, active or not")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_staff_list)
