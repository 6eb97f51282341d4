"""prefect.yaml: one deployment per flow, typed forms, schedules in the site timezone, and it deploys."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import get_client
from prefect.settings import PREFECT_API_URL

from tasks.runtime import protocol
from tests.flows.conftest import ALL_FLOWS

ROOT = Path(__file__).parents[2]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_flow_has_exactly_one_deployment_named_after_it():
    names = [d["name"] for d in SPEC["deployments"]]
    assert sorted(names) == sorted(f.name for f in ALL_FLOWS)
    for d in SPEC["deployments"]:
        assert _flow(d["entrypoint"]).name == d["name"]
        assert d["enforce_parameter_schema"] is True
        assert d["work_pool"]["name"] == "nktrial"


def test_every_schedule_runs_in_the_protocol_site_timezone():
    schedules = [s for d in SPEC["deployments"] for s in d.get("schedules", [])]
    assert schedules, "daily-rounds must be scheduled"
    assert all(s["timezone"] == protocol().timezone for s in schedules)
    rounds = next(d for d in SPEC["deployments"] if d["name"] == "daily-rounds")
    assert rounds["schedules"][0]["cron"] == "0 7 * * *"


def test_enrollment_is_serialized_by_deployment_concurrency():
    enroll = next(d for d in SPEC["deployments"] if d["name"] == "enroll-patient")
    assert enroll["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_prefect_yaml_deploys_to_a_real_server_with_typed_forms(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", "nktrial", "--type", "process"], env=env, cwd=ROOT, check=False, capture_output=True)
    out = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
        schema = dep.parameter_openapi_schema
        assert dep.enforce_parameter_schema and dep.work_pool_name == "nktrial"
        assert "ScreeningRecord" in schema["definitions"] and schema["definitions"]["ScreeningRecord"]["additionalProperties"] is False
        rounds = client.read_deployment_by_name("daily-rounds/daily-rounds")
        assert rounds.schedules[0].schedule.timezone == protocol().timezone
    assert not (ROOT / "prefect.yaml").read_text(encoding="utf-8").count("set_working_directory")  # no machine path was written back
