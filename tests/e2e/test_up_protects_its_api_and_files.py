"""`nktrial up` for real, on a free port with its own data folder: the API asks for the basic-auth
string it generated, the worker's flow runs carry that string, the data folder and its files are
the owner's only, and Ctrl-C stops the server and the worker.

The up process is started in a session of its own, as a terminal's foreground job would be; its
server and worker are in sessions of their own too, so Ctrl-C reaches only `nktrial up`, which
stops them. The tests of the module share one start (about 30 s) and run in order; the last stops it.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models.db import make_engine
from nktrial import apiauth
from nktrial.server import free_port, healthy
from protocol.errors import UserError
from tests.helpers import call_api as _call

ROOT = Path(__file__).parents[2]
START_TIMEOUT_S = 150


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _processes_with(data_dir: Path) -> list[int]:
    """Processes started for this data folder (up, its server, its worker, their flow runs): their environment names it."""
    marker = f"NKTRIAL_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


class Up:
    def __init__(self, work: Path):
        self.data = work / "data"
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.lines: list[str] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NKTRIAL_"))}
        env["NKTRIAL_DATA_DIR"] = str(self.data)
        env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker takes the test's flow run sooner (default 10 s)
        self.proc = subprocess.Popen([sys.executable, "-m", "nktrial", "up", "--port", str(self.port)], cwd=work, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Press Ctrl-C" not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.data / "logs" / "server.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no server log)"
                pytest.fail(f"nktrial up did not come up:\n{self.output}\nserver log ends:\n{tail}")
            time.sleep(0.5)

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the foreground job's process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=45)

    def clean_up(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in _processes_with(self.data):  # only what this test started, found by its own data folder
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("up"))
    try:
        up.wait_until_up()
        yield up
    finally:
        up.clean_up()


def test_the_api_refuses_a_request_without_the_auth_string_and_answers_one_with_it(up):
    secret = (up.data / "prefect-api-auth").read_text().strip()
    filter_url = f"{up.api}/deployments/filter"
    assert _call(filter_url, body={})[0] == 401
    assert _call(filter_url, body={}, auth="nktrial:not-the-string")[0] == 401
    status, deployments = _call(filter_url, body={}, auth=secret)
    assert status == 200
    assert {"daily-rounds", "enroll-patient", "patient-treatment"} <= {d["name"] for d in deployments}
    assert _call(f"{up.api}/health")[0] == 200  # Prefect leaves GET /health and /ready open, for probes
    assert apiauth.api_status(up.api, None) == 401
    assert apiauth.api_status(up.api, secret) == 200


def test_the_first_start_says_where_the_string_is_and_how_to_add_the_pi_but_never_prints_it(up):
    secret = (up.data / "prefect-api-auth").read_text().strip()
    assert re.fullmatch(r"nktrial:[A-Za-z0-9_-]{32}", secret)
    assert secret.split(":")[1] not in up.output
    assert f"a new basic-auth string in {up.data / 'prefect-api-auth'}" in up.output
    assert "the UI asks for it once" in up.output
    assert 'nktrial staff add --id pi-01 --name "' in up.output and "--roles pi" in up.output


def test_the_auth_string_the_data_folder_and_both_databases_are_the_owners_only(up):
    assert _mode(up.data) == 0o700
    assert _mode(up.data / "prefect-api-auth") == 0o600
    assert _mode(up.data / "trial.db") == 0o600
    assert _mode(up.data / "prefect") == 0o700
    prefect_db = list((up.data / "prefect").glob("prefect.db*"))
    assert prefect_db, "Prefect's database is under the data folder"
    for path in [*prefect_db, *up.data.glob("trial.db-*"), *(up.data / "logs").iterdir()]:
        assert _mode(path) == 0o600, path


def test_a_flow_run_started_by_the_worker_reaches_the_api_with_the_string(up):
    secret = (up.data / "prefect-api-auth").read_text().strip()
    status, deployment = _call(f"{up.api}/deployments/name/daily-rounds/daily-rounds", auth=secret)
    assert status == 200
    status, run = _call(f"{up.api}/deployments/{deployment['id']}/create_flow_run", body={}, auth=secret)
    assert status == 201, run
    deadline = time.monotonic() + 60
    while True:
        _, run = _call(f"{up.api}/flow_runs/{run['id']}", auth=secret)
        state = (run.get("state") or {}).get("type")
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    worker_log = (up.data / "logs" / "worker.log").read_text(errors="replace")[-3000:]
    assert state == "COMPLETED", f"daily-rounds ended {state}; the worker's log ends:\n{worker_log}"


def test_ctrl_c_stops_the_server_and_the_worker_promptly(up):
    children = [pid for pid in _processes_with(up.data) if pid != up.proc.pid]
    assert len(children) >= 2, "a server and a worker run"
    started = time.monotonic()
    assert up.interrupt() == 0
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 5
    while _processes_with(up.data) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(up.data) == []
    assert not healthy(up.api)
    assert "stopped; the data is kept in" in up.output


# -- the pieces, without a server -----------------------------------------------------------------

def test_the_auth_string_is_made_once_with_mode_0600_and_the_next_start_reuses_it(tmp_path):
    first, created = apiauth.load_or_create(tmp_path)
    assert created and _mode(tmp_path / apiauth.AUTH_FILE) == 0o600
    (tmp_path / apiauth.AUTH_FILE).chmod(0o644)
    again, created_again = apiauth.load_or_create(tmp_path)
    assert (again, created_again) == (first, False)
    assert _mode(tmp_path / apiauth.AUTH_FILE) == 0o600


def test_the_cli_sends_the_kept_string_only_to_a_server_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    assert apiauth.client_auth("http://127.0.0.1:4200/api", tmp_path) is None  # no string kept: none sent
    secret, _ = apiauth.load_or_create(tmp_path)
    assert apiauth.client_auth("http://127.0.0.1:4200/api", tmp_path) == secret
    assert apiauth.client_auth("http://localhost:4200/api", tmp_path) == secret
    assert apiauth.client_auth("http://prefect.example.org/api", tmp_path) is None
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_cloud")
    assert apiauth.client_auth("http://127.0.0.1:4200/api", tmp_path) is None
    monkeypatch.delenv("PREFECT_API_KEY")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "site:given")
    assert apiauth.client_auth("http://prefect.example.org/api", tmp_path) == "site:given"
    assert secret not in apiauth.refused_message("http://127.0.0.1:4200/api", tmp_path)


def test_a_new_sqlite_trial_database_and_its_folder_are_the_owners_only(tmp_path):
    db = tmp_path / "data" / "trial.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert _mode(db.parent) == 0o700
        for path in (db, db.with_name("trial.db-wal"), db.with_name("trial.db-shm")):
            assert _mode(path) == 0o600, path
    engine.dispose()
    db.chmod(0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert _mode(db) == 0o600


def test_a_folder_anyone_may_write_to_is_refused_as_the_data_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(UserError, match="writable by everyone"):
        apiauth.private_dir(shared)
    assert _mode(shared) == 0o1777
