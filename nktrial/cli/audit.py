"""`nktrial audit verify`: walk the audit trail's hash chain and check its links, reading with a role that cannot write."""

from __future__ import annotations

import json
import sys


def cmd_audit_verify(args) -> None:
    from nktrial.cli.shared import engine
    from tasks.audit import verify
    from tasks.settings import get_settings

    engine().dispose()  # one sentence if the database cannot be reached; verify then reads on a connection that cannot write
    report = verify(get_settings().trial_database_url)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.summary)
    if not report.intact:
        sys.exit(1)


def add_parsers(sub) -> None:
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = audit.add_parser("verify", help="walk the hash chain; report the first row changed, deleted or written out of band "
                                        "(exit 1), or 'audit trail intact' (exit 0)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_audit_verify)
