"""`nktrial`: the command line. Bad input gets one sentence and exit status 2, never a traceback.

One module per command group builds its subcommands and runs them; this one assembles the parser
and runs the command chosen. Heavy imports (database, Prefect, the services) happen inside the
commands that need them, so that `nktrial --help` and the pure commands stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nktrial.cli import ae, audit, db, escalation, notify, pure, reconcile, records, report, simulate, staff, up
from nktrial.cli.shared import EXIT_USER_ERROR, database_problem, print_error
from protocol.errors import UserError

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nktrial", description="NCT06641648 treatment schedule: protocol, calendar, screening, escalation.")
    parser.add_argument("--protocol", type=Path, default=None, help="protocol YAML file (default: the shipped NCT06641648 file)")
    parser.add_argument("--as", "--actor", dest="actor", metavar="STAFF_ID", default=None,
                        help="your staff ID: who writes, for the audit trail and the delegation log (default: NKTRIAL_ACTOR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pure.add_parsers(sub)  # protocol show, calendar, screen
    esc = sub.add_parser("escalation", help="the 3+3 dose-escalation rule").add_subparsers(dest="action", required=True, metavar="ACTION")
    pure.add_escalation_parsers(esc)  # next, oc, paths: the rule alone
    escalation.add_parsers(esc)  # status, code, approve: the trial database
    ae.add_parsers(sub)
    db.add_parsers(sub)
    audit.add_parsers(sub)
    records.add_enroll_parsers(sub)  # enroll, record ...
    records.add_off_study_parser(sub)
    staff.add_parsers(sub)
    notify.add_parsers(sub)
    report.add_parsers(sub)
    simulate.add_parsers(sub)
    up.add_parsers(sub)
    reconcile.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        return print_error(exc)
    except ValueError as exc:  # a refused write from the data layer, worded for a person
        return print_error(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a database a person can fix (no schema yet, not a database file): one sentence too
        if type(exc).__module__.startswith("sqlalchemy") and (sentence := database_problem(exc)):
            return print_error(UserError(sentence))
        raise
    return 0
