"""`nktrial up`: the main job on the embedded default, in one command.

Starts a local Prefect server (SQLite, under the data folder), creates the process work pool,
deploys every flow from prefect.yaml, starts a worker, and says what to do first. Ctrl-C, SIGTERM or
SIGHUP stops all of it within seconds, also when a script started it in the background (nktrial/supervisor.py);
starting again keeps the data (trial database and Prefect database both persist).

The API and the UI ask for a basic-auth string, generated at the first start and kept in the
data folder (nktrial/apiauth.py). The data folder is its owner's only: 0700, and everything
created under it 0600 (the processes started here run with umask 077).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from nktrial.apiauth import LOOPBACK, load_or_create, private_dir, secret_path
from nktrial.server import healthy, prefect_exe
from nktrial.supervisor import Supervisor
from protocol.errors import UserError

POOL = "nktrial"
ROOT = Path(__file__).resolve().parents[1]


def _step(msg: str) -> None:
    print(f"• {msg}", flush=True)


def tighten(data_dir: Path) -> None:
    """Take group and other access away from everything already under the data folder (made before umask 077)."""
    for folder, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            p = Path(folder, name)
            st = p.lstat()
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                p.chmod(stat.S_IMODE(st.st_mode) & 0o700)


def addresses(host: str, port: int) -> tuple[str, str]:
    """The API and UI URLs this machine's clients call for a server listening on `host`:`port`."""
    near = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{near}:{port}/api", f"http://{near}:{port}"


def stack_env(*, data_dir: Path, api: str, ui: str, auth: str, prefect_home: str) -> dict[str, str]:
    """The environment of everything `nktrial up` (and `up --ha`) starts: the Prefect clients' settings, the data folder."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ("PREFECT_API_KEY", "PREFECT_SERVER_API_AUTH_STRING")},
        "PREFECT_HOME": str(data_dir / prefect_home),
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": auth,  # every client: deploy, worker, flow runs (PREFECT_API_KEY must not be set too)
        # the browser calls the API here: its default (port 4200) breaks other ports; behind a proxy, the public URL
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or api,
        "PREFECT_UI_URL": os.environ.get("PREFECT_UI_URL") or ui,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "NKTRIAL_DATA_DIR": str(data_dir),
        # flow runs beat every 60 s, so the zombie-run automation `nktrial reconcile` creates can mark a run whose process died Crashed
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or "60",
        # a form submitted is picked up within 5 s, and a referral queued behind another (enroll-patient runs one at a
        # time) tries again 5 s later (Prefect's defaults: 15 s and 30 s)
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS") or "5",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS":
            os.environ.get("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS") or "5",
    }


def run(*, host: str, port: int, data_dir: Path, apprise_config: Path | None) -> int:
    data_dir = private_dir(data_dir.resolve())
    old_umask = os.umask(0o077)  # what this process and its children create (Prefect's database, logs, results) is 0600
    try:
        return _run(host=host, port=port, data_dir=data_dir, apprise_config=apprise_config)
    finally:
        os.umask(old_umask)


def _run(*, host: str, port: int, data_dir: Path, apprise_config: Path | None) -> int:
    tighten(data_dir)
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    api, ui = addresses(host, port)
    if healthy(api):
        raise UserError(f"port {port}: a Prefect server already answers at {ui}; stop it first or choose --port")
    auth, first_start = load_or_create(data_dir)
    env = {**stack_env(data_dir=data_dir, api=api, ui=ui, auth=auth, prefect_home="prefect"),
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": auth}
    if apprise_config:
        env["NKTRIAL_APPRISE_CONFIG"] = str(apprise_config.resolve())
    processes = Supervisor()  # the server and the worker, each in a session of its own (nktrial/supervisor.py)
    children = processes.children
    processes.install_handlers()  # SIGINT, SIGTERM, SIGHUP stop everything, even when started with `&` from a script

    try:
        if first_start:
            _step(f"API authentication: a new basic-auth string in {secret_path(data_dir)} (mode 0600); "
                  "the UI asks for it once per browser")
        else:
            _step(f"API authentication: the basic-auth string in {secret_path(data_dir)}")
        if host not in LOOPBACK:
            _step(f"listening on {host}: other machines reach the API over plain http; "
                  "put it behind the site's TLS reverse proxy (README, Security)")
        _step(f"trial database: {data_dir / 'trial.db'}")
        subprocess.run([sys.executable, "-m", "nktrial", "db", "upgrade"], env=env, check=True, cwd=ROOT)
        _step(f"starting the Prefect server on {ui} (log: {logs / 'server.log'})")
        with open(logs / "server.log", "a", encoding="utf-8") as server_log:  # the child keeps its own copy
            processes.start([prefect_exe(), "server", "start", "--host", host, "--port", str(port)], env=server_env,
                            stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not healthy(api):
            if children[0].poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the Prefect server did not start; see {logs / 'server.log'}")
            time.sleep(1)
        _step(f"work pool '{POOL}' (process; its job template carries the trial's settings to every flow run)")
        pool = subprocess.run([sys.executable, "-m", "nktrial.workpool", POOL], check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        if pool.returncode != 0:
            (logs / "workpool.log").write_text(pool.stdout + pool.stderr, encoding="utf-8")
            raise UserError(f"the work pool could not be set up; see {logs / 'workpool.log'}")
        _step("deploying every flow from prefect.yaml")
        deploy = subprocess.run([prefect_exe(), "--no-prompt", "deploy", "--all"], check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        if deploy.returncode != 0:
            (logs / "deploy.log").write_text(deploy.stdout + deploy.stderr, encoding="utf-8")
            raise UserError(f"prefect deploy failed; see {logs / 'deploy.log'}")
        _step("reconciling every patient's scheduled runs with the trial database (a redeploy deletes none of the record)")
        rec = subprocess.run([sys.executable, "-m", "nktrial", "reconcile"], check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        (logs / "reconcile.log").write_text(rec.stdout + rec.stderr, encoding="utf-8")
        if rec.returncode != 0:
            print(f"warning: reconcile did not finish (see {logs / 'reconcile.log'}); daily rounds repair the runs at 07:00", flush=True)
        _step(f"starting a worker on pool '{POOL}' (log: {logs / 'worker.log'})")
        with open(logs / "worker.log", "a", encoding="utf-8") as worker_log:
            processes.start([prefect_exe(), "worker", "start", "--pool", POOL], env=env, stdout=worker_log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
        channel = (f"notifications go to the channels in {apprise_config}" if apprise_config else
                   "no notification channel is configured: every notice is still recorded in the outbox "
                   "(set NKTRIAL_APPRISE_CONFIG to an apprise config file with role tags to send them)")
        first = (f"""
First start: the API and the UI ask for the basic-auth string in {secret_path(data_dir)}
(the browser asks once; paste the whole line). The nktrial commands send it by themselves
to a server on this machine. Add the first staff member, the PI:
  nktrial staff add --id pi-01 --name "<the PI's full name>" --roles pi
""" if first_start else "")
        print(f"""
NCT06641648 orchestrator is up.

  Prefect UI   {ui}  (asks for the string in {secret_path(data_dir)})
  CLI          export PREFECT_API_URL={api}  (then recording re-projects a patient's runs at once)
  data         {data_dir}  (kept when you stop; starting again carries on)
  notices      {channel}
{first}
What to do first:
  1. Open {ui}/deployments and pick enroll-patient → Run → Custom run. Fill in the screening
     checklist (sections 1 to 7; empty means unknown, washouts take a date or never) and the
     planned day 0 in site time (e.g. 2027-01-31 09:00), or paste a screening record as JSON.
  2. Artifacts → worklist: what is due today and in the next 7 days; casebook-s-001: one
     patient's record, with a link to all their runs, done and planned.
  3. daily-rounds runs every morning at 07:00 site time; run it by hand from its deployment too.

Press Ctrl-C to stop the worker and the server.
""", flush=True)
        while all(p.poll() is None for p in children):
            time.sleep(1)
        dead = next(p for p in children if p.poll() is not None)
        raise UserError(f"{'the server' if dead is children[0] else 'the worker'} stopped unexpectedly; see the logs in {logs}")
    except KeyboardInterrupt:
        processes.signalled = processes.signalled or signal.SIGINT  # from here on a signal hurries the stop, never interrupts it
        print(f"\n{signal.Signals(processes.signalled).name}: stopping the worker and the server…", flush=True)
        return 0
    finally:
        took = processes.stop()
        print(f"stopped; the data is kept in {data_dir} (stopping took {took:.1f} s)", flush=True)
