"""`nktrial up`: the main job on the embedded default, in one command.

Starts a local Prefect server (SQLite, under the data folder), creates the process work pool,
deploys every flow from prefect.yaml, starts a worker, and says what to do first. Ctrl-C stops
all of it; starting again keeps the data (trial database and Prefect database both persist).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nktrial.server import healthy, prefect_exe
from protocol.errors import UserError

POOL = "nktrial"
ROOT = Path(__file__).resolve().parents[1]


def _step(msg: str) -> None:
    print(f"• {msg}", flush=True)


def run(*, host: str, port: int, data_dir: Path, apprise_config: Path | None) -> int:
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    api = f"http://{host}:{port}/api"
    ui = f"http://{host}:{port}"
    if healthy(api):
        raise UserError(f"port {port}: a Prefect server already answers at {ui}; stop it first or choose --port")
    env = {
        **os.environ,
        "PREFECT_HOME": str(data_dir / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # the browser calls the API here; its default (port 4200) would break other ports
        "PREFECT_UI_URL": ui,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "NKTRIAL_DATA_DIR": str(data_dir),
    }
    if apprise_config:
        env["NKTRIAL_APPRISE_CONFIG"] = str(apprise_config.resolve())
    children: list[subprocess.Popen] = []
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def stop(*_):
        for p in reversed(children):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(children):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        _step(f"trial database: {data_dir / 'trial.db'}")
        subprocess.run([sys.executable, "-m", "nktrial", "db", "upgrade"], env=env, check=True, cwd=ROOT)
        _step(f"starting the Prefect server on {ui} (log: {logs / 'server.log'})")
        server_log = open(logs / "server.log", "a", encoding="utf-8")
        children.append(subprocess.Popen([prefect_exe(), "server", "start", "--host", host, "--port", str(port)], env=env,
                                         stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
        deadline = time.monotonic() + 120
        while not healthy(api):
            if children[0].poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the Prefect server did not start; see {logs / 'server.log'}")
            time.sleep(1)
        _step(f"work pool '{POOL}' (process)")
        inspect = subprocess.run([prefect_exe(), "work-pool", "inspect", POOL], env=env, capture_output=True, cwd=ROOT)
        if inspect.returncode != 0:
            subprocess.run([prefect_exe(), "work-pool", "create", POOL, "--type", "process"], env=env, check=True, capture_output=True, cwd=ROOT)
        _step("deploying every flow from prefect.yaml")
        deploy = subprocess.run([prefect_exe(), "--no-prompt", "deploy", "--all"], env=env, capture_output=True, text=True, cwd=ROOT)
        if deploy.returncode != 0:
            (logs / "deploy.log").write_text(deploy.stdout + deploy.stderr, encoding="utf-8")
            raise UserError(f"prefect deploy failed; see {logs / 'deploy.log'}")
        _step(f"starting a worker on pool '{POOL}' (log: {logs / 'worker.log'})")
        worker_log = open(logs / "worker.log", "a", encoding="utf-8")
        children.append(subprocess.Popen([prefect_exe(), "worker", "start", "--pool", POOL], env=env, stdout=worker_log,
                                         stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
        channel = (f"notifications go to the channels in {apprise_config}" if apprise_config else
                   "no notification channel is configured: every notice is still recorded in the outbox "
                   "(set NKTRIAL_APPRISE_CONFIG to an apprise config file with role tags to send them)")
        print(f"""
NCT06641648 orchestrator is up.

  Prefect UI   {ui}
  data         {data_dir}  (kept when you stop; starting again carries on)
  notices      {channel}

What to do first:
  1. Open {ui}/deployments and pick enroll-patient → Run → Custom run. Paste a screening record
     (see examples/screening-S-001.json) and the planned day 0 (site time, e.g. 2027-01-31T09:00).
  2. Watch the patient's runs under Runs, filtered by tag subject:S-001, and the schedule table
     under Artifacts (subject-s-001-schedule).
  3. daily-rounds runs every morning at 07:00 site time; run it by hand from its deployment too.

Press Ctrl-C to stop the worker and the server.
""", flush=True)
        while all(p.poll() is None for p in children):
            time.sleep(1)
        dead = next(p for p in children if p.poll() is not None)
        raise UserError(f"{'the server' if dead is children[0] else 'the worker'} stopped unexpectedly; see the logs in {logs}")
    except KeyboardInterrupt:
        print("\nstopping the worker and the server…", flush=True)
        return 0
    finally:
        stop()
        print("stopped; the data is kept in", data_dir, flush=True)
