"""`nktrial simulate`: a whole trial in virtual time, through the real deployments on a real Prefect server.

- loop.py: the event loop — of everything that could happen next, take the earliest, set the
  virtual clock to its time, do it, write it to the event log.
- staff.py: the people at the site — referrals, bedside entries, AEs, the PI signing with the code
  their channel received (on a real local apprise receiver).
- runner.py: runs are created from the deployments on the server and executed in this process as
  a worker would (a worker on a shared server never sees one due: each is Pending or scheduled in
  virtual time).
- results.py: the final state as typed rows, and the 3+3 check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from models.clock import VirtualClock, use_clock
from models.crud import register_protocol
from models.db import UnitOfWork
from models.migrate import upgrade
from nktrial.receiver import Receiver
from nktrial.rehearsal.loop import Rehearsal
from nktrial.rehearsal.results import DecisionResult, LevelResult, PatientResult, Result, StepTimes, check
from nktrial.rehearsal.staff import site_staff
from nktrial.scenario import Scenario
from nktrial.server import temporary_environment
from protocol.dates import local_instant
from protocol.definition import ProtocolDefinition
from protocol.roles import Role
from tasks.staff import add_staff

__all__ = ["DecisionResult", "LevelResult", "PatientResult", "Rehearsal", "Result", "StepTimes", "check", "rehearse"]


def rehearse(scenario: Scenario, *, out_dir: Path, protocol: ProtocolDefinition, api_url: str | None = None,
             api_auth: str | None = None, temporary_server: bool = False, progress: Callable[[str], None] | None = None,
             reports_every: int | None = None, receiver: Receiver | None = None) -> Result:
    """Run a scenario into a fresh trial database under out_dir, on the Prefect server in use, a given one, or a temporary one.

    Notices go to a local receiver (its own, or the one given), one path per role. Daily rounds draw the reports, the
    worklist and the casebooks at the close, and also every `reports_every` virtual days if it is given (for a server
    whose UI someone watches while the rehearsal runs; on a server thrown away at the end nobody sees them).
    """
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    from models.db import make_engine
    from nktrial.server import local_server

    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / "trial.db"
    if db.exists():
        from protocol.errors import UserError

        raise UserError(f"--out {out_dir.name}: it already holds a rehearsal's trial database; choose a new folder")
    own_receiver = receiver is None
    receiver = receiver or Receiver().start()
    apprise = out_dir / "apprise.yml"
    staff = site_staff(scenario)  # everyone the rehearsal acts as, registered below
    own = {who: [f"staff:{who}"] for who, *_ in staff}  # each staff member's own channel (signing codes)
    apprise.write_text(receiver.apprise_yaml({role.value: [role.value] for role in Role} | own), encoding="utf-8")
    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine)
        clock = VirtualClock(local_instant(protocol.timezone, scenario.start, dt.time(0, 0), what="start")[0])
        with UnitOfWork(engine, actor="system:rehearsal", reason=f"rehearsal {scenario.name}", clock=clock) as u:
            register_protocol(u.session, protocol=protocol, at=u.at)
            u.commit()
        for sid, name, roles in staff:  # the PI first, on the empty register (the bootstrap); then everyone else, added by the PI
            add_staff(engine, protocol, staff_id=sid, printed_name=name, roles=roles, actor=staff[0][0], clock=clock,
                      allow_bootstrap=sid == staff[0][0])
        with ExitStack() as stack:
            stack.enter_context(temporary_environment({"NKTRIAL_DATABASE_URL": f"sqlite:///{db}", "NKTRIAL_APPRISE_CONFIG": str(apprise),
                                              "NKTRIAL_DATA_DIR": str(out_dir)}))
            if temporary_server:
                progress and progress("starting a temporary Prefect server…")
                api_url = stack.enter_context(local_server(out_dir / "prefect"))
            # Runs execute here and last a second: no heartbeat thread (its join costs up to 1 s a run); a temporary
            # server is thrown away, so its logs stay on the console.
            rehearsal_settings = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            if api_url:
                rehearsal_settings |= {PREFECT_API_URL: api_url, PREFECT_LOGGING_TO_API_ENABLED: not temporary_server}
            if api_auth:  # a server that asks for its basic-auth string (nktrial up's)
                rehearsal_settings[PREFECT_API_AUTH_STRING] = api_auth
            stack.enter_context(temporary_settings(rehearsal_settings))
            rehearsal = Rehearsal(scenario, protocol, engine, out_dir=out_dir, clock=clock, receiver=receiver, progress=progress,
                                  reports_every=reports_every)
            with use_clock(clock):
                return rehearsal.run()
    finally:
        if own_receiver:
            receiver.stop()
        engine.dispose()
