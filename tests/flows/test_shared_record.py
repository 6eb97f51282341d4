"""One system of record when scaled out: a flow run on a worker whose Prefect API is on another machine never writes
the clinical record to a SQLite file of its own, and report files go to a folder every node sees, never one worker's
disk. Real flow runs on the session's Prefect server."""

from __future__ import annotations

import socket
from pathlib import Path

from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.runtime import SplitRecordRefused, trial_engine
from tasks.settings import get_settings


@flow(name="touch-the-record")
def touch_the_record(api_url: str) -> str:
    with temporary_settings({PREFECT_API_URL: api_url}):  # what this worker's flow runs were started with
        return str(trial_engine().url)


def test_a_flow_run_with_a_remote_api_refuses_the_embedded_database(prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("NKTRIAL_DATABASE_URL", raising=False)  # a worker started without the trial's settings
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path / "data"))
    state = touch_the_record("http://10.20.30.40:4200/api", return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert "trial database is a SQLite file on this worker (NKTRIAL_DATABASE_URL unset or sqlite) and its Prefect API " \
           "(10.20.30.40) is on another machine" in message
    assert not (tmp_path / "data" / "trial.db").exists()  # nothing written beside the record
    try:
        state.result()
    except SplitRecordRefused:
        pass
    else:
        raise AssertionError("the run should have been refused")


def test_the_same_flow_on_this_machine_or_with_a_database_url_acts(prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("NKTRIAL_DATABASE_URL", raising=False)
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path / "data"))
    assert touch_the_record("http://127.0.0.1:4200/api").endswith("trial.db")  # nktrial up's own worker
    assert touch_the_record(f"http://{socket.gethostname()}:4200/api").endswith("trial.db")  # nktrial up --host <this machine>
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'named.db'}")  # a file of its own all the same
    assert touch_the_record("http://127.0.0.1:4200/api").endswith("named.db")
    assert touch_the_record("http://10.20.30.40:4200/api", return_state=True).is_failed()
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", "postgresql+psycopg://trial@db.example/trial")  # the shared one: told
    assert touch_the_record("http://10.20.30.40:4200/api").endswith("db.example/trial")


def test_report_files_go_where_every_node_sees_them(tmp_path, monkeypatch):
    monkeypatch.setenv("NKTRIAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NKTRIAL_REPORTS_DIR", raising=False)
    monkeypatch.delenv("NKTRIAL_DATABASE_URL", raising=False)
    assert get_settings().report_folder == (tmp_path / "data" / "reports").resolve()  # one node: beside its database
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'named.db'}")
    assert get_settings().report_folder == (tmp_path / "data" / "reports").resolve()  # a named SQLite file: still one node
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", "postgresql+psycopg://trial@db.example/trial")
    assert get_settings().report_folder is None  # a shared database and no shared folder: artifacts only
    monkeypatch.setenv("NKTRIAL_REPORTS_DIR", str(tmp_path / "shared"))
    assert get_settings().report_folder == Path(tmp_path / "shared").resolve()
