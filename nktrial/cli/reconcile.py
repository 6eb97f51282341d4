"""`nktrial reconcile`: rebuild the Prefect projection from the trial database.

Every planned event of every patient on study gets exactly one live treatment-event run (made by its
idempotency key, so a second pass creates nothing); moved events move their runs; duplicates and
runs of events done or cancelled, or of patients off study, are cancelled; runs stuck Pending or Late
past the protocol's `stuck_run_minutes`, or Crashed, are set back to Scheduled and the coordinators
are told (the notice waits in the outbox for the next delivery pass). After a deployment was deleted
and deployed again (which deleted its runs), this restores every run. It also creates, once, Prefect's
automation that marks a flow run Crashed when its heartbeats stop (tasks.projection.ensure_zombie_automation).
"""

from __future__ import annotations

import sys

from nktrial.cli.shared import api_auth, engine, print_json, table
from protocol.errors import UserError

ACTIONS = ("created", "moved", "cancelled", "rescheduled", "unchanged")


def cmd_reconcile(args) -> None:
    import os

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise UserError("PREFECT_API_URL is not set: reconcile rebuilds the runs on a Prefect server, so set it to that server's API "
                        "address (e.g. http://127.0.0.1:4200/api, as `nktrial up` prints)")
    import datetime as dt

    import httpx
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_UI_URL
    from sqlmodel import Session

    from models.clock import wall_clock
    from models.queries import get_subject
    from tasks.projection import TREATMENT_EVENT, ensure_zombie_automation, notify_flagged, project_each, stuck_requests
    from tasks.runtime import protocol

    eng = engine()
    if args.subject is not None:
        with Session(eng) as s:
            if get_subject(s, subject_id=args.subject) is None:
                raise UserError(f"--subject {args.subject}: no such subject in the trial database")
    stuck_after = dt.timedelta(minutes=protocol().notifications.stuck_run_minutes.value)
    now = wall_clock()
    quiet = args.json or not sys.stderr.isatty()
    every = 1 if not quiet else 10

    def progress(done: int, total: int, sid: str) -> None:
        if done % every == 0 or done == total:
            print(f"{done}/{total} patients ({sid})", file=sys.stderr, flush=True)

    with api_auth(api):
        try:
            with get_client(sync_client=True) as client:
                reports = project_each(client, eng, now=now, wall_now=now, stuck_after=stuck_after, subject_id=args.subject,
                                       progress=progress)
                flagged = [f for r in reports.values() for f in r.flagged]
                if args.subject is None:
                    flagged += stuck_requests(client, eng, wall_now=now, stuck_after=stuck_after)
            zombies = ensure_zombie_automation()  # runs whose heartbeats stop are marked Crashed, then healed here
        except ObjectNotFound:
            raise UserError(f"the deployment {TREATMENT_EVENT} is not on the Prefect server at {api}: deploy the flows "
                            "(`prefect deploy --all`, or `nktrial up`), then run reconcile again") from None
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 401:
                raise
            raise UserError(f"the Prefect server at {api} refused the API auth string (HTTP 401): set PREFECT_API_AUTH_STRING "
                            "to the server's string") from None
        except httpx.ConnectError:
            raise UserError(f"PREFECT_API_URL {api}: no Prefect server answers there") from None
    told = notify_flagged(eng, flagged, clock=wall_clock, ui_url=PREFECT_UI_URL.value())
    totals = {a: sum(getattr(r, a) for r in reports.values()) for a in ACTIONS}
    if args.json:
        print_json({"patients": {sid: {**{a: getattr(r, a) for a in ACTIONS}, "details": r.details} for sid, r in reports.items()},
                    "totals": totals, "flagged": [f.sentence for f in flagged], "notices": told,
                    "zombie_automation_created": zombies})
        return
    rows = [[sid, *(str(getattr(r, a)) for a in ACTIONS)] for sid, r in reports.items()]
    if rows:
        print(table(rows, ["subject", *ACTIONS]))
    for r in reports.values():
        for line in r.details:
            print(f"  {line}")
    print(f"{len(reports)} patient(s): " + ", ".join(f"{totals[a]} {a}" for a in ACTIONS))
    for f in flagged:
        print(f"flagged: {f.sentence}")
    if zombies:
        print("note: created the Prefect automation that marks a flow run Crashed when its heartbeats stop "
              "(the worker needs PREFECT_FLOWS_HEARTBEAT_FREQUENCY set)")
    if told:
        print(f"note: {told} notice(s) to the coordinators wait in the outbox; `nktrial notify deliver` or daily rounds send them")


def add_parsers(sub) -> None:
    p = sub.add_parser("reconcile", help="rebuild every scheduled run the patients' calendars need, from the trial database "
                                         "(idempotent; needs PREFECT_API_URL)")
    p.add_argument("--subject", metavar="S", default=None, help="one patient only, e.g. S-003 (default: every patient)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_reconcile)
