"""`nktrial simulate`: rehearse a whole trial in virtual time through the real deployments."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from nktrial.cli.shared import load_protocol, print_json, table, writable_folder
from protocol.errors import UserError

MAX_REPORTS_EVERY = 366  # a year of virtual days: more is the same as "only at the end"
DEFAULT_REPORTS_EVERY = 7  # with --api-url: a virtual week
SHIPPED = "no-dlt, one-of-three-expansion, two-dlts-deescalation, late-infusion, withdrawal-replacement, missed-il2"


def rehearsal_text(res) -> str:
    yes = {True: "yes", False: "no (replaced)", None: "—"}
    out = [f"Rehearsal {res.scenario}: {res.title}",
           f"{res.virtual_days} virtual days · {res.runs_executed} runs executed · {res.staff_entries} bedside entries · "
           f"{res.notices_sent} notices · {res.wall_seconds} s", "",
           table([[p.subject_id, p.dose_level or "—", p.cohort or "—", p.status.replace("_", " "), yes[p.evaluable], p.dlts, p.outcome]
                  for p in res.patients],
                 ["patient", "level", "cohort", "status", "evaluable", "DLTs", "DLT window"]), "",
           table([[f"DL{lv.dose_level}", lv.status.replace("_", " "), lv.patients, lv.dlts] for lv in res.levels],
                 ["level", "status", "evaluable", "DLTs"]), "", "decisions:"]
    for i, d in enumerate(res.decisions, start=1):
        target = f" DL{d.level}" if d.level else ""
        signed = f"signed {d.signed}{target} by {d.signer} at {d.signed_at}" if d.signed else "waiting for the PI"
        out.append(f"  {i}. {d.history} → rule: {d.recommended}"
                   + (f" DL{d.recommended_level}" if d.recommended_level else "") + f"; {signed}")
    if not res.decisions:
        out.append("  none")
    out += ["", f"history: {res.history or '(none)'}",
            f"MTD: {'DL' + str(res.mtd) if res.mtd else 'none declared' + (' (the trial is still open)' if res.trial_open else '')}",
            "3+3 check: " + ("the final state is what the rules imply" if not res.problems else "; ".join(res.problems)),
            f"event log: {res.event_log}", f"reports: {res.reports}"]
    return "\n".join(out)


def cmd_simulate(args) -> None:
    import os
    import time

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the progress lines, not every run's log (read when Prefect loads)

    from nktrial.apiauth import api_status, client_auth, refused_message
    from nktrial.rehearsal import rehearse
    from nktrial.scenario import load
    from nktrial.server import healthy
    from tasks.settings import get_settings

    if args.reports_every is not None and not 1 <= args.reports_every <= MAX_REPORTS_EVERY:
        raise UserError(f"--reports-every {args.reports_every}: give a number of days from 1 to {MAX_REPORTS_EVERY}")
    scenario = load(args.scenario)
    api_auth = None
    protocol = load_protocol(args)
    if args.api_url:
        api = args.api_url.rstrip("/")
        if not api.startswith(("http://", "https://")) or not api.endswith("/api"):
            raise UserError(f"--api-url '{args.api_url}' is not a Prefect API address like http://127.0.0.1:4200/api")
        if not healthy(api):
            raise UserError(f"--api-url {api}: no Prefect server answers there; start one (make up) or leave --api-url out")
        api_auth = client_auth(api, get_settings().data_dir)
        if api_status(api, api_auth) == 401:
            raise UserError(f"--api-url: {refused_message(api, get_settings().data_dir)}")
        if scenario.start <= dt.date.today():
            raise UserError(f"scenario start {scenario.start} is not in the future: on a shared server a worker would take the "
                            "rehearsal's due runs; rehearse there with a later start, or leave --api-url out")
    out = args.out or get_settings().data_dir / "rehearsals" / f"{scenario.name}-{dt.datetime.now():%Y%m%dT%H%M%S}"
    writable_folder("--out", Path(out))
    started = time.monotonic()

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    # A running server's UI shows the views as the rehearsal goes: weekly by default. A temporary server is thrown away at
    # the end, so nobody sees its artifacts before the close: the reports are drawn once, at the close, unless asked.
    every = args.reports_every if args.reports_every is not None else (DEFAULT_REPORTS_EVERY if args.api_url else None)
    res = rehearse(scenario, out_dir=Path(out), protocol=protocol, api_url=args.api_url, api_auth=api_auth,
                   temporary_server=not args.api_url, progress=progress, reports_every=every)
    progress(f"done in {time.monotonic() - started:.0f} s" + ("" if args.api_url else " (the temporary server's start included)"))
    if args.json:
        print_json(res.as_dict())
    else:
        print(rehearsal_text(res))
    if res.problems:
        raise SystemExit(1)


def add_parsers(sub) -> None:
    sim = sub.add_parser("simulate", help="rehearse a whole trial in virtual time through the real deployments")
    sim.add_argument("scenario", help=f"a scenario YAML file, or a shipped one: {SHIPPED}")
    sim.add_argument("--json", action="store_true", help="print the final state as JSON")
    sim.add_argument("--api-url", default=None, help="a running Prefect server (default: a temporary one, started and stopped here)")
    sim.add_argument("--out", type=Path, default=None, help="folder for the rehearsal's trial database and event log "
                                                           "(default: data/rehearsals/NAME-TIME)")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.add_argument("--reports-every", type=int, default=None, metavar="DAYS",
                     help="daily rounds refresh the reports, the worklist and the casebooks every DAYS virtual days, and once at the "
                          f"end (default: {DEFAULT_REPORTS_EVERY} with --api-url; on a temporary server only at the end, since it is "
                          "thrown away when the rehearsal ends)")
    sim.set_defaults(func=cmd_simulate)
