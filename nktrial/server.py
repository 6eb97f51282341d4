"""A Prefect server of our own for a while: started as a subprocess, waited for, flushed and stopped.

`nktrial simulate` uses one when no --api-url is given, so a rehearsal needs no `make up`; the
browser test uses one because the test harness's server has no UI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import UserError

# A server whose database is thrown away when it stops, and whose UI nobody reads (a rehearsal's temporary server, the
# test harness's), keeps no event history: storing each event (three per task run) with its related resources was
# most of such a server's database writes, and nothing reads them back. Its services still receive every event
# (task runs are recorded from them, automations are triggered by them).
THROWAWAY_SERVER_ENV = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}


@contextmanager
def temporary_environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set while the block runs (for the processes it starts), then as they were."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flush_to(api: str) -> None:
    """Send what this process still owes the server (logs, events) while it is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        APILogWorker.instance().drain()
        EventsWorker.drain_all()


@contextmanager
def local_server(home: Path, *, ui: bool = False, timeout_s: float = 120) -> Iterator[str]:
    """A Prefect server on a free loopback port with its own database under `home`; yields the API URL. Without its UI
    it is a throwaway server (THROWAWAY_SERVER_ENV); with it, the UI shows the event feed as `nktrial up`'s does."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true" if ui else "false",
           **({"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "true"} if ui else THROWAWAY_SERVER_ENV)}
    log_path = home / "server.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy(api):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
                raise UserError(f"the temporary Prefect server did not start within {timeout_s:.0f} s; its log ends: {tail}")
            time.sleep(0.5)
        yield api
        flush_to(api)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
